"""MaskedDiffusionModel: forward masking, training loss, likelihood bound, sampling.

Notation (one notation for the whole package):

- ``x0``: clean images, ``torch.long``, ``(batch, C, height, width)``, values in
  ``{0, ..., K-1}``; binarized MNIST has ``C = 1``, ``K = num_classes = 2``.
- MASK: the absorbing state, index ``K`` (``mask_index``).
- ``t`` in ``[0, 1]``: diffusion time; ``alpha_t`` is the probability that a pixel is
  still unmasked (see :class:`~masked_diffusion.MaskSchedule`).
- ``xt``: the masked image, ``q(xt_j | x0_j) = alpha_t [xt_j = x0_j] + (1 - alpha_t)
  [xt_j = MASK]``, independently per pixel.
- ``obs_mask``: ``torch.bool``, same shape as ``x0``, ``True`` where a pixel was
  observed. Missing pixels are MASK in the network input at every ``t`` and never
  enter a loss or a likelihood; the values stored there are ignored.

The network ``f(xt, t)`` returns logits over the ``K`` clean values. With the
carry-over ("SUBS") parameterization the prediction at an unmasked pixel is its
current value, so only masked pixels are scored and a sampler never changes a decoded
pixel.

References:
    Sahoo et al., "Simple and Effective Masked Diffusion Language Models" (MDLM),
    NeurIPS 2024. Shi et al., "Simplified and Generalized Masked Diffusion for Discrete
    Data" (MD4), NeurIPS 2024. Ou et al., "Your Absorbing Discrete Diffusion Secretly
    Models the Conditional Distributions of Clean Data", 2024.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from masked_diffusion._random import stratified_uniform, uniform
from masked_diffusion.config import (
    SAMPLER_NAMES,
    DiffusionConfig,
    ExperimentConfig,
)
from masked_diffusion.network import MDMUNet
from masked_diffusion.samplers import SamplingResult, run_sampler
from masked_diffusion.schedule import MaskSchedule

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["LikelihoodEstimate", "MaskedDiffusionModel"]

logger = logging.getLogger(__name__)

ESTIMATORS = ("count", "time")
TIME_KINDS = ("continuous", "discrete")


@dataclasses.dataclass
class LikelihoodEstimate:
    """Monte Carlo estimate of the bound on ``-log p(x)`` for each image.

    Attributes:
        nats: Bound per image in nats, float64, ``(batch,)``.
        bits_per_dim: ``nats / (D ln 2)`` with ``D`` the number of scored (observed)
            pixels of each image, float64, ``(batch,)``.
        stderr: Standard error of ``nats`` over the Monte Carlo draws, float64,
            ``(batch,)``; NaN when ``num_samples`` is 1.
        num_samples: Monte Carlo draws per image.
        num_dims: Scored pixels per image, ``(batch,)``.

    Example:
        >>> import torch
        >>> from masked_diffusion import MaskedDiffusionModel, MDMUNet, ModelConfig
        >>> net = MDMUNet(ModelConfig(base_channels=8, channel_mults=(1, 2), num_groups=4))
        >>> x0 = torch.zeros(2, 1, 28, 28, dtype=torch.long)
        >>> estimate = MaskedDiffusionModel(net).nll(x0)
        >>> estimate.nats.shape, estimate.bits_per_dim.dtype
        (torch.Size([2]), torch.float64)
        >>> round(float(estimate.bits_per_dim[0]), 6)  # an untrained MDMUNet predicts uniformly
        1.0
    """

    nats: Tensor
    bits_per_dim: Tensor
    stderr: Tensor
    num_samples: int
    num_dims: Tensor


class MaskedDiffusionModel(nn.Module):
    """A masked (absorbing-state) diffusion model around any denoising network.

    Args:
        network: Any ``nn.Module`` with ``forward(xt, t) -> logits``: ``xt``
            ``torch.long`` ``(batch, C, height, width)`` in ``{0..K}``, ``t`` float
            ``(batch,)``, logits ``(batch, K, height, width)`` (``C = 1``) or
            ``(batch, K, C, height, width)``.
        schedule: Masking schedule. Default: ``MaskSchedule("linear")``.
        num_classes: Pixel values ``K``; MASK is index ``K``. Default: ``2``.
        image_shape: ``(C, height, width)``. Default: ``(1, 28, 28)``.
        loss_weighting: ``"mlm"`` (mean cross-entropy over masked pixels) or
            ``"elbo"`` (per-image bound in nats). Default: ``"mlm"``.
        sampler: Default sampler of :meth:`sample` and :meth:`impute`. Default:
            ``"ancestral"``.
        sampling_steps: Default number of sampler steps. Default: ``100``.
        temperature: Default sampling temperature. Default: ``1.0``.
        network_uses_time: Whether ``network`` reads ``t``; if ``False``, samplers
            reuse its outputs across steps in which an image did not change. Default:
            the network's ``time_conditioning`` attribute, else ``True``.

    Raises:
        TypeError: If ``network`` is not an ``nn.Module`` or ``schedule`` not a
            :class:`MaskSchedule`.
        ValueError: On an invalid option value.

    Example:
        >>> import torch
        >>> from masked_diffusion import MaskedDiffusionModel, MaskSchedule, MDMUNet, ModelConfig
        >>> net = MDMUNet(ModelConfig(base_channels=8, channel_mults=(1, 2), num_groups=4))
        >>> model = MaskedDiffusionModel(net, MaskSchedule("linear"))
        >>> x0 = torch.randint(0, 2, (4, 1, 28, 28))
        >>> model.compute_loss(x0).shape
        torch.Size([])
        >>> model.sample(2, steps=10, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([2, 1, 28, 28])
    """

    def __init__(
        self,
        network: nn.Module,
        schedule: MaskSchedule | None = None,
        *,
        num_classes: int = 2,
        image_shape: Sequence[int] = (1, 28, 28),
        loss_weighting: str = "mlm",
        sampler: str = "ancestral",
        sampling_steps: int = 100,
        temperature: float = 1.0,
        network_uses_time: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise TypeError(
                f"network must be a torch.nn.Module with forward(xt, t) -> logits, "
                f"got {type(network).__name__}"
            )
        schedule = schedule if schedule is not None else MaskSchedule()
        if not isinstance(schedule, MaskSchedule):
            raise TypeError(f"schedule must be a MaskSchedule, got {type(schedule).__name__}")
        if num_classes < 2:
            raise ValueError(f"invalid num_classes={num_classes}: expected an integer >= 2")
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(
                f"invalid image_shape={image_shape}: expected (channels, height, width), "
                f"e.g. (1, 28, 28)"
            )
        # DiffusionConfig checks and words the remaining options.
        DiffusionConfig(
            loss_weighting=loss_weighting,
            sampler=sampler,
            sampling_steps=sampling_steps,
            temperature=temperature,
        )
        self.network = network
        self.schedule = schedule
        self.num_classes = num_classes
        self.mask_index = num_classes
        self.image_shape: tuple[int, ...] = image_shape
        self.loss_weighting = loss_weighting
        self.sampler = sampler
        self.sampling_steps = sampling_steps
        self.temperature = temperature
        if network_uses_time is None:
            network_uses_time = bool(getattr(network, "time_conditioning", True))
        self.network_uses_time = network_uses_time
        self.config: ExperimentConfig | None = None

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> MaskedDiffusionModel:
        """Build an :class:`MDMUNet`, its schedule and the model from ``config``.

        The model keeps ``config`` as ``model.config``, which checkpoints and
        :meth:`save_pretrained` store.
        """
        network = MDMUNet(config.model)
        model = cls(
            network,
            MaskSchedule.from_config(config.schedule),
            num_classes=config.model.num_classes,
            image_shape=(config.model.in_channels, *config.model.image_size),
            loss_weighting=config.diffusion.loss_weighting,
            sampler=config.diffusion.sampler,
            sampling_steps=config.diffusion.sampling_steps,
            temperature=config.diffusion.temperature,
        )
        model.config = config
        return model

    @property
    def num_pixels(self) -> int:
        """Pixels per image, ``C * height * width``."""
        channels, height, width = self.image_shape
        return channels * height * width

    @property
    def device(self) -> torch.device:
        """Device of the first parameter or buffer (CPU for a network without any)."""
        for parameter in self.parameters():
            return parameter.device
        for buffer in self.buffers():
            return buffer.device
        return torch.device("cpu")

    # -- input checks ---------------------------------------------------------------------

    def check_inputs(self, x0: Tensor, obs_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Validate ``x0`` and ``obs_mask`` and return them as ``long`` and ``bool``.

        Values at missing pixels (``obs_mask`` False) are not checked and are replaced
        by 0 in the returned ``x0``, so they cannot reach any computation.

        Raises:
            TypeError: If ``x0`` is not an integer tensor or ``obs_mask`` not a bool tensor.
            ValueError: If a shape differs from ``(batch, *image_shape)`` or an observed
                value lies outside ``{0, ..., K-1}``.
        """
        expected = f"(batch, {', '.join(str(s) for s in self.image_shape)})"
        if not isinstance(x0, Tensor):
            raise TypeError(
                f"x0 must be a torch.Tensor of shape {expected}, got {type(x0).__name__}"
            )
        if x0.is_floating_point() or x0.is_complex() or x0.dtype == torch.bool:
            raise TypeError(
                f"x0 must have an integer dtype (torch.long) with values in "
                f"{{0, ..., {self.num_classes - 1}}}, got dtype {x0.dtype}; binarize images "
                f"first, e.g. masked_diffusion.binarize(images)"
            )
        if x0.dim() != 4 or tuple(x0.shape[1:]) != self.image_shape:
            raise ValueError(f"x0 must have shape {expected}, got {tuple(x0.shape)}")
        if obs_mask is None:
            obs_mask = torch.ones_like(x0, dtype=torch.bool)
        else:
            if not isinstance(obs_mask, Tensor) or obs_mask.dtype != torch.bool:
                got = obs_mask.dtype if isinstance(obs_mask, Tensor) else type(obs_mask).__name__
                raise TypeError(
                    f"obs_mask must be a torch.bool tensor (True where observed), got {got}"
                )
            if obs_mask.shape != x0.shape:
                raise ValueError(
                    f"obs_mask must have the shape of x0 {tuple(x0.shape)}, "
                    f"got {tuple(obs_mask.shape)}"
                )
            obs_mask = obs_mask.to(x0.device)
        x0 = x0.long()
        invalid = obs_mask & ((x0 < 0) | (x0 >= self.num_classes))
        if bool(invalid.any()):
            observed = x0[obs_mask]
            raise ValueError(
                f"x0 must contain values in {{0, ..., {self.num_classes - 1}}} "
                f"(num_classes={self.num_classes}) at observed pixels, got values in "
                f"[{int(observed.min())}, {int(observed.max())}]; binarize images first, "
                f"e.g. masked_diffusion.binarize(images)"
            )
        return torch.where(obs_mask, x0, 0), obs_mask

    # -- forward process ------------------------------------------------------------------

    def add_mask(
        self,
        x0: Tensor,
        t: Tensor,
        obs_mask: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Draw ``xt ~ q(xt | x0)``: mask each pixel independently with prob. ``1 - alpha_t``.

        Args:
            x0: Clean images, ``torch.long``, ``(batch, C, height, width)``.
            t: Times in ``[0, 1]``, ``(batch,)``.
            obs_mask: ``torch.bool`` like ``x0``; missing pixels are always MASK.
            generator: Source of randomness. Default: the global generator.

        Returns:
            ``(xt, masked)``: ``xt`` with MASK at masked and missing pixels, and the
            bool tensor of observed pixels that the forward process masked.
        """
        mask_prob = self.schedule.mask_prob(t.to(torch.float64)).view(-1, 1, 1, 1)
        u = uniform(x0.shape, generator, x0.device)
        masked = u < mask_prob
        if obs_mask is not None:
            masked = masked & obs_mask
            hidden = masked | ~obs_mask
        else:
            hidden = masked
        xt = torch.where(hidden, torch.full_like(x0, self.mask_index), x0)
        return xt, masked

    def logits(self, xt: Tensor, t: Tensor) -> Tensor:
        """Run the network and return float32 logits ``(batch, C, height, width, K)``.

        Raises:
            ValueError: If the network returns logits of an unexpected shape.
        """
        raw: Tensor = self.network(xt, t.to(torch.float32))
        batch = xt.shape[0]
        channels, height, width = self.image_shape
        if (
            raw.dim() == 4
            and channels == 1
            and raw.shape == (batch, self.num_classes, height, width)
        ):
            raw = raw.unsqueeze(2)
        if raw.shape != (batch, self.num_classes, channels, height, width):
            one_channel = f"({batch}, {self.num_classes}, {height}, {width})"
            raise ValueError(
                f"the network returned logits of shape {tuple(raw.shape)}; expected "
                f"(batch, K, height, width) = {one_channel} for one channel, or "
                f"(batch, K, C, height, width), with K = num_classes = {self.num_classes}"
            )
        return raw.float().movedim(1, -1)

    def predict_x0(self, xt: Tensor, t: Tensor) -> Tensor:
        """Compute ``p(x0 | xt)`` per pixel with the carry-over parameterization.

        Args:
            xt: Masked images, ``torch.long``, ``(batch, C, height, width)``.
            t: Times, ``(batch,)``.

        Returns:
            Probabilities ``(batch, C, height, width, K)``: the network's softmax at
            masked pixels and a one-hot of the current value at unmasked ones.
        """
        probs = torch.softmax(self.logits(xt, t), dim=-1)
        is_masked = (xt == self.mask_index).unsqueeze(-1)
        current = F.one_hot(xt.clamp(max=self.num_classes - 1), self.num_classes).to(probs.dtype)
        return torch.where(is_masked, probs, current)

    # -- training loss --------------------------------------------------------------------

    def compute_loss(
        self,
        x0: Tensor,
        obs_mask: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Compute the training loss on a batch.

        Draws ``t`` in ``(0, 1]`` (stratified over the batch; grid times for a
        discrete schedule), masks ``x0`` and scores the network at pixels that are
        observed *and* masked by the forward process:

        - ``"mlm"``: mean cross-entropy over those pixels of the whole batch.
        - ``"elbo"``: per image ``w(t) * sum_j CE_j`` with ``w(t) = -alpha'_t /
          (1 - alpha_t)`` (continuous) or ``T (alpha_s - alpha_t) / (1 - alpha_t)``
          (discrete), averaged over the batch; in nats, a bound on ``-log p(x_obs)``.

        An image with nothing masked contributes zero, never NaN.

        Args:
            x0: Clean images, integer tensor ``(batch, C, height, width)`` in
                ``{0, ..., K-1}`` at observed pixels.
            obs_mask: ``torch.bool`` like ``x0``, ``True`` where observed. Default:
                every pixel observed.
            generator: Source of the time and mask draws. Default: the global
                generator.

        Returns:
            Scalar float32 loss.

        Raises:
            TypeError, ValueError: As :meth:`check_inputs`.
        """
        x0, obs_mask = self.check_inputs(x0, obs_mask)
        t = self.schedule.sample_times(x0.shape[0], generator=generator, device=x0.device)
        xt, masked = self.add_mask(x0, t, obs_mask, generator=generator)
        logits = self.logits(xt, t)
        ce = F.cross_entropy(logits.movedim(-1, 1), x0, reduction="none")  # (B, C, H, W)
        ce = torch.where(masked, ce, torch.zeros_like(ce))

        if self.loss_weighting == "mlm":
            count = masked.sum().clamp_min(1)
            return ce.sum() / count
        weight = self._elbo_weight(t).to(ce.dtype)  # finite for every drawn t > 0
        return (weight * ce.flatten(1).sum(dim=1)).mean()

    def forward(
        self,
        x0: Tensor,
        obs_mask: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Compute the training loss; the same as :meth:`compute_loss`.

        Calling the model itself lets wrappers such as ``DistributedDataParallel``
        and ``torch.compile`` see the whole training computation.
        """
        return self.compute_loss(x0, obs_mask, generator=generator)

    def _elbo_weight(self, t: Tensor) -> Tensor:
        """ELBO weight of each drawn time, float64, ``(batch,)``."""
        if self.schedule.num_timesteps is None:
            return self.schedule.loss_weight(t)
        steps = self.schedule.num_timesteps
        s = (t - 1.0 / steps).clamp_min(0.0)
        return steps * self.schedule.unmask_prob(t, s)

    # -- likelihood -----------------------------------------------------------------------

    def nll(
        self,
        x0: Tensor,
        obs_mask: Tensor | None = None,
        *,
        num_samples: int = 1,
        time: str | None = None,
        estimator: str = "count",
        generator: torch.Generator | None = None,
    ) -> LikelihoodEstimate:
        """Estimate the variational bound on ``-log p(x0)`` (or ``-log p(x_obs)``) per image.

        Continuous time: ``integral_0^1 w(t) E_q[sum_{masked j} -log p(x0_j | xt)] dt``.
        Discrete time with ``T`` steps: ``sum_i (alpha_s - alpha_t) / (1 - alpha_t)
        E_q[sum_{masked j} -log p(x0_j | xt)]`` with ``s = (i-1)/T``, ``t = i/T``. For one
        image it can be below the continuous bound. With ``T = 1`` and the exact
        conditionals it is ``sum_j -log p(x_j)``, which is below ``-log p(x)`` for an
        image whose pixels are jointly rarer than independent pixels would be. With the
        exact conditionals its mean over the data is at least the entropy.

        Two unbiased Monte Carlo estimators of the same bound:

        - ``"count"`` (default): draw the mask level ``m = 1 - alpha_t`` uniformly
          (continuous) or step ``i`` with probability ``alpha_{i-1} - alpha_i``
          (discrete), then ``n = 1 + Binomial(D - 1, m)`` masked pixels chosen
          uniformly, and score ``D / n * sum_{masked j} CE_j``. A predictor that is
          uniform over ``K`` values scores exactly ``D ln K`` on every draw.
        - ``"time"``: draw ``t`` and mask pixels independently, as in training, and
          score ``w(t) * sum_{masked j} CE_j``.

        Draws are stratified over the batch, accumulated in float64 and taken from
        ``generator``; the global random state is neither used nor changed. The
        network runs in eval mode under ``torch.inference_mode``, and its mode is
        restored afterwards.

        Args:
            x0: Images, integer tensor ``(batch, C, height, width)``.
            obs_mask: ``torch.bool`` like ``x0``; only observed pixels are scored, which
                bounds ``-log p(x_obs)``. Default: every pixel observed.
            num_samples: Monte Carlo draws per image. Default: ``1``.
            time: ``"continuous"`` or ``"discrete"`` (needs a discrete schedule).
                Default: the schedule's kind.
            estimator: ``"count"`` or ``"time"``. Default: ``"count"``.
            generator: Source of randomness. Default: a private generator seeded
                with 0, so repeated calls give the same estimate.

        Returns:
            A :class:`LikelihoodEstimate`.

        Raises:
            ValueError: On an invalid option or input.
        """
        if num_samples < 1:
            raise ValueError(f"invalid num_samples={num_samples}: expected a positive integer")
        if estimator not in ESTIMATORS:
            raise ValueError(f"invalid estimator={estimator!r}: expected one of {list(ESTIMATORS)}")
        if time is None:
            time = "discrete" if self.schedule.is_discrete else "continuous"
        if time not in TIME_KINDS:
            raise ValueError(f"invalid time={time!r}: expected one of {list(TIME_KINDS)}")
        if time == "discrete" and not self.schedule.is_discrete:
            raise ValueError(
                "time='discrete' needs a discrete schedule, but num_timesteps is None; "
                "use time='continuous' or a schedule with num_timesteps=T"
            )
        x0, obs_mask = self.check_inputs(x0, obs_mask)
        if generator is None:
            generator = torch.Generator(device=x0.device).manual_seed(0)

        num_dims = obs_mask.flatten(1).sum(dim=1)
        draws = torch.zeros(num_samples, x0.shape[0], dtype=torch.float64, device=x0.device)
        with self._evaluating():
            for k in range(num_samples):
                if estimator == "count":
                    draws[k] = self._nll_count_draw(x0, obs_mask, num_dims, time, generator)
                else:
                    draws[k] = self._nll_time_draw(x0, obs_mask, time, generator)

        nats = draws.mean(dim=0)
        if num_samples > 1:
            stderr = draws.std(dim=0, unbiased=True) / math.sqrt(num_samples)
        else:
            stderr = torch.full_like(nats, math.nan)
        dims = num_dims.to(torch.float64)
        bits = torch.where(
            dims > 0, nats / (dims.clamp_min(1) * math.log(2)), torch.zeros_like(nats)
        )
        return LikelihoodEstimate(nats, bits, stderr, num_samples, num_dims)

    def _masked_ce_sum(self, x0: Tensor, xt: Tensor, t: Tensor, scored: Tensor) -> Tensor:
        """Sum of ``-log p(x0_j | xt)`` over the ``scored`` pixels, float64, ``(batch,)``."""
        log_probs = torch.log_softmax(self.logits(xt, t).to(torch.float64), dim=-1)
        ce = -log_probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
        return torch.where(scored, ce, torch.zeros_like(ce)).flatten(1).sum(dim=1)

    def _draw_mask_level(
        self, batch: int, time: str, generator: torch.Generator, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """Stratified mask levels ``m = 1 - alpha_t`` and their times, float64."""
        if time == "continuous":
            level = 1.0 - stratified_uniform(batch, generator, device)  # in (0, 1]
            return level, self.schedule.time_from_mask_prob(level)
        # Step i with probability alpha_{i-1} - alpha_i, by inverse CDF.
        steps = self.schedule.num_timesteps
        assert steps is not None
        cdf = torch.cumsum(self.schedule.step_probs(), dim=0).to(device)
        v = stratified_uniform(batch, generator, device)
        index = torch.searchsorted(cdf, v * cdf[-1], right=True).clamp(max=steps - 1) + 1
        t = index.to(torch.float64) / steps
        return self.schedule.mask_prob(t), t

    def _nll_count_draw(
        self, x0: Tensor, obs_mask: Tensor, num_dims: Tensor, time: str, generator: torch.Generator
    ) -> Tensor:
        batch = x0.shape[0]
        level, t = self._draw_mask_level(batch, time, generator, x0.device)

        # One observed pixel is always masked, every other observed pixel with
        # probability `level`: n = 1 + Binomial(D - 1, level), a uniform subset.
        keys = torch.where(obs_mask, uniform(x0.shape, generator, x0.device), -1.0)
        forced = keys.flatten(1).argmax(dim=1)
        masked = uniform(x0.shape, generator, x0.device) < level.view(-1, 1, 1, 1)
        masked = masked.flatten(1)
        masked[torch.arange(batch, device=x0.device), forced] = True
        masked = masked.view_as(x0) & obs_mask

        xt = torch.where(masked | ~obs_mask, torch.full_like(x0, self.mask_index), x0)
        ce_sum = self._masked_ce_sum(x0, xt, t, masked)
        count = masked.flatten(1).sum(dim=1)
        dims = num_dims.to(torch.float64)
        return torch.where(count > 0, dims * ce_sum / count.clamp_min(1), torch.zeros_like(ce_sum))

    def _nll_time_draw(
        self, x0: Tensor, obs_mask: Tensor, time: str, generator: torch.Generator
    ) -> Tensor:
        batch = x0.shape[0]
        if time == "continuous" and self.schedule.is_discrete:
            t = 1.0 - stratified_uniform(batch, generator, x0.device)
            weight = self.schedule.loss_weight(t)
        else:
            t = self.schedule.sample_times(batch, generator=generator, device=x0.device)
            weight = self._elbo_weight(t)
        xt, masked = self.add_mask(x0, t, obs_mask, generator=generator)
        return weight * self._masked_ce_sum(x0, xt, t, masked)

    # -- sampling -------------------------------------------------------------------------

    @overload
    def sample(
        self,
        num_samples: int,
        *,
        sampler: str | None = ...,
        steps: int | None = ...,
        temperature: float | None = ...,
        generator: torch.Generator | None = ...,
        device: torch.device | str | None = ...,
        return_info: Literal[False] = ...,
        return_trajectory: bool = ...,
        pixels_per_event: int = ...,
        confidence_schedule: str = ...,
        confidence_noise: float = ...,
    ) -> Tensor: ...

    @overload
    def sample(
        self,
        num_samples: int,
        *,
        sampler: str | None = ...,
        steps: int | None = ...,
        temperature: float | None = ...,
        generator: torch.Generator | None = ...,
        device: torch.device | str | None = ...,
        return_info: Literal[True],
        return_trajectory: bool = ...,
        pixels_per_event: int = ...,
        confidence_schedule: str = ...,
        confidence_noise: float = ...,
    ) -> SamplingResult: ...

    def sample(
        self,
        num_samples: int,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        temperature: float | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        return_info: bool = False,
        return_trajectory: bool = False,
        pixels_per_event: int = 1,
        confidence_schedule: str = "cosine",
        confidence_noise: float = 4.5,
    ) -> Tensor | SamplingResult:
        """Generate images by running a reverse-process sampler from all-MASK.

        Args:
            num_samples: Number of images ``N``.
            sampler: ``"ancestral"``, ``"first_hitting"`` or ``"confidence"``.
                Default: the model's ``sampler``.
            steps: Sampler steps, any positive number (ignored by
                ``first_hitting``, which takes one step per event). Default: the
                model's ``sampling_steps``.
            temperature: Softmax temperature; ``0`` takes the most likely value.
                Default: the model's ``temperature``.
            generator: Source of randomness. Default: the global generator.
            device: Device of the samples. Default: the model's device.
            return_info: Return a :class:`~masked_diffusion.samplers.SamplingResult`
                with the number of network evaluations instead of the tensor.
            return_trajectory: Record the state after every step (implies
                ``return_info``).
            pixels_per_event: Pixels unmasked per ``first_hitting`` event.
                Default: ``1``.
            confidence_schedule: ``"cosine"`` or ``"linear"`` for ``confidence``.
                Default: ``"cosine"``.
            confidence_noise: Scale of the annealed Gumbel noise on the
                ``confidence`` sampler's scores (MaskGIT's choice temperature); ``0``
                reveals strictly the most confident pixels first. Default: ``4.5``.

        Returns:
            ``torch.long`` samples ``(N, C, height, width)`` in ``{0, ..., K-1}``, or
            a ``SamplingResult`` when ``return_info`` or ``return_trajectory``.

        Raises:
            ValueError: On an invalid option.
        """
        if num_samples < 0:
            raise ValueError(f"invalid num_samples={num_samples}: expected an integer >= 0")
        target = torch.device(device) if device is not None else self.device
        xt = torch.full(
            (num_samples, *self.image_shape), self.mask_index, dtype=torch.long, device=target
        )
        t_start = torch.ones(num_samples, dtype=torch.float64, device=target)
        result = self._run(
            xt,
            t_start,
            sampler,
            steps,
            temperature,
            generator,
            return_trajectory,
            pixels_per_event,
            confidence_schedule,
            confidence_noise,
        )
        if return_info or return_trajectory:
            return result
        return result.samples

    def impute(
        self,
        x0: Tensor,
        obs_mask: Tensor,
        *,
        num_completions: int = 1,
        sampler: str | None = None,
        steps: int | None = None,
        temperature: float | None = None,
        generator: torch.Generator | None = None,
        pixels_per_event: int = 1,
        confidence_schedule: str = "cosine",
        confidence_noise: float = 4.5,
    ) -> Tensor:
        """Complete partially observed images; observed pixels are never changed.

        Each image starts with its missing pixels masked, at the time ``t`` whose mask
        probability ``1 - alpha_t`` equals its missing fraction, and a sampler decodes
        it to ``t = 0``. With the exact conditionals of the data, completions follow
        ``p(x_missing | x_obs)``.

        Args:
            x0: Images, integer tensor ``(batch, C, height, width)``; values at
                missing pixels are ignored.
            obs_mask: ``torch.bool`` like ``x0``, ``True`` where observed.
            num_completions: Completions per image ``S``. Default: ``1``.
            sampler: As in :meth:`sample`, and so are ``steps``, ``temperature``,
                ``generator``, ``pixels_per_event``, ``confidence_schedule`` and
                ``confidence_noise``; ``temperature=0`` gives the MAP-style (argmax)
                completion.

        Returns:
            ``torch.long`` completions ``(batch, S, C, height, width)``.

        Raises:
            TypeError, ValueError: As :meth:`check_inputs`, or on an invalid option.
        """
        if num_completions < 1:
            raise ValueError(
                f"invalid num_completions={num_completions}: expected a positive integer"
            )
        x0, obs_mask = self.check_inputs(x0, obs_mask)
        batch = x0.shape[0]
        x0 = x0.repeat_interleave(num_completions, dim=0)
        obs_mask = obs_mask.repeat_interleave(num_completions, dim=0)
        xt = torch.where(obs_mask, x0, torch.full_like(x0, self.mask_index))
        missing_share = (~obs_mask).flatten(1).to(torch.float64).mean(dim=1)
        t_start = self.schedule.snap_to_grid(self.schedule.time_from_mask_prob(missing_share))
        result = self._run(
            xt,
            t_start,
            sampler,
            steps,
            temperature,
            generator,
            False,
            pixels_per_event,
            confidence_schedule,
            confidence_noise,
        )
        return result.samples.view(batch, num_completions, *self.image_shape)

    def reconstruct(
        self,
        x0: Tensor,
        t: float | Tensor,
        *,
        method: str = "sample",
        sampler: str | None = None,
        steps: int | None = None,
        temperature: float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Mask ``x0`` at time ``t`` with the forward process and reconstruct it.

        Args:
            x0: Clean images, integer tensor ``(batch, C, height, width)``.
            t: Time in ``[0, 1]``, a float or ``(batch,)`` tensor; ``t = 0.5`` masks
                about half of the pixels under the linear schedule.
            method: ``"sample"`` runs the sampler from ``t`` to 0; ``"argmax"`` sets
                every masked pixel to its most likely value in one network call.
            sampler, steps, temperature, generator: As in :meth:`sample`.

        Returns:
            ``(xt, reconstruction)``, both ``torch.long`` like ``x0``; ``xt`` contains MASK.

        Raises:
            ValueError: On an invalid ``method`` or ``t`` outside ``[0, 1]``.
        """
        if method not in ("sample", "argmax"):
            raise ValueError(f"invalid method={method!r}: expected 'sample' or 'argmax'")
        x0, _ = self.check_inputs(x0)
        times = torch.as_tensor(t, dtype=torch.float64, device=x0.device).expand(x0.shape[0])
        if bool(((times < 0) | (times > 1)).any()):
            raise ValueError(f"invalid t={t}: expected times in [0, 1]")
        times = self.schedule.snap_to_grid(times)
        with self._evaluating():
            xt, _ = self.add_mask(x0, times, generator=generator)
            if method == "argmax":
                best = self.logits(xt, times).argmax(dim=-1)
                return xt, torch.where(xt == self.mask_index, best, xt)
        result = self._run(
            xt, times, sampler, steps, temperature, generator, False, 1, "cosine", 4.5
        )
        return xt, result.samples

    def _run(
        self,
        xt: Tensor,
        t_start: Tensor,
        sampler: str | None,
        steps: int | None,
        temperature: float | None,
        generator: torch.Generator | None,
        return_trajectory: bool,
        pixels_per_event: int,
        confidence_schedule: str,
        confidence_noise: float,
    ) -> SamplingResult:
        sampler = sampler if sampler is not None else self.sampler
        if sampler not in SAMPLER_NAMES:
            raise ValueError(f"invalid sampler={sampler!r}: expected one of {list(SAMPLER_NAMES)}")
        with self._evaluating():
            return run_sampler(
                self.logits,
                self.schedule,
                xt,
                t_start,
                mask_index=self.mask_index,
                sampler=sampler,
                steps=steps if steps is not None else self.sampling_steps,
                temperature=temperature if temperature is not None else self.temperature,
                generator=generator,
                uses_time=self.network_uses_time,
                return_trajectory=return_trajectory,
                pixels_per_event=pixels_per_event,
                confidence_schedule=confidence_schedule,
                confidence_noise=confidence_noise,
            )

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Run in eval mode under ``torch.inference_mode``, then restore the mode."""
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.train(was_training)

    # -- saving ---------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the config and the weights (no optimizer state) to ``directory``.

        Raises:
            ValueError: If the model was not built by :meth:`from_config`, so no
                config describes it.
        """
        from masked_diffusion.checkpoint import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, map_location: str | torch.device | None = None
    ) -> Self:
        """Load a model written by :meth:`save_pretrained`."""
        from masked_diffusion.checkpoint import load_pretrained

        return load_pretrained(directory, map_location=map_location)  # type: ignore[return-value]
