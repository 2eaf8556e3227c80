"""Tests of MaskSchedule: alpha_t, its weights, its inverse and the time draws."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from masked_diffusion import MaskSchedule

KINDS = [
    ("linear", 1.0),
    ("cosine", 1.0),
    ("polynomial", 2.0),
    ("polynomial", 0.5),
    ("polynomial", 3.7),
]
IDS = [f"{kind}-{exponent}" for kind, exponent in KINDS]


def closed_form(kind: str, exponent: float, t: float) -> float:
    if kind == "linear":
        return 1.0 - t
    if kind == "cosine":
        return math.cos(0.5 * math.pi * t)
    return 1.0 - t**exponent


unit_times = st.floats(0.0, 1.0, allow_nan=False)
positive_times = st.floats(1e-300, 1.0, allow_nan=False)


@pytest.mark.parametrize(("kind", "exponent"), KINDS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpha_endpoints_exact(kind: str, exponent: float, dtype: torch.dtype) -> None:
    schedule = MaskSchedule(kind, exponent=exponent)
    alpha = schedule.alpha(torch.tensor([0.0, 1.0], dtype=dtype))
    assert alpha.dtype == dtype
    assert alpha.tolist() == [1.0, 0.0]
    assert schedule.mask_prob(torch.tensor([0.0, 1.0], dtype=dtype)).tolist() == [0.0, 1.0]


@pytest.mark.parametrize(("kind", "exponent"), KINDS, ids=IDS)
def test_alpha_closed_form(kind: str, exponent: float) -> None:
    schedule = MaskSchedule(kind, exponent=exponent)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    expected = torch.tensor([closed_form(kind, exponent, float(x)) for x in t], dtype=torch.float64)
    assert torch.allclose(schedule.alpha(t), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize(("kind", "exponent"), KINDS, ids=IDS)
@given(a=unit_times, b=unit_times)
def test_alpha_monotone(kind: str, exponent: float, a: float, b: float) -> None:
    schedule = MaskSchedule(kind, exponent=exponent)
    low, high = min(a, b), max(a, b)
    alpha = schedule.alpha(torch.tensor([low, high], dtype=torch.float64))
    assert alpha[0] >= alpha[1]
    assert 0.0 <= float(alpha[1]) <= float(alpha[0]) <= 1.0


@pytest.mark.parametrize(("kind", "exponent"), KINDS, ids=IDS)
@given(t=unit_times)
def test_mask_prob_complements_alpha(kind: str, exponent: float, t: float) -> None:
    schedule = MaskSchedule(kind, exponent=exponent)
    times = torch.tensor([t], dtype=torch.float64)
    total = schedule.alpha(times) + schedule.mask_prob(times)
    assert float(total) == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize(("kind", "exponent"), KINDS, ids=IDS)
def test_mask_prob_accurate_small_t(kind: str, exponent: float) -> None:
    # 1 - alpha_t would round to 0 here; mask_prob must not.
    schedule = MaskSchedule(kind, exponent=exponent)
    t = torch.tensor([1e-12], dtype=torch.float64)
    if kind == "cosine":
        expected = 2.0 * math.sin(0.25 * math.pi * 1e-12) ** 2
    else:
        expected = 1e-12 ** (exponent if kind == "polynomial" else 1.0)
    assert float(schedule.mask_prob(t)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("kind", "exponent"), KINDS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_weight_finite_positive(kind: str, exponent: float, dtype: torch.dtype) -> None:
    schedule = MaskSchedule(kind, exponent=exponent)
    t = torch.tensor([1e-30, 1e-20, 1e-8, 1e-3, 0.5, 0.999, 1.0], dtype=dtype)
    weight = schedule.loss_weight(t)
    assert bool(torch.isfinite(weight).all())
    assert bool((weight > 0).all())


@pytest.mark.parametrize(("kind", "exponent"), KINDS, ids=IDS)
@given(t=st.floats(1e-60, 1.0))
def test_loss_weight_definition(kind: str, exponent: float, t: float) -> None:
    schedule = MaskSchedule(kind, exponent=exponent)
    times = torch.tensor([t], dtype=torch.float64)
    weight = float(schedule.loss_weight(times))
    derivative = -schedule.alpha_derivative(times)
    assert weight == pytest.approx(float(derivative / schedule.mask_prob(times)), rel=1e-9)
    if t >= 0.05:
        # Far from 0 the textbook form 1 - alpha_t has no cancellation to speak of.
        assert weight == pytest.approx(float(derivative / (1.0 - schedule.alpha(times))), rel=1e-9)


@pytest.mark.parametrize(("kind", "exponent"), KINDS, ids=IDS)
@given(t=positive_times)
def test_loss_weight_finite_property(kind: str, exponent: float, t: float) -> None:
    weight = MaskSchedule(kind, exponent=exponent).loss_weight(
        torch.tensor([t], dtype=torch.float64)
    )
    assert math.isfinite(float(weight))
    assert float(weight) > 0


@pytest.mark.parametrize(("kind", "exponent"), KINDS, ids=IDS)
def test_alpha_derivative_numeric(kind: str, exponent: float) -> None:
    schedule = MaskSchedule(kind, exponent=exponent)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    numeric = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
    assert torch.allclose(schedule.alpha_derivative(t), numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(("kind", "exponent"), KINDS, ids=IDS)
@given(t=unit_times)
def test_time_from_mask_prob_inverts(kind: str, exponent: float, t: float) -> None:
    schedule = MaskSchedule(kind, exponent=exponent)
    times = torch.tensor([t], dtype=torch.float64)
    level = schedule.mask_prob(times)
    recovered = schedule.time_from_mask_prob(level)
    # The inverse is steep where alpha' vanishes: compare levels, not times.
    assert float(schedule.mask_prob(recovered)) == pytest.approx(float(level), rel=1e-9, abs=1e-15)
    if kind != "cosine" and exponent <= 1.0:
        assert float(recovered) == pytest.approx(t, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize(("kind", "exponent"), KINDS, ids=IDS)
def test_time_from_mask_prob_endpoints(kind: str, exponent: float) -> None:
    schedule = MaskSchedule(kind, exponent=exponent)
    times = schedule.time_from_mask_prob(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert times.tolist() == pytest.approx([0.0, 1.0], abs=1e-15)


@pytest.mark.parametrize("schedule", [MaskSchedule("cosine"), MaskSchedule(num_timesteps=5)])
def test_sample_times_positive(schedule: MaskSchedule) -> None:
    for batch in (1, 2, 7, 1000):
        for stratified in (True, False):
            t = schedule.sample_times(
                batch, generator=torch.Generator().manual_seed(batch), stratified=stratified
            )
            assert t.shape == (batch,)
            assert t.dtype == torch.float64
            assert bool((t > 0).all())
            assert bool((t <= 1).all())


@pytest.mark.parametrize("batch", [1, 3, 1000])
def test_sample_times_extreme_draw(monkeypatch: pytest.MonkeyPatch, batch: int) -> None:
    # torch.rand cannot be made to return its largest value on demand, so replace it
    # with a draw of 1 - 2**-53 everywhere: (B - 1 + u) / B then rounds up to 1.
    real_rand = torch.rand

    def largest(*args: object, **kwargs: object) -> torch.Tensor:
        return torch.full_like(real_rand(*args, **kwargs), 1.0 - 2.0**-53)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "rand", largest)
    for stratified in (True, False):
        t = MaskSchedule("cosine").sample_times(
            batch, generator=torch.Generator().manual_seed(0), stratified=stratified
        )
        assert bool((t > 0).all()), f"stratified={stratified}: {t.min()}"
        assert bool((MaskSchedule("cosine").loss_weight(t) < math.inf).all())


@given(batch=st.integers(1, 300), seed=st.integers(0, 2**32))
def test_sample_times_stratified_cover(batch: int, seed: int) -> None:
    schedule = MaskSchedule("linear")
    t = schedule.sample_times(batch, generator=torch.Generator().manual_seed(seed))
    # Element k of the sorted batch lies in ((k) / B, (k + 1) / B].
    strata = torch.ceil(torch.sort(t).values * batch) - 1
    assert torch.equal(strata, torch.arange(batch, dtype=torch.float64))


@given(steps=st.integers(1, 50), batch=st.integers(1, 200), seed=st.integers(0, 2**32))
def test_sample_times_discrete_grid(steps: int, batch: int, seed: int) -> None:
    schedule = MaskSchedule("cosine", num_timesteps=steps)
    t = schedule.sample_times(batch, generator=torch.Generator().manual_seed(seed))
    index = torch.round(t * steps)
    assert torch.equal(t, index / steps)
    assert bool((index >= 1).all())
    assert bool((index <= steps).all())


def test_sample_times_discrete_uniform() -> None:
    schedule = MaskSchedule("linear", num_timesteps=4)
    t = schedule.sample_times(40_000, generator=torch.Generator().manual_seed(1), stratified=False)
    counts = torch.bincount((t * 4).round().long(), minlength=5)[1:].double()
    expected = 10_000.0
    assert bool(((counts - expected).abs() < 5 * math.sqrt(expected * 0.75)).all())


def test_sample_times_uses_generator() -> None:
    schedule = MaskSchedule()
    state = torch.get_rng_state()
    first = schedule.sample_times(16, generator=torch.Generator().manual_seed(3))
    second = schedule.sample_times(16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(("kind", "exponent"), KINDS, ids=IDS)
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_step_probs_sum(kind: str, exponent: float, steps: int) -> None:
    schedule = MaskSchedule(kind, num_timesteps=steps, exponent=exponent)
    probs = schedule.step_probs()
    assert probs.shape == (steps,)
    assert bool((probs >= 0).all())
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-15)


def test_step_probs_continuous_error() -> None:
    with pytest.raises(ValueError, match=r"step_probs\(\) needs a discrete schedule"):
        MaskSchedule("linear").step_probs()


@pytest.mark.parametrize(("kind", "exponent"), KINDS, ids=IDS)
@given(a=unit_times, b=unit_times)
def test_unmask_prob_definition(kind: str, exponent: float, a: float, b: float) -> None:
    schedule = MaskSchedule(kind, exponent=exponent)
    s, t = min(a, b), max(a, b)
    times = torch.tensor([t], dtype=torch.float64)
    value = float(schedule.unmask_prob(times, torch.tensor([s], dtype=torch.float64)))
    assert 0.0 <= value <= 1.0
    if s == 0.0:
        assert value == 1.0
    elif t > 1e-6:
        alpha_s, alpha_t = closed_form(kind, exponent, s), closed_form(kind, exponent, t)
        assert value == pytest.approx((alpha_s - alpha_t) / (1 - alpha_t), abs=1e-9)


def test_snap_to_grid() -> None:
    schedule = MaskSchedule(num_timesteps=4)
    t = torch.tensor([0.0, 0.1, 0.13, 0.6, 1.0], dtype=torch.float64)
    assert schedule.snap_to_grid(t).tolist() == [0.0, 0.0, 0.25, 0.5, 1.0]
    assert torch.equal(MaskSchedule().snap_to_grid(t), t)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(kind="sigmoid"), r"invalid schedule.kind='sigmoid'"),
        (dict(kind="cosin"), r"did you mean 'cosine'\?"),
        (dict(num_timesteps=0), r"invalid schedule.num_timesteps=0"),
        (dict(kind="polynomial", exponent=0.0), r"invalid schedule.exponent=0.0"),
    ],
)
def test_schedule_invalid(arguments: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MaskSchedule(**arguments)  # type: ignore[arg-type]


def test_schedule_repr() -> None:
    assert repr(MaskSchedule("polynomial", 5, 2.0)) == (
        "MaskSchedule(kind='polynomial', num_timesteps=5, exponent=2.0)"
    )
    assert MaskSchedule(num_timesteps=5).is_discrete
    assert not MaskSchedule().is_discrete
