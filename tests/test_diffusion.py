"""Tests of MaskedDiffusionModel: forward masking, the training loss and input checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from masked_diffusion import (
    DiffusionConfig,
    ExperimentConfig,
    MaskedDiffusionModel,
    MaskSchedule,
    MDMUNet,
    ModelConfig,
)
from toy import Oracle, UniformNetwork, binary_toy, exact_bound

SMALL_NET = ModelConfig(image_size=(4, 4), base_channels=8, channel_mults=(1, 2), num_groups=4)


class FixedTimeSchedule(MaskSchedule):
    """A schedule whose training times are given, to reach t -> 0 and t = 1 on purpose."""

    def __init__(self, times: Tensor, kind: str = "linear", num_timesteps: int | None = None):
        super().__init__(kind, num_timesteps)
        self.times = times

    def sample_times(self, batch_size: int, **kwargs: object) -> Tensor:
        assert batch_size == self.times.numel()
        return self.times.clone()


class PerturbLogits(nn.Module):
    """Adds fixed noise to a network's logits at unmasked (or masked) pixels of ``xt``."""

    def __init__(self, network: nn.Module, where: str, mask_index: int = 2) -> None:
        super().__init__()
        self.network = network
        self.where = where
        self.mask_index = mask_index

    def forward(self, xt: Tensor, t: Tensor) -> Tensor:
        logits: Tensor = self.network(xt, t)
        noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0)) * 3.0
        masked = xt == self.mask_index  # (B, 1, H, W) broadcasts over the K logits
        target = masked if self.where == "masked" else ~masked
        return torch.where(target, logits + noise.to(logits.dtype), logits)


class TinyNetwork(nn.Module):
    """A user network: an embedding of each pixel state and a 3x3 convolution."""

    def __init__(self, num_classes: int = 2, out_classes: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_classes + 1, 8)
        self.conv = nn.Conv2d(8, out_classes or num_classes, 3, padding=1)

    def forward(self, xt: Tensor, t: Tensor) -> Tensor:
        h = self.embed(xt[:, 0]).permute(0, 3, 1, 2)
        out: Tensor = self.conv(h) * (1.0 + t.float()[:, None, None, None])
        return out


def small_model(loss_weighting: str = "elbo", **kwargs: object) -> MaskedDiffusionModel:
    torch.manual_seed(0)
    return MaskedDiffusionModel(
        MDMUNet(SMALL_NET),
        image_shape=(1, 4, 4),
        loss_weighting=loss_weighting,
        **kwargs,  # type: ignore[arg-type]
    )


def random_images(batch: int, seed: int = 0, shape: tuple[int, ...] = (1, 4, 4)) -> Tensor:
    return torch.randint(0, 2, (batch, *shape), generator=torch.Generator().manual_seed(seed))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- forward process -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "cosine", "polynomial"])
def test_add_mask_fraction(kind: str) -> None:
    model = MaskedDiffusionModel(
        UniformNetwork(2), MaskSchedule(kind, exponent=2.0), image_shape=(1, 8, 8)
    )
    x0 = random_images(500, shape=(1, 8, 8))
    for time in (0.1, 0.5, 0.9):
        t = torch.full((500,), time, dtype=torch.float64)
        xt, masked = model.add_mask(x0, t, generator=seeded(1))
        expected = float(model.schedule.mask_prob(t[:1]))
        fraction = float(masked.double().mean())
        tolerance = 5 * math.sqrt(expected * (1 - expected) / masked.numel())
        assert abs(fraction - expected) < tolerance
        assert torch.equal(xt == 2, masked)
        assert torch.equal(xt[~masked], x0[~masked])


def test_add_mask_endpoints() -> None:
    model = small_model()
    x0 = random_images(8)
    xt, masked = model.add_mask(x0, torch.zeros(8, dtype=torch.float64), generator=seeded(0))
    assert torch.equal(xt, x0)
    assert not bool(masked.any())
    xt, masked = model.add_mask(x0, torch.ones(8, dtype=torch.float64), generator=seeded(0))
    assert bool((xt == 2).all())
    assert bool(masked.all())


