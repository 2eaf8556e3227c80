"""Tests of binarization, observation masks, dataset loading and batch loading."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader, DistributedSampler

from masked_diffusion.config import DataConfig
from masked_diffusion.data import (
    BinaryImageDataset,
    DatasetNotFoundError,
    TensorBatchLoader,
    binarize,
    load_dataset,
    load_dataset_from_config,
    make_obs_mask,
    split_mask_seed,
)
from strategies import (
    LoaderSettings,
    float_images,
    image_shapes,
    loader_settings,
    p_missing_values,
    seeds,
    thresholds,
    uint8_images,
)

# ---------------------------------------------------------------------------
# binarize


def test_binarize_uint8_threshold() -> None:
    images = torch.tensor([0, 127, 128, 255], dtype=torch.uint8)
    assert binarize(images).tolist() == [0, 0, 1, 1]


def test_binarize_uint8_exact_threshold() -> None:
    # 51 / 255 == 0.2 exactly in float64, so the strict comparison decides.
    images = torch.tensor([50, 51, 52], dtype=torch.uint8)
    assert binarize(images, threshold=0.2).tolist() == [0, 0, 1]


def test_binarize_float_threshold() -> None:
    for dtype in (torch.float32, torch.float64):
        images = torch.tensor([0.0, 0.5, 0.5000001, 1.0], dtype=dtype)
        assert binarize(images).tolist() == [0, 0, 1, 1], dtype


def test_binarize_custom_threshold() -> None:
    images = torch.tensor([0.2, 0.3, 0.31], dtype=torch.float64)
    assert binarize(images, threshold=0.3).tolist() == [0, 0, 1]


def test_binarize_numpy_dtype_shape() -> None:
    images = np.full((3, 1, 28, 28), 200, dtype=np.uint8)
    result = binarize(images)
    assert isinstance(result, torch.Tensor)
    assert result.dtype == torch.long
    assert result.shape == (3, 1, 28, 28)
    assert bool((result == 1).all())


def test_binarize_rejects_int_dtype() -> None:
    with pytest.raises(TypeError, match=r"images must have dtype uint8.*got torch\.int32"):
        binarize(torch.zeros(2, dtype=torch.int32))


def test_binarize_rejects_list() -> None:
    with pytest.raises(
        TypeError, match=r"images must be a torch\.Tensor or numpy\.ndarray, got list"
    ):
        binarize([0, 1])  # type: ignore[arg-type]


def test_binarize_rejects_float_range() -> None:
    with pytest.raises(
        ValueError, match=r"intensities in \[0, 1\], got values in \[0\.0, 255\.0\]"
    ):
        binarize(torch.tensor([0.0, 255.0]))


def test_binarize_rejects_nan() -> None:
    with pytest.raises(ValueError, match=r"intensities in \[0, 1\].*nan"):
        binarize(torch.tensor([0.5, float("nan")]))


@pytest.mark.parametrize("threshold", [-0.1, 1.0, 2.0])
def test_binarize_rejects_threshold(threshold: float) -> None:
    with pytest.raises(ValueError, match=rf"invalid threshold={threshold}: expected .*\[0, 1\)"):
        binarize(torch.zeros(2), threshold)


@given(images=float_images(), low=thresholds(), high=thresholds())
def test_binarize_monotone_threshold(images: np.ndarray, low: float, high: float) -> None:
    low, high = min(low, high), max(low, high)
    assert bool((binarize(images, high) <= binarize(images, low)).all())


@given(images=uint8_images(), threshold=thresholds())
def test_binarize_monotone_intensity(images: np.ndarray, threshold: float) -> None:
    flat = np.sort(images.ravel())
    result = binarize(flat, threshold)
    assert bool((result[1:] >= result[:-1]).all())


@given(images=uint8_images())
def test_binarize_uint8_matches_128(images: np.ndarray) -> None:
    expected = torch.from_numpy((images >= 128).astype(np.int64))
    assert torch.equal(binarize(images), expected)


# ---------------------------------------------------------------------------
# make_obs_mask


def test_obs_mask_fraction() -> None:
    obs_mask = make_obs_mask(200, (1, 28, 28), p_missing=0.3, seed=0)
    missing_fraction = 1.0 - obs_mask.float().mean().item()
    # 156,800 pixels: the standard error of the fraction is about 0.0012.
    assert abs(missing_fraction - 0.3) < 0.01


def test_obs_mask_identical_calls() -> None:
    first = make_obs_mask(10, (1, 28, 28), p_missing=0.5, seed=7)
    second = make_obs_mask(10, (1, 28, 28), p_missing=0.5, seed=7)
    assert torch.equal(first, second)


def test_obs_mask_seed_changes_mask() -> None:
    first = make_obs_mask(10, (1, 28, 28), p_missing=0.5, seed=7)
    second = make_obs_mask(10, (1, 28, 28), p_missing=0.5, seed=8)
    assert not torch.equal(first, second)


def test_obs_mask_differs_across_images() -> None:
    obs_mask = make_obs_mask(10, (1, 28, 28), p_missing=0.5, seed=0)
    for i in range(1, 10):
        assert not torch.equal(obs_mask[0], obs_mask[i]), i


def test_obs_mask_zero_missing_all_observed() -> None:
    obs_mask = make_obs_mask(5, (1, 28, 28), p_missing=0.0, seed=3)
    assert obs_mask.dtype == torch.bool
    assert bool(obs_mask.all())


def test_obs_mask_keeps_global_rng() -> None:
    state = torch.random.get_rng_state()
    make_obs_mask(5, (1, 28, 28), p_missing=0.5, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("p_missing", [1.0, -0.1, 1.5])
def test_obs_mask_rejects_p_missing(p_missing: float) -> None:
    with pytest.raises(ValueError, match=rf"invalid p_missing={p_missing}: expected .*\[0, 1\)"):
        make_obs_mask(1, (1, 2, 2), p_missing, seed=0)


def test_obs_mask_rejects_negative_seed() -> None:
    with pytest.raises(ValueError, match=r"invalid seed=-1: expected an integer in \[0, 2\*\*63\)"):
        make_obs_mask(1, (1, 2, 2), 0.5, seed=-1)


def test_obs_mask_rejects_float_seed() -> None:
    with pytest.raises(TypeError, match=r"seed must be an int, got float 1\.5"):
        make_obs_mask(1, (1, 2, 2), 0.5, seed=1.5)  # type: ignore[arg-type]


def test_obs_mask_rejects_image_shape() -> None:
    with pytest.raises(ValueError, match=r"invalid image_shape=\(1, 0, 28\): expected positive"):
        make_obs_mask(1, (1, 0, 28), 0.5, seed=0)


def test_obs_mask_rejects_num_images() -> None:
    with pytest.raises(ValueError, match="invalid num_images=-2: expected a non-negative"):
        make_obs_mask(-2, (1, 2, 2), 0.5, seed=0)


@given(
    num_images=st.integers(0, 5),
    image_shape=image_shapes(),
    p_missing=p_missing_values(),
    seed=seeds(),
)
def test_obs_mask_shape_determinism(
    num_images: int, image_shape: tuple[int, ...], p_missing: float, seed: int
) -> None:
    obs_mask = make_obs_mask(num_images, image_shape, p_missing, seed)
    assert obs_mask.shape == (num_images, *image_shape)
    assert obs_mask.dtype == torch.bool
    assert torch.equal(obs_mask, make_obs_mask(num_images, image_shape, p_missing, seed))


# ---------------------------------------------------------------------------
# BinaryImageDataset


def test_dataset_from_tensor_items() -> None:
    images = torch.randint(0, 2, (6, 1, 5, 5), generator=torch.Generator().manual_seed(0))
    dataset = BinaryImageDataset.from_tensor(images, torch.arange(6), p_missing=0.5, mask_seed=1)
    x0, obs_mask = dataset[2]
    assert len(dataset) == 6
    assert torch.equal(x0, images[2])
    assert torch.equal(obs_mask, make_obs_mask(6, (1, 5, 5), 0.5, 1)[2])
    assert dataset.labels is not None
    assert dataset.labels.dtype == torch.long
    assert dataset.image_shape == (1, 5, 5)


def test_dataset_from_tensor_adds_channel() -> None:
    dataset = BinaryImageDataset.from_tensor(np.ones((4, 3, 3), dtype=np.uint8))
    assert dataset.images.shape == (4, 1, 3, 3)
    assert dataset.images.dtype == torch.long


def test_dataset_from_tensor_bool_images() -> None:
    dataset = BinaryImageDataset.from_tensor(torch.ones(2, 1, 3, 3, dtype=torch.bool))
    assert dataset.images.dtype == torch.long


def test_dataset_works_with_dataloader() -> None:
    dataset = BinaryImageDataset.from_tensor(torch.zeros(5, 1, 3, 3, dtype=torch.long))
    x0, obs_mask = next(iter(DataLoader(dataset, batch_size=4)))
    assert x0.shape == (4, 1, 3, 3)
    assert obs_mask.dtype == torch.bool


def test_dataset_corrupted_images() -> None:
    images = torch.ones(20, 1, 4, 4, dtype=torch.long)
    dataset = BinaryImageDataset.from_tensor(images, p_missing=0.5, mask_seed=0)
    corrupted = dataset.corrupted_images()
    assert bool((corrupted[~dataset.obs_mask] == 2).all())
    assert bool((corrupted[dataset.obs_mask] == 1).all())


def test_dataset_subset() -> None:
    images = torch.randint(0, 2, (6, 1, 3, 3), generator=torch.Generator().manual_seed(0))
    dataset = BinaryImageDataset.from_tensor(images, torch.arange(6), p_missing=0.5)
    part = dataset.subset([4, 1])
    assert torch.equal(part.images, images[[4, 1]])
    assert torch.equal(part.obs_mask, dataset.obs_mask[[4, 1]])
    assert part.labels is not None
    assert part.labels.tolist() == [4, 1]


def test_dataset_rejects_float_images() -> None:
    with pytest.raises(TypeError, match=r"integer dtype.*got torch\.float32; binarize"):
        BinaryImageDataset.from_tensor(torch.zeros(2, 1, 3, 3))


def test_dataset_rejects_values() -> None:
    images = torch.full((2, 1, 3, 3), 2, dtype=torch.long)
    with pytest.raises(
        ValueError, match=r"values in \[2, 2\], expected values in \{0, \.\.\., 1\}"
    ):
        BinaryImageDataset.from_tensor(images)


def test_dataset_rejects_shape() -> None:
    with pytest.raises(ValueError, match=r"images has shape \(2, 9\), expected \(N, C, H, W\)"):
        BinaryImageDataset.from_tensor(torch.zeros(2, 9, dtype=torch.long))


def test_dataset_rejects_empty() -> None:
    with pytest.raises(ValueError, match="expected at least one non-empty image"):
        BinaryImageDataset.from_tensor(torch.zeros(0, 1, 3, 3, dtype=torch.long))


def test_dataset_rejects_labels_shape() -> None:
    with pytest.raises(ValueError, match=r"labels has shape \(3,\), expected \(2,\)"):
        BinaryImageDataset.from_tensor(torch.zeros(2, 1, 3, 3, dtype=torch.long), torch.arange(3))


def test_dataset_rejects_float_labels() -> None:
    with pytest.raises(TypeError, match=r"labels must have an integer dtype, got torch\.float32"):
        BinaryImageDataset.from_tensor(torch.zeros(2, 1, 3, 3, dtype=torch.long), torch.zeros(2))


def test_dataset_rejects_num_classes() -> None:
    with pytest.raises(ValueError, match="invalid num_classes=1: expected an integer >= 2"):
        BinaryImageDataset.from_tensor(torch.zeros(2, 1, 3, 3, dtype=torch.long), num_classes=1)


def test_dataset_rejects_obs_mask_dtype() -> None:
    images = torch.zeros(2, 1, 3, 3, dtype=torch.long)
    with pytest.raises(TypeError, match=r"obs_mask must be a torch\.bool tensor, got torch\.int64"):
        BinaryImageDataset(images, torch.ones_like(images))


def test_dataset_rejects_obs_mask_shape() -> None:
    images = torch.zeros(2, 1, 3, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"obs_mask has shape \(1, 1, 3, 3\), expected"):
        BinaryImageDataset(images, torch.ones(1, 1, 3, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------
# load_dataset: mnist-sample


def read_sample_file() -> tuple[np.ndarray, np.ndarray]:
    path = resources.files("masked_diffusion").joinpath("data_files").joinpath("mnist_5k.npz")
    with resources.as_file(path) as file, np.load(file) as archive:
        return archive["images"], archive["labels"]


def test_sample_split_sizes() -> None:
    train = load_dataset("mnist-sample", "train")
    heldout = load_dataset("mnist-sample", "heldout")
    assert len(train) == 4500
    assert len(heldout) == 500
    assert train.labels is not None
    assert heldout.labels is not None
    assert train.labels.bincount().tolist() == [450] * 10
    assert heldout.labels.bincount().tolist() == [50] * 10


def test_sample_split_rule() -> None:
    file_images, file_labels = read_sample_file()
    heldout_positions = np.sort(
        np.concatenate([np.flatnonzero(file_labels == digit)[-50:] for digit in range(10)])
    )
    train_positions = np.setdiff1d(np.arange(5000), heldout_positions)
    assert np.intersect1d(train_positions, heldout_positions).size == 0

    train = load_dataset("mnist-sample", "train")
    heldout = load_dataset("mnist-sample", "heldout")
    assert torch.equal(train.images, binarize(file_images[train_positions]).unsqueeze(1))
    assert torch.equal(heldout.images, binarize(file_images[heldout_positions]).unsqueeze(1))
    assert heldout.labels is not None
    assert heldout.labels.tolist() == file_labels[heldout_positions].tolist()


def test_sample_split_golden() -> None:
    # Pins the split and the binarization: a change in either changes these numbers.
    heldout = load_dataset("mnist-sample", "heldout")
    assert heldout.labels is not None
    assert heldout.labels[:3].tolist() == [0, 0, 0]
    assert int(heldout.images.sum()) == 53_704


def test_sample_deterministic() -> None:
    first = load_dataset("mnist-sample", "heldout", p_missing=0.3, mask_seed=5)
    second = load_dataset("mnist-sample", "heldout", p_missing=0.3, mask_seed=5)
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.obs_mask, second.obs_mask)


def test_sample_shape_dtype(mnist_sample_heldout: BinaryImageDataset) -> None:
    assert mnist_sample_heldout.images.shape == (500, 1, 28, 28)
    assert mnist_sample_heldout.images.dtype == torch.long
    assert mnist_sample_heldout.obs_mask.dtype == torch.bool
    assert mnist_sample_heldout.num_classes == 2
    assert mnist_sample_heldout.name == "mnist-sample"
    assert mnist_sample_heldout.split == "heldout"
    assert bool(mnist_sample_heldout.obs_mask.all())


def test_sample_threshold_changes_images() -> None:
    low = load_dataset("mnist-sample", "heldout", threshold=0.1)
    high = load_dataset("mnist-sample", "heldout", threshold=0.9)
    assert int(low.images.sum()) > int(high.images.sum())


def test_sample_masks_use_split_seed() -> None:
    heldout = load_dataset("mnist-sample", "heldout", p_missing=0.5, mask_seed=3)
    expected = make_obs_mask(500, (1, 28, 28), 0.5, split_mask_seed(3, "heldout"))
    assert torch.equal(heldout.obs_mask, expected)


def test_sample_train_heldout_masks_differ() -> None:
    train = load_dataset("mnist-sample", "train", p_missing=0.5, mask_seed=0)
    heldout = load_dataset("mnist-sample", "heldout", p_missing=0.5, mask_seed=0)
    assert split_mask_seed(0, "train") != split_mask_seed(0, "heldout")
    assert not torch.equal(train.obs_mask[:500], heldout.obs_mask)


def test_sample_mask_seed_changes_masks() -> None:
    first = load_dataset("mnist-sample", "heldout", p_missing=0.5, mask_seed=0)
    second = load_dataset("mnist-sample", "heldout", p_missing=0.5, mask_seed=1)
    assert not torch.equal(first.obs_mask, second.obs_mask)


def test_split_mask_seed_golden() -> None:
    # Resumed runs rebuild their masks from mask_seed, so this derivation must not change.
    assert split_mask_seed(0, "train") == 5_215_398_181_291_949_088


def test_load_from_config() -> None:
    config = DataConfig(dataset="mnist-sample", p_missing=0.2, mask_seed=4)
    dataset = load_dataset_from_config(config, "heldout")
    expected = load_dataset("mnist-sample", "heldout", p_missing=0.2, mask_seed=4)
    assert torch.equal(dataset.obs_mask, expected.obs_mask)


def test_load_logs(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="masked_diffusion.data"):
        load_dataset("mnist-sample", "heldout")
    assert "loaded dataset mnist-sample split=heldout: 500 images" in caplog.text


def test_load_rejects_name() -> None:
    with pytest.raises(
        ValueError, match=r"invalid name='mnsit': expected one of .*did you mean 'mnist'"
    ):
        load_dataset("mnsit")


def test_load_rejects_split() -> None:
    with pytest.raises(ValueError, match=r"invalid split='held-out'.*did you mean 'heldout'"):
        load_dataset("mnist-sample", "held-out")


def test_load_rejects_p_missing() -> None:
    with pytest.raises(ValueError, match=r"invalid p_missing=1\.0: expected a value in \[0, 1\)"):
        load_dataset("mnist-sample", p_missing=1.0)


# ---------------------------------------------------------------------------
# load_dataset: torchvision datasets from IDX files


@pytest.mark.parametrize(
    ("name", "folder"), [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")]
)
def test_torchvision_idx_files(
    name: str, folder: str, write_torchvision_raw: Callable[..., Any], tmp_path: Path
) -> None:
    raw = write_torchvision_raw(folder, num_train=20, num_test=10)
    train = load_dataset(name, "train", root=tmp_path)
    heldout = load_dataset(name, "heldout", root=tmp_path, p_missing=0.25)

    assert train.images.shape == (20, 1, 28, 28)
    assert heldout.images.shape == (10, 1, 28, 28)
    assert torch.equal(train.images, binarize(raw.train_images).unsqueeze(1))
    assert torch.equal(heldout.images, binarize(raw.test_images).unsqueeze(1))
    assert train.labels is not None
    assert train.labels.tolist() == raw.train_labels.tolist()
    assert heldout.name == name
    assert not bool(heldout.obs_mask.all())


@pytest.mark.parametrize(
    ("name", "folder"), [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")]
)
def test_torchvision_missing_files(name: str, folder: str, tmp_path: Path) -> None:
    raw_folder = re.escape(str(tmp_path / folder / "raw"))
    pattern = rf"{raw_folder}; pass download=True .* use the bundled dataset 'mnist-sample'"
    with pytest.raises(DatasetNotFoundError, match=pattern):
        load_dataset(name, root=tmp_path)


def test_torchvision_missing_lists_files(
    write_torchvision_raw: Callable[..., Any], tmp_path: Path
) -> None:
    write_torchvision_raw("MNIST")
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"uncompressed files t10k-labels-idx1-ubyte in"):
        load_dataset("mnist", root=tmp_path)


# ---------------------------------------------------------------------------
# TensorBatchLoader


def index_dataset(num_images: int) -> BinaryImageDataset:
    """Dataset whose image i stores i in binary, so batches reveal their indices."""
    bits = (torch.arange(num_images).unsqueeze(1) >> torch.arange(16)) & 1
    return BinaryImageDataset.from_tensor(bits.reshape(num_images, 1, 4, 4), p_missing=0.3)


def decode(x0: torch.Tensor) -> list[int]:
    weights = 2 ** torch.arange(16)
    return (x0.reshape(x0.shape[0], 16) * weights).sum(dim=1).tolist()


def visited(loader: TensorBatchLoader, start: int = 0) -> list[int]:
    return [index for x0, _ in loader.iter_from(start) for index in decode(x0)]


def test_loader_covers_every_index() -> None:
    loader = TensorBatchLoader(index_dataset(37), batch_size=8, seed=1)
    loader.set_epoch(3)
    order = visited(loader)
    assert sorted(order) == list(range(37))
    assert order != list(range(37))


def test_loader_batches_match_dataset() -> None:
    dataset = index_dataset(37)
    loader = TensorBatchLoader(dataset, batch_size=8, seed=1)
    indices = loader.epoch_indices()
    x0, obs_mask = next(iter(loader))
    assert torch.equal(x0, dataset.images[indices[:8]])
    assert torch.equal(obs_mask, dataset.obs_mask[indices[:8]])


def test_loader_same_epoch_same_order() -> None:
    first = TensorBatchLoader(index_dataset(37), batch_size=8, seed=1)
    second = TensorBatchLoader(index_dataset(37), batch_size=8, seed=1)
    first.set_epoch(2)
    second.set_epoch(5)
    second.set_epoch(2)
    assert visited(first) == visited(second)


def test_loader_epochs_differ() -> None:
    loader = TensorBatchLoader(index_dataset(37), batch_size=8, seed=1)
    loader.set_epoch(0)
    epoch_0 = visited(loader)
    loader.set_epoch(1)
    assert visited(loader) != epoch_0


def test_loader_no_shuffle_order() -> None:
    loader = TensorBatchLoader(index_dataset(10), batch_size=4, shuffle=False)
    loader.set_epoch(4)
    assert visited(loader) == list(range(10))


def test_loader_length_and_last_batch() -> None:
    dataset = index_dataset(37)
    loader = TensorBatchLoader(dataset, batch_size=8)
    sizes = [x0.shape[0] for x0, _ in loader]
    assert len(loader) == 5
    assert sizes == [8, 8, 8, 8, 5]


def test_loader_drop_last() -> None:
    loader = TensorBatchLoader(index_dataset(37), batch_size=8, drop_last=True)
    sizes = [x0.shape[0] for x0, _ in loader]
    assert len(loader) == 4
    assert sizes == [8, 8, 8, 8]


def test_loader_ranks_disjoint() -> None:
    dataset = index_dataset(36)
    shards = []
    for rank in range(3):
        loader = TensorBatchLoader(dataset, batch_size=5, seed=2, rank=rank, world_size=3)
        loader.set_epoch(1)
        shards.append(set(visited(loader)))
    assert [len(shard) for shard in shards] == [12, 12, 12]
    assert shards[0].isdisjoint(shards[1])
    assert shards[0].isdisjoint(shards[2])
    assert shards[1].isdisjoint(shards[2])
    assert set().union(*shards) == set(range(36))


def test_loader_ranks_padded() -> None:
    dataset = index_dataset(37)
    orders = [visited(TensorBatchLoader(dataset, 5, rank=rank, world_size=3)) for rank in range(3)]
    assert [len(order) for order in orders] == [13, 13, 13]
    assert set(orders[0] + orders[1] + orders[2]) == set(range(37))


def test_loader_resume_mid_epoch() -> None:
    loader = TensorBatchLoader(index_dataset(37), batch_size=8, seed=4)
    loader.set_epoch(6)
    full = [decode(x0) for x0, _ in loader]
    resumed = TensorBatchLoader(index_dataset(37), batch_size=8, seed=4)
    resumed.set_epoch(6)
    assert [decode(x0) for x0, _ in resumed.iter_from(3)] == full[3:]
    assert list(resumed.iter_from(len(resumed))) == []


@given(settings=loader_settings())
def test_loader_matches_distributed_sampler(settings: LoaderSettings) -> None:
    dataset = index_dataset(settings.num_images)
    sampler = DistributedSampler(
        dataset,
        num_replicas=settings.world_size,
        rank=settings.rank,
        shuffle=settings.shuffle,
        seed=settings.seed,
    )
    sampler.set_epoch(settings.epoch)
    loader = TensorBatchLoader(
        dataset,
        settings.batch_size,
        shuffle=settings.shuffle,
        drop_last=settings.drop_last,
        seed=settings.seed,
        rank=settings.rank,
        world_size=settings.world_size,
    )
    loader.set_epoch(settings.epoch)
    expected = list(sampler)
    if settings.drop_last:
        expected = expected[: len(expected) // settings.batch_size * settings.batch_size]
    assert visited(loader) == expected
    assert len(list(loader)) == len(loader)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loader_device_cuda() -> None:
    loader = TensorBatchLoader(index_dataset(10), batch_size=4, device="cuda")
    x0, obs_mask = next(iter(loader))
    assert x0.device.type == "cuda"
    assert obs_mask.device.type == "cuda"


def test_loader_rejects_batch_size() -> None:
    with pytest.raises(ValueError, match="invalid batch_size=0: expected a positive integer"):
        TensorBatchLoader(index_dataset(4), batch_size=0)


def test_loader_rejects_rank() -> None:
    with pytest.raises(ValueError, match=r"invalid rank=2: expected an integer in \[0, 2\)"):
        TensorBatchLoader(index_dataset(4), batch_size=2, rank=2, world_size=2)


def test_loader_rejects_world_size() -> None:
    with pytest.raises(ValueError, match="invalid world_size=0: expected a positive integer"):
        TensorBatchLoader(index_dataset(4), batch_size=2, world_size=0)


def test_loader_rejects_epoch() -> None:
    loader = TensorBatchLoader(index_dataset(4), batch_size=2)
    with pytest.raises(ValueError, match="invalid epoch=-1: expected a non-negative integer"):
        loader.set_epoch(-1)


def test_loader_rejects_batch_index() -> None:
    loader = TensorBatchLoader(index_dataset(4), batch_size=2)
    with pytest.raises(ValueError, match=r"invalid batch_index=3: expected a value in \[0, 2\]"):
        loader.iter_from(3)
