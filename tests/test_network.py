"""Tests of MDMUNet: output shapes, shape checks, time conditioning and sampling with it."""

from __future__ import annotations

import pytest
import torch

from masked_diffusion import MaskedDiffusionModel, MaskSchedule, MDMUNet, ModelConfig
from masked_diffusion.network import sinusoidal_embedding


def small_config(**overrides: object) -> ModelConfig:
    options: dict[str, object] = dict(
        image_size=(8, 8), base_channels=8, channel_mults=(1, 2), num_groups=4
    )
    options.update(overrides)
    return ModelConfig(**options)  # type: ignore[arg-type]


def trained_like(network: MDMUNet) -> MDMUNet:
    """Give the zero-initialised output layer random weights, so outputs depend on inputs."""
    torch.manual_seed(0)
    torch.nn.init.normal_(network.conv_out.weight, std=0.5)
    return network


def test_unet_output_shape() -> None:
    network = MDMUNet(small_config())
    xt = torch.randint(0, 3, (5, 1, 8, 8))
    logits = network(xt, torch.rand(5))
    assert logits.shape == (5, 2, 8, 8)
    assert logits.dtype == torch.float32


def test_unet_mnist_shape() -> None:
    network = MDMUNet(ModelConfig(base_channels=8, num_groups=4))
    logits = network(torch.full((2, 1, 28, 28), 2), torch.ones(2))
    assert logits.shape == (2, 2, 28, 28)


def test_unet_starts_uniform() -> None:
    network = MDMUNet(small_config())
    logits = network(torch.randint(0, 3, (3, 1, 8, 8)), torch.rand(3))
    assert torch.equal(logits, torch.zeros_like(logits))


@pytest.mark.parametrize(("num_classes", "in_channels"), [(3, 1), (2, 3), (4, 3)])
def test_unet_classes_channels(num_classes: int, in_channels: int) -> None:
    network = MDMUNet(small_config(num_classes=num_classes, in_channels=in_channels))
    xt = torch.randint(0, num_classes + 1, (2, in_channels, 8, 8))
    logits = network(xt, torch.rand(2))
    if in_channels == 1:
        assert logits.shape == (2, num_classes, 8, 8)
    else:
        assert logits.shape == (2, num_classes, in_channels, 8, 8)


def test_unet_rejects_odd_levels() -> None:
    message = (
        r"invalid model.channel_mults=\[1, 2, 2, 2\]: 4 levels halve 28x28 images 3 times, "
        r"but the path 28x28 -> 14x14 -> 7x7 reaches an odd size after 2 halvings.*"
        r"use at most 3 levels, e.g. channel_mults=\[1, 2, 2\]"
    )
    with pytest.raises(ValueError, match=message):
        MDMUNet(ModelConfig(channel_mults=(1, 2, 2, 2)))


def test_unet_rejects_groups() -> None:
    with pytest.raises(
        ValueError, match=r"invalid model.num_groups=3: .* \[8, 16\] .* use one of \[1, 2, 4, 8\]"
    ):
        MDMUNet(small_config(num_groups=3))


def test_unet_ignores_time_without_conditioning() -> None:
    network = trained_like(MDMUNet(small_config(time_conditioning=False)))
    assert network.time_mlp is None
    xt = torch.randint(0, 3, (4, 1, 8, 8))
    first = network(xt, torch.zeros(4))
    second = network(xt, torch.ones(4))
    assert torch.equal(first, second)


def test_unet_reads_time_with_conditioning() -> None:
    network = trained_like(MDMUNet(small_config()))
    torch.nn.init.normal_(network.time_mlp[2].weight)  # type: ignore[index]
    xt = torch.randint(0, 3, (4, 1, 8, 8))
    assert not torch.equal(network(xt, torch.zeros(4)), network(xt, torch.ones(4)))


def test_unet_batch_independent() -> None:
    network = trained_like(MDMUNet(small_config())).eval()
    xt = torch.randint(0, 3, (6, 1, 8, 8))
    t = torch.rand(6)
    full = network(xt, t)
    part = network(xt[2:4], t[2:4])
    assert torch.allclose(full[2:4], part, atol=1e-5)


def test_sinusoidal_embedding() -> None:
    embedding = sinusoidal_embedding(torch.tensor([0.0, 0.5]), 16)
    assert embedding.shape == (2, 16)
    assert torch.equal(embedding[0, :8], torch.ones(8))
    assert torch.equal(embedding[0, 8:], torch.zeros(8))


@pytest.mark.parametrize("sampler", ["ancestral", "first_hitting", "confidence"])
def test_unet_samples_valid(sampler: str) -> None:
    config = small_config(image_size=(4, 4), time_conditioning=sampler != "ancestral")
    model = MaskedDiffusionModel(
        trained_like(MDMUNet(config)), MaskSchedule("cosine"), image_shape=(1, 4, 4)
    )
    result = model.sample(
        6,
        sampler=sampler,
        steps=5,
        return_trajectory=True,
        generator=torch.Generator().manual_seed(1),
    )
    assert result.samples.shape == (6, 1, 4, 4)
    assert bool((result.samples >= 0).all())
    assert bool((result.samples < 2).all())
    assert result.trajectory is not None
    for before, after in zip(result.trajectory[:-1], result.trajectory[1:], strict=True):
        decoded = before != 2
        assert torch.equal(after[decoded], before[decoded])
    again = model.sample(6, sampler=sampler, steps=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, result.samples)


def test_unet_cache_counts() -> None:
    network = trained_like(MDMUNet(small_config(image_size=(4, 4), time_conditioning=False)))
    model = MaskedDiffusionModel(network, image_shape=(1, 4, 4))
    assert model.network_uses_time is False
    result = model.sample(4, steps=60, return_info=True, generator=torch.Generator().manual_seed(2))
    assert result.num_image_evals < 4 * result.num_function_evals