def test_add_mask_ambient() -> None:
    model = small_model()
    x0 = random_images(64)
    obs_mask = torch.rand(64, 1, 4, 4, generator=seeded(2)) < 0.7
    xt, masked = model.add_mask(x0, torch.full((64,), 0.3), obs_mask, generator=seeded(3))
    assert bool((xt[~obs_mask] == 2).all())
    assert not bool((masked & ~obs_mask).any())
    assert torch.equal(xt == 2, masked | ~obs_mask)


# -- training loss -------------------------------------------------------------------


@pytest.mark.parametrize("loss_weighting", ["mlm", "elbo"])
@pytest.mark.parametrize("num_timesteps", [None, 4])
def test_loss_ignores_unmasked_logits(loss_weighting: str, num_timesteps: int | None) -> None:
    base = small_model(loss_weighting, schedule=MaskSchedule(num_timesteps=num_timesteps))
    x0 = random_images(16)
    reference = base.compute_loss(x0, generator=seeded(4))
    for where, changes in (("unmasked", False), ("masked", True)):
        perturbed = MaskedDiffusionModel(
            PerturbLogits(base.network, where),
            base.schedule,
            image_shape=(1, 4, 4),
            loss_weighting=loss_weighting,
        )
        loss = perturbed.compute_loss(x0, generator=seeded(4))
        assert bool(torch.equal(loss, reference)) is not changes, where


def test_loss_uniform_network() -> None:
    model = MaskedDiffusionModel(UniformNetwork(2), image_shape=(1, 4, 4), loss_weighting="mlm")
    loss = model.compute_loss(random_images(32), generator=seeded(5))
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("loss_weighting", ["mlm", "elbo"])
def test_loss_nothing_masked(loss_weighting: str) -> None:
    # NOTE: below about 3e-39 the float32 weight overflows to inf, and inf * 0 is NaN;
    # sample_times never draws below 2**-53.
    times = torch.tensor([1e-30, 1e-20, 1e-12, 1.0], dtype=torch.float64)
    model = small_model(loss_weighting, schedule=FixedTimeSchedule(times))
    network_loss = model.compute_loss(random_images(4), generator=seeded(6))
    assert bool(torch.isfinite(network_loss))
    # Only the row at t = 1 has masked pixels: the other rows add exactly zero.
    solo = small_model(loss_weighting, schedule=FixedTimeSchedule(times[:3]))
    assert float(solo.compute_loss(random_images(4)[:3], generator=seeded(6)).detach()) == 0.0


@pytest.mark.parametrize("loss_weighting", ["mlm", "elbo"])
@pytest.mark.parametrize("kind", ["linear", "cosine", "polynomial"])
def test_loss_gradients_finite(loss_weighting: str, kind: str) -> None:
    times = torch.tensor([1e-30, 1e-8, 1e-3, 0.5, 1.0, 1.0], dtype=torch.float64)
    model = small_model(loss_weighting, schedule=FixedTimeSchedule(times, kind))
    # The rows at t = 1 are fully masked, so the loss is positive.
    loss = model.compute_loss(random_images(6), generator=seeded(7))
    loss.backward()
    assert bool(torch.isfinite(loss))
    assert float(loss.detach()) > 0
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert bool(torch.isfinite(parameter.grad).all()), name


@pytest.mark.parametrize("loss_weighting", ["mlm", "elbo"])
def test_loss_ambient_ignores_missing_values(loss_weighting: str) -> None:
    model = small_model(loss_weighting)
    x0 = random_images(16, seed=8)
    obs_mask = torch.rand(16, 1, 4, 4, generator=seeded(9)) < 0.5
    other = torch.where(obs_mask, x0, 1 - x0)
    invalid = torch.where(obs_mask, x0, 7)  # missing values are not checked either

    gradients = []
    losses = []
    for images in (x0, other, invalid):
        model.zero_grad()
        loss = model.compute_loss(images, obs_mask, generator=seeded(10))
        loss.backward()
        losses.append(loss.detach())
        gradients.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert torch.equal(losses[0], losses[1])
    assert torch.equal(losses[0], losses[2])
    for first, second in zip(gradients[0], gradients[1], strict=True):
        assert torch.equal(first, second)


