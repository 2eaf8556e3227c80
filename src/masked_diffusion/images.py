"""PNG input and output for discrete images: sample grids, comparison grids, loss curves.

Images follow the package notation: ``torch.long`` tensors of shape
``(batch, channels, height, width)`` with values in ``{0, ..., K-1}`` plus the MASK
state ``K`` (``K = num_classes``). In a picture, value ``v`` is the gray level
``round(255 * v / (K - 1))`` (0 black, ``K-1`` white), MASK pixels are drawn in
:data:`MASK_COLOR` and pixels that were never observed (``obs_mask`` False) in
:data:`MISSING_COLOR`, so corrupted inputs stay visible next to their completions.

All writers create missing parent folders and write atomically: the PNG goes to a
temporary file in the target folder, which then replaces ``path``, so a reader never
sees half a file. Only Pillow (a torchvision dependency) is used for drawing.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

__all__ = [
    "MASK_COLOR",
    "MISSING_COLOR",
    "PAD_COLOR",
    "load_image_png",
    "load_mask_png",
    "make_image_grid",
    "save_comparison_grid",
    "save_image_grid",
    "save_loss_curve",
]

logger = logging.getLogger(__name__)

MASK_COLOR: tuple[int, int, int] = (70, 110, 200)
"""RGB colour of MASK pixels (value ``num_classes``): a mid blue."""

MISSING_COLOR: tuple[int, int, int] = (220, 50, 47)
"""RGB colour of pixels whose ``obs_mask`` is False (never observed): red."""

PAD_COLOR: tuple[int, int, int] = (160, 160, 160)
"""RGB colour of the padding between grid cells: light gray."""

_SERIES_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
_DEFAULT_CURVE_PATTERNS = ("loss", "nll", "bits_per_dim", "bpd")


def make_image_grid(
    images: torch.Tensor,
    *,
    nrow: int | None = None,
    num_classes: int = 2,
    obs_mask: torch.Tensor | None = None,
    padding: int = 2,
    scale: int = 1,
) -> np.ndarray:
    """Render a batch of discrete images as one RGB grid.

    Args:
        images: ``(N, C, H, W)`` integer or bool tensor with values in
            ``{0, ..., num_classes}`` (``num_classes`` is MASK); ``C`` is 1 or 3.
        nrow: Images per grid row. Default: ``ceil(sqrt(N))``.
        num_classes: Number of pixel values ``K``. Default: ``2``.
        obs_mask: Optional bool tensor of the same shape as ``images``, True where a
            pixel was observed; False pixels are drawn in :data:`MISSING_COLOR`
            whatever their value. Default: ``None`` (all observed).
        padding: Pixels of :data:`PAD_COLOR` between and around the images.
            Default: ``2``.
        scale: Integer upscaling factor of the whole grid (nearest neighbour).
            Default: ``1``.

    Returns:
        ``uint8`` array of shape ``(height, width, 3)``.

    Raises:
        TypeError: If ``images`` is not an integer or bool tensor, or ``obs_mask``
            is not a bool tensor.
        ValueError: On a wrong shape, an out-of-range value or a non-positive
            ``nrow``, ``num_classes`` or ``scale``.

    Example:
        >>> import torch
        >>> make_image_grid(torch.zeros(4, 1, 28, 28, dtype=torch.long)).shape
        (62, 62, 3)
    """
    tiles = _render_tiles(images, num_classes=num_classes, obs_mask=obs_mask)
    count = tiles.shape[0]
    if nrow is None:
        nrow = math.ceil(math.sqrt(count))
    if nrow <= 0:
        raise ValueError(f"invalid nrow={nrow}: expected a positive integer or None")
    rows = [tiles[start : start + nrow] for start in range(0, count, nrow)]
    return _scale(_compose(rows, ncols=min(nrow, count), padding=padding), scale)


def save_image_grid(
    images: torch.Tensor,
    path: str | Path,
    *,
    nrow: int | None = None,
    num_classes: int = 2,
    obs_mask: torch.Tensor | None = None,
    padding: int = 2,
    scale: int = 1,
) -> Path:
    """Write a batch of discrete images as a PNG grid.

    Args:
        images: ``(N, C, H, W)`` integer tensor in ``{0, ..., num_classes}``; see
            :func:`make_image_grid`.
        path: Output file; parent folders are created.
        nrow: Images per grid row. Default: ``ceil(sqrt(N))``.
        num_classes: Number of pixel values ``K``. Default: ``2``.
        obs_mask: Optional bool tensor like ``images``, True where observed.
            Default: ``None``.
        padding: Pixels between and around the images. Default: ``2``.
        scale: Integer upscaling factor. Default: ``1``.

    Returns:
        The path written.

    Raises:
        TypeError, ValueError: See :func:`make_image_grid`.

    Example:
        >>> import torch, tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> save_image_grid(torch.ones(2, 1, 8, 8, dtype=torch.long), folder / "g.png").name
        'g.png'
    """
    grid = make_image_grid(
        images, nrow=nrow, num_classes=num_classes, obs_mask=obs_mask, padding=padding, scale=scale
    )
    return _write_png(Image.fromarray(grid), path)


def save_comparison_grid(
    rows: Sequence[torch.Tensor],
    path: str | Path,
    *,
    obs_masks: Sequence[torch.Tensor | None] | None = None,
    labels: Sequence[str] | None = None,
    num_classes: int = 2,
    padding: int = 2,
    scale: int = 1,
) -> Path:
    """Write several batches as the rows of one PNG, e.g. clean / corrupted / completions.

    Args:
        rows: One ``(n_i, C, H, W)`` integer tensor per grid row; all rows share
            ``C``, ``H`` and ``W`` and may hold different numbers of images.
        path: Output file; parent folders are created.
        obs_masks: One bool tensor (like that row) or ``None`` per row; False pixels
            are drawn in :data:`MISSING_COLOR`. Default: ``None`` (all observed).
        labels: One short text per row, written left of the row. Default: ``None``.
        num_classes: Number of pixel values ``K``. Default: ``2``.
        padding: Pixels between and around the images. Default: ``2``.
        scale: Integer upscaling factor. Default: ``1``.

    Returns:
        The path written.

    Raises:
        ValueError: If ``rows`` is empty, the rows differ in image shape, or
            ``obs_masks`` or ``labels`` do not have one entry per row.
        TypeError: See :func:`make_image_grid`.

    Example:
        >>> import torch, tempfile, pathlib
        >>> x0 = torch.zeros(3, 1, 8, 8, dtype=torch.long)
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "c.png"
        >>> save_comparison_grid([x0, x0 + 1], out, labels=["clean", "sample"]).name
        'c.png'
    """
    if len(rows) == 0:
        raise ValueError("invalid rows=[]: expected at least one batch of images")
    masks = list(obs_masks) if obs_masks is not None else [None] * len(rows)
    if len(masks) != len(rows):
        raise ValueError(
            f"invalid obs_masks: got {len(masks)} entries for {len(rows)} rows; "
            "pass one mask or None per row"
        )
    if labels is not None and len(labels) != len(rows):
        raise ValueError(
            f"invalid labels: got {len(labels)} entries for {len(rows)} rows; pass one per row"
        )

    tile_rows = [
        _render_tiles(row, num_classes=num_classes, obs_mask=mask)
        for row, mask in zip(rows, masks, strict=True)
    ]
    tile_shapes = {tiles.shape[1:] for tiles in tile_rows}
    if len(tile_shapes) != 1:
        shapes = [tuple(row.shape[1:]) for row in rows]
        raise ValueError(f"invalid rows: image shapes differ between rows: {shapes}")
    ncols = max(tiles.shape[0] for tiles in tile_rows)
    grid = _compose(tile_rows, ncols=ncols, padding=padding)
    image = Image.fromarray(_scale(grid, scale))
    if labels is not None:
        tile_height = tile_rows[0].shape[1] * scale
        image = _add_row_labels(
            image,
            labels,
            row_pitch=tile_height + padding * scale,
            top=padding * scale,
            tile_height=tile_height,
        )
    return _write_png(image, path)


def save_loss_curve(
    records: Iterable[Mapping[str, Any]],
    path: str | Path,
    *,
    keys: Sequence[str] | None = None,
    x_key: str = "step",
    width: int = 640,
    panel_height: int = 220,
) -> Path:
    """Plot training curves from ``metrics.jsonl``-style records as a PNG.

    Each series gets its own panel with its own y axis, because training losses
    (nats per pixel) and validation bounds (nats per image) differ by orders of
    magnitude. Records that lack ``x_key`` or a series' key, or hold a non-finite
    value, are skipped for that series.

    Args:
        records: Dictionaries such as ``{"step": 100, "train_loss": 0.31}``.
        path: Output file; parent folders are created.
        keys: Series to plot. Default: every numeric key whose name contains
            ``loss``, ``nll``, ``bits_per_dim`` or ``bpd``, in order of first appearance.
        x_key: Key of the horizontal axis. Default: ``"step"``.
        width: Image width in pixels. Default: ``640``.
        panel_height: Height of each panel in pixels. Default: ``220``.

    Returns:
        The path written.

    Raises:
        ValueError: If no series has a point to plot, or ``width`` or
            ``panel_height`` is too small to draw axes (below 200 or 120 pixels).

    Example:
        >>> import tempfile, pathlib
        >>> records = [{"step": s, "train_loss": 1.0 / s} for s in range(1, 50)]
        >>> save_loss_curve(records, pathlib.Path(tempfile.mkdtemp()) / "loss.png").suffix
        '.png'
    """
    if width < 200 or panel_height < 120:
        raise ValueError(
            f"invalid size width={width}, panel_height={panel_height}: "
            "expected width >= 200 and panel_height >= 120 pixels"
        )
    records = list(records)
    names = list(keys) if keys is not None else _default_curve_keys(records, x_key)
    series = {name: _collect_points(records, x_key, name) for name in names}
    series = {name: points for name, points in series.items() if points}
    if not series:
        present = sorted({key for record in records for key in record})
        raise ValueError(
            f"no data to plot: none of the keys {names} has a finite value next to "
            f"{x_key!r} in {len(records)} records (keys present: {present}); "
            "pass keys=[...] naming numeric fields"
        )

    image = Image.new("RGB", (width, panel_height * len(series)), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for index, (name, points) in enumerate(series.items()):
        box = (0, index * panel_height, width, (index + 1) * panel_height)
        color = _SERIES_COLORS[index % len(_SERIES_COLORS)]
        _draw_panel(draw, font, box, points, title=name, x_label=x_key, color=color)
    return _write_png(image, path)


def load_image_png(path: str | Path) -> torch.Tensor:
    """Read an image file as a binary image; gray levels above 127 become 1.

    Colour and alpha images are converted to 8-bit gray first (alpha ignored).

    Args:
        path: PNG (or any format Pillow reads).

    Returns:
        ``torch.long`` tensor of shape ``(1, H, W)`` with values in ``{0, 1}``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not a readable image.

    Example:
        >>> import torch, tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "one.png"
        >>> _ = save_image_grid(torch.ones(1, 1, 4, 4, dtype=torch.long), out, padding=0)
        >>> load_image_png(out).sum().item()
        16
    """
    gray = _read_gray(path)
    return torch.from_numpy((gray > 127).astype(np.int64)).unsqueeze(0)


def load_mask_png(path: str | Path) -> torch.Tensor:
    """Read an observation-mask image: white (gray level above 127) means observed.

    Args:
        path: PNG (or any format Pillow reads) of the same size as the image it masks.

    Returns:
        Bool tensor of shape ``(1, H, W)``, True where observed.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not a readable image.
    """
    gray = _read_gray(path)
    return torch.from_numpy(gray > 127).unsqueeze(0)


# --- rendering helpers -------------------------------------------------------------


def _render_tiles(
    images: torch.Tensor, *, num_classes: int, obs_mask: torch.Tensor | None
) -> np.ndarray:
    """Map ``(N, C, H, W)`` values to RGB tiles ``(N, H, W, 3)`` uint8."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"invalid images of type {type(images).__name__}: expected a torch.Tensor")
    if images.dtype.is_floating_point or images.dtype.is_complex:
        raise TypeError(
            f"invalid images dtype {images.dtype}: expected an integer tensor of class "
            "indices; binarize first, e.g. (x > 0.5).long()"
        )
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(
            f"invalid images shape {tuple(images.shape)}: expected (N, C, H, W) with N >= 1 "
            "and C in {1, 3}; add a channel axis with x.unsqueeze(1)"
        )
    if num_classes < 2:
        raise ValueError(f"invalid num_classes={num_classes}: expected an integer >= 2")
    values = images.detach().to("cpu", torch.long)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > num_classes:
        raise ValueError(
            f"invalid image values in [{low}, {high}]: expected 0..{num_classes - 1}, "
            f"or {num_classes} for MASK"
        )

    # Gray levels 0 .. 255 for the classes; MASK gets its own colour afterwards.
    levels = np.round(np.linspace(0, 255, num_classes)).astype(np.uint8)
    levels = np.append(levels, 0)
    array = values.numpy()
    rgb = levels[array]  # (N, C, H, W)
    rgb = np.repeat(rgb, 3, axis=1) if rgb.shape[1] == 1 else rgb
    tiles = np.ascontiguousarray(rgb.transpose(0, 2, 3, 1))  # (N, H, W, 3)
    tiles[(array == num_classes).any(axis=1)] = MASK_COLOR

    if obs_mask is not None:
        if not isinstance(obs_mask, torch.Tensor) or obs_mask.dtype != torch.bool:
            raise TypeError(f"invalid obs_mask: expected a bool tensor, got {_describe(obs_mask)}")
        if obs_mask.shape != images.shape:
            raise ValueError(
                f"invalid obs_mask shape {tuple(obs_mask.shape)}: expected the images' "
                f"shape {tuple(images.shape)}"
            )
        missing = ~obs_mask.detach().cpu().numpy().all(axis=1)
        tiles[missing] = MISSING_COLOR
    return tiles


