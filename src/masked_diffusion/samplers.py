"""Reverse-process samplers: ancestral, first-hitting and confidence (MaskGIT-style).

Every sampler starts from a partially or fully masked state ``xt`` (``torch.long``,
``(batch, C, height, width)``, MASK = ``K``) at per-image times ``t_start`` and
decodes it to ``t = 0``. Only masked pixels are ever written, so a decoded pixel never
changes and the result contains no MASK. Categorical draws use the Gumbel-max trick in
float64: a category of probability 0 (logit ``-inf``) is never drawn, and float32
noise, which measurably lowers sample diversity, is avoided.

- ``ancestral``: from ``t`` to ``s < t`` each masked pixel is unmasked with probability
  ``(alpha_s - alpha_t) / (1 - alpha_t)``; the last step goes to ``s = 0`` and unmasks
  every remaining pixel.
- ``first_hitting``: exact simulation of the continuous-time reverse process. With
  ``n`` masked pixels at mask level ``1 - alpha_t``, the next unmasking happens at
  ``1 - alpha_s = (1 - alpha_t) u^(1/n)``, ``u ~ U(0, 1)``, and unmasks one uniformly
  chosen masked pixel. With ``pixels_per_event = k > 1`` it jumps to the ``k``-th
  next event and unmasks ``k`` pixels from one network evaluation (an approximation).
- ``confidence``: MaskGIT's schedule; each step draws every masked pixel and keeps the
  most confident draws, so that a cosine (or linear) share of pixels stays masked.

When the network ignores ``t``, its output for an image is cached and reused in later
steps until one of that image's pixels changes.

References:
    Zheng et al., "Masked Diffusion Models are Secretly Time-Agnostic Masked Models
    and Exploit Inaccurate Categorical Sampling", 2024 (first-hitting sampler, float64
    draws). Chang et al., "MaskGIT: Masked Generative Image Transformer", CVPR 2022.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import Tensor

from masked_diffusion._random import uniform
from masked_diffusion.schedule import MaskSchedule

__all__ = ["SAMPLERS", "SamplingResult", "run_sampler", "sample_categorical"]

SAMPLERS = ("ancestral", "first_hitting", "confidence")
CONFIDENCE_SCHEDULES = ("cosine", "linear")

# Maps (xt, t) to float logits of shape (batch, C, height, width, K).
LogitsFn = Callable[[Tensor, Tensor], Tensor]


@dataclasses.dataclass
class SamplingResult:
    """Output of a sampler run.

    Attributes:
        samples: Decoded images, ``torch.long``, ``(batch, C, height, width)`` in
            ``{0, ..., K-1}``.
        num_function_evals: Number of network forward calls.
        num_image_evals: Number of images passed through the network over all calls;
            below ``batch * num_function_evals`` when cached outputs were reused.
        trajectory: States after each step, on the CPU, first entry the start
            state; ``None`` unless requested.

    Example:
        >>> import torch
        >>> from masked_diffusion import MaskedDiffusionModel, MDMUNet, ModelConfig
        >>> net = MDMUNet(ModelConfig(base_channels=8, channel_mults=(1, 2), num_groups=4))
        >>> generator = torch.Generator().manual_seed(0)
        >>> result = MaskedDiffusionModel(net).sample(
        ...     2, steps=10, return_info=True, generator=generator
        ... )
        >>> result.samples.shape, result.num_function_evals
        (torch.Size([2, 1, 28, 28]), 10)
    """

    samples: Tensor
    num_function_evals: int
    num_image_evals: int
    trajectory: list[Tensor] | None = None


def sample_categorical(
    logits: Tensor, temperature: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Draw one category per row of ``logits`` (last dimension) in float64.

    Args:
        logits: Unnormalised log-probabilities ``(..., K)``; ``-inf`` marks a category
            of probability 0, which is never drawn.
        temperature: Divides the logits; ``0`` returns the most likely category.
            Default: ``1.0``.
        generator: Source of randomness. Default: the global generator.

    Returns:
        ``torch.long`` indices of shape ``logits.shape[:-1]``.

    Raises:
        ValueError: If ``temperature`` is negative.
    """
    if temperature < 0:
        raise ValueError(f"invalid temperature={temperature}: expected a number >= 0")
    logits = logits.to(torch.float64)
    if temperature == 0:
        return logits.argmax(dim=-1)
    return (logits / temperature + _gumbel(logits.shape, generator, logits.device)).argmax(dim=-1)


