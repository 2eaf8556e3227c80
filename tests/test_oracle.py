"""Likelihood bounds against exact values computed by enumeration on toy distributions.

With the oracle network (the exact conditionals of the toy distribution), the
continuous-time bound equals ``-log p(x)`` for every schedule; the discrete-time
bound and the bound of an imperfect network are computed exactly by summing over
every mask. Monte Carlo estimates must match these values within 5 standard errors
(fixed seeds). Each image is repeated ``R`` times in the batch, and the repeats are
combined, so one call covers many draws.
"""

from __future__ import annotations

import math

import pytest
import torch

from masked_diffusion import MaskedDiffusionModel, MaskSchedule
from toy import (
    Oracle,
    PerturbedOracle,
    ToyDistribution,
    UniformNetwork,
    binary_toy,
    exact_bound,
    first_hitting_law,
    ternary_toy,
)

SCHEDULES = {
    "linear": dict(kind="linear"),
    "cosine": dict(kind="cosine"),
    "poly2": dict(kind="polynomial", exponent=2.0),
    "poly0.5": dict(kind="polynomial", exponent=0.5),
}
Z_LIMIT = 5.0


@pytest.fixture(scope="module")
def toy() -> ToyDistribution:
    return binary_toy()


def make_model(
    network: torch.nn.Module, toy: ToyDistribution, **schedule: object
) -> MaskedDiffusionModel:
    return MaskedDiffusionModel(
        network, MaskSchedule(**schedule), num_classes=toy.num_classes, image_shape=toy.image_shape
    )