def _compose(rows: Sequence[np.ndarray], *, ncols: int, padding: int) -> np.ndarray:
    """Place rows of ``(n, h, w, 3)`` tiles on a padded canvas, left-aligned."""
    if padding < 0:
        raise ValueError(f"invalid padding={padding}: expected an integer >= 0")
    height, width = rows[0].shape[1:3]
    canvas = np.empty(
        (padding + len(rows) * (height + padding), padding + ncols * (width + padding), 3),
        dtype=np.uint8,
    )
    canvas[:] = PAD_COLOR
    for row_index, tiles in enumerate(rows):
        top = padding + row_index * (height + padding)
        for col_index, tile in enumerate(tiles):
            left = padding + col_index * (width + padding)
            canvas[top : top + height, left : left + width] = tile
    return canvas


def _scale(grid: np.ndarray, scale: int) -> np.ndarray:
    if scale < 1:
        raise ValueError(f"invalid scale={scale}: expected a positive integer")
    if scale == 1:
        return grid
    return np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)


def _add_row_labels(
    image: Image.Image, labels: Sequence[str], *, row_pitch: int, top: int, tile_height: int
) -> Image.Image:
    """Prepend a white column with one text label per row, centred on the row."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(image)
    text_width = max(int(measure.textlength(label, font=font)) for label in labels)
    margin = text_width + 12
    labelled = Image.new("RGB", (image.width + margin, image.height), (255, 255, 255))
    labelled.paste(image, (margin, 0))
    draw = ImageDraw.Draw(labelled)
    for index, label in enumerate(labels):
        centre_y = top + index * row_pitch + tile_height // 2
        draw.text((6, centre_y), label, fill=(0, 0, 0), font=font, anchor="lm")
    return labelled


# --- loss-curve helpers ------------------------------------------------------------


def _default_curve_keys(records: Sequence[Mapping[str, Any]], x_key: str) -> list[str]:
    names: list[str] = []
    for record in records:
        for key, value in record.items():
            if key == x_key or key in names or not _is_number(value):
                continue
            if any(pattern in key for pattern in _DEFAULT_CURVE_PATTERNS):
                names.append(key)
    return names


def _collect_points(
    records: Sequence[Mapping[str, Any]], x_key: str, key: str
) -> list[tuple[float, float]]:
    points = []
    for record in records:
        x, y = record.get(x_key), record.get(key)
        if _is_number(x) and _is_number(y) and math.isfinite(x) and math.isfinite(y):
            points.append((float(x), float(y)))
    return sorted(points)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _nice_ticks(low: float, high: float, target: int = 5) -> list[float]:
    """Round tick positions (1, 2 or 5 times a power of ten) covering [low, high]."""
    if high <= low:
        high = low + (abs(low) if low else 1.0)
    raw_step = (high - low) / target
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step)
    first = math.floor(low / step) * step
    count = math.ceil((high - first) / step - 1e-9)
    return [first + i * step for i in range(count + 1)]


def _draw_panel(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    box: tuple[int, int, int, int],
    points: Sequence[tuple[float, float]],
    *,
    title: str,
    x_label: str,
    color: tuple[int, int, int],
) -> None:
    """Draw one series with its axes, numbered ticks and title inside ``box``."""
    left, top, right, bottom = box
    plot_left, plot_right = left + 70, right - 20
    plot_top, plot_bottom = top + 26, bottom - 40

    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    x_ticks = _nice_ticks(min(xs), max(xs))
    y_ticks = _nice_ticks(min(ys), max(ys))
    x_low, x_high = x_ticks[0], x_ticks[-1]
    y_low, y_high = y_ticks[0], y_ticks[-1]

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        px = plot_left + (x - x_low) / (x_high - x_low) * (plot_right - plot_left)
        py = plot_bottom - (y - y_low) / (y_high - y_low) * (plot_bottom - plot_top)
        return px, py

    draw.text(((left + right) / 2, top + 6), title, fill=(0, 0, 0), font=font, anchor="mt")
    grid_color, axis_color = (225, 225, 225), (0, 0, 0)
    for tick in y_ticks:
        _, py = to_pixel(x_low, tick)
        draw.line([(plot_left, py), (plot_right, py)], fill=grid_color)
        draw.text((plot_left - 6, py), f"{tick:.4g}", fill=axis_color, font=font, anchor="rm")
    for tick in x_ticks:
        px, _ = to_pixel(tick, y_low)
        draw.line([(px, plot_bottom), (px, plot_bottom + 4)], fill=axis_color)
        draw.text((px, plot_bottom + 6), f"{tick:.6g}", fill=axis_color, font=font, anchor="mt")
    draw.text(
        ((plot_left + plot_right) / 2, bottom - 4), x_label, fill=axis_color, font=font, anchor="mb"
    )
    draw.line(
        [(plot_left, plot_top), (plot_left, plot_bottom), (plot_right, plot_bottom)],
        fill=axis_color,
    )

    pixels = [to_pixel(x, y) for x, y in points]
    if len(pixels) == 1:
        (px, py), radius = pixels[0], 3
        draw.ellipse([px - radius, py - radius, px + radius, py + radius], fill=color)
    else:
        draw.line(pixels, fill=color, width=2)


# --- file helpers ------------------------------------------------------------------


def _write_png(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name in the same folder (so os.replace stays on one file system), opened
    # with plain open() so the file gets the usual umask permissions.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "xb") as stream:
            image.save(stream, format="PNG")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    logger.debug("wrote %s (%dx%d)", path, image.width, image.height)
    return path


def _read_gray(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L"))
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read {path} as an image: {error}") from error


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of dtype {value.dtype}"
    return f"a value of type {type(value).__name__}"
