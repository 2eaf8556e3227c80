"""Tiny discrete image distributions with exact conditionals, for exact-answer tests.

A :class:`ToyDistribution` lists every image of a small shape (``2 x 3`` binary
images: 64 of them) with a fixed, correlated probability. :class:`Oracle` is a
denoising network whose logits are the exact conditionals ``log p(x0_j | unmasked
pixels of xt)``, obtained by summing the table over the images that agree with
``xt``. With it, a correct masked diffusion model has a continuous-time bound equal
to ``-log p(x)`` and an exact sampler reproduces the table, so tests compare the
library with these exact values instead of a training curve.

The module also computes, by enumeration, the exact bound of any network that
ignores ``t`` and the exact output distribution of the ancestral and first-hitting
samplers, and a chi-square goodness-of-fit p-value without SciPy.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from masked_diffusion.schedule import MaskSchedule

__all__ = [
    "Oracle",
    "PerturbedOracle",
    "TimeRecorder",
    "ToyDistribution",
    "UniformNetwork",
    "ancestral_law",
    "binary_toy",
    "chi_square_pvalue",
    "exact_bound",
    "first_hitting_law",
    "goodness_of_fit",
    "image_index",
    "ternary_toy",
]


@dataclass(frozen=True)
class ToyDistribution:
    """A probability table over every image of a small shape.

    Attributes:
        num_classes: Pixel values ``K``; MASK is ``K``.
        image_shape: ``(C, H, W)``.
        images: Every image, ``torch.long``, ``(K**D, C, H, W)`` in lexicographic
            order of the flattened pixels, so row ``i`` has :func:`image_index` ``i``.
        probs: Probability of each image, float64, ``(K**D,)``, all positive.
    """

    num_classes: int
    image_shape: tuple[int, int, int]
    images: Tensor
    probs: Tensor

    @property
    def num_pixels(self) -> int:
        """Pixels per image ``D``."""
        return math.prod(self.image_shape)

    @property
    def mask_index(self) -> int:
        """The MASK value ``K``."""
        return self.num_classes

    def log_prob(self, x: Tensor) -> Tensor:
        """Compute ``log p(x)`` for images ``x`` ``(B, C, H, W)``, float64 ``(B,)``."""
        return self.probs[image_index(x, self.num_classes)].log()

    def marginal_log_prob(self, x: Tensor, obs_mask: Tensor) -> Tensor:
        """Compute ``log p(x_obs)``, summing over the unobserved pixels, float64 ``(B,)``."""
        flat = x.reshape(x.shape[0], 1, -1)
        observed = obs_mask.reshape(x.shape[0], 1, -1)
        table = self.images.reshape(1, self.images.shape[0], -1)
        agrees = ((flat == table) | ~observed).all(dim=-1)
        return (agrees.to(torch.float64) * self.probs).sum(dim=1).log()

    def conditional_probs(self, x: Tensor, obs_mask: Tensor) -> Tensor:
        """Compute ``p(full image | x_obs)`` over the table, float64 ``(B, K**D)``."""
        flat = x.reshape(x.shape[0], 1, -1)
        observed = obs_mask.reshape(x.shape[0], 1, -1)
        table = self.images.reshape(1, self.images.shape[0], -1)
        agrees = ((flat == table) | ~observed).all(dim=-1)
        weights = agrees.to(torch.float64) * self.probs
        return weights / weights.sum(dim=1, keepdim=True)

    def product_of_marginals(self) -> Tensor:
        """Compute the table of independent pixels with the same marginals, ``(K**D,)``."""
        flat = self.images.reshape(self.images.shape[0], -1)
        one_hot = nn.functional.one_hot(flat, self.num_classes).to(torch.float64)
        marginals = torch.einsum("n,ndk->dk", self.probs, one_hot)  # (D, K)
        per_pixel = marginals[torch.arange(flat.shape[1]), flat]  # (N, D)
        return per_pixel.prod(dim=1)


def image_index(x: Tensor, num_classes: int) -> Tensor:
    """Row of each image of ``x`` ``(B, C, H, W)`` in :attr:`ToyDistribution.images`."""
    flat = x.reshape(x.shape[0], -1).long()
    num_pixels = flat.shape[1]
    powers = num_classes ** torch.arange(num_pixels - 1, -1, -1, device=x.device)
    return (flat * powers).sum(dim=1)


def _all_images(num_classes: int, image_shape: tuple[int, int, int]) -> Tensor:
    num_pixels = math.prod(image_shape)
    rows = list(itertools.product(range(num_classes), repeat=num_pixels))
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), *image_shape)


def binary_toy() -> ToyDistribution:
    """Build a correlated distribution over the 64 binary images of shape ``(1, 2, 3)``.

    The log-probability is an Ising energy with strong couplings between
    neighbouring pixels (so pixels are far from independent), a field that differs
    per pixel, and fixed Gaussian noise per image that breaks every symmetry.
    """
    images = _all_images(2, (1, 2, 3))
    spins = 2.0 * images.reshape(-1, 2, 3).to(torch.float64) - 1.0
    horizontal = (spins[:, :, 1:] * spins[:, :, :-1]).sum(dim=(1, 2))
    vertical = (spins[:, 1, :] * spins[:, 0, :]).sum(dim=1)
    field = torch.tensor([[0.24, -0.18, 0.06], [-0.12, 0.3, -0.36]], dtype=torch.float64)
    generator = torch.Generator().manual_seed(20240611)
    noise = 0.5 * torch.randn(images.shape[0], generator=generator, dtype=torch.float64)
    energy = 0.5 * horizontal + 0.4 * vertical + (spins * field).sum(dim=(1, 2)) + noise
    probs = torch.softmax(energy, dim=0)
    return ToyDistribution(2, (1, 2, 3), images, probs)


def ternary_toy() -> ToyDistribution:
    """Build a correlated distribution over the 81 images with 3 values of shape ``(1, 1, 4)``.

    Neighbouring pixels prefer equal values, and value 2 after value 0 is
    penalised, so the conditionals depend on the neighbours' values, not only on
    whether they agree.
    """
    images = _all_images(3, (1, 1, 4))
    flat = images.reshape(-1, 4)
    equal = (flat[:, 1:] == flat[:, :-1]).sum(dim=1).to(torch.float64)
    jump = ((flat[:, :-1] == 0) & (flat[:, 1:] == 2)).sum(dim=1).to(torch.float64)
    generator = torch.Generator().manual_seed(7)
    noise = 0.4 * torch.randn(images.shape[0], generator=generator, dtype=torch.float64)
    energy = 1.1 * equal - 1.5 * jump + 0.3 * flat[:, 0].to(torch.float64) + noise
    probs = torch.softmax(energy, dim=0)
    return ToyDistribution(3, (1, 1, 4), images, probs)


class Oracle(nn.Module):
    """Network ``forward(xt, t)`` returning the exact conditionals of a toy distribution.

    At each masked pixel ``j`` the logits are ``log p(x0_j = k | unmasked pixels of
    xt)``, float64. At unmasked pixels they are 0 (uniform), because a masked
    diffusion model must ignore them. ``t`` is ignored. The conditionals of all
    ``(K + 1)**D`` states are computed once, so a forward call is a table lookup.

    Args:
        toy: The distribution.
        time_conditioning: Value of the ``time_conditioning`` attribute, which tells
            the model whether samplers may cache outputs. Default: ``False``.
    """

    def __init__(self, toy: ToyDistribution, time_conditioning: bool = False) -> None:
        super().__init__()
        self.toy = toy
        self.time_conditioning = time_conditioning
        self.num_classes = toy.num_classes
        flat = toy.images.reshape(toy.images.shape[0], -1)
        one_hot = nn.functional.one_hot(flat, toy.num_classes).to(torch.float64)
        states = _all_states(toy)
        agrees = ((states[:, None] == toy.mask_index) | (states[:, None] == flat[None])).all(-1)
        weights = agrees.to(torch.float64) * toy.probs  # (S, N)
        numerator = torch.einsum("sn,ndk->sdk", weights, one_hot)
        conditionals = numerator / weights.sum(dim=1)[:, None, None]
        logits = torch.where(
            (states == toy.mask_index)[..., None],
            conditionals.log(),
            torch.zeros_like(conditionals),
        )
        self.register_buffer("conditional_table", conditionals)
        self.register_buffer("logit_table", logits)
        self.register_buffer(
            "powers", (toy.num_classes + 1) ** torch.arange(flat.shape[1] - 1, -1, -1)
        )
        self.calls = 0

    def _rows(self, xt: Tensor) -> Tensor:
        return (xt.reshape(xt.shape[0], self.toy.num_pixels) * self.powers).sum(dim=1)

    def conditionals(self, xt: Tensor) -> Tensor:
        """Compute ``p(x0_j = k | xt)`` for every pixel, float64 ``(B, D, K)``."""
        return self.conditional_table[self._rows(xt)]

    def forward(self, xt: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self._to_layout(self.logit_table[self._rows(xt)])

    def _to_layout(self, logits: Tensor) -> Tensor:
        channels, height, width = self.toy.image_shape
        out = logits.reshape(-1, channels, height, width, self.toy.num_classes).movedim(-1, 1)
        return out.squeeze(2) if channels == 1 else out


class PerturbedOracle(Oracle):
    """An imperfect network: the oracle's logits times ``scale`` plus a per-pixel bias.

    Its bound is strictly above ``-log p(x)``, because its conditionals are wrong.
    """

    def __init__(self, toy: ToyDistribution, scale: float = 0.6, bias: float = 0.3) -> None:
        super().__init__(toy)
        self.scale = scale
        self.bias = bias

    def forward(self, xt: Tensor, t: Tensor) -> Tensor:
        logits = self.conditionals(xt).log() * self.scale
        logits[..., 0] += self.bias
        return self._to_layout(logits)


class UniformNetwork(nn.Module):
    """A network that returns zero logits: the uniform predictor over ``K`` values."""

    def __init__(self, num_classes: int, time_conditioning: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.time_conditioning = time_conditioning

    def forward(self, xt: Tensor, t: Tensor) -> Tensor:
        batch, channels, height, width = xt.shape
        shape = (batch, self.num_classes, height, width)
        if channels > 1:
            shape = (batch, self.num_classes, channels, height, width)
        return torch.zeros(shape, dtype=torch.float32, device=xt.device)


class TimeRecorder(nn.Module):
    """Wraps a network and stores every ``t`` it receives (a time-reading network)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.time_conditioning = True
        self.times: list[Tensor] = []

    def forward(self, xt: Tensor, t: Tensor) -> Tensor:
        self.times.append(t.detach().to(torch.float64).cpu().clone())
        out: Tensor = self.network(xt, t)
        return out


