"""Hypothesis strategies shared by the test suite, and the ``ci`` settings profile.

``conftest.py`` loads the profile named by the ``HYPOTHESIS_PROFILE`` environment
variable, ``ci`` by default. The profile has no deadline, because the first call of a
PyTorch operation can take far longer than later ones, and few examples, so the
property tests stay within the suite's time budget on two CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

__all__ = [
    "LoaderSettings",
    "float_images",
    "image_shapes",
    "loader_settings",
    "p_missing_values",
    "seeds",
    "thresholds",
    "uint8_images",
]

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=25,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", deadline=None, max_examples=500)


def image_shapes(max_channels: int = 2, max_side: int = 6) -> st.SearchStrategy[tuple[int, ...]]:
    """Image shapes ``(C, H, W)`` with small positive sizes."""
    return st.tuples(
        st.integers(1, max_channels), st.integers(1, max_side), st.integers(1, max_side)
    )


def uint8_images(max_images: int = 4, max_side: int = 6) -> st.SearchStrategy[np.ndarray]:
    """Grayscale ``uint8`` image arrays ``(N, 1, H, W)`` with intensities 0-255."""
    shapes = st.tuples(
        st.integers(1, max_images), st.just(1), st.integers(1, max_side), st.integers(1, max_side)
    )
    return shapes.flatmap(lambda shape: hnp.arrays(np.uint8, shape))


def float_images(max_images: int = 4, max_side: int = 6) -> st.SearchStrategy[np.ndarray]:
    """Grayscale ``float32`` image arrays ``(N, 1, H, W)`` with intensities in ``[0, 1]``."""
    shapes = st.tuples(
        st.integers(1, max_images), st.just(1), st.integers(1, max_side), st.integers(1, max_side)
    )
    elements = st.floats(0.0, 1.0, width=32)
    return shapes.flatmap(lambda shape: hnp.arrays(np.float32, shape, elements=elements))


def thresholds() -> st.SearchStrategy[float]:
    """Binarization thresholds in ``[0, 1)``."""
    return st.floats(0.0, 1.0, exclude_max=True)


def p_missing_values() -> st.SearchStrategy[float]:
    """Missing-pixel probabilities in ``[0, 1)``."""
    return st.floats(0.0, 1.0, exclude_max=True)


def seeds() -> st.SearchStrategy[int]:
    """Generator seeds in ``[0, 2**63)``."""
    return st.integers(0, 2**63 - 1)


@dataclass(frozen=True)
class LoaderSettings:
    """Arguments of one ``TensorBatchLoader`` and the size of its dataset."""

    num_images: int
    batch_size: int
    shuffle: bool
    drop_last: bool
    seed: int
    world_size: int
    rank: int
    epoch: int


@st.composite
def loader_settings(draw: st.DrawFn, max_images: int = 50) -> LoaderSettings:
    """Small datasets with batch sizes, sharding and epochs for ``TensorBatchLoader``."""
    world_size = draw(st.integers(1, 4))
    return LoaderSettings(
        num_images=draw(st.integers(1, max_images)),
        batch_size=draw(st.integers(1, 16)),
        shuffle=draw(st.booleans()),
        drop_last=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31)),
        world_size=world_size,
        rank=draw(st.integers(0, world_size - 1)),
        epoch=draw(st.integers(0, 1000)),
    )
