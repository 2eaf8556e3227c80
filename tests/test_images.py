"""Tests of PNG grids, loss curves and PNG reading in masked_diffusion.images."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from masked_diffusion.images import (
    MASK_COLOR,
    MISSING_COLOR,
    PAD_COLOR,
    load_image_png,
    load_mask_png,
    make_image_grid,
    save_comparison_grid,
    save_image_grid,
    save_loss_curve,
)


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_grid_size_default_nrow() -> None:
    grid = make_image_grid(torch.zeros(10, 1, 28, 28, dtype=torch.long), padding=2)
    # ceil(sqrt(10)) = 4 columns, 3 rows, each cell 28 pixels plus padding.
    assert grid.shape == (2 + 3 * 30, 2 + 4 * 30, 3)


def test_grid_size_explicit_nrow_and_scale() -> None:
    grid = make_image_grid(torch.zeros(6, 1, 5, 7, dtype=torch.long), nrow=3, padding=1, scale=2)
    assert grid.shape == (2 * (1 + 2 * 6), 2 * (1 + 3 * 8), 3)


def test_grid_colours_of_values_mask_and_missing() -> None:
    images = torch.tensor([[[[0, 1, 2, 1]]]])  # (1, 1, 1, 4): 0, 1, MASK, 1
    obs_mask = torch.tensor([[[[True, True, True, False]]]])
    grid = make_image_grid(images, obs_mask=obs_mask, padding=1)
    pixels = grid[1, 1:5]
    assert tuple(pixels[0]) == (0, 0, 0)
    assert tuple(pixels[1]) == (255, 255, 255)
    assert tuple(pixels[2]) == MASK_COLOR
    assert tuple(pixels[3]) == MISSING_COLOR
    assert tuple(grid[0, 0]) == PAD_COLOR


def test_grid_gray_levels_for_three_classes() -> None:
    grid = make_image_grid(torch.tensor([[[[0, 1, 2, 3]]]]), num_classes=3, padding=0)
    assert [int(v) for v in grid[0, :3, 0]] == [0, 128, 255]
    assert tuple(grid[0, 3]) == MASK_COLOR


def test_grid_distinct_special_colours() -> None:
    colours = {MASK_COLOR, MISSING_COLOR, PAD_COLOR, (0, 0, 0), (255, 255, 255)}
    assert len(colours) == 5


def test_save_grid_writes_png(tmp_path: Path) -> None:
    images = torch.randint(0, 3, (5, 1, 28, 28))
    path = save_image_grid(images, tmp_path / "nested" / "grid.png", nrow=5, scale=2)
    assert path == tmp_path / "nested" / "grid.png"
    written = read_rgb(path)
    assert written.shape == (2 * (2 + 30), 2 * (2 + 5 * 30), 3)
    assert np.array_equal(written, make_image_grid(images, nrow=5, scale=2))


def test_save_grid_leaves_no_temporary_file(tmp_path: Path) -> None:
    save_image_grid(torch.zeros(1, 1, 4, 4, dtype=torch.long), tmp_path / "g.png")
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]


def test_save_grid_replaces_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "g.png"
    path.write_bytes(b"old")
    save_image_grid(torch.ones(1, 1, 4, 4, dtype=torch.long), path, padding=0)
    assert load_image_png(path).sum().item() == 16


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        (torch.zeros(2, 1, 4, 4), TypeError, "dtype torch.float32"),
        (torch.zeros(2, 4, 4, dtype=torch.long), ValueError, "unsqueeze"),
        (torch.zeros(0, 1, 4, 4, dtype=torch.long), ValueError, "N >= 1"),
        (torch.full((1, 1, 2, 2), 3), ValueError, r"values in \[3, 3\]"),
        (torch.full((1, 1, 2, 2), -1), ValueError, r"expected 0\.\.1, or 2 for MASK"),
    ],
)
def test_grid_invalid_images(images: torch.Tensor, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        make_image_grid(images)


def test_grid_invalid_obs_mask_shape() -> None:
    images = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="obs_mask shape"):
        make_image_grid(images, obs_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool))


def test_grid_invalid_obs_mask_dtype() -> None:
    images = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    with pytest.raises(TypeError, match="bool tensor"):
        make_image_grid(images, obs_mask=torch.ones(2, 1, 4, 4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nrow": 0}, "nrow=0"),
        ({"scale": 0}, "scale=0"),
        ({"padding": -1}, "padding=-1"),
        ({"num_classes": 1}, "num_classes=1"),
    ],
)
def test_grid_invalid_options(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_image_grid(torch.zeros(1, 1, 4, 4, dtype=torch.long), **kwargs)  # type: ignore[arg-type]


def test_comparison_grid_rows(tmp_path: Path) -> None:
    clean = torch.zeros(3, 1, 4, 4, dtype=torch.long)
    corrupted = torch.ones(3, 1, 4, 4, dtype=torch.long)
    obs_mask = torch.ones(3, 1, 4, 4, dtype=torch.bool)
    obs_mask[:, :, 0, 0] = False
    path = save_comparison_grid(
        [clean, corrupted, clean[:1]], tmp_path / "cmp.png", obs_masks=[None, obs_mask, None]
    )
    grid = read_rgb(path)
    assert grid.shape == (2 + 3 * 6, 2 + 3 * 6, 3)
    assert tuple(grid[2, 2]) == (0, 0, 0)  # row 0: clean
    assert tuple(grid[8, 8]) == MISSING_COLOR  # row 1, column 1: missing pixel (0, 0)
    assert tuple(grid[9, 9]) == (255, 255, 255)  # row 1, column 1: observed pixel
    assert tuple(grid[14, 8]) == PAD_COLOR  # row 2 has a single image


def test_comparison_grid_labels_widen_image(tmp_path: Path) -> None:
    rows = [torch.zeros(2, 1, 4, 4, dtype=torch.long)] * 2
    plain = read_rgb(save_comparison_grid(rows, tmp_path / "plain.png"))
    labelled = read_rgb(
        save_comparison_grid(rows, tmp_path / "labelled.png", labels=["input", "completion"])
    )
    assert labelled.shape[0] == plain.shape[0]
    assert labelled.shape[1] > plain.shape[1]
    assert np.array_equal(labelled[:, -plain.shape[1] :], plain)


def test_comparison_grid_invalid_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one batch"):
        save_comparison_grid([], tmp_path / "x.png")
    rows = [torch.zeros(1, 1, 4, 4, dtype=torch.long), torch.zeros(1, 1, 5, 5, dtype=torch.long)]
    with pytest.raises(ValueError, match="image shapes differ"):
        save_comparison_grid(rows, tmp_path / "x.png")
    with pytest.raises(ValueError, match="2 entries for 1 rows"):
        save_comparison_grid(rows[:1], tmp_path / "x.png", labels=["a", "b"])
    with pytest.raises(ValueError, match="0 entries for 1 rows"):
        save_comparison_grid(rows[:1], tmp_path / "x.png", obs_masks=[])


def loss_records() -> list[dict[str, float]]:
    records: list[dict[str, float]] = [
        {"step": step, "epoch": step // 100, "train_loss": 0.7 * np.exp(-step / 300) + 0.1}
        for step in range(0, 1000, 10)
    ]
    records += [{"step": step, "val_nll": 150.0 - step / 20} for step in range(100, 1000, 100)]
    return records


def test_loss_curve_writes_two_panels(tmp_path: Path) -> None:
    path = save_loss_curve(loss_records(), tmp_path / "plots" / "loss.png", width=500)
    pixels = read_rgb(path)
    assert pixels.shape == (2 * 220, 500, 3)
    # Both panels hold drawn (non-white) pixels: axes, ticks, labels and the line.
    assert (pixels[:220] != 255).any(axis=2).mean() > 0.01
    assert (pixels[220:] != 255).any(axis=2).mean() > 0.01


def test_loss_curve_draws_series_colour(tmp_path: Path) -> None:
    path = save_loss_curve(loss_records(), tmp_path / "loss.png", keys=["train_loss"])
    pixels = read_rgb(path)
    line = (pixels == np.array([31, 119, 180], dtype=np.uint8)).all(axis=2)
    assert pixels.shape[0] == 220
    assert line.sum() > 300


def test_loss_curve_single_point(tmp_path: Path) -> None:
    path = save_loss_curve([{"step": 5, "val_nll": 3.0}], tmp_path / "one.png")
    assert read_rgb(path).shape == (220, 640, 3)


def test_loss_curve_skips_non_finite(tmp_path: Path) -> None:
    records = [{"step": 1, "train_loss": float("nan")}, {"step": 2, "train_loss": 1.0}]
    assert save_loss_curve(records, tmp_path / "loss.png").is_file()


def test_loss_curve_no_data(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no data to plot.*keys present: \['lr', 'step'\]"):
        save_loss_curve([{"step": 1, "lr": 0.1}], tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()


def test_loss_curve_too_small(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="width >= 200"):
        save_loss_curve(loss_records(), tmp_path / "loss.png", width=100)


@given(
    hnp.arrays(
        np.int64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=12), elements=st.integers(0, 1)
    )
)
def test_png_round_trip(bits: np.ndarray) -> None:
    images = torch.from_numpy(bits)[None, None]  # (1, 1, H, W)
    with tempfile.TemporaryDirectory() as folder:
        path = save_image_grid(images, Path(folder) / "one.png", padding=0)
        assert torch.equal(load_image_png(path), images[0])


def test_load_image_png_binarizes_gray(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    Image.fromarray(np.array([[0, 127, 128, 255]], dtype=np.uint8)).save(path)
    assert load_image_png(path).tolist() == [[[0, 0, 1, 1]]]


def test_load_mask_png_white_is_observed(tmp_path: Path) -> None:
    path = tmp_path / "mask.png"
    Image.fromarray(np.array([[255, 0], [200, 10]], dtype=np.uint8)).save(path)
    mask = load_mask_png(path)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[[True, False], [True, False]]]


def test_load_image_png_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="image file not found"):
        load_image_png(tmp_path / "absent.png")


def test_load_image_png_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "text.png"
    path.write_text("not a png")
    with pytest.raises(ValueError, match=r"cannot read .* as an image"):
        load_image_png(path)