# -- exact values by enumeration -----------------------------------------------------------


def exact_bound(
    network: nn.Module,
    x: Tensor,
    obs_mask: Tensor | None = None,
    schedule: MaskSchedule | None = None,
) -> float:
    """Compute a network's likelihood bound for one image exactly, by summing over masks.

    The network must ignore ``t``. With ``m`` the mask level and ``f(S)`` the sum of
    ``-log p(x_j | x with S and the missing pixels masked)`` over ``j`` in ``S``:

    - continuous time (``schedule`` None or continuous): ``sum_S B(n, D - n + 1)
      f(S)``, the integral ``int_0^1 (1/m) E_{S ~ Bern(m)^D}[f(S)] dm``;
    - discrete time: ``sum_i (alpha_{i-1} - alpha_i) / m_i * E_{S ~ Bern(m_i)^D}
      [f(S)]`` with ``m_i = 1 - alpha_{i/T}``.

    ``S`` ranges over subsets of the ``D`` observed pixels.

    Args:
        network: Time-ignoring network returning ``(1+, K, ...)`` logits.
        x: One image ``(C, H, W)``.
        obs_mask: ``torch.bool`` like ``x``. Default: all observed.
        schedule: Discrete schedule for the discrete bound. Default: continuous.

    Returns:
        The bound in nats.
    """
    shape = x.shape
    flat = x.reshape(-1)
    observed = torch.ones_like(flat, dtype=torch.bool) if obs_mask is None else obs_mask.reshape(-1)
    positions = observed.nonzero().squeeze(1)
    dims = int(positions.numel())
    num_classes = int(network.num_classes)
    subsets = torch.tensor(list(itertools.product([False, True], repeat=dims)), dtype=torch.bool)
    subsets = subsets.reshape(-1, dims)
    masked = torch.zeros(subsets.shape[0], flat.numel(), dtype=torch.bool)
    masked[:, positions] = subsets
    hidden = masked | ~observed[None]
    xt = torch.where(hidden, torch.full_like(flat, num_classes), flat[None])
    with torch.no_grad():
        raw = network(xt.reshape(-1, *shape), torch.ones(xt.shape[0]))
    logits = raw.to(torch.float64)
    if logits.dim() == 4:
        logits = logits.unsqueeze(2)
    log_probs = torch.log_softmax(logits.movedim(1, -1).reshape(xt.shape[0], -1, num_classes), -1)
    ce = -log_probs.gather(-1, flat.expand(xt.shape[0], -1).unsqueeze(-1)).squeeze(-1)
    f = torch.where(masked, ce, torch.zeros_like(ce)).sum(dim=1)
    n = masked.sum(dim=1).to(torch.float64)

    if schedule is None or not schedule.is_discrete:
        log_beta = torch.lgamma(n) + torch.lgamma(dims - n + 1) - math.lgamma(dims + 1)
        weight = torch.where(n > 0, log_beta.exp(), torch.zeros_like(n))
        return float((weight * f).sum())

    steps = schedule.num_timesteps
    assert steps is not None
    grid = torch.arange(steps + 1, dtype=torch.float64) / steps
    alphas = schedule.alpha(grid)
    total = 0.0
    for i in range(1, steps + 1):
        level = 1.0 - float(alphas[i])
        prob_subset = level**n * (1.0 - level) ** (dims - n)
        total += float(alphas[i - 1] - alphas[i]) / level * float((prob_subset * f).sum())
    return total