@pytest.mark.parametrize("loss_weighting", ["mlm", "elbo"])
def test_loss_all_observed_equals_none(loss_weighting: str) -> None:
    model = small_model(loss_weighting)
    x0 = random_images(16, seed=11)
    everything = torch.ones_like(x0, dtype=torch.bool)
    first = model.compute_loss(x0, everything, generator=seeded(12))
    second = model.compute_loss(x0, None, generator=seeded(12))
    assert torch.equal(first, second)


def test_loss_reproducible_and_forward() -> None:
    model = small_model("elbo")
    x0 = random_images(8)
    first = model.compute_loss(x0, generator=seeded(13))
    assert torch.equal(first, model(x0, generator=seeded(13)))
    assert not torch.equal(first, model.compute_loss(x0, generator=seeded(14)))


@pytest.mark.parametrize("num_timesteps", [None, 3])
def test_elbo_loss_mean_is_bound(num_timesteps: int | None) -> None:
    # With the oracle the expected "elbo" loss is the mean bound of the batch images.
    toy = binary_toy()
    oracle = Oracle(toy)
    schedule = MaskSchedule("cosine", num_timesteps=num_timesteps)
    model = MaskedDiffusionModel(
        oracle, schedule, image_shape=toy.image_shape, loss_weighting="elbo"
    )
    batch = toy.images.repeat(50, 1, 1, 1)
    generator = seeded(15)
    losses = torch.tensor(
        [float(model.compute_loss(batch, generator=generator)) for _ in range(30)]
    )
    exact = torch.tensor([exact_bound(oracle, x, schedule=schedule) for x in toy.images]).mean()
    stderr = float(losses.std()) / math.sqrt(losses.numel())
    assert abs(float(losses.mean()) - float(exact)) < 5 * stderr + 1e-6


# -- input checks --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x0", "obs_mask", "error", "message"),
    [
        (
            torch.full((2, 1, 4, 4), 2),
            None,
            ValueError,
            r"x0 must contain values in \{0, \.\.\., 1\}",
        ),
        (torch.full((2, 1, 4, 4), -1), None, ValueError, r"got values in \[-1, -1\]"),
        (
            torch.zeros(2, 4, 4, dtype=torch.long),
            None,
            ValueError,
            r"x0 must have shape \(batch, 1, 4, 4\), got \(2, 4, 4\)",
        ),
        (torch.zeros(2, 1, 5, 4, dtype=torch.long), None, ValueError, r"got \(2, 1, 5, 4\)"),
        (
            torch.zeros(2, 1, 4, 4),
            None,
            TypeError,
            r"x0 must have an integer dtype .* got dtype torch.float32",
        ),
        (torch.zeros(2, 1, 4, 4, dtype=torch.bool), None, TypeError, r"got dtype torch.bool"),
        (
            [[0, 1]],
            None,
            TypeError,
            r"x0 must be a torch.Tensor of shape \(batch, 1, 4, 4\), got list",
        ),
        (
            torch.zeros(2, 1, 4, 4, dtype=torch.long),
            torch.ones(2, 1, 4, 4),
            TypeError,
            r"obs_mask must be a torch.bool tensor .* got torch.float32",
        ),
        (
            torch.zeros(2, 1, 4, 4, dtype=torch.long),
            torch.ones(2, 4, 4, dtype=torch.bool),
            ValueError,
            r"obs_mask must have the shape of x0 \(2, 1, 4, 4\), got \(2, 4, 4\)",
        ),
    ],
)
def test_loss_invalid_inputs(
    x0: object, obs_mask: Tensor | None, error: type[Exception], message: str
) -> None:
    model = small_model()
    with pytest.raises(error, match=message):
        model.compute_loss(x0, obs_mask)  # type: ignore[arg-type]


def test_nll_invalid_inputs() -> None:
    model = small_model()
    with pytest.raises(ValueError, match=r"x0 must contain values in"):
        model.nll(torch.full((1, 1, 4, 4), 3))
    with pytest.raises(ValueError, match=r"invalid num_samples=0"):
        model.nll(random_images(1), num_samples=0)
    with pytest.raises(ValueError, match=r"invalid estimator='mean'"):
        model.nll(random_images(1), estimator="mean")
    with pytest.raises(ValueError, match=r"time='discrete' needs a discrete schedule"):
        model.nll(random_images(1), time="discrete")
    with pytest.raises(ValueError, match=r"invalid time='exact'"):
        model.nll(random_images(1), time="exact")


