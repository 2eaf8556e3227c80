"""MDMUNet: a U-Net that predicts clean pixels ``x0`` from a masked image ``xt``.

Input: ``xt``, ``torch.long``, ``(batch, C, height, width)`` in ``{0, ..., K-1, MASK}``
with ``MASK = K``, and times ``t``, ``(batch,)``. Each pixel is one-hot encoded over
the ``K + 1`` states; ``t`` enters through a sinusoidal embedding and an MLP that
conditions every residual block. Output: logits over the ``K`` clean values,
``(batch, K, height, width)`` for one image channel and ``(batch, K, C, height, width)``
otherwise. The network never predicts MASK.

Each entry of ``channel_mults`` is one resolution level. Every level after the first
halves the height and width with a stride-2 convolution. The decoder mirrors the
encoder with skip connections, so every downsampled size must be even.
"""

from __future__ import annotations

import logging
import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from masked_diffusion.config import ModelConfig

__all__ = ["MDMUNet", "sinusoidal_embedding"]

logger = logging.getLogger(__name__)


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Embed times ``t`` in ``[0, 1]`` with sines and cosines of geometric frequencies.

    Times are scaled by 1000 first, so the embedding of ``t`` and ``t + 1e-3`` differ
    at the highest frequency as integer diffusion steps would.

    Args:
        t: Times, shape ``(batch,)``.
        dim: Embedding size (even).
        max_period: Maximum period, in units of ``1000 t``. Default: ``10000``.

    Returns:
        Float32 tensor ``(batch, dim)``.
    """
    half = dim // 2
    exponents = torch.arange(half, device=t.device, dtype=torch.float32) / half
    freqs = torch.exp(-math.log(max_period) * exponents)
    args = 1000.0 * t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus a time shift, twice, with a residual path."""

    def __init__(
        self, in_channels: int, out_channels: int, time_dim: int, num_groups: int, dropout: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_channels) if time_dim > 0 else None
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = (
            nn.Conv2d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: Tensor, time_emb: Tensor | None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_proj is not None and time_emb is not None:
            h = h + self.time_proj(time_emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        out: Tensor = self.skip(x) + h
        return out


class MDMUNet(nn.Module):
    """U-Net denoiser ``f(xt, t) -> logits`` for masked diffusion on discrete images.

    Args:
        config: Network shape. Default: ``ModelConfig()``, about 1.2M parameters
            for 28x28 binary images.

    Raises:
        ValueError: If ``channel_mults`` downsamples the image to an odd size before
            the last level (the skip connections would not line up), or
            ``num_groups`` does not divide a channel count. The message lists values
            that work.

    Example:
        >>> import torch
        >>> from masked_diffusion import MDMUNet, ModelConfig
        >>> net = MDMUNet(ModelConfig(base_channels=8, channel_mults=(1, 2), num_groups=4))
        >>> xt = torch.full((2, 1, 28, 28), 2)  # fully masked binary images
        >>> net(xt, torch.ones(2)).shape
        torch.Size([2, 2, 28, 28])
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        config = config if config is not None else ModelConfig()
        _check_shape(config)
        self.config = config
        self.num_classes = config.num_classes
        self.mask_index = config.num_classes
        self.in_channels = config.in_channels
        self.time_conditioning = config.time_conditioning

        base = config.base_channels
        time_dim = 4 * base if config.time_conditioning else 0
        if config.time_conditioning:
            self.time_mlp: nn.Module | None = nn.Sequential(
                nn.Linear(base, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
            )
        else:
            self.time_mlp = None

        def block(cin: int, cout: int) -> _ResBlock:
            return _ResBlock(cin, cout, time_dim, config.num_groups, config.dropout)

        one_hot_channels = config.in_channels * (config.num_classes + 1)
        self.conv_in = nn.Conv2d(one_hot_channels, base, 3, padding=1)

        # Encoder: num_res_blocks blocks per level, a stride-2 conv between levels.
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        skip_channels = [base]
        channels = base
        for level, mult in enumerate(config.channel_mults):
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                blocks.append(block(channels, base * mult))
                channels = base * mult
                skip_channels.append(channels)
            self.down_blocks.append(blocks)
            if level < len(config.channel_mults) - 1:
                self.downsamples.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1))
                skip_channels.append(channels)

        self.mid_blocks = nn.ModuleList([block(channels, channels), block(channels, channels)])

        # Decoder: one more block per level than the encoder, each consuming a skip.
        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mults))):
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                blocks.append(block(channels + skip_channels.pop(), base * mult))
                channels = base * mult
            self.up_blocks.append(blocks)
            if level > 0:
                self.upsamples.append(nn.Conv2d(channels, channels, 3, padding=1))

        self.norm_out = nn.GroupNorm(config.num_groups, channels)
        self.conv_out = nn.Conv2d(channels, config.in_channels * config.num_classes, 3, padding=1)
        # Start from uniform predictions, the maximum-entropy guess.
        nn.init.zeros_(self.conv_out.weight)
        if self.conv_out.bias is not None:
            nn.init.zeros_(self.conv_out.bias)

    def forward(self, xt: Tensor, t: Tensor) -> Tensor:
        """Predict logits of the clean pixels.

        Args:
            xt: Masked images, ``torch.long``, ``(batch, C, height, width)``, values in
                ``{0, ..., K}`` where ``K`` is MASK.
            t: Times in ``[0, 1]``, ``(batch,)``; ignored when the network was built
                with ``time_conditioning=False``.

        Returns:
            Float logits ``(batch, K, height, width)`` for ``C = 1``, else
            ``(batch, K, C, height, width)``.
        """
        batch, channels, height, width = xt.shape
        one_hot = F.one_hot(xt, self.num_classes + 1)  # (B, C, H, W, K+1)
        h = one_hot.permute(0, 1, 4, 2, 3).reshape(batch, -1, height, width)
        # The permuted one-hot has channels-last strides. Give the convolutions the
        # layout of their weights instead, so that oneDNN and cuDNN do not reorder the
        # weights on every call: channels-last after
        # ``net.to(memory_format=torch.channels_last)``, else contiguous NCHW.
        h = h.to(self.conv_in.weight.dtype).contiguous(memory_format=self._memory_format())

        time_emb = None
        if self.time_mlp is not None:
            time_emb = self.time_mlp(sinusoidal_embedding(t, self.config.base_channels))

        h = self.conv_in(h)
        skips = [h]
        for level, blocks in enumerate(self.down_blocks):
            for res_block in cast(nn.ModuleList, blocks):
                h = res_block(h, time_emb)
                skips.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)
                skips.append(h)

        for res_block in self.mid_blocks:
            h = res_block(h, time_emb)

        for index, blocks in enumerate(self.up_blocks):
            for res_block in cast(nn.ModuleList, blocks):
                h = res_block(torch.cat([h, skips.pop()], dim=1), time_emb)
            if index < len(self.upsamples):
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
                h = self.upsamples[index](h)

        logits: Tensor = self.conv_out(F.silu(self.norm_out(h)))
        if channels == 1:
            return logits
        return logits.view(batch, self.num_classes, channels, height, width)

    def _memory_format(self) -> torch.memory_format:
        """Return ``torch.channels_last`` if the weights have that layout, else contiguous."""
        weight = self.conv_in.weight
        if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
            return torch.channels_last
        return torch.contiguous_format


def _check_shape(config: ModelConfig) -> None:
    """Reject level counts and group sizes that cannot work for ``config.image_size``."""
    height, width = config.image_size
    levels = len(config.channel_mults)
    max_levels = 1
    h, w = height, width
    while h % 2 == 0 and w % 2 == 0:
        max_levels += 1
        h, w = h // 2, w // 2
    if levels > max_levels:
        sizes = [f"{height >> k}x{width >> k}" for k in range(max_levels)]
        raise ValueError(
            f"invalid model.channel_mults={list(config.channel_mults)}: {levels} levels halve "
            f"{height}x{width} images {levels - 1} times, but the path "
            f"{' -> '.join(sizes)} reaches an odd size after {max_levels - 1} halvings, so the "
            f"skip connections would not line up; use at most {max_levels} levels, e.g. "
            f"channel_mults={list(config.channel_mults[:max_levels])}"
        )
    channel_counts = {config.base_channels * m for m in config.channel_mults}
    channel_counts.add(config.base_channels)
    bad = sorted(c for c in channel_counts if c % config.num_groups)
    if bad:
        divisors = [
            g for g in range(1, config.base_channels + 1) if all(c % g == 0 for c in channel_counts)
        ]
        raise ValueError(
            f"invalid model.num_groups={config.num_groups}: it must divide every channel "
            f"count, but {bad} are not multiples of it; use one of {divisors}"
        )