def _all_states(toy: ToyDistribution) -> Tensor:
    rows = list(itertools.product(range(toy.num_classes + 1), repeat=toy.num_pixels))
    return torch.tensor(rows, dtype=torch.long)


def _state_row(states: Tensor, x: Tensor, base: int) -> int:
    powers = base ** torch.arange(states.shape[1] - 1, -1, -1)
    return int((x.reshape(-1) * powers).sum())


def _clean_law(toy: ToyDistribution, states: Tensor, law: Tensor) -> Tensor:
    clean = (states < toy.num_classes).all(dim=1)
    leftover = float(law[~clean].sum())
    assert leftover < 1e-12, f"the sampler law leaves mass {leftover} on masked states"
    return law[clean]


def _network_marginals(toy: ToyDistribution, states: Tensor, network: nn.Module | None) -> Tensor:
    """Softmax of a time-ignoring network (default: the oracle) at every state, ``(S, D, K)``."""
    if network is None:
        return Oracle(toy).conditionals(states.reshape(-1, *toy.image_shape))
    with torch.no_grad():
        raw = network(states.reshape(-1, *toy.image_shape), torch.ones(states.shape[0]))
    logits = raw.to(torch.float64)
    if logits.dim() == 4:
        logits = logits.unsqueeze(2)
    logits = logits.movedim(1, -1).reshape(states.shape[0], toy.num_pixels, toy.num_classes)
    return torch.softmax(logits, dim=-1)


