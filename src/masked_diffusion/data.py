"""Binarized image datasets, fixed observation masks and tensor batch loading.

Shapes and dtypes used throughout this module:

- ``images`` / ``x0``: ``torch.long``, ``(N, C, H, W)``, values in ``{0, ..., K-1}``
  where ``K = num_classes`` (2 for binarized images).
- ``obs_mask``: ``torch.bool``, ``(N, C, H, W)``, ``True`` where the pixel was observed.
  A fraction ``p_missing`` of the pixels of every image is missing completely at random
  and stays missing in every epoch.
- ``labels``: ``torch.long``, ``(N,)`` class labels of the images (digits for MNIST), or
  ``None``. They are metadata for evaluation, and the diffusion model does not use them.

Datasets live in memory as tensors. :class:`TensorBatchLoader` cuts batches by tensor
indexing, with the shuffling and sharding of
:class:`torch.utils.data.DistributedSampler`, so the order of an epoch is a function of
``(seed, epoch, rank, world_size)`` alone and training can resume inside an epoch.

Example:
    >>> train = load_dataset("mnist-sample", "train", p_missing=0.25)
    >>> loader = TensorBatchLoader(train, batch_size=128, seed=0)
    >>> loader.set_epoch(0)
    >>> x0, obs_mask = next(iter(loader))
    >>> x0.shape, obs_mask.dtype
    (torch.Size([128, 1, 28, 28]), torch.bool)
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import io
import logging
import math
import os
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from masked_diffusion.config import DataConfig

__all__ = [
    "DATASET_NAMES",
    "SPLITS",
    "BinaryImageDataset",
    "DatasetNotFoundError",
    "TensorBatchLoader",
    "binarize",
    "load_dataset",
    "load_dataset_from_config",
    "make_obs_mask",
    "split_mask_seed",
]

logger = logging.getLogger(__name__)

DATASET_NAMES = ("mnist-sample", "mnist", "fashion-mnist")
SPLITS = ("train", "heldout")

# Images per class that the "heldout" split of "mnist-sample" takes: the last ones of
# each class in file order.
_SAMPLE_HELDOUT_PER_CLASS = 50
_SAMPLE_FILE = "mnist_5k.npz"

# torchvision class name (which is also the folder under ``root``) per dataset name.
_TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class DatasetNotFoundError(FileNotFoundError):
    """Raised when the files of a torchvision dataset are missing and cannot be downloaded."""


def _check_unit_interval(name: str, value: float, *, closed_right: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    upper_ok = value <= 1.0 if closed_right else value < 1.0
    if not (value >= 0.0 and upper_ok):
        interval = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"invalid {name}={value!r}: expected a value in {interval}")


def _check_seed(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not 0 <= value < 2**63:
        raise ValueError(f"invalid {name}={value!r}: expected an integer in [0, 2**63)")


def binarize(images: torch.Tensor | npt.NDArray[Any], threshold: float = 0.5) -> torch.Tensor:
    """Binarize grayscale images: a pixel is 1 when its intensity is above ``threshold``.

    Intensities are ``value / 255`` for ``uint8`` input and the values themselves for
    floating-point input. The comparison is strict, so at ``threshold=0.5`` the
    ``uint8`` value 127 maps to 0 and 128 maps to 1, and the float 0.5 maps to 0.

    Args:
        images: Images of any shape, a tensor or NumPy array of dtype ``uint8``
            (0-255) or floating point with values in ``[0, 1]``.
        threshold: Intensity threshold in ``[0, 1)``. Default: ``0.5``.

    Returns:
        ``torch.long`` tensor of the same shape with values in ``{0, 1}``, on the
        device of ``images``.

    Raises:
        TypeError: If ``images`` is not a tensor or array, or its dtype is neither
            ``uint8`` nor floating point.
        ValueError: If ``threshold`` is outside ``[0, 1)`` or floating-point
            intensities are outside ``[0, 1]`` or NaN.

    Example:
        >>> binarize(torch.tensor([0, 127, 128, 255], dtype=torch.uint8))
        tensor([0, 0, 1, 1])
    """
    _check_unit_interval("threshold", threshold)
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"images must be a torch.Tensor or numpy.ndarray, got {type(images).__name__}"
        )

    if images.dtype == torch.uint8:
        # value / 255 > threshold, computed in float64 so that no value rounds across
        # the threshold.
        return (images.to(torch.float64) / 255.0 > threshold).long()
    if images.dtype in _FLOAT_DTYPES:
        if images.numel() > 0:
            low, high = images.min().item(), images.max().item()
            if math.isnan(low) or math.isnan(high) or low < 0.0 or high > 1.0:
                raise ValueError(
                    f"floating-point images must have intensities in [0, 1], got values in "
                    f"[{low}, {high}]; divide 0-255 intensities by 255 or pass uint8 images"
                )
        return (images > threshold).long()
    raise TypeError(
        f"images must have dtype uint8 (0-255) or a floating-point dtype (values in "
        f"[0, 1]), got {images.dtype}; convert with .to(torch.uint8) or .float() / 255"
    )


def make_obs_mask(
    num_images: int, image_shape: Sequence[int], p_missing: float, seed: int
) -> torch.Tensor:
    """Draw the fixed observation masks of a dataset, missing completely at random.

    Every pixel of every image is missing independently with probability
    ``p_missing``. All masks are drawn at once from a private CPU
    :class:`torch.Generator` seeded with ``seed``, so the same arguments always give
    the same masks: that is how masks stay fixed across epochs, DataLoader workers
    and resumed runs. The global RNG is not touched.

    Args:
        num_images: Number of images ``N`` (non-negative).
        image_shape: Shape of one image, e.g. ``(1, 28, 28)``.
        p_missing: Probability that a pixel is missing, in ``[0, 1)``. ``0`` gives an
            all-``True`` mask.
        seed: Generator seed in ``[0, 2**63)``.

    Returns:
        ``torch.bool`` tensor of shape ``(N, *image_shape)`` on the CPU, ``True`` where
        the pixel is observed.

    Raises:
        TypeError: If ``seed`` is not an int or ``p_missing`` not a number.
        ValueError: If ``num_images`` is negative, ``image_shape`` has a non-positive
            entry, ``p_missing`` is outside ``[0, 1)`` or ``seed`` is out of range.

    Example:
        >>> obs_mask = make_obs_mask(2, (1, 28, 28), p_missing=0.5, seed=0)
        >>> obs_mask.shape, obs_mask.dtype
        (torch.Size([2, 1, 28, 28]), torch.bool)
    """
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)):
        raise TypeError(f"num_images must be an int, got {type(num_images).__name__}")
    if num_images < 0:
        raise ValueError(f"invalid num_images={num_images}: expected a non-negative integer")
    shape = tuple(int(size) for size in image_shape)
    if not shape or any(size <= 0 for size in shape):
        raise ValueError(
            f"invalid image_shape={tuple(image_shape)!r}: expected positive sizes, e.g. (1, 28, 28)"
        )
    _check_unit_interval("p_missing", p_missing)
    _check_seed("seed", seed)

    if p_missing == 0.0:
        return torch.ones((int(num_images), *shape), dtype=torch.bool)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    uniform = torch.rand((int(num_images), *shape), generator=generator)
    # uniform is in [0, 1), so a pixel is missing with probability exactly p_missing.
    return uniform >= p_missing


def split_mask_seed(mask_seed: int, split: str) -> int:
    """Derive the observation-mask seed of one split from the user's ``mask_seed``.

    The seed is the first 8 bytes of
    ``sha256(f"masked-diffusion/obs-mask/{split}/{mask_seed}")``, big-endian, shifted
    right by one bit to fit ``[0, 2**63)``. Train and held-out masks therefore come
    from unrelated streams, and the value does not depend on the NumPy or PyTorch
    version.

    Args:
        mask_seed: Any integer.
        split: ``"train"`` or ``"heldout"``.

    Returns:
        Seed in ``[0, 2**63)`` for :func:`make_obs_mask`.

    Raises:
        ValueError: If ``split`` is not one of :data:`SPLITS`.
    """
    _check_split(split)
    digest = hashlib.sha256(f"masked-diffusion/obs-mask/{split}/{int(mask_seed)}".encode())
    return int.from_bytes(digest.digest()[:8], "big") >> 1


def _check_split(split: str) -> None:
    if split not in SPLITS:
        close = difflib.get_close_matches(str(split), SPLITS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"invalid split={split!r}: expected one of {list(SPLITS)}{hint}")


def _as_tensor(name: str, value: torch.Tensor | npt.NDArray[Any]) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, torch.Tensor):
        return value
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


class BinaryImageDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """In-memory dataset of discrete images with fixed per-image observation masks.

    Build one with :meth:`from_tensor` or :func:`load_dataset`. Item ``i`` is the
    pair ``(x0, obs_mask)`` of image ``i``, so a standard
    :class:`torch.utils.data.DataLoader` works; :class:`TensorBatchLoader` is the
    faster choice for training.

    Args:
        images: ``torch.long`` ``(N, C, H, W)``, values in ``{0, ..., num_classes-1}``.
        obs_mask: ``torch.bool`` ``(N, C, H, W)``, ``True`` where observed.
        labels: ``torch.long`` ``(N,)`` image labels, or ``None``. Default: ``None``.
        num_classes: Number of pixel values ``K`` (at least 2). Default: ``2``.
        name: Dataset name for logs and configs. Default: ``"custom"``.
        split: Split name, usually ``"train"`` or ``"heldout"``. Default: ``"train"``.

    Attributes:
        images: The images, as given.
        labels: The labels, or ``None``.
        obs_mask: The observation masks.
        num_classes: Number of pixel values ``K``; the MASK index is ``K``.
        name: Dataset name.
        split: Split name.

    Raises:
        TypeError: If a tensor has the wrong type or dtype.
        ValueError: If shapes disagree, the dataset is empty or pixel values are
            outside ``{0, ..., num_classes-1}``.

    Example:
        >>> images = torch.randint(0, 2, (8, 1, 28, 28))
        >>> dataset = BinaryImageDataset.from_tensor(images, p_missing=0.1)
        >>> x0, obs_mask = dataset[0]
        >>> x0.shape
        torch.Size([1, 28, 28])
    """

    def __init__(
        self,
        images: torch.Tensor,
        obs_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        num_classes: int = 2,
        name: str = "custom",
        split: str = "train",
    ) -> None:
        _validate_images(images, num_classes, check_values=False)
        if not isinstance(obs_mask, torch.Tensor) or obs_mask.dtype != torch.bool:
            found = obs_mask.dtype if isinstance(obs_mask, torch.Tensor) else type(obs_mask)
            raise TypeError(f"obs_mask must be a torch.bool tensor, got {found}")
        if obs_mask.shape != images.shape:
            raise ValueError(
                f"obs_mask has shape {tuple(obs_mask.shape)}, expected the images shape "
                f"{tuple(images.shape)}"
            )
        # Values at missing pixels are never used, so corrupted data may hold anything there.
        _validate_values(images[obs_mask.to(images.device)], num_classes)
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.dtype != torch.long:
                found = labels.dtype if isinstance(labels, torch.Tensor) else type(labels)
                raise TypeError(f"labels must be a torch.long tensor or None, got {found}")
            if labels.shape != (images.shape[0],):
                raise ValueError(
                    f"labels has shape {tuple(labels.shape)}, expected ({images.shape[0]},), "
                    "one label per image"
                )
        self.images = images
        self.obs_mask = obs_mask
        self.labels = labels
        self.num_classes = num_classes
        self.name = name
        self.split = split

    @classmethod
    def from_tensor(
        cls,
        images: torch.Tensor | npt.NDArray[Any],
        labels: torch.Tensor | npt.NDArray[Any] | None = None,
        *,
        p_missing: float = 0.0,
        mask_seed: int = 0,
        num_classes: int = 2,
        name: str = "custom",
        split: str = "train",
    ) -> BinaryImageDataset:
        """Build a dataset from discrete images, drawing its observation masks.

        Args:
            images: Integer or bool tensor or array, ``(N, C, H, W)`` or ``(N, H, W)``
                (a channel axis is added), values in ``{0, ..., num_classes-1}``.
                Binarize grayscale images with :func:`binarize` first.
            labels: Integer labels ``(N,)``, or ``None``. Default: ``None``.
            p_missing: Probability that a pixel is never observed, in ``[0, 1)``.
                Default: ``0.0``.
            mask_seed: Seed of :func:`make_obs_mask`, used as given. Default: ``0``.
            num_classes: Number of pixel values ``K``. Default: ``2``.
            name: Dataset name. Default: ``"custom"``.
            split: Split name. Default: ``"train"``.

        Returns:
            The dataset, sharing memory with ``images`` where no conversion was needed.

        Raises:
            TypeError: If ``images`` or ``labels`` has a non-integer dtype.
            ValueError: If a shape or value is invalid (see the class docstring).
        """
        images_tensor = _as_tensor("images", images)
        if images_tensor.dtype == torch.bool:
            images_tensor = images_tensor.long()
        if images_tensor.is_floating_point() or images_tensor.is_complex():
            raise TypeError(
                f"images must have an integer dtype with values in {{0, ..., num_classes-1}}, "
                f"got {images_tensor.dtype}; binarize grayscale images with "
                "masked_diffusion.data.binarize first"
            )
        if images_tensor.dim() == 3:
            images_tensor = images_tensor.unsqueeze(1)
        if images_tensor.dim() != 4:
            raise ValueError(
                f"images has shape {tuple(images_tensor.shape)}, expected (N, C, H, W) or (N, H, W)"
            )
        images_tensor = images_tensor.long()

        labels_tensor = None
        if labels is not None:
            labels_tensor = _as_tensor("labels", labels)
            if labels_tensor.is_floating_point() or labels_tensor.dtype == torch.bool:
                raise TypeError(f"labels must have an integer dtype, got {labels_tensor.dtype}")
            labels_tensor = labels_tensor.long()

        obs_mask = make_obs_mask(
            images_tensor.shape[0], images_tensor.shape[1:], p_missing, mask_seed
        ).to(images_tensor.device)
        return cls(
            images_tensor,
            obs_mask,
            labels_tensor,
            num_classes=num_classes,
            name=name,
            split=split,
        )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.obs_mask[index]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, "
            f"size={len(self)}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes}, p_observed={self.observed_fraction:.3f})"
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one image."""
        channels, height, width = self.images.shape[1:]
        return int(channels), int(height), int(width)

    @property
    def mask_index(self) -> int:
        """Index of the MASK state, equal to ``num_classes``."""
        return self.num_classes

    @property
    def observed_fraction(self) -> float:
        """Fraction of all pixels that are observed."""
        return float(self.obs_mask.float().mean().item())

    def corrupted_images(self) -> torch.Tensor:
        """Return the images as observed: missing pixels set to the MASK index ``K``.

        Returns:
            ``torch.long`` ``(N, C, H, W)`` with values in ``{0, ..., K}``.
        """
        return self.images.masked_fill(~self.obs_mask, self.mask_index)

    def subset(self, indices: torch.Tensor | Sequence[int]) -> BinaryImageDataset:
        """Return a dataset of the selected images, keeping their masks and labels.

        Args:
            indices: Image indices, a ``torch.long`` tensor or a sequence of ints.

        Returns:
            A new :class:`BinaryImageDataset` with the same name, split and
            ``num_classes``.
        """
        index = torch.as_tensor(indices, dtype=torch.long, device=self.images.device)
        labels = None if self.labels is None else self.labels[index.to(self.labels.device)]
        return BinaryImageDataset(
            self.images[index],
            self.obs_mask[index],
            labels,
            num_classes=self.num_classes,
            name=self.name,
            split=self.split,
        )