def _gumbel(
    shape: torch.Size | tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Standard Gumbel noise ``-log(-log u)`` in float64."""
    u = uniform(shape, generator, device)
    # u = 0 would give -inf, so clamp to the smallest normal float64.
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))


class _CachedDenoiser:
    """Calls the network, reusing per-image outputs when it ignores ``t``."""

    def __init__(self, logits_fn: LogitsFn, uses_time: bool, mask_index: int) -> None:
        self.logits_fn = logits_fn
        self.uses_time = uses_time
        self.mask_index = mask_index
        self.cache: Tensor | None = None
        self.cached_state: Tensor | None = None
        self.num_function_evals = 0
        self.num_image_evals = 0

    def __call__(self, xt: Tensor, t: Tensor) -> Tensor:
        if self.uses_time or self.cache is None or self.cached_state is None:
            logits = self.logits_fn(xt, t)
            self.num_function_evals += 1
            self.num_image_evals += xt.shape[0]
        else:
            changed = (xt != self.cached_state).flatten(1).any(dim=1)
            # NOTE: nonzero() synchronises with the device once per step; it is what
            # lets unchanged images skip the network.
            rows = changed.nonzero().squeeze(1)
            # Samplers read the logits only within a step, so updating in place is safe.
            logits = self.cache
            if rows.numel() > 0:
                logits[rows] = self.logits_fn(xt[rows], t[rows])
                self.num_function_evals += 1
                self.num_image_evals += int(rows.numel())
        if not self.uses_time:
            self.cache = logits
            # Samplers build each new state with torch.where and never write into xt.
            self.cached_state = xt
        return logits


def run_sampler(
    logits_fn: LogitsFn,
    schedule: MaskSchedule,
    xt: Tensor,
    t_start: Tensor,
    *,
    mask_index: int,
    sampler: str = "ancestral",
    steps: int = 100,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    uses_time: bool = True,
    return_trajectory: bool = False,
    pixels_per_event: int = 1,
    confidence_schedule: str = "cosine",
    confidence_noise: float = 4.5,
) -> SamplingResult:
    """Decode the masked pixels of ``xt`` from times ``t_start`` down to ``t = 0``.

    Args:
        logits_fn: Maps ``(xt, t)`` to float logits ``(batch, C, height, width, K)``.
        schedule: The masking schedule the network was trained with.
        xt: Start state, ``torch.long``, ``(batch, C, height, width)``, MASK =
            ``mask_index``. Not modified.
        t_start: Start time per image, ``(batch,)``; 1 for unconditional sampling.
        mask_index: The MASK value ``K``.
        sampler: ``"ancestral"``, ``"first_hitting"`` or ``"confidence"``.
        steps: Steps of the ancestral and confidence samplers (any positive number;
            ``first_hitting`` takes one step per event instead). Default: ``100``.
        temperature: Sampling temperature; ``0`` takes the most likely value.
        generator: Source of randomness. Default: the global generator.
        uses_time: Whether the network reads ``t``; if not, outputs are cached.
        return_trajectory: Record the state after every step.
        pixels_per_event: Pixels unmasked per first-hitting event. Default: ``1``
            (exact).
        confidence_schedule: ``"cosine"`` or ``"linear"`` share of pixels still
            masked after each confidence step. Default: ``"cosine"``.
        confidence_noise: Scale of the Gumbel noise added to the confidence scores,
            annealed linearly to 0 at the last step, as MaskGIT's choice temperature.
            Without it the most confident pixels of binarized digits are background,
            which is revealed first and leaves blank images. Default: ``4.5``.

    Returns:
        A :class:`SamplingResult`.

    Raises:
        ValueError: On an unknown sampler or confidence schedule, a non-positive
            ``steps`` or ``pixels_per_event``, or a negative ``confidence_noise``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"invalid sampler={sampler!r}: expected one of {list(SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"invalid steps={steps}: expected a positive integer")
    if pixels_per_event < 1:
        raise ValueError(f"invalid pixels_per_event={pixels_per_event}: expected an integer >= 1")
    if confidence_schedule not in CONFIDENCE_SCHEDULES:
        raise ValueError(
            f"invalid confidence_schedule={confidence_schedule!r}: "
            f"expected one of {list(CONFIDENCE_SCHEDULES)}"
        )
    if temperature < 0:
        raise ValueError(f"invalid temperature={temperature}: expected a number >= 0")
    if confidence_noise < 0:
        raise ValueError(f"invalid confidence_noise={confidence_noise}: expected a number >= 0")

    trajectory: list[Tensor] | None = [xt.cpu().clone()] if return_trajectory else None
    if xt.shape[0] == 0:
        # Nothing to decode; reshape(0, -1) in the samplers would fail on an empty batch.
        return SamplingResult(xt.clone(), 0, 0, trajectory)
    denoiser = _CachedDenoiser(logits_fn, uses_time, mask_index)
    t_start = t_start.to(device=xt.device, dtype=torch.float64)
    state = xt.clone()
    if sampler == "ancestral":
        state = _ancestral(
            denoiser, schedule, state, t_start, steps, temperature, generator, trajectory
        )
    elif sampler == "first_hitting":
        state = _first_hitting(
            denoiser, schedule, state, t_start, pixels_per_event, temperature, generator, trajectory
        )
    else:
        state = _confidence(
            denoiser,
            schedule,
            state,
            steps,
            temperature,
            generator,
            confidence_schedule,
            confidence_noise,
            trajectory,
        )
    return SamplingResult(state, denoiser.num_function_evals, denoiser.num_image_evals, trajectory)


def _ancestral(
    denoiser: _CachedDenoiser,
    schedule: MaskSchedule,
    xt: Tensor,
    t_start: Tensor,
    steps: int,
    temperature: float,
    generator: torch.Generator | None,
    trajectory: list[Tensor] | None,
) -> Tensor:
    mask_index = denoiser.mask_index
    expand = (-1,) + (1,) * (xt.dim() - 1)
    for step in range(steps):
        # Per-image grid t_start * (1 - k / steps), snapped for discrete schedules.
        t = schedule.snap_to_grid(t_start * (1.0 - step / steps))
        s = schedule.snap_to_grid(t_start * (1.0 - (step + 1) / steps))
        if step == steps - 1:
            s = torch.zeros_like(s)
        unmask_prob = schedule.unmask_prob(t, s).view(expand)

        logits = denoiser(xt, t.float())
        draws = sample_categorical(logits, temperature, generator)
        u = uniform(xt.shape, generator, xt.device)
        unmask = (xt == mask_index) & (u < unmask_prob)
        xt = torch.where(unmask, draws, xt)
        if trajectory is not None:
            trajectory.append(xt.cpu().clone())
    return xt


def _first_hitting(
    denoiser: _CachedDenoiser,
    schedule: MaskSchedule,
    xt: Tensor,
    t_start: Tensor,
    pixels_per_event: int,
    temperature: float,
    generator: torch.Generator | None,
    trajectory: list[Tensor] | None,
) -> Tensor:
    mask_index = denoiser.mask_index
    batch = xt.shape[0]
    flat_shape = (batch, -1)
    level = schedule.mask_prob(t_start)  # 1 - alpha_t per image, float64
    num_masked = (xt == mask_index).reshape(flat_shape).sum(dim=1)
    # One host sync up front fixes the number of events; the loop itself has none.
    num_events = int(torch.ceil(num_masked.max() / pixels_per_event).item()) if batch else 0
    offsets = torch.arange(pixels_per_event, device=xt.device)

    for _ in range(num_events):
        count = torch.clamp(num_masked, max=pixels_per_event)  # pixels this event, (B,)
        # The count-th next event among n masked pixels, each unmasking at a level
        # uniform below the current one: level * prod_i u_i^(1 / (n - i)), i < count.
        active = offsets[None, :] < count[:, None]
        exponents = torch.where(
            active, 1.0 / (num_masked[:, None] - offsets[None, :]).clamp_min(1), 0.0
        ).to(torch.float64)
        u = uniform((batch, pixels_per_event), generator, xt.device)
        level = level * torch.prod(u.pow(exponents), dim=1)
        s = schedule.time_from_mask_prob(level)

        logits = denoiser(xt, s.float())
        draws = sample_categorical(logits, temperature, generator)
        chosen = _choose_masked(xt == mask_index, count, generator)
        xt = torch.where(chosen, draws, xt)
        num_masked = num_masked - count
        if trajectory is not None:
            trajectory.append(xt.cpu().clone())
    return xt


def _choose_masked(masked: Tensor, count: Tensor, generator: torch.Generator | None) -> Tensor:
    """Pick ``count[b]`` masked positions of image ``b`` uniformly at random."""
    batch = masked.shape[0]
    keys = uniform(masked.shape, generator, masked.device).reshape(batch, -1)
    keys = torch.where(masked.reshape(batch, -1), keys, -1.0)
    ranks = _ranks_descending(keys)
    return (ranks < count[:, None]).reshape(masked.shape) & masked


def _ranks_descending(scores: Tensor) -> Tensor:
    """Rank of each entry within its row, 0 for the largest."""
    order = scores.argsort(dim=1, descending=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    ranks.scatter_(1, order, positions)
    return ranks


def _confidence(
    denoiser: _CachedDenoiser,
    schedule: MaskSchedule,
    xt: Tensor,
    steps: int,
    temperature: float,
    generator: torch.Generator | None,
    count_schedule: str,
    noise_scale: float,
    trajectory: list[Tensor] | None,
) -> Tensor:
    mask_index = denoiser.mask_index
    batch = xt.shape[0]
    num_pixels = xt[0].numel() if batch else 1
    masked = (xt == mask_index).reshape(batch, -1)
    start_count = masked.sum(dim=1).to(torch.float64)
    previous = start_count.long()

    for step in range(1, steps + 1):
        ratio = step / steps
        share = math.cos(0.5 * math.pi * ratio) if count_schedule == "cosine" else 1.0 - ratio
        remaining = torch.floor(start_count * share).long()
        # Reveal at least one pixel per step while any remain; none are left at the end.
        remaining = torch.minimum(remaining, (previous - 1).clamp_min(0))
        if step == steps:
            remaining = torch.zeros_like(remaining)
        reveal = previous - remaining

        masked = (xt == mask_index).reshape(batch, -1)
        t = schedule.time_from_mask_prob(masked.sum(dim=1).to(torch.float64) / num_pixels)
        logits = denoiser(xt, schedule.snap_to_grid(t).float())
        draws = sample_categorical(logits, temperature, generator)
        log_probs = torch.log_softmax(logits.to(torch.float64), dim=-1)
        confidence = log_probs.gather(-1, draws.unsqueeze(-1)).squeeze(-1).reshape(batch, -1)
        if noise_scale > 0 and step < steps:
            noise = _gumbel(confidence.shape, generator, confidence.device)
            confidence = confidence + noise_scale * (1.0 - ratio) * noise
        confidence = torch.where(masked, confidence, -math.inf)
        chosen = (_ranks_descending(confidence) < reveal[:, None]) & masked
        xt = torch.where(chosen.reshape(xt.shape), draws, xt)
        previous = remaining
        if trajectory is not None:
            trajectory.append(xt.cpu().clone())
    return xt