def _start_law(states: Tensor, start: Tensor | None, toy: ToyDistribution) -> Tensor:
    law = torch.zeros(states.shape[0], dtype=torch.float64)
    if start is None:
        start = torch.full((toy.num_pixels,), toy.mask_index)
    law[_state_row(states, start, toy.num_classes + 1)] = 1.0
    return law


def ancestral_law(
    toy: ToyDistribution,
    schedule: MaskSchedule,
    steps: int,
    start: Tensor | None = None,
    t_start: float = 1.0,
    network: nn.Module | None = None,
) -> Tensor:
    """Compute the exact output distribution of ancestral sampling with the oracle.

    Step ``k`` goes from ``t = snap(t_start (1 - k / steps))`` to ``s = snap(t_start
    (1 - (k + 1) / steps))``, with ``s = 0`` on the last step; each masked pixel is
    unmasked with probability ``(alpha_s - alpha_t) / (1 - alpha_t)`` to a value
    drawn from the oracle's conditional given the current state, independently of
    the other pixels.

    Args:
        toy: The distribution of the oracle.
        schedule: The model's schedule.
        steps: Sampler steps.
        start: Start state ``(D,)`` or ``(C, H, W)`` with MASK. Default: all masked.
        t_start: Start time. Default: ``1``.
        network: Time-ignoring network in place of the oracle. Default: the oracle.

    Returns:
        Probability of each image of ``toy.images``, float64 ``(K**D,)``.
    """
    states = _all_states(toy)
    marginals = _network_marginals(toy, states, network)  # (S, D, K)
    masked = states == toy.mask_index
    num_masked = masked.sum(dim=1).to(torch.float64)
    # T[x, y] = p**u (1 - p)**(m_x - u) Q[x, y], with u the pixels that y unmasks
    # and Q the product of their conditionals; split Q by u so a step is 7 products.
    per_pixel = torch.where(
        masked[..., None],
        torch.cat([marginals, torch.ones_like(marginals[..., :1])], dim=-1),
        nn.functional.one_hot(states, toy.num_classes + 1).to(torch.float64),
    )
    values = _transition(per_pixel, states)
    unmasked = num_masked[:, None] - num_masked[None, :]
    by_count = torch.stack(
        [torch.where(unmasked == u, values, 0.0) for u in range(toy.num_pixels + 1)]
    )
    law = _start_law(states, start, toy)
    for step in range(steps):
        times = torch.tensor(
            [t_start * (1.0 - step / steps), t_start * (1.0 - (step + 1) / steps)],
            dtype=torch.float64,
        )
        t, s = schedule.snap_to_grid(times).tolist()
        if step == steps - 1:
            s = 0.0
        alpha_t, alpha_s = schedule.alpha(torch.tensor([t, s], dtype=torch.float64)).tolist()
        if s <= 0.0:
            p = 1.0
        elif alpha_t < 1.0:
            p = (alpha_s - alpha_t) / (1.0 - alpha_t)
        else:
            p = 0.0
        new_law = torch.zeros_like(law)
        for u in range(toy.num_pixels + 1):
            stay = torch.tensor(1.0 - p, dtype=torch.float64).pow((num_masked - u).clamp_min(0))
            new_law += p**u * ((law * stay) @ by_count[u])
        law = new_law
    return _clean_law(toy, states, law)


