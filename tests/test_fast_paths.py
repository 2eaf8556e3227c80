"""Tests of the fast paths: channels-last layout, torch.compile, sync-free sampling loops.

Speed itself is measured by ``benchmarks/run.py``, never here. These tests check that
each fast path gives the same results as the plain path, and that the sampling loops
do not copy values from the device to the host.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from masked_diffusion.config import ExperimentConfig, ModelConfig, TrainerConfig, apply_overrides
from masked_diffusion.data import BinaryImageDataset
from masked_diffusion.diffusion import MaskedDiffusionModel
from masked_diffusion.network import MDMUNet
from masked_diffusion.trainer import Trainer

REPO_ROOT = Path(__file__).resolve().parent.parent
SMALL = ModelConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, num_groups=4)

# ATen operators that copy a device value to the host, or whose output size depends
# on tensor values (boolean indexing calls nonzero).
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique")
# Tensor methods that return a Python value. On the CPU, item() and the conversions
# read memory directly without an ATen call, so they are recorded at the Python level.
SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


class SyncRecorder(TorchDispatchMode):
    """Record every ATen operator and tensor method that synchronises with the host."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        self.calls: list[str] = []
        for name in SYNC_METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._recording(name))

    def _recording(self, name: str) -> Callable[..., Any]:
        original = getattr(torch.Tensor, name)

        def method(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return original(tensor, *args, **kwargs)

        return method

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.calls.append(name)
        elif name in ("index", "index_put_", "index_put") and _has_bool_index(args):
            self.calls.append(f"{name} with a bool mask")
        return func(*args, **(kwargs or {}))


def _has_bool_index(args: tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def make_model(time_conditioning: bool = True) -> MaskedDiffusionModel:
    torch.manual_seed(0)
    config = ExperimentConfig(
        model=ModelConfig(
            base_channels=8,
            channel_mults=(1, 2),
            num_res_blocks=1,
            num_groups=4,
            time_conditioning=time_conditioning,
        )
    )
    return MaskedDiffusionModel.from_config(config)


def record_syncs(run: Callable[[], object], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    with monkeypatch.context() as patch, SyncRecorder(patch) as recorder:
        run()
    return recorder.calls


def random_xt(batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    xt = torch.randint(0, 3, (batch, 1, 28, 28), generator=generator)
    t = torch.rand(batch, generator=generator)
    return xt, t


def trained_like(network: MDMUNet) -> MDMUNet:
    """Give the zero-initialised output layer weights, so outputs depend on the input."""
    with torch.no_grad():
        nn.init.normal_(network.conv_out.weight, std=0.1)
    return network


# --------------------------------------------------------------------------- channels_last


def test_channels_last_outputs_match_contiguous() -> None:
    torch.manual_seed(0)
    contiguous = trained_like(MDMUNet(SMALL))
    channels_last = MDMUNet(SMALL)
    channels_last.load_state_dict(contiguous.state_dict())
    channels_last.to(memory_format=torch.channels_last)
    xt, t = random_xt()

    expected = contiguous(xt, t)
    actual = channels_last(xt, t)

    assert expected.abs().max() > 0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_channels_last_gradients_match_contiguous() -> None:
    torch.manual_seed(0)
    contiguous = trained_like(MDMUNet(SMALL))
    channels_last = MDMUNet(SMALL)
    channels_last.load_state_dict(contiguous.state_dict())
    channels_last.to(memory_format=torch.channels_last)
    xt, t = random_xt()

    contiguous(xt, t).square().mean().backward()
    channels_last(xt, t).square().mean().backward()

    for (name, a), (_, b) in zip(
        contiguous.named_parameters(), channels_last.named_parameters(), strict=True
    ):
        assert a.grad is not None and b.grad is not None, name
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_network_activations_follow_weight_layout(layout: torch.memory_format) -> None:
    network = MDMUNet(SMALL).to(memory_format=layout)
    seen: list[torch.Tensor] = []
    network.down_blocks[0][0].conv1.register_forward_hook(  # type: ignore[index]
        lambda module, inputs, output: seen.append(output)
    )
    network(*random_xt())

    assert len(seen) == 1
    assert seen[0].is_contiguous(memory_format=layout)


def test_channels_last_config_key() -> None:
    config = apply_overrides(ExperimentConfig(), ["trainer.channels_last=true"])

    assert config.trainer.channels_last is True
    assert TrainerConfig().channels_last is False


def test_trainer_channels_last_converts_network(tmp_path: Path) -> None:
    images = torch.randint(0, 2, (16, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    data = BinaryImageDataset.from_tensor(images)
    config = apply_overrides(
        ExperimentConfig(model=SMALL),
        [
            f"trainer.output_dir={tmp_path / 'run'}",
            "trainer.channels_last=true",
            "trainer.device=cpu",
            "trainer.epochs=1",
            "trainer.ema_decay=0.9",
            "trainer.num_sample_images=0",
            "trainer.progress_bar=false",
            "data.batch_size=8",
        ],
    )
    model = MaskedDiffusionModel.from_config(config)
    Trainer(model, config, train_data=data).fit()

    weight = model.network.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert not weight.is_contiguous()
    fresh = MaskedDiffusionModel.from_config(config)
    fresh.load_state_dict(model.state_dict())
    xt, t = random_xt()
    torch.testing.assert_close(fresh.network(xt, t), model.network(xt, t))


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_compile_fullgraph_matches_eager() -> None:
    torch.manual_seed(0)
    network = trained_like(MDMUNet(SMALL)).eval()
    compiled = torch.compile(network, fullgraph=True)
    xt, t = random_xt()

    with torch.no_grad():
        expected = network(xt, t)
        actual = compiled(xt, t)

    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- host syncs


@pytest.mark.parametrize("sampler", ["ancestral", "confidence"])
@pytest.mark.parametrize("steps", [3, 12])
def test_sampling_loop_has_no_host_sync(
    sampler: str, steps: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model()
    generator = torch.Generator().manual_seed(0)

    calls = record_syncs(
        lambda: model.sample(4, sampler=sampler, steps=steps, generator=generator), monkeypatch
    )

    assert calls == []


@pytest.mark.parametrize("pixels_per_event", [98, 392])
def test_first_hitting_syncs_once(pixels_per_event: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    generator = torch.Generator().manual_seed(0)

    calls = record_syncs(
        lambda: model.sample(
            2, sampler="first_hitting", pixels_per_event=pixels_per_event, generator=generator
        ),
        monkeypatch,
    )

    # item() of a CPU tensor may or may not reach ATen's _local_scalar_dense.
    assert calls in (["item"], ["item", "_local_scalar_dense"])


def test_sync_recorder_sees_cache_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    # The output cache of a time-agnostic network selects changed images with
    # nonzero() once per step after the first; the recorder must report those.
    model = make_model(time_conditioning=False)
    generator = torch.Generator().manual_seed(0)

    calls = record_syncs(
        lambda: model.sample(4, sampler="ancestral", steps=5, generator=generator), monkeypatch
    )

    assert calls.count("nonzero") == 4


def test_sampling_runs_in_inference_mode() -> None:
    model = make_model()
    modes: list[bool] = []
    model.network.register_forward_hook(
        lambda module, inputs, output: modes.append(torch.is_inference_mode_enabled())
    )

    model.sample(2, steps=2, generator=torch.Generator().manual_seed(0))

    assert modes == [True, True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sampler", ["ancestral", "confidence"])
def test_sampling_loop_has_no_cuda_sync(sampler: str) -> None:
    model = make_model().cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)
    model.sample(2, sampler=sampler, steps=2, generator=generator)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.sample(4, sampler=sampler, steps=4, generator=generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------- benchmark smoke


@pytest.mark.slow
def test_benchmark_quick_writes_report(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "--output", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert set(results) >= {"machine", "matmul", "training", "time_to_quality", "sampling"}
    assert len(results["machine"]["load_average"]) == 3
    assert all(r["error"] is None for r in results["training"])
    assert all(r["fraction_of_matmul"] > 0 for r in results["training"])
    assert {r["sampler"] for r in results["sampling"]} == {
        "ancestral",
        "confidence",
        "first_hitting",
    }
    assert results["time_to_quality"]["points"][0]["val_nll"] > 0
    cache = {r["cache"]: r for r in results["cache"]}
    assert cache[True]["num_image_evals"] <= cache[False]["num_image_evals"]
    report = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "## Training throughput" in report
    assert "## Sampling" in report
    assert (tmp_path / "sampling_quality_vs_time.png").is_file()
    assert (tmp_path / "time_to_quality.png").is_file()