def test_model_invalid_options() -> None:
    with pytest.raises(TypeError, match=r"network must be a torch.nn.Module .* got function"):
        MaskedDiffusionModel(lambda xt, t: xt)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"schedule must be a MaskSchedule, got str"):
        MaskedDiffusionModel(TinyNetwork(), "linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"invalid num_classes=1"):
        MaskedDiffusionModel(TinyNetwork(), num_classes=1)
    with pytest.raises(ValueError, match=r"invalid image_shape=\(28, 28\)"):
        MaskedDiffusionModel(TinyNetwork(), image_shape=(28, 28))
    with pytest.raises(ValueError, match=r"invalid diffusion.loss_weighting='kl'"):
        MaskedDiffusionModel(TinyNetwork(), loss_weighting="kl")
    with pytest.raises(ValueError, match=r"invalid diffusion.sampler='ancestra'.*'ancestral'"):
        MaskedDiffusionModel(TinyNetwork(), sampler="ancestra")


# -- user networks -------------------------------------------------------------------


def test_custom_network_composes() -> None:
    model = MaskedDiffusionModel(TinyNetwork(), MaskSchedule("cosine"), image_shape=(1, 5, 7))
    x0 = random_images(4, shape=(1, 5, 7))
    loss = model.compute_loss(x0, generator=seeded(16))
    loss.backward()
    assert model.network.conv.weight.grad is not None
    assert model.nll(x0).nats.shape == (4,)
    samples = model.sample(3, steps=4, generator=seeded(17))
    assert samples.shape == (3, 1, 5, 7)
    assert model.network_uses_time is True
    assert set(model.state_dict()) == {
        "network.embed.weight",
        "network.conv.weight",
        "network.conv.bias",
    }


def test_custom_network_wrong_shape() -> None:
    model = MaskedDiffusionModel(TinyNetwork(out_classes=3), image_shape=(1, 4, 4))
    with pytest.raises(
        ValueError, match=r"the network returned logits of shape \(2, 3, 4, 4\); expected"
    ):
        model.compute_loss(random_images(2))


def test_ternary_model_loss() -> None:
    network = MDMUNet(
        ModelConfig(
            num_classes=3,
            in_channels=3,
            image_size=(4, 4),
            base_channels=8,
            channel_mults=(1,),
            num_groups=4,
        )
    )
    model = MaskedDiffusionModel(
        network, num_classes=3, image_shape=(3, 4, 4), loss_weighting="elbo"
    )
    x0 = torch.randint(0, 3, (4, 3, 4, 4), generator=seeded(18))
    assert bool(torch.isfinite(model.compute_loss(x0, generator=seeded(19))))
    # An untrained MDMUNet predicts uniformly, so the bound is D ln K for every image.
    assert torch.allclose(
        model.nll(x0).nats, torch.full((4,), 48 * math.log(3), dtype=torch.float64)
    )
    samples = model.sample(2, steps=3, generator=seeded(20))
    assert samples.shape == (2, 3, 4, 4)
    assert bool((samples < 3).all())


def test_from_config() -> None:
    config = ExperimentConfig(
        model=SMALL_NET, diffusion=DiffusionConfig(loss_weighting="elbo", sampling_steps=7)
    )
    model = MaskedDiffusionModel.from_config(config)
    assert model.config == config
    assert model.image_shape == (1, 4, 4)
    assert model.loss_weighting == "elbo"
    assert model.sampling_steps == 7
    assert isinstance(model.network, MDMUNet)
    result = model.sample(2, return_info=True)
    assert result.num_function_evals == 7


def test_nll_keeps_training_mode() -> None:
    model = small_model()
    model.train()
    state = torch.get_rng_state()
    first = model.nll(random_images(4), num_samples=2)
    second = model.nll(random_images(4), num_samples=2)
    assert model.training
    assert torch.equal(first.nats, second.nats)
    assert torch.equal(torch.get_rng_state(), state)