def _validate_images(images: torch.Tensor, num_classes: int, *, check_values: bool = True) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"invalid num_classes={num_classes!r}: expected an integer >= 2")
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.long:
        raise TypeError(f"images must have dtype torch.long, got {images.dtype}")
    if images.dim() != 4:
        raise ValueError(f"images has shape {tuple(images.shape)}, expected (N, C, H, W)")
    if images.shape[0] == 0 or images[0].numel() == 0:
        raise ValueError(
            f"images has shape {tuple(images.shape)}: expected at least one non-empty image"
        )
    if check_values:
        _validate_values(images, num_classes)


def _validate_values(values: torch.Tensor, num_classes: int) -> None:
    if values.numel() == 0:
        return
    low, high = int(values.min().item()), int(values.max().item())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"images has values in [{low}, {high}], expected values in "
            f"{{0, ..., {num_classes - 1}}} for num_classes={num_classes}; binarize "
            "grayscale images with masked_diffusion.data.binarize"
        )


@functools.lru_cache(maxsize=1)
def _read_sample_file() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    resource = resources.files("masked_diffusion").joinpath("data_files").joinpath(_SAMPLE_FILE)
    # Read the bytes first, so loading also works when the package sits in a zip file.
    with resource.open("rb") as handle:
        buffer = io.BytesIO(handle.read())
    with np.load(buffer) as archive:
        images = np.asarray(archive["images"], dtype=np.uint8)
        labels = np.asarray(archive["labels"], dtype=np.uint8)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _sample_split_indices(labels: npt.NDArray[np.uint8], split: str) -> npt.NDArray[np.int64]:
    """Select the file positions of one split of ``mnist-sample``, in file order.

    The held-out split is the last 50 images of each class in file order, and the
    training split is every other image. The rule uses no random numbers, so the
    split is the same on every machine and library version.
    """
    heldout_parts = []
    for digit in np.unique(labels):
        positions = np.flatnonzero(labels == digit)
        heldout_parts.append(positions[-_SAMPLE_HELDOUT_PER_CLASS:])
    heldout = np.sort(np.concatenate(heldout_parts))
    if split == "heldout":
        return heldout.astype(np.int64)
    is_train = np.ones(labels.shape[0], dtype=bool)
    is_train[heldout] = False
    return np.flatnonzero(is_train).astype(np.int64)


