"""Samplers against the exact distributions they must produce, and their invariants.

With the oracle network (exact conditionals of a toy distribution), the exact
output distribution of each sampler is computed by enumerating every state: the
first-hitting sampler with one pixel per event reproduces the toy distribution, and
the ancestral sampler reproduces its own law, which approaches the toy distribution
as the steps grow (it draws pixels unmasked in the same step independently).
Samples are compared with a chi-square test at a fixed seed, rejecting below
``P_MIN``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from masked_diffusion import MaskedDiffusionModel, MaskSchedule
from masked_diffusion.samplers import run_sampler, sample_categorical
from toy import (
    Oracle,
    TimeRecorder,
    ToyDistribution,
    ancestral_law,
    binary_toy,
    first_hitting_law,
    goodness_of_fit,
    ternary_toy,
)

P_MIN = 1e-6
NUM_SAMPLES = 20_000


@pytest.fixture(scope="module")
def toy() -> ToyDistribution:
    return binary_toy()


def make_model(
    network: torch.nn.Module, toy: ToyDistribution, **kwargs: object
) -> MaskedDiffusionModel:
    schedule = MaskSchedule(**kwargs)  # type: ignore[arg-type]
    return MaskedDiffusionModel(
        network, schedule, num_classes=toy.num_classes, image_shape=toy.image_shape
    )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- exact output distributions ----------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "steps"),
    [
        (dict(kind="linear"), 1),
        (dict(kind="cosine"), 2),
        (dict(kind="linear", num_timesteps=10), 7),
        (dict(kind="polynomial", exponent=2.0), 7),
        (dict(kind="polynomial", exponent=0.5, num_timesteps=3), 2),
        (dict(kind="cosine", num_timesteps=4), 50),
        (dict(kind="linear"), 50),
    ],
)
def test_ancestral_matches_exact_law(
    toy: ToyDistribution, schedule: dict[str, object], steps: int
) -> None:
    model = make_model(Oracle(toy), toy, **schedule)
    # Many steps cost more per sample, and their law is closer to the toy's anyway.
    num_samples = NUM_SAMPLES if steps < 50 else NUM_SAMPLES // 2
    samples = model.sample(num_samples, sampler="ancestral", steps=steps, generator=seeded(1))
    law = ancestral_law(toy, MaskSchedule(**schedule), steps)  # type: ignore[arg-type]
    assert goodness_of_fit(samples, law, toy.num_classes) > P_MIN


def test_ancestral_one_step_is_not_toy(toy: ToyDistribution) -> None:
    # One step draws every pixel from its marginal: the test must see the difference.
    model = make_model(Oracle(toy), toy)
    samples = model.sample(NUM_SAMPLES, sampler="ancestral", steps=1, generator=seeded(2))
    assert goodness_of_fit(samples, toy.probs, toy.num_classes) < 1e-30
    assert goodness_of_fit(samples, toy.product_of_marginals(), toy.num_classes) > P_MIN


def test_ancestral_law_approaches_toy(toy: ToyDistribution) -> None:
    distances = []
    for steps in (1, 10, 100):
        law = ancestral_law(toy, MaskSchedule("linear"), steps)
        distances.append(0.5 * float((law - toy.probs).abs().sum()))
    assert distances[0] > distances[1] > distances[2]
    assert distances[2] < 0.02


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_first_hitting_exact(toy: ToyDistribution, time_conditioning: bool) -> None:
    model = make_model(Oracle(toy, time_conditioning), toy, kind="cosine")
    samples = model.sample(NUM_SAMPLES, sampler="first_hitting", generator=seeded(3))
    assert goodness_of_fit(samples, toy.probs, toy.num_classes) > P_MIN


def test_first_hitting_exact_ternary() -> None:
    toy = ternary_toy()
    model = make_model(Oracle(toy), toy, kind="linear", num_timesteps=5)
    samples = model.sample(NUM_SAMPLES, sampler="first_hitting", generator=seeded(4))
    assert goodness_of_fit(samples, toy.probs, toy.num_classes) > P_MIN


def test_ancestral_ternary_matches_law() -> None:
    toy = ternary_toy()
    model = make_model(Oracle(toy), toy, kind="cosine")
    samples = model.sample(NUM_SAMPLES, sampler="ancestral", steps=3, generator=seeded(5))
    law = ancestral_law(toy, MaskSchedule("cosine"), 3)
    assert goodness_of_fit(samples, law, toy.num_classes) > P_MIN


@pytest.mark.parametrize("pixels_per_event", [2, 4])
def test_first_hitting_multi_pixel_law(toy: ToyDistribution, pixels_per_event: int) -> None:
    model = make_model(Oracle(toy), toy)
    samples = model.sample(
        NUM_SAMPLES,
        sampler="first_hitting",
        pixels_per_event=pixels_per_event,
        generator=seeded(6),
    )
    law = first_hitting_law(toy, pixels_per_event)
    assert goodness_of_fit(samples, law, toy.num_classes) > P_MIN
    # Several pixels per network call is an approximation for correlated pixels.
    assert 0.5 * float((law - toy.probs).abs().sum()) > 0.05


def test_first_hitting_event_levels(toy: ToyDistribution) -> None:
    # Unmasking levels of D pixels are D independent uniforms: event i happens at
    # the i-th largest, so the first is Beta(D, 1) and the pooled levels are uniform.
    recorder = TimeRecorder(Oracle(toy))
    model = make_model(recorder, toy, kind="linear")
    batch = 4000
    model.sample(batch, sampler="first_hitting", generator=seeded(7))
    levels = torch.stack(recorder.times)  # linear schedule: mask level = t
    assert levels.shape == (toy.num_pixels, batch)
    assert bool((levels[1:] <= levels[:-1]).all())

    dims = toy.num_pixels
    first = levels[0]
    # P(first <= x) = x**D: compare the empirical CDF at a few points.
    for x in (0.5, 0.8, 0.9, 0.95):
        expected = x**dims
        observed = float((first <= x).double().mean())
        tolerance = 5 * math.sqrt(expected * (1 - expected) / batch)
        assert abs(observed - expected) < tolerance, f"P(first <= {x}): {observed} vs {expected}"
    pooled = levels.flatten()
    for x in (0.1, 0.3, 0.5, 0.7, 0.9):
        observed = float((pooled <= x).double().mean())
        # Levels of one image are dependent (order statistics); the per-image count
        # below x is Binomial(D, x), so the variance is that of batch images.
        tolerance = 5 * math.sqrt(x * (1 - x) / (batch * dims))
        assert abs(observed - x) < tolerance, f"P(level <= {x}): {observed} vs {x}"


# -- imputation ------------------------------------------------------------------------


def test_impute_first_hitting_exact(toy: ToyDistribution) -> None:
    x0 = toy.images[[22, 45]]
    obs_mask = torch.tensor([[1, 0, 0, 1, 0, 1], [0, 1, 0, 0, 0, 0]], dtype=torch.bool).view(
        2, 1, 2, 3
    )
    model = make_model(Oracle(toy), toy, kind="cosine")
    completions = model.impute(
        x0, obs_mask, num_completions=NUM_SAMPLES, sampler="first_hitting", generator=seeded(8)
    )
    assert completions.shape == (2, NUM_SAMPLES, 1, 2, 3)
    target = toy.conditional_probs(x0, obs_mask)
    for b in range(2):
        kept = completions[b][:, obs_mask[b]]
        assert bool((kept == x0[b][obs_mask[b]]).all())
        assert goodness_of_fit(completions[b], target[b], toy.num_classes) > P_MIN


def test_impute_ancestral_matches_law(toy: ToyDistribution) -> None:
    x0 = toy.images[[37]]
    obs_mask = torch.tensor([[0, 1, 0, 0, 1, 0]], dtype=torch.bool).view(1, 1, 2, 3)
    schedule = MaskSchedule("linear", num_timesteps=6)
    model = make_model(Oracle(toy), toy, kind="linear", num_timesteps=6)
    completions = model.impute(
        x0,
        obs_mask,
        num_completions=NUM_SAMPLES,
        sampler="ancestral",
        steps=2,
        generator=seeded(9),
    )
    assert bool((completions[0][:, obs_mask[0]] == x0[0][obs_mask[0]]).all())
    start = torch.where(obs_mask[0], x0[0], toy.mask_index)
    # Missing share 4/6 starts at the grid time 4/6 of the linear schedule.
    law = ancestral_law(toy, schedule, 2, start=start, t_start=4 / 6)
    assert goodness_of_fit(completions[0], law, toy.num_classes) > P_MIN


@pytest.mark.parametrize("sampler", ["ancestral", "first_hitting", "confidence"])
def test_impute_keeps_observed(toy: ToyDistribution, sampler: str) -> None:
    x0 = toy.images[torch.arange(0, 64, 4)]
    obs_mask = torch.rand(16, 1, 2, 3, generator=seeded(10)) < 0.5
    model = make_model(Oracle(toy), toy, kind="cosine")
    completions = model.impute(
        x0, obs_mask, num_completions=5, sampler=sampler, steps=3, generator=seeded(11)
    )
    assert completions.shape == (16, 5, 1, 2, 3)
    assert completions.dtype == torch.long
    assert bool((completions < toy.num_classes).all())
    expanded = obs_mask[:, None].expand_as(completions)
    assert torch.equal(completions[expanded], x0[:, None].expand_as(completions)[expanded])


def test_impute_argmax_temperature_zero(toy: ToyDistribution) -> None:
    # With one missing pixel, temperature 0 fills in its most likely value.
    x0 = toy.images[[9]]
    obs_mask = torch.ones(1, 1, 2, 3, dtype=torch.bool)
    obs_mask[0, 0, 1, 2] = False
    model = make_model(Oracle(toy), toy)
    completion = model.impute(x0, obs_mask, num_completions=3, temperature=0.0)
    target = toy.conditional_probs(x0, obs_mask)[0]
    best = toy.images[int(target.argmax())]
    assert bool((completion[0] == best).all())


# -- invariants of every sampler -------------------------------------------------------


SAMPLER_CASES = [
    ("ancestral", dict(steps=7)),
    ("ancestral", dict(steps=1)),
    ("first_hitting", dict()),
    ("first_hitting", dict(pixels_per_event=4)),
    ("confidence", dict(steps=4)),
    ("confidence", dict(steps=10, confidence_schedule="linear")),
]


@pytest.mark.parametrize(("sampler", "options"), SAMPLER_CASES)
def test_trajectory_monotone(
    toy: ToyDistribution, sampler: str, options: dict[str, object]
) -> None:
    model = make_model(Oracle(toy), toy, kind="cosine")
    result = model.sample(
        200, sampler=sampler, return_trajectory=True, generator=seeded(12), **options
    )
    trajectory = result.trajectory
    assert trajectory is not None
    assert bool((trajectory[0] == toy.mask_index).all())
    assert torch.equal(trajectory[-1], result.samples)
    assert bool((result.samples != toy.mask_index).all())
    for before, after in itertools.pairwise(trajectory):
        decoded = before != toy.mask_index
        assert torch.equal(after[decoded], before[decoded])
        assert int((after == toy.mask_index).sum()) <= int((before == toy.mask_index).sum())


@pytest.mark.parametrize(("schedule", "steps"), [("cosine", 4), ("linear", 3), ("cosine", 9)])
def test_confidence_reveal_counts(toy: ToyDistribution, schedule: str, steps: int) -> None:
    model = make_model(Oracle(toy), toy)
    result = model.sample(
        50,
        sampler="confidence",
        steps=steps,
        confidence_schedule=schedule,
        return_trajectory=True,
        generator=seeded(13),
    )
    assert result.trajectory is not None
    masked = [int((state[0] == toy.mask_index).sum()) for state in result.trajectory]
    dims = toy.num_pixels
    previous = dims
    for step in range(1, steps + 1):
        ratio = step / steps
        share = math.cos(0.5 * math.pi * ratio) if schedule == "cosine" else 1.0 - ratio
        expected = min(math.floor(dims * share), max(previous - 1, 0))
        expected = 0 if step == steps else expected
        assert masked[step] == expected, f"step {step}: {masked[step]} masked, expected {expected}"
        previous = expected


def test_confidence_decodes_most_confident(toy: ToyDistribution) -> None:
    # With temperature 0 and no confidence noise the first step reveals the pixel
    # whose marginal is most peaked, set to its most likely value.
    model = make_model(Oracle(toy), toy)
    result = model.sample(
        2,
        sampler="confidence",
        steps=6,
        temperature=0.0,
        return_trajectory=True,
        confidence_schedule="linear",
        confidence_noise=0.0,
    )
    assert result.trajectory is not None
    first = result.trajectory[1][0].reshape(-1)
    marginal_one = (toy.probs[:, None] * toy.images.reshape(64, -1)).sum(dim=0)
    peak = torch.maximum(marginal_one, 1 - marginal_one)
    j = int(peak.argmax())
    assert int((first != toy.mask_index).sum()) == 1
    assert int(first[j]) == int(marginal_one[j] > 0.5)


def test_first_hitting_argmax(toy: ToyDistribution) -> None:
    oracle = Oracle(toy)
    model = make_model(oracle, toy)
    result = model.sample(
        100, sampler="first_hitting", temperature=0.0, return_trajectory=True, generator=seeded(14)
    )
    assert result.trajectory is not None
    for before, after in zip(result.trajectory[:-1], result.trajectory[1:], strict=True):
        best = oracle.conditionals(before).argmax(dim=-1).view_as(before)
        new = (before == toy.mask_index) & (after != toy.mask_index)
        assert torch.equal(after[new], best[new])


@pytest.mark.parametrize(
    ("sampler", "options", "expected"),
    [
        ("ancestral", dict(steps=9), 9),
        ("first_hitting", dict(), 6),
        ("first_hitting", dict(pixels_per_event=4), 2),
        ("confidence", dict(steps=5), 5),
    ],
)
def test_num_function_evals(
    toy: ToyDistribution, sampler: str, options: dict[str, object], expected: int
) -> None:
    oracle = Oracle(toy, time_conditioning=True)
    model = make_model(oracle, toy)
    result = model.sample(8, sampler=sampler, return_info=True, generator=seeded(15), **options)
    assert result.num_function_evals == expected
    assert result.num_function_evals == oracle.calls
    assert result.num_image_evals == 8 * expected


@pytest.mark.parametrize("sampler", ["ancestral", "first_hitting", "confidence"])
def test_cache_keeps_samples(toy: ToyDistribution, sampler: str) -> None:
    cached = make_model(Oracle(toy), toy, kind="cosine")
    uncached = MaskedDiffusionModel(
        Oracle(toy), MaskSchedule("cosine"), image_shape=toy.image_shape, network_uses_time=True
    )
    assert cached.network_uses_time is False
    first = cached.sample(300, sampler=sampler, steps=40, return_info=True, generator=seeded(16))
    second = uncached.sample(300, sampler=sampler, steps=40, return_info=True, generator=seeded(16))
    assert torch.equal(first.samples, second.samples)
    assert second.num_image_evals == 300 * second.num_function_evals
    if sampler == "ancestral":
        # Most of the 40 steps leave an image unchanged, so its output is reused.
        assert first.num_image_evals < 300 * first.num_function_evals
        assert first.num_image_evals < 0.5 * second.num_image_evals


def test_sample_reproducible(toy: ToyDistribution) -> None:
    model = make_model(Oracle(toy), toy)
    first = model.sample(64, steps=5, generator=seeded(17))
    second = model.sample(64, steps=5, generator=seeded(17))
    third = model.sample(64, steps=5, generator=seeded(18))
    assert torch.equal(first, second)
    assert not torch.equal(first, third)


def test_sample_zero_images(toy: ToyDistribution) -> None:
    model = make_model(Oracle(toy), toy)
    for sampler in ("ancestral", "first_hitting", "confidence"):
        assert model.sample(0, sampler=sampler, steps=3).shape == (0, 1, 2, 3)


# -- categorical draws -----------------------------------------------------------------


def test_categorical_never_draws_impossible() -> None:
    logits = torch.tensor([0.0, -math.inf, 3.0, -math.inf]).expand(200_000, 4)
    draws = sample_categorical(logits, generator=seeded(19))
    assert not bool(((draws == 1) | (draws == 3)).any())


def test_categorical_rare_rate() -> None:
    probs = torch.tensor([0.02, 0.98], dtype=torch.float64)
    n = 200_000
    draws = sample_categorical(probs.log().expand(n, 2), generator=seeded(20))
    rate = float((draws == 0).double().mean())
    tolerance = 5 * math.sqrt(0.02 * 0.98 / n)
    assert abs(rate - 0.02) < tolerance


def test_categorical_temperature() -> None:
    logits = torch.tensor([[0.0, 1.0, 0.5], [2.0, -1.0, 1.9]])
    assert torch.equal(sample_categorical(logits, 0.0), torch.tensor([1, 0]))
    # Temperature 0.5 squares the probabilities (then renormalises).
    n = 100_000
    probs = torch.tensor([0.3, 0.7], dtype=torch.float64)
    draws = sample_categorical(probs.log().expand(n, 2), 0.5, generator=seeded(21))
    expected = 0.09 / (0.09 + 0.49)
    rate = float((draws == 0).double().mean())
    assert abs(rate - expected) < 5 * math.sqrt(expected * (1 - expected) / n)


def test_categorical_negative_temperature() -> None:
    with pytest.raises(ValueError, match=r"invalid temperature=-1.0: expected a number >= 0"):
        sample_categorical(torch.zeros(2, 2), -1.0)


# -- options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(sampler="gibbs"), r"invalid sampler='gibbs': expected one of"),
        (dict(steps=0), r"invalid steps=0: expected a positive integer"),
        (dict(pixels_per_event=0), r"invalid pixels_per_event=0: expected an integer >= 1"),
        (dict(confidence_schedule="exp"), r"invalid confidence_schedule='exp'"),
        (dict(temperature=-0.5), r"invalid temperature=-0.5"),
        (dict(num_samples=-1), r"invalid num_samples=-1"),
    ],
)
def test_sample_invalid_options(
    toy: ToyDistribution, options: dict[str, object], message: str
) -> None:
    model = make_model(Oracle(toy), toy)
    arguments: dict[str, object] = {"num_samples": 2, **options}
    with pytest.raises(ValueError, match=message):
        model.sample(**arguments)  # type: ignore[arg-type]


def test_run_sampler_leaves_input(toy: ToyDistribution) -> None:
    model = make_model(Oracle(toy), toy)
    xt = torch.full((4, 1, 2, 3), toy.mask_index)
    xt[:, 0, 0, 0] = 1
    before = xt.clone()
    result = run_sampler(
        model.logits, model.schedule, xt, torch.ones(4), mask_index=toy.mask_index, steps=3
    )
    assert torch.equal(xt, before)
    assert bool((result.samples[:, 0, 0, 0] == 1).all())


def test_impute_invalid_completions(toy: ToyDistribution) -> None:
    model = make_model(Oracle(toy), toy)
    obs = torch.ones(1, 1, 2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"invalid num_completions=0: expected a positive integer"):
        model.impute(toy.images[:1], obs, num_completions=0)


def test_confidence_noise_changes_order(toy: ToyDistribution) -> None:
    # The annealed noise makes the reveal order random: with it, the first pixel
    # revealed is not always the most peaked one.
    model = make_model(Oracle(toy), toy)
    generator = torch.Generator().manual_seed(0)
    result = model.sample(
        200,
        sampler="confidence",
        steps=6,
        temperature=0.0,
        return_trajectory=True,
        confidence_schedule="linear",
        confidence_noise=4.5,
        generator=generator,
    )
    assert result.trajectory is not None
    first_revealed = (result.trajectory[1] != toy.mask_index).reshape(200, -1).float().argmax(1)
    assert len(set(first_revealed.tolist())) > 1


def test_confidence_noise_rejects_negative(toy: ToyDistribution) -> None:
    model = make_model(Oracle(toy), toy)
    with pytest.raises(ValueError, match=r"invalid confidence_noise=-1.0: expected a number >= 0"):
        model.sample(2, sampler="confidence", confidence_noise=-1.0)