def first_hitting_law(
    toy: ToyDistribution,
    pixels_per_event: int,
    start: Tensor | None = None,
    network: nn.Module | None = None,
) -> Tensor:
    """Compute the exact output distribution of the first-hitting sampler with the oracle.

    Each event unmasks ``min(k, n)`` of the ``n`` masked pixels, a uniformly chosen
    subset, to values drawn independently from the oracle's conditionals. With
    ``k = 1`` this is ``p`` (or ``p(x_missing | x_obs)`` from a partial ``start``).
    With ``k = 1`` and another time-ignoring ``network`` it is the distribution of
    the continuous-time model that the network defines.

    Returns:
        Probability of each image of ``toy.images``, float64 ``(K**D,)``.
    """
    states = _all_states(toy)
    marginals = _network_marginals(toy, states, network)
    masked = states == toy.mask_index
    per_pixel = torch.where(
        masked[..., None],
        torch.cat([marginals, torch.ones_like(marginals[..., :1])], dim=-1),
        nn.functional.one_hot(states, toy.num_classes + 1).to(torch.float64),
    )
    transition = _transition(per_pixel, states)
    num_masked = masked.sum(dim=1)
    count = num_masked.clamp(max=pixels_per_event)
    revealed = num_masked[:, None] - num_masked[None, :]
    ways = torch.tensor(
        [math.comb(int(n), int(c)) for n, c in zip(num_masked, count, strict=True)],
        dtype=torch.float64,
    )
    transition = torch.where(revealed == count[:, None], transition, 0.0) / ways[:, None]
    law = _start_law(states, start, toy)
    for _ in range(math.ceil(toy.num_pixels / pixels_per_event)):
        law = law @ transition
    return _clean_law(toy, states, law)


def _transition(per_pixel: Tensor, states: Tensor) -> Tensor:
    """Matrix ``T[x, y] = prod_j per_pixel[x, j, y_j]`` over all state pairs."""
    transition = torch.ones(states.shape[0], states.shape[0], dtype=torch.float64)
    for j in range(states.shape[1]):
        transition = transition * per_pixel[:, j, :][:, states[:, j]]
    return transition


# -- goodness of fit --------------------------------------------------------------------


def chi_square_pvalue(statistic: float, dof: int) -> float:
    """Survival function of the chi-square distribution, ``Q(dof / 2, statistic / 2)``."""
    value = torch.special.gammaincc(
        torch.tensor(dof / 2.0, dtype=torch.float64),
        torch.tensor(statistic / 2.0, dtype=torch.float64),
    )
    return float(value)


def goodness_of_fit(samples: Tensor, probs: Tensor, num_classes: int) -> float:
    """Pearson chi-square p-value of images ``samples`` against the table ``probs``.

    Cells with an expected count below 5 are pooled into one cell. A sample in a
    cell of probability 0 gives p-value 0.
    """
    index = image_index(samples, num_classes)
    counts = torch.bincount(index, minlength=probs.numel()).to(torch.float64)
    if bool((counts[probs == 0] > 0).any()):
        return 0.0
    expected = probs * index.numel()
    small = expected < 5.0
    observed_cells = counts[~small]
    expected_cells = expected[~small]
    if bool(small.any()):
        observed_cells = torch.cat([observed_cells, counts[small].sum().view(1)])
        expected_cells = torch.cat([expected_cells, expected[small].sum().view(1)])
    keep = expected_cells > 0
    observed_cells, expected_cells = observed_cells[keep], expected_cells[keep]
    statistic = float(((observed_cells - expected_cells) ** 2 / expected_cells).sum())
    return chi_square_pvalue(statistic, int(observed_cells.numel()) - 1)