def _load_sample(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _read_sample_file()
    positions = _sample_split_indices(labels, split)
    return torch.from_numpy(images[positions]), torch.from_numpy(labels[positions].astype(np.int64))


def _missing_files_message(name: str, raw_folder: Path, download: bool) -> str:
    missing = [file for file in _RAW_FILES if not (raw_folder / file).is_file()]
    files = ", ".join(missing) if missing else ", ".join(_RAW_FILES)
    action = (
        "the download failed; check the network connection or copy the files there by hand"
        if download
        else "pass download=True (data.download=true) when online"
    )
    return (
        f"dataset {name!r} not found: torchvision expects the uncompressed files {files} "
        f"in {raw_folder}; {action}, or use the bundled dataset 'mnist-sample', which "
        "needs no download"
    )


def _load_torchvision(
    name: str, split: str, root: str | os.PathLike[str], download: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision import datasets  # imported here: torchvision is slow to import

    class_name = _TORCHVISION_CLASSES[name]
    dataset_class = getattr(datasets, class_name)
    raw_folder = Path(root) / class_name / "raw"
    try:
        dataset = dataset_class(root=str(root), train=split == "train", download=download)
    except (RuntimeError, OSError) as error:
        raise DatasetNotFoundError(_missing_files_message(name, raw_folder, download)) from error
    # ``data`` is already a uint8 tensor (N, 28, 28), so no per-image PIL conversion runs.
    return dataset.data, dataset.targets.long()


def load_dataset(
    name: str,
    split: str = "train",
    *,
    root: str | os.PathLike[str] = "data",
    download: bool = False,
    threshold: float = 0.5,
    p_missing: float = 0.0,
    mask_seed: int = 0,
) -> BinaryImageDataset:
    """Load a binarized image dataset with fixed observation masks.

    Datasets:

    - ``"mnist-sample"``: 5,000 MNIST digits shipped with the package (500 per
      class), so it needs no download. ``"heldout"`` is the last 50 images of each
      class in file order (500 images), ``"train"`` the other 4,500 (450 per class).
    - ``"mnist"`` and ``"fashion-mnist"``: the full sets through
      ``torchvision.datasets.MNIST`` / ``FashionMNIST``. ``"train"`` is the 60,000
      training images and ``"heldout"`` the 10,000 test images. The files must be in
      ``<root>/MNIST/raw`` (or ``<root>/FashionMNIST/raw``) unless ``download=True``.

    Observation masks come from :func:`make_obs_mask` seeded with
    ``split_mask_seed(mask_seed, split)``, so train and held-out masks differ and
    each split's masks are the same on every call.

    Args:
        name: One of :data:`DATASET_NAMES`.
        split: ``"train"`` or ``"heldout"``. Default: ``"train"``.
        root: Folder of the torchvision datasets; unused for ``"mnist-sample"``.
            Default: ``"data"``.
        download: Let torchvision download missing files into ``root``.
            Default: ``False``.
        threshold: Binarization threshold on intensities, in ``[0, 1)``; see
            :func:`binarize`. Default: ``0.5``.
        p_missing: Probability that a pixel is never observed, in ``[0, 1)``.
            Default: ``0.0``.
        mask_seed: Seed of the observation masks. Default: ``0``.

    Returns:
        :class:`BinaryImageDataset` with images ``(N, 1, 28, 28)`` in ``{0, 1}``,
        digit or clothing labels ``(N,)`` and ``num_classes=2``.

    Raises:
        ValueError: If ``name``, ``split``, ``threshold`` or ``p_missing`` is invalid.
        DatasetNotFoundError: If the torchvision files are missing and were not or
            could not be downloaded.

    Example:
        >>> heldout = load_dataset("mnist-sample", "heldout")
        >>> len(heldout)
        500
    """
    if name not in DATASET_NAMES:
        close = difflib.get_close_matches(str(name), DATASET_NAMES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"invalid name={name!r}: expected one of {list(DATASET_NAMES)}{hint}")
    _check_split(split)
    _check_unit_interval("threshold", threshold)
    _check_unit_interval("p_missing", p_missing)

    if name == "mnist-sample":
        raw_images, labels = _load_sample(split)
    else:
        raw_images, labels = _load_torchvision(name, split, root, download)

    dataset = BinaryImageDataset.from_tensor(
        binarize(raw_images, threshold).unsqueeze(1),
        labels,
        p_missing=p_missing,
        mask_seed=split_mask_seed(mask_seed, split),
        num_classes=2,
        name=name,
        split=split,
    )
    logger.info(
        "loaded dataset %s split=%s: %d images of shape %s, p_missing=%g",
        name,
        split,
        len(dataset),
        dataset.image_shape,
        p_missing,
    )
    return dataset


def load_dataset_from_config(config: DataConfig, split: str = "train") -> BinaryImageDataset:
    """Load the dataset that a :class:`~masked_diffusion.config.DataConfig` describes.

    Args:
        config: Data settings (dataset, root, download, threshold, p_missing,
            mask_seed).
        split: ``"train"`` or ``"heldout"``. Default: ``"train"``.

    Returns:
        The :class:`BinaryImageDataset` of :func:`load_dataset`.

    Raises:
        ValueError, DatasetNotFoundError: As :func:`load_dataset`.

    Example:
        >>> from masked_diffusion import DataConfig
        >>> heldout = load_dataset_from_config(DataConfig(p_missing=0.25), "heldout")
        >>> len(heldout), heldout.obs_mask.dtype
        (500, torch.bool)
    """
    return load_dataset(
        config.dataset,
        split,
        root=config.root,
        download=config.download,
        threshold=config.threshold,
        p_missing=config.p_missing,
        mask_seed=config.mask_seed,
    )


class TensorBatchLoader:
    """Iterate over ``(x0, obs_mask)`` batches of a dataset by tensor indexing.

    The sample order follows :class:`torch.utils.data.DistributedSampler`. With
    ``shuffle=True`` the permutation is ``torch.randperm(N)`` from a generator seeded
    with ``seed + epoch``. The index list is then padded by repeating its start until
    its length divides by ``world_size``, and rank ``r`` takes every
    ``world_size``-th index starting at ``r``. The order of an epoch therefore depends
    only on ``(seed, epoch, rank, world_size)``, and :meth:`iter_from` resumes inside
    an epoch. The epoch does not advance by itself, so call :meth:`set_epoch` before
    each epoch, as with ``DistributedSampler``.

    Args:
        dataset: The dataset to load from.
        batch_size: Images per batch on this rank (positive).
        shuffle: Shuffle every epoch; otherwise use file order. Default: ``True``.
        drop_last: Drop the last batch of a rank when it is smaller than
            ``batch_size``. Default: ``False``.
        seed: Shuffling seed, the same on every rank. Default: ``0``.
        rank: Index of this process, in ``[0, world_size)``. Default: ``0``.
        world_size: Number of processes sharing the dataset. Default: ``1``.
        device: Device that the images and masks are copied to once, at
            construction; ``None`` keeps them where they are. Default: ``None``.

    Raises:
        ValueError: If ``batch_size``, ``rank``, ``world_size`` or ``seed`` is invalid.

    Example:
        >>> dataset = load_dataset("mnist-sample", "heldout")
        >>> loader = TensorBatchLoader(dataset, batch_size=64, seed=0)
        >>> for epoch in range(2):
        ...     loader.set_epoch(epoch)
        ...     for x0, obs_mask in loader:
        ...         pass

    Note:
        With ``world_size > 1`` the padding repeats up to ``world_size - 1`` images,
        as ``DistributedSampler`` does, so evaluation over all ranks counts those
        images twice.
    """

    def __init__(
        self,
        dataset: BinaryImageDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"invalid batch_size={batch_size!r}: expected a positive integer")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size <= 0:
            raise ValueError(f"invalid world_size={world_size!r}: expected a positive integer")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(
                f"invalid rank={rank!r}: expected an integer in [0, {world_size}) for "
                f"world_size={world_size}"
            )
        _check_seed("seed", seed)

        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.device = dataset.images.device if device is None else torch.device(device)
        self._images = dataset.images.to(self.device)
        self._obs_mask = dataset.obs_mask.to(self.device)

    @property
    def num_samples(self) -> int:
        """Images that this rank visits per epoch, padding included."""
        return math.ceil(len(self.dataset) / self.world_size)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch whose order the next iteration follows.

        Args:
            epoch: Non-negative epoch number.

        Raises:
            ValueError: If ``epoch`` is negative.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"invalid epoch={epoch!r}: expected a non-negative integer")
        self.epoch = epoch

    def epoch_indices(self) -> torch.Tensor:
        """Return this rank's dataset indices for the current epoch, in visiting order.

        Returns:
            ``torch.long`` ``(num_samples,)`` on the CPU.
        """
        size = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(size, generator=generator)
        else:
            indices = torch.arange(size)

        total_size = self.num_samples * self.world_size
        padding = total_size - size
        if padding > 0:
            # Same padding as DistributedSampler: repeat the start of the order.
            repeats = math.ceil(padding / size)
            indices = torch.cat([indices, indices.repeat(repeats)[:padding]])
        return indices[self.rank : total_size : self.world_size]

    def iter_from(self, batch_index: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate over the current epoch's batches from ``batch_index`` on.

        Args:
            batch_index: Number of batches of this epoch already consumed, in
                ``[0, len(self)]``.

        Yields:
            ``(x0, obs_mask)``: ``torch.long`` and ``torch.bool``, each
            ``(B, C, H, W)`` on :attr:`device`, with ``B <= batch_size``.

        Raises:
            ValueError: If ``batch_index`` is outside ``[0, len(self)]``.
        """
        num_batches = len(self)
        if isinstance(batch_index, bool) or not isinstance(batch_index, int):
            raise ValueError(f"invalid batch_index={batch_index!r}: expected an integer")
        if not 0 <= batch_index <= num_batches:
            raise ValueError(
                f"invalid batch_index={batch_index}: expected a value in [0, {num_batches}], "
                f"the number of batches per epoch"
            )
        return self._iter_batches(batch_index, num_batches)

    def _iter_batches(self, start: int, stop: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self.epoch_indices().to(self.device)
        for batch in range(start, stop):
            index = indices[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield self._images[index], self._obs_mask[index]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)