def estimate(
    model: MaskedDiffusionModel,
    images: torch.Tensor,
    *,
    repeats: int,
    num_samples: int,
    seed: int,
    obs_mask: torch.Tensor | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image bound estimate and its standard error, over ``repeats * num_samples`` draws."""
    count = images.shape[0]
    batch = images.repeat(repeats, 1, 1, 1)
    mask = None if obs_mask is None else obs_mask.repeat(repeats, 1, 1, 1)
    result = model.nll(
        batch,
        mask,
        num_samples=num_samples,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,  # type: ignore[arg-type]
    )
    nats = result.nats.view(repeats, count).mean(dim=0)
    # Draws of different repeats are stratified together, which only lowers the
    # variance, so this standard error is conservative.
    stderr = result.stderr.view(repeats, count).square().sum(dim=0).sqrt() / repeats
    return nats, stderr


def assert_matches(nats: torch.Tensor, stderr: torch.Tensor, exact: torch.Tensor) -> None:
    error = nats - exact
    worst = int((error.abs() - Z_LIMIT * stderr).argmax())
    assert error[worst].abs() <= Z_LIMIT * stderr[worst] + 1e-6, (
        f"image {worst}: estimate {nats[worst]:.4f} vs exact {exact[worst]:.4f} "
        f"(stderr {stderr[worst]:.4f})"
    )
    pooled = error.mean()
    pooled_stderr = stderr.square().sum().sqrt() / error.numel()
    assert pooled.abs() <= Z_LIMIT * pooled_stderr + 1e-6, (
        f"mean error over images {pooled:.5f} (stderr {pooled_stderr:.5f})"
    )


# -- the toy tools themselves ----------------------------------------------------------


def test_exact_bound_oracle_equals_nll(toy: ToyDistribution) -> None:
    oracle = Oracle(toy)
    for index in (0, 17, 42, 63):
        bound = exact_bound(oracle, toy.images[index])
        assert bound == pytest.approx(-math.log(toy.probs[index]), abs=1e-9)


def test_first_hitting_law_oracle_is_toy(toy: ToyDistribution) -> None:
    law = first_hitting_law(toy, 1)
    assert torch.allclose(law, toy.probs, rtol=0, atol=1e-12)


# -- continuous time, oracle -----------------------------------------------------------


@pytest.mark.parametrize("estimator", ["count", "time"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_nll_oracle_exact(toy: ToyDistribution, schedule: str, estimator: str) -> None:
    model = make_model(Oracle(toy), toy, **SCHEDULES[schedule])
    nats, stderr = estimate(
        model, toy.images, repeats=25, num_samples=20, seed=11, estimator=estimator
    )
    exact = -toy.probs.log()
    assert_matches(nats, stderr, exact)
    if estimator == "count":
        # The time estimator has heavy tails (variance diverges like log(1/t) as
        # t -> 0), so only the count estimator gets an absolute bound.
        assert float((nats - exact).abs().max()) < 0.5


@pytest.mark.parametrize("estimator", ["count", "time"])
def test_nll_oracle_ternary(estimator: str) -> None:
    toy = ternary_toy()
    model = make_model(Oracle(toy, time_conditioning=True), toy, kind="cosine")
    nats, stderr = estimate(
        model, toy.images, repeats=20, num_samples=20, seed=12, estimator=estimator
    )
    assert_matches(nats, stderr, -toy.probs.log())


# -- discrete time ---------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["count", "time"])
@pytest.mark.parametrize(("kind", "steps"), [("linear", 1), ("cosine", 3), ("linear", 10)])
def test_nll_discrete_matches_exact(
    toy: ToyDistribution, kind: str, steps: int, estimator: str
) -> None:
    oracle = Oracle(toy)
    model = make_model(oracle, toy, kind=kind, num_timesteps=steps)
    nats, stderr = estimate(
        model, toy.images, repeats=20, num_samples=20, seed=13, estimator=estimator
    )
    schedule = MaskSchedule(kind, num_timesteps=steps)
    exact = torch.tensor([exact_bound(oracle, image, schedule=schedule) for image in toy.images])
    assert_matches(nats, stderr, exact)


def test_discrete_bound_one_step_is_marginals(toy: ToyDistribution) -> None:
    # With T = 1 every pixel is predicted from the fully masked image.
    marginal_one = (toy.probs[:, None] * toy.images.reshape(64, -1)).sum(dim=0)
    flat = toy.images.reshape(64, -1).to(torch.float64)
    expected = -(flat * marginal_one.log() + (1 - flat) * (1 - marginal_one).log()).sum(dim=1)
    model = make_model(Oracle(toy), toy, num_timesteps=1)
    result = model.nll(toy.images, num_samples=2)
    assert torch.allclose(result.nats, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_discrete_bound_above_entropy(toy: ToyDistribution, steps: int) -> None:
    # Per image the discrete bound may fall below -log p(x); its mean under p is a
    # cross-entropy, so it is at least the entropy, strictly for a few steps.
    oracle = Oracle(toy)
    schedule = MaskSchedule("linear", num_timesteps=steps)
    bounds = torch.tensor([exact_bound(oracle, image, schedule=schedule) for image in toy.images])
    entropy = float(-(toy.probs * toy.probs.log()).sum())
    assert float((toy.probs * bounds).sum()) > entropy + 0.01


def test_discrete_bound_below_for_some_image(toy: ToyDistribution) -> None:
    # With T = 1 the bound is sum_j -log p(x_j), below -log p(x) where the pixels of
    # x are jointly rarer than independent pixels would be.
    oracle = Oracle(toy)
    schedule = MaskSchedule("linear", num_timesteps=1)
    bounds = torch.tensor([exact_bound(oracle, image, schedule=schedule) for image in toy.images])
    assert bool((bounds < -toy.probs.log() - 0.1).any())
    assert bool((bounds > -toy.probs.log() + 0.1).any())


def test_discrete_bound_decreases_with_refinement(toy: ToyDistribution) -> None:
    # The grid of T = 2 contains that of T = 1, and T = 4 that of T = 2.
    oracle = Oracle(toy)
    means = []
    for steps in (1, 2, 4):
        schedule = MaskSchedule("cosine", num_timesteps=steps)
        bounds = torch.tensor([exact_bound(oracle, x, schedule=schedule) for x in toy.images])
        means.append(float((toy.probs * bounds).sum()))
    assert means[0] > means[1] > means[2]


def test_nll_continuous_on_discrete_schedule(toy: ToyDistribution) -> None:
    model = make_model(Oracle(toy), toy, num_timesteps=2)
    nats, stderr = estimate(
        model, toy.images, repeats=20, num_samples=20, seed=14, time="continuous"
    )
    assert_matches(nats, stderr, -toy.probs.log())


# -- imperfect network -----------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["count", "time"])
def test_nll_perturbed_matches_exact(toy: ToyDistribution, estimator: str) -> None:
    network = PerturbedOracle(toy)
    model = make_model(network, toy, kind="polynomial", exponent=2.0)
    nats, stderr = estimate(
        model, toy.images, repeats=20, num_samples=20, seed=15, estimator=estimator
    )
    exact = torch.tensor([exact_bound(network, image) for image in toy.images])
    assert_matches(nats, stderr, exact)


def test_perturbed_bound_above_model_nll(toy: ToyDistribution) -> None:
    # The bound is an order average of -log p_theta(x | order), so by Jensen it is
    # at least -log p_theta(x), where p_theta samples one pixel at a time.
    network = PerturbedOracle(toy)
    model_probs = first_hitting_law(toy, 1, network=network)
    bounds = torch.tensor([exact_bound(network, image) for image in toy.images])
    assert bool((bounds >= -model_probs.log() - 1e-9).all())
    entropy = float(-(toy.probs * toy.probs.log()).sum())
    assert float((toy.probs * bounds).sum()) > entropy + 0.05


# -- uniform predictor -----------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize(
    "schedule",
    [
        dict(kind="linear"),
        dict(kind="cosine", num_timesteps=3),
        dict(kind="polynomial", exponent=0.5),
        dict(kind="polynomial", exponent=2.0, num_timesteps=1),
    ],
)
def test_nll_uniform_exact(toy: ToyDistribution, schedule: dict[str, object], batch: int) -> None:
    model = make_model(UniformNetwork(2), toy, **schedule)
    result = model.nll(
        toy.images[:batch], num_samples=5, generator=torch.Generator().manual_seed(3)
    )
    expected = toy.num_pixels * math.log(2)
    assert torch.allclose(
        result.nats, torch.full((batch,), expected, dtype=torch.float64), rtol=0, atol=1e-9
    )
    assert torch.allclose(result.bits_per_dim, torch.ones(batch, dtype=torch.float64), atol=1e-9)


def test_nll_uniform_ambient_exact(toy: ToyDistribution) -> None:
    model = make_model(UniformNetwork(2), toy, kind="cosine")
    obs_mask = torch.rand(64, 1, 2, 3, generator=torch.Generator().manual_seed(0)) < 0.5
    result = model.nll(toy.images, obs_mask, num_samples=3)
    expected = obs_mask.flatten(1).sum(dim=1).to(torch.float64) * math.log(2)
    assert torch.allclose(result.nats, expected, rtol=0, atol=1e-9)


def test_nll_uniform_ternary_exact() -> None:
    toy = ternary_toy()
    model = make_model(UniformNetwork(3), toy)
    result = model.nll(toy.images, num_samples=2)
    expected = torch.full((81,), 4 * math.log(3), dtype=torch.float64)
    assert torch.allclose(result.nats, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("schedule", [dict(kind="cosine"), dict(kind="linear", num_timesteps=4)])
def test_nll_uniform_time_estimator(toy: ToyDistribution, schedule: dict[str, object]) -> None:
    model = make_model(UniformNetwork(2), toy, **schedule)
    nats, stderr = estimate(model, toy.images, repeats=10, num_samples=20, seed=4, estimator="time")
    exact = torch.full((64,), toy.num_pixels * math.log(2), dtype=torch.float64)
    assert_matches(nats, stderr, exact)


# -- ambient (partially observed) images -----------------------------------------------


def ambient_masks(count: int, seed: int) -> torch.Tensor:
    masks = torch.rand(count, 1, 2, 3, generator=torch.Generator().manual_seed(seed)) < 0.6
    masks.view(count, -1)[:, 0] |= ~masks.view(count, -1).any(dim=1)  # at least one observed
    return masks


@pytest.mark.parametrize("estimator", ["count", "time"])
def test_nll_ambient_oracle(toy: ToyDistribution, estimator: str) -> None:
    obs_mask = ambient_masks(64, seed=5)
    # Values at missing pixels must not matter: scramble them.
    scrambled = torch.where(obs_mask, toy.images, 1 - toy.images)
    model = make_model(Oracle(toy), toy, kind="linear")
    nats, stderr = estimate(
        model,
        scrambled,
        repeats=20,
        num_samples=20,
        seed=16,
        obs_mask=obs_mask,
        estimator=estimator,
    )
    exact = -toy.marginal_log_prob(toy.images, obs_mask)
    assert_matches(nats, stderr, exact)


def test_nll_ambient_perturbed(toy: ToyDistribution) -> None:
    obs_mask = ambient_masks(64, seed=6)
    network = PerturbedOracle(toy)
    model = make_model(network, toy, kind="cosine", num_timesteps=5)
    nats, stderr = estimate(
        model, toy.images, repeats=20, num_samples=20, seed=17, obs_mask=obs_mask
    )
    schedule = MaskSchedule("cosine", num_timesteps=5)
    exact = torch.tensor(
        [exact_bound(network, x, m, schedule) for x, m in zip(toy.images, obs_mask, strict=True)]
    )
    assert_matches(nats, stderr, exact)
