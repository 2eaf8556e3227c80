"""Masking schedules ``alpha_t`` of the absorbing-state forward process.

``alpha_t`` is the probability that a pixel is still unmasked at time ``t`` in
``[0, 1]``. ``t = 0`` is the clean image and ``t = 1`` the fully masked one, with
``alpha_0 = 1`` and ``alpha_1 = 0`` exactly. Three families are provided:

- linear: ``alpha_t = 1 - t``
- cosine: ``alpha_t = cos(pi t / 2)``
- polynomial: ``alpha_t = 1 - t**w``

A discrete schedule with ``T = num_timesteps`` steps uses the same function on the grid
``t_i = i / T``. The continuous-time ELBO weight is ``w(t) = -alpha'_t / (1 - alpha_t)``
and the discrete-time weight of step ``i`` is ``(alpha_s - alpha_t) / (1 - alpha_t)``
with ``s = (i - 1) / T``. Every quantity is computed in closed form without the
cancellation of ``1 - alpha_t`` near ``t = 0``, so the weights are finite for all
``t > 0``.

References:
    Shi et al., "Simplified and Generalized Masked Diffusion for Discrete Data" (MD4),
    NeurIPS 2024. Sahoo et al., "Simple and Effective Masked Diffusion Language
    Models" (MDLM), NeurIPS 2024.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from masked_diffusion._random import stratified_uniform, uniform
from masked_diffusion.config import ScheduleConfig

__all__ = ["MaskSchedule"]


class MaskSchedule:
    """Masking schedule ``alpha_t``, vectorised over a batch of times.

    Args:
        kind: ``"linear"``, ``"cosine"`` or ``"polynomial"``. Default: ``"linear"``.
        num_timesteps: Steps ``T`` of a discrete schedule on the grid ``i / T``, or
            ``None`` for continuous time. Default: ``None``.
        exponent: Exponent ``w`` of the polynomial schedule ``1 - t**w``; ignored by
            the other kinds. Default: ``1.0``.

    Raises:
        ValueError: If ``kind`` is unknown, ``num_timesteps`` is not positive or
            ``exponent`` is not positive.

    Example:
        >>> import torch
        >>> from masked_diffusion import MaskSchedule
        >>> schedule = MaskSchedule("linear")
        >>> schedule.alpha(torch.tensor([0.0, 0.25, 1.0]))
        tensor([1.0000, 0.7500, 0.0000])
        >>> schedule.loss_weight(torch.tensor([0.5]))
        tensor([2.])
    """

    def __init__(
        self, kind: str = "linear", num_timesteps: int | None = None, exponent: float = 1.0
    ) -> None:
        # ScheduleConfig performs (and words) every check.
        config = ScheduleConfig(kind=kind, num_timesteps=num_timesteps, exponent=exponent)
        self.kind = config.kind
        self.num_timesteps = config.num_timesteps
        self.exponent = float(config.exponent)

    @classmethod
    def from_config(cls, config: ScheduleConfig) -> MaskSchedule:
        """Build the schedule that ``config`` describes."""
        return cls(config.kind, config.num_timesteps, config.exponent)

    @property
    def is_discrete(self) -> bool:
        """Whether the schedule has a finite number of steps."""
        return self.num_timesteps is not None

    def __repr__(self) -> str:
        extra = f", exponent={self.exponent}" if self.kind == "polynomial" else ""
        return f"MaskSchedule(kind={self.kind!r}, num_timesteps={self.num_timesteps}{extra})"

    # -- alpha_t and its derivative -----------------------------------------------------

    def alpha(self, t: Tensor) -> Tensor:
        """Compute ``alpha_t``, the probability that a pixel is still unmasked.

        Args:
            t: Times in ``[0, 1]``, any shape and floating dtype.

        Returns:
            ``alpha_t`` with the shape and dtype of ``t``; exactly 1 at ``t = 0`` and
            exactly 0 at ``t = 1``.
        """
        if self.kind == "linear":
            return 1.0 - t
        if self.kind == "cosine":
            # cos(pi/2) is 6e-17 in floating point, not 0.
            return torch.where(t >= 1.0, torch.zeros_like(t), torch.cos(0.5 * math.pi * t))
        return 1.0 - t.pow(self.exponent)

    def mask_prob(self, t: Tensor) -> Tensor:
        """Compute ``1 - alpha_t``, the probability that a pixel is masked at time ``t``.

        Computed without cancellation, so it stays accurate for tiny ``t``.
        """
        if self.kind == "linear":
            return t.clone()
        if self.kind == "cosine":
            # 1 - cos(x) = 2 sin^2(x / 2)
            return torch.where(
                t >= 1.0, torch.ones_like(t), 2.0 * torch.sin(0.25 * math.pi * t).square()
            )
        return t.pow(self.exponent)

    def alpha_derivative(self, t: Tensor) -> Tensor:
        """Compute ``d alpha_t / dt`` (non-positive)."""
        if self.kind == "linear":
            return -torch.ones_like(t)
        if self.kind == "cosine":
            return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)
        return -self.exponent * t.pow(self.exponent - 1.0)

    def loss_weight(self, t: Tensor) -> Tensor:
        """Compute the continuous-time ELBO weight ``-alpha'_t / (1 - alpha_t)``.

        The weight diverges like ``1 / t`` at ``t = 0`` for every kind, so ``t = 0``
        must not be passed; every ``t > 0`` gives a finite value.

        Args:
            t: Times in ``(0, 1]``.

        Returns:
            The weight, shape and dtype of ``t``. Linear: ``1 / t``; polynomial:
            ``w / t``; cosine: ``(pi / 2) / tan(pi t / 4)``.
        """
        if self.kind == "linear":
            return 1.0 / t
        if self.kind == "cosine":
            # sin(x) / (1 - cos x) = cot(x / 2) with x = pi t / 2.
            return 0.5 * math.pi / torch.tan(0.25 * math.pi * t)
        return self.exponent / t

    def time_from_mask_prob(self, mask_prob: Tensor) -> Tensor:
        """Invert :meth:`mask_prob`: the time ``t`` at which ``1 - alpha_t = mask_prob``.

        Args:
            mask_prob: Values in ``[0, 1]``.

        Returns:
            Continuous times in ``[0, 1]`` (not snapped to a discrete grid).
        """
        m = mask_prob.clamp(0.0, 1.0)
        if self.kind == "linear":
            return m.clone()
        if self.kind == "cosine":
            # 1 - cos(pi t / 2) = m  <=>  t = (4 / pi) asin(sqrt(m / 2))
            return (4.0 / math.pi) * torch.asin(torch.sqrt(0.5 * m))
        return m.pow(1.0 / self.exponent)

    # -- discrete time --------------------------------------------------------------------

    def snap_to_grid(self, t: Tensor) -> Tensor:
        """Round ``t`` to the nearest grid time ``i / T`` (identity in continuous time)."""
        if self.num_timesteps is None:
            return t
        steps = self.num_timesteps
        return torch.round(t * steps) / steps

    def unmask_prob(self, t: Tensor, s: Tensor) -> Tensor:
        """Compute ``(alpha_s - alpha_t) / (1 - alpha_t)`` for ``s <= t``.

        This is the probability that a pixel masked at time ``t`` is unmasked at the
        earlier time ``s``: the reverse-step probability of ancestral sampling and the
        weight of a discrete-time ELBO step. It is exactly 1 when ``s = 0``, and 0 where
        ``1 - alpha_t = 0``.
        """
        numerator = self.mask_prob(t) - self.mask_prob(s)
        denominator = self.mask_prob(t)
        safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
        prob = torch.where(denominator > 0, numerator / safe, torch.zeros_like(numerator))
        return torch.where(s <= 0, torch.ones_like(prob), prob.clamp(0.0, 1.0))

    def step_probs(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """Compute ``alpha_{(i-1)/T} - alpha_{i/T}`` for ``i = 1..T``, summing to 1.

        Raises:
            ValueError: If the schedule is continuous.
        """
        if self.num_timesteps is None:
            raise ValueError(
                "step_probs() needs a discrete schedule, but num_timesteps is None; "
                "build the schedule with num_timesteps=T"
            )
        grid = torch.arange(self.num_timesteps + 1, dtype=dtype) / self.num_timesteps
        alphas = self.alpha(grid)
        return alphas[:-1] - alphas[1:]

    # -- drawing times --------------------------------------------------------------------

    def sample_times(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        stratified: bool = True,
    ) -> Tensor:
        """Draw training times ``t`` in ``(0, 1]``; ``t = 0`` is never drawn.

        With ``stratified=True`` the batch covers ``(0, 1]`` evenly: element ``b`` lies
        in the stratum ``(pi_b / B, (pi_b + 1) / B]`` for a random permutation ``pi``,
        so every element is still marginally uniform. A discrete schedule returns grid
        times ``i / T`` with ``i`` uniform on ``1..T``.

        Args:
            batch_size: Number of times ``B``.
            generator: Source of randomness. Default: the global generator.
            device: Device of the result. Default: CPU.
            dtype: Floating dtype of the result. Default: ``torch.float64``.
            stratified: Draw one time per stratum. Default: ``True``.

        Returns:
            Times, shape ``(batch_size,)``.
        """
        if stratified:
            u = stratified_uniform(batch_size, generator, device)
        else:
            u = uniform((batch_size,), generator, device)
        if self.num_timesteps is None:
            # u is in [0, 1), so 1 - u is in (0, 1].
            return (1.0 - u).to(dtype)
        steps = self.num_timesteps
        index = torch.clamp(torch.floor(u * steps).long() + 1, 1, steps)
        return (index.to(torch.float64) / steps).to(dtype)
