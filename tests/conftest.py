"""Shared pytest fixtures and the Hypothesis profile of the test suite."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

import strategies  # noqa: F401  (registers the Hypothesis profiles)
from masked_diffusion.data import BinaryImageDataset, load_dataset

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The tests use small tensors, for which a second intra-op thread costs more in
# synchronisation than it saves, and pytest-xdist already runs one worker per core.
torch.set_num_threads(int(os.environ.get("MASKED_DIFFUSION_TEST_THREADS", "1")))

# IDX headers: big-endian uint32 magic number (0x0000, type 0x08 = uint8, number of
# dimensions), then one big-endian uint32 per dimension.
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


@dataclass(frozen=True)
class RawSplits:
    """The uint8 arrays written as one torchvision raw dataset."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array of 1 or 3 dimensions as an uncompressed IDX file."""
    magic = IDX_LABELS_MAGIC if array.ndim == 1 else IDX_IMAGES_MAGIC
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.fixture
def write_torchvision_raw(tmp_path: Path) -> Callable[..., RawSplits]:
    """Return a writer of MNIST-format IDX files under ``tmp_path`` in torchvision's layout.

    ``write(folder, num_train=20, num_test=10, seed=0)`` writes the four raw files
    that ``torchvision.datasets.MNIST`` (``folder="MNIST"``) or ``FashionMNIST``
    (``folder="FashionMNIST"``) reads from ``<tmp_path>/<folder>/raw`` and returns
    the arrays, so ``load_dataset(name, root=tmp_path)`` finds them.
    """

    def write(folder: str, num_train: int = 20, num_test: int = 10, seed: int = 0) -> RawSplits:
        rng = np.random.default_rng(seed)
        splits = RawSplits(
            train_images=rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8),
            train_labels=rng.integers(0, 10, num_train, dtype=np.uint8),
            test_images=rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8),
            test_labels=rng.integers(0, 10, num_test, dtype=np.uint8),
        )
        raw = tmp_path / folder / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        write_idx(raw / "train-images-idx3-ubyte", splits.train_images)
        write_idx(raw / "train-labels-idx1-ubyte", splits.train_labels)
        write_idx(raw / "t10k-images-idx3-ubyte", splits.test_images)
        write_idx(raw / "t10k-labels-idx1-ubyte", splits.test_labels)
        return splits

    return write


@pytest.fixture(scope="session")
def mnist_sample_heldout() -> BinaryImageDataset:
    """The 500 held-out images of the bundled MNIST sample, fully observed.

    Shared by the whole session: tests must not modify its tensors in place.
    """
    return load_dataset("mnist-sample", "heldout")
