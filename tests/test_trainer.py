"""Tests of the training loop: exact resume, crash safety, best/epoch files, precision, EMA."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from masked_diffusion.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model,
    save_checkpoint,
    save_pretrained,
)
from masked_diffusion.config import (
    DataConfig,
    DiffusionConfig,
    ExperimentConfig,
    ModelConfig,
    TrainerConfig,
)
from masked_diffusion.data import BinaryImageDataset
from masked_diffusion.diffusion import MaskedDiffusionModel
from masked_diffusion.network import MDMUNet
from masked_diffusion.schedule import MaskSchedule
from masked_diffusion.trainer import (
    NonFiniteLossError,
    Trainer,
    resolve_device,
    seed_everything,
    warmup_cosine_lambda,
)

IMAGE_SIZE = (14, 14)
RESERVED = ("format", "format_version", "library_version")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run on one CPU thread: faster on a shared 2-core machine, and the same kernels
    as the subprocesses below, which bit-exact comparisons need."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def images(mnist_sample_heldout: BinaryImageDataset) -> torch.Tensor:
    """48 MNIST digits, binarized and max-pooled to 14x14, ``torch.long``."""
    digits = mnist_sample_heldout.images[:48].float()
    return F.max_pool2d(digits, 2).long()


@dataclasses.dataclass(frozen=True)
class StraightRun:
    """An uninterrupted two-epoch run that tests compare against; read it, never write."""

    run_dir: Path
    result: dict[str, float]
    state_dict: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, images: torch.Tensor) -> StraightRun:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = tmp_path_factory.mktemp("straight") / "run"
        # Sample grids are on here and off in the runs compared with this one, which
        # also checks that drawing pictures leaves the training streams alone.
        trainer = _trainer(_config(run_dir, num_sample_images=4), images)
        result = trainer.fit()
    finally:
        torch.set_num_threads(previous)
    state_dict = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    return StraightRun(run_dir, result, state_dict)


def _datasets(
    images: torch.Tensor, p_missing: float = 0.0
) -> tuple[BinaryImageDataset, BinaryImageDataset]:
    train = BinaryImageDataset.from_tensor(images[:32], p_missing=p_missing, mask_seed=1)
    val = BinaryImageDataset.from_tensor(images[32:40], p_missing=p_missing, mask_seed=2)
    return train, val


def _config(output_dir: Path, **trainer: Any) -> ExperimentConfig:
    settings: dict[str, Any] = {
        "output_dir": str(output_dir),
        "epochs": 2,
        "lr": 1e-2,
        "warmup_steps": 2,
        "lr_schedule": "cosine",
        "ema_decay": 0.9,
        "device": "cpu",
        "progress_bar": False,
        "num_sample_images": 0,
        "log_every_steps": 1,
    }
    settings.update(trainer)
    return ExperimentConfig(
        data=DataConfig(batch_size=8, eval_batch_size=8),
        model=ModelConfig(
            image_size=IMAGE_SIZE,
            base_channels=8,
            channel_mults=(1, 2),
            num_res_blocks=1,
            num_groups=4,
        ),
        diffusion=DiffusionConfig(sampling_steps=4),
        trainer=TrainerConfig(**settings),
    )


def _trainer(
    config: ExperimentConfig,
    images: torch.Tensor,
    *,
    init_seed: int = 0,
    p_missing: float = 0.0,
    clean: bool = True,
) -> Trainer:
    torch.manual_seed(init_seed)
    model = MaskedDiffusionModel.from_config(config)
    train, val = _datasets(images, p_missing)
    clean_val = None
    if p_missing > 0 and clean:
        clean_val = BinaryImageDataset(val.images, torch.ones_like(val.obs_mask))
    return Trainer(model, config, train_data=train, val_data=val, clean_val_data=clean_val)


def _records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _without_times(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("time", "elapsed_s")}


def _assert_same(actual: Any, expected: Any, where: str) -> None:
    """Assert bit-identical nested checkpoint content (tensors compared with torch.equal)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), where
    elif isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), where
        assert sorted(actual, key=str) == sorted(expected, key=str), where
        for key in expected:
            _assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_same(a, e, f"{where}[{index}]")
    elif isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(actual), where
    else:
        assert actual == expected, where


def _assert_same_training_state(actual_path: Path, expected_path: Path) -> None:
    actual = load_checkpoint(actual_path)
    expected = load_checkpoint(expected_path)
    for key in ("model", "ema", "optimizer", "lr_scheduler", "grad_scaler", "rng", "metrics"):
        _assert_same(actual[key], expected[key], key)
    progress_a = {k: v for k, v in actual["progress"].items() if k != "elapsed_s"}
    progress_e = {k: v for k, v in expected["progress"].items() if k != "elapsed_s"}
    assert progress_a == progress_e


def _rewrite_checkpoint(path: Path, **progress: Any) -> None:
    state = {k: v for k, v in load_checkpoint(path).items() if k not in RESERVED}
    state["progress"] = {**state["progress"], **progress}
    save_checkpoint(path, state)


# --------------------------------------------------------------------------- exact resume


def test_resume_mid_epoch_bit_identical(
    tmp_path: Path, images: torch.Tensor, straight: StraightRun
) -> None:
    # 4 steps per epoch: max_steps=6 stops inside epoch 2, after a step checkpoint at 3.
    first = _trainer(_config(tmp_path / "run", max_steps=6, checkpoint_every_steps=3), images)
    first.fit()
    second = _trainer(_config(tmp_path / "run"), images, init_seed=123)
    result = second.fit(resume_from=tmp_path / "run")

    last = Path("checkpoints/last.pt")
    _assert_same_training_state(tmp_path / "run" / last, straight.run_dir / last)
    for name, tensor in straight.state_dict.items():
        assert torch.equal(second.model.state_dict()[name], tensor), name
    assert result["lr"] == straight.result["lr"]


def test_resume_epoch_boundary_bit_identical(
    tmp_path: Path, images: torch.Tensor, straight: StraightRun
) -> None:
    _trainer(_config(tmp_path / "run", max_steps=4), images).fit()
    checkpoint = tmp_path / "run" / "checkpoints" / "epoch_001.pt"
    assert load_checkpoint(checkpoint)["progress"]["batch_in_epoch"] == 0

    _trainer(_config(tmp_path / "run"), images, init_seed=7).fit(resume_from=checkpoint)

    last = Path("checkpoints/last.pt")
    _assert_same_training_state(tmp_path / "run" / last, straight.run_dir / last)


def test_resume_metrics_match_straight_run(
    tmp_path: Path, images: torch.Tensor, straight: StraightRun
) -> None:
    _trainer(_config(tmp_path / "run", max_steps=3), images).fit()
    _trainer(_config(tmp_path / "run"), images).fit(resume_from=tmp_path / "run")

    for kind in ("train", "epoch"):
        resumed = [_without_times(r) for r in _records(tmp_path / "run", kind)]
        expected = [_without_times(r) for r in _records(straight.run_dir, kind)]
        assert resumed == expected, kind


def test_validation_leaves_training_unchanged(
    tmp_path: Path, images: torch.Tensor, straight: StraightRun
) -> None:
    # The straight run validates and draws samples every epoch; this one does neither.
    config = _config(tmp_path / "run")
    torch.manual_seed(0)
    model = MaskedDiffusionModel.from_config(config)
    Trainer(model, config, train_data=_datasets(images)[0]).fit()

    for name, tensor in straight.state_dict.items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_resume_finished_run_returns(tmp_path: Path, images: torch.Tensor) -> None:
    config = _config(tmp_path / "run", epochs=1)
    first = _trainer(config, images).fit()
    again = _trainer(config, images).fit(resume_from=tmp_path / "run")
    assert again == first


_KILL_SCRIPT = """
import sys
import time
from pathlib import Path

import torch

from masked_diffusion.config import (
    DataConfig, DiffusionConfig, ExperimentConfig, ModelConfig, TrainerConfig,
)
from masked_diffusion.data import BinaryImageDataset
from masked_diffusion.diffusion import MaskedDiffusionModel
from masked_diffusion.network import MDMUNet
from masked_diffusion.schedule import MaskSchedule
from masked_diffusion.trainer import Trainer


class SlowUNet(MDMUNet):
    # Sleeps in training mode so that the test can kill the process mid-run.
    delay = 0.0

    def forward(self, xt, t):
        if self.training and self.delay:
            time.sleep(self.delay)
        return super().forward(xt, t)


def build(run_dir, data_path, delay):
    torch.set_num_threads(1)
    config = ExperimentConfig(
        data=DataConfig(batch_size=8, eval_batch_size=8),
        model=ModelConfig(image_size=(14, 14), base_channels=8, channel_mults=(1, 2),
                          num_res_blocks=1, num_groups=4),
        diffusion=DiffusionConfig(sampling_steps=4),
        trainer=TrainerConfig(output_dir=str(run_dir), epochs=2, lr=1e-2, ema_decay=0.9,
                              device="cpu", progress_bar=False, num_sample_images=0,
                              log_every_steps=1, checkpoint_every_steps=2),
    )
    torch.manual_seed(0)
    network = SlowUNet(config.model)
    network.delay = delay
    model = MaskedDiffusionModel(network, MaskSchedule.from_config(config.schedule),
                                 image_shape=(1, 14, 14), sampling_steps=4)
    model.config = config
    data = torch.load(data_path, weights_only=True)
    train = BinaryImageDataset.from_tensor(data["train"])
    val = BinaryImageDataset.from_tensor(data["val"])
    return Trainer(model, config, train_data=train, val_data=val)


if __name__ == "__main__":
    build(Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])).fit()
"""


def _import_script(path: Path) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("kill_script", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if record["kind"] == "train":
            steps.append(record["step"])
    return steps


@pytest.mark.slow
def test_sigkill_mid_training_resumes_exactly(tmp_path: Path, images: torch.Tensor) -> None:
    script = tmp_path / "train_script.py"
    script.write_text(textwrap.dedent(_KILL_SCRIPT), encoding="utf-8")
    data_path = tmp_path / "data.pt"
    torch.save({"train": images[:32], "val": images[32:40]}, data_path)
    run_dir = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    process = subprocess.Popen(
        [sys.executable, str(script), str(run_dir), str(data_path), "0.05"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        # Kill once a step checkpoint exists and more steps ran after it.
        while not (
            (run_dir / "checkpoints" / "last.pt").exists()
            and max(_logged_steps(run_dir), default=0) >= 3
        ):
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, "training subprocess made no progress"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "checkpoints" / "epoch_002.pt").exists()
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.suffix == ".tmp"] == []

    module = _import_script(script)
    resumed = module.build(run_dir, str(data_path), 0.0)
    resumed.fit(resume_from=run_dir)
    straight = module.build(tmp_path / "straight", str(data_path), 0.0)
    straight.fit()

    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    last = Path("checkpoints/last.pt")
    _assert_same_training_state(run_dir / last, tmp_path / "straight" / last)
    assert _logged_steps(run_dir) == list(range(1, 9))


# --------------------------------------------------------------------------- run folder files


def test_run_folder_layout(straight: StraightRun) -> None:
    run_dir = straight.run_dir
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    samples = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert checkpoints == ["best.pt", "epoch_001.pt", "epoch_002.pt", "last.pt"]
    assert samples == ["epoch_001.png", "epoch_002.png"]
    assert (run_dir / "loss_curve.png").stat().st_size > 0
    assert (run_dir / "config.yaml").is_file()


def test_metrics_jsonl_records(straight: StraightRun) -> None:
    train = _records(straight.run_dir, "train")
    epochs = _records(straight.run_dir, "epoch")
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert epochs[-1]["val_nll"] == straight.result["val_nll"]
    assert {"train_loss", "val_loss", "val_nll", "val_bits_per_dim", "lr"} <= set(epochs[-1])


def test_fresh_run_rejects_existing_folder(tmp_path: Path, images: torch.Tensor) -> None:
    run_dir = tmp_path / "run"
    config = _config(run_dir, epochs=1)
    _trainer(config, images).fit()
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    with pytest.raises(FileExistsError, match=r"already contains a training run.*--resume"):
        _trainer(config, images).fit()

    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before


def test_fresh_run_accepts_unrelated_files(tmp_path: Path, images: torch.Tensor) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "train.log").write_text("log of the launcher\n", encoding="utf-8")

    _trainer(_config(run_dir, max_steps=1), images).fit()

    assert (run_dir / "train.log").read_text(encoding="utf-8") == "log of the launcher\n"


def test_epoch_checkpoint_never_overwritten(
    tmp_path: Path, images: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    config = _config(run_dir)
    _trainer(config, images).fit()
    epoch_2 = run_dir / "checkpoints" / "epoch_002.pt"
    save_checkpoint(epoch_2, {"sentinel": True})

    with caplog.at_level(logging.WARNING, logger="masked_diffusion.trainer"):
        _trainer(config, images).fit(resume_from=run_dir / "checkpoints" / "epoch_001.pt")

    assert load_checkpoint(epoch_2)["sentinel"] is True
    assert "kept existing" in caplog.text


def test_resume_missing_checkpoint(tmp_path: Path, images: torch.Tensor) -> None:
    with pytest.raises(FileNotFoundError, match=r"checkpoint .* not found"):
        _trainer(_config(tmp_path / "run"), images).fit(resume_from=tmp_path / "none.pt")


def test_resume_folder_without_checkpoint(tmp_path: Path, images: torch.Tensor) -> None:
    with pytest.raises(FileNotFoundError, match=r"has no checkpoints/last\.pt"):
        _trainer(_config(tmp_path / "run"), images).fit(resume_from=tmp_path)


def test_resume_pretrained_file_rejected(tmp_path: Path, images: torch.Tensor) -> None:
    trainer = _trainer(_config(tmp_path / "run"), images)
    save_pretrained(trainer.model, tmp_path / "pretrained")

    with pytest.raises(CheckpointError, match="contains weights only"):
        trainer.fit(resume_from=tmp_path / "pretrained" / "model.pt")


def test_resume_changed_model_rejected(tmp_path: Path, images: torch.Tensor) -> None:
    _trainer(_config(tmp_path / "run", max_steps=1), images).fit()
    config = _config(tmp_path / "run")
    wider = config.replace(
        model=ModelConfig(
            **{
                **config.to_dict()["model"],
                "base_channels": 12,
                "image_size": IMAGE_SIZE,
                "channel_mults": (1, 2),
            }
        )
    )

    with pytest.raises(ValueError, match=r"model settings .* differ"):
        _trainer(wider, images).fit(resume_from=tmp_path / "run")


# --------------------------------------------------------------------------- best checkpoint


def test_best_tracks_minimum(straight: StraightRun) -> None:
    epochs = _records(straight.run_dir, "epoch")
    values = [r["val_nll"] for r in epochs]
    best = load_checkpoint(straight.run_dir / "checkpoints" / "best.pt")
    assert best["progress"]["best_metric"] == min(values)
    assert best["progress"]["global_step"] == epochs[values.index(min(values))]["step"]
    assert [r["best_val_nll"] for r in epochs] == [min(values[: i + 1]) for i in range(2)]


def test_best_kept_on_equal_value_after_resume(
    tmp_path: Path, images: torch.Tensor, straight: StraightRun
) -> None:
    epochs = _records(straight.run_dir, "epoch")
    epoch_1_value, epoch_2_value = epochs[0]["val_nll"], epochs[1]["val_nll"]
    assert epoch_2_value < epoch_1_value  # otherwise the test below could not fail
    run_dir = tmp_path / "run"
    _trainer(_config(run_dir, max_steps=4), images).fit()
    # The resumed epoch 2 reproduces epoch_2_value exactly: equal is not better.
    _rewrite_checkpoint(run_dir / "checkpoints" / "last.pt", best_metric=epoch_2_value)

    _trainer(_config(run_dir), images).fit(resume_from=run_dir)

    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert best["progress"]["global_step"] == 4


def test_best_replaced_on_better_value_after_resume(
    tmp_path: Path, images: torch.Tensor, straight: StraightRun
) -> None:
    epoch_2_value = _records(straight.run_dir, "epoch")[1]["val_nll"]
    run_dir = tmp_path / "run"
    _trainer(_config(run_dir, max_steps=4), images).fit()
    slightly_worse = math.nextafter(epoch_2_value, math.inf)
    _rewrite_checkpoint(run_dir / "checkpoints" / "last.pt", best_metric=slightly_worse)

    _trainer(_config(run_dir), images).fit(resume_from=run_dir)

    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert best["progress"]["global_step"] == 8


# --------------------------------------------------------------------------- non-finite losses


class NaNUNet(MDMUNet):
    """MDMUNet that returns NaN logits on chosen training-mode calls (1-based)."""

    def __init__(self, config: ModelConfig, nan_calls: set[int]) -> None:
        super().__init__(config)
        self.nan_calls = nan_calls
        self.calls = 0

    def forward(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = super().forward(xt, t)
        if not self.training:
            return logits
        self.calls += 1
        if self.calls in self.nan_calls:
            return logits * float("nan")
        return logits


def _nan_trainer(config: ExperimentConfig, images: torch.Tensor, nan_calls: set[int]) -> Trainer:
    torch.manual_seed(0)
    network = NaNUNet(config.model, nan_calls)
    model = MaskedDiffusionModel(
        network, MaskSchedule(), image_shape=(1, *IMAGE_SIZE), sampling_steps=4
    )
    train, val = _datasets(images)
    return Trainer(model, config, train_data=train, val_data=val)


def test_nonfinite_loss_raises_with_step(tmp_path: Path, images: torch.Tensor) -> None:
    trainer = _nan_trainer(_config(tmp_path / "run", checkpoint_every_steps=2), images, {3})

    with pytest.raises(NonFiniteLossError, match=r"global step 3 \(epoch 1, batch 3 of 4\)"):
        trainer.fit()

    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["progress"]["global_step"] == 2


def test_nonfinite_loss_raise_keeps_weights(tmp_path: Path, images: torch.Tensor) -> None:
    trainer = _nan_trainer(_config(tmp_path / "run"), images, {2})

    with pytest.raises(NonFiniteLossError):
        trainer.fit()

    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())


def test_nonfinite_loss_skip_counts(
    tmp_path: Path, images: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(tmp_path / "run", on_nonfinite_loss="skip")
    trainer = _nan_trainer(config, images, {2, 7})

    with caplog.at_level(logging.WARNING, logger="masked_diffusion.trainer"):
        result = trainer.fit()

    assert result["skipped_batches"] == 2
    assert result["global_step"] == 6
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    assert "skipped batch at global step 2 (epoch 1, batch 2 of 4)" in caplog.text
    assert _records(tmp_path / "run", "epoch")[-1]["skipped_batches"] == 2


# --------------------------------------------------------------------------- precision, devices


def test_bf16_autocast_cpu_finite(tmp_path: Path, images: torch.Tensor) -> None:
    run_dir = tmp_path / "run"
    _trainer(_config(run_dir, precision="bf16", max_steps=3), images).fit()

    losses = [r["train_loss"] for r in _records(run_dir, "train")]
    assert len(losses) == 3
    assert all(math.isfinite(v) for v in losses)


def test_fp16_on_cpu_rejected(tmp_path: Path, images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="precision='fp16' needs a CUDA device"):
        _trainer(_config(tmp_path / "run", precision="fp16"), images)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_resolve_device_cuda_unavailable() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_resolve_device_unknown() -> None:
    with pytest.raises(ValueError, match=r"invalid trainer.device='tpu'"):
        resolve_device("tpu")


def test_resolve_device_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")


def test_deterministic_mode_restored(tmp_path: Path, images: torch.Tensor) -> None:
    _trainer(_config(tmp_path / "run", deterministic=True, max_steps=1), images).fit()
    assert not torch.are_deterministic_algorithms_enabled()


# --------------------------------------------------------------------------- EMA and models


def test_ema_differs_from_raw(tmp_path: Path, images: torch.Tensor) -> None:
    run_dir = tmp_path / "run"
    _trainer(_config(run_dir, epochs=1), images).fit()

    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    raw = state["model"]
    ema = {k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"}
    assert sorted(ema) == sorted(raw)
    assert any(not torch.equal(ema[name], raw[name]) for name in raw)


def test_ema_warmup_tracks_short_runs(tmp_path: Path, images: torch.Tensor) -> None:
    """After 4 steps at decay 0.999 the average is near the trained, not the initial, weights."""
    run_dir = tmp_path / "run"
    trainer = _trainer(_config(run_dir, epochs=1, ema_decay=0.999), images)
    initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()

    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    raw = state["model"]
    ema = {k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"}
    to_raw = sum(float((ema[k].float() - raw[k].float()).norm()) for k in raw)
    initial_to_raw = sum(float((initial[k].float() - raw[k].float()).norm()) for k in raw)
    assert to_raw < 0.5 * initial_to_raw, (to_raw, initial_to_raw)


def test_load_model_uses_ema(tmp_path: Path, images: torch.Tensor) -> None:
    run_dir = tmp_path / "run"
    _trainer(_config(run_dir, epochs=1), images).fit()
    path = run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    name = "network.conv_in.weight"

    assert torch.equal(load_model(path).state_dict()[name], state["ema"][f"module.{name}"])
    assert torch.equal(load_model(path, use_ema=False).state_dict()[name], state["model"][name])


def test_load_model_from_run_folder(tmp_path: Path, images: torch.Tensor) -> None:
    run_dir = tmp_path / "run"
    _trainer(_config(run_dir, epochs=1), images).fit()
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    name = "network.conv_in.weight"

    assert torch.equal(load_model(run_dir).state_dict()[name], best["ema"][f"module.{name}"])


# --------------------------------------------------------------------------- missing pixels


def test_ambient_run_logs_both_bounds(tmp_path: Path, images: torch.Tensor) -> None:
    run_dir = tmp_path / "run"
    result = _trainer(_config(run_dir, epochs=1), images, p_missing=0.3).fit()

    assert {"val_obs_nll", "val_obs_bits_per_dim", "val_nll", "val_bits_per_dim"} <= set(result)
    assert result["val_obs_nll"] < result["val_nll"]  # fewer scored pixels
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert best["best_metric_name"] == "val_nll"


def test_ambient_run_without_clean_data(tmp_path: Path, images: torch.Tensor) -> None:
    run_dir = tmp_path / "run"
    result = _trainer(_config(run_dir, epochs=1), images, p_missing=0.3, clean=False).fit()

    assert "val_nll" not in result
    assert result["best_val_obs_nll"] == result["val_obs_nll"]


def test_ambient_run_writes_completions(tmp_path: Path, images: torch.Tensor) -> None:
    run_dir = tmp_path / "run"
    _trainer(_config(run_dir, epochs=1, num_sample_images=2), images, p_missing=0.3).fit()

    assert (run_dir / "samples" / "epoch_001.png").is_file()
    assert (run_dir / "samples" / "completion_epoch_001.png").is_file()


# --------------------------------------------------------------------------- inputs and helpers


def test_fit_needs_train_data(tmp_path: Path) -> None:
    config = _config(tmp_path / "run")
    trainer = Trainer(MaskedDiffusionModel.from_config(config), config)
    with pytest.raises(ValueError, match=r"Trainer.fit needs training data"):
        trainer.fit()


def test_dataset_shape_mismatch(tmp_path: Path, images: torch.Tensor) -> None:
    config = _config(tmp_path / "run")
    wrong = BinaryImageDataset.from_tensor(torch.zeros(4, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"train_data has images of shape \(1, 8, 8\)"):
        Trainer(MaskedDiffusionModel.from_config(config), config, train_data=wrong)


def test_from_config_trains(tmp_path: Path) -> None:
    config = ExperimentConfig(
        data=DataConfig(batch_size=4),
        model=ModelConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, num_groups=4),
        trainer=TrainerConfig(
            output_dir=str(tmp_path / "run"), max_steps=1, device="cpu", progress_bar=False
        ),
    )
    result = Trainer.from_config(config).fit()

    assert result["global_step"] == 1
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_warmup_cosine_lambda_values() -> None:
    factor = warmup_cosine_lambda(4, 20, "cosine")
    assert factor(0) == 0.25
    assert factor(3) == 1.0
    assert factor(12) == pytest.approx(0.5)
    assert factor(20) == pytest.approx(0.0)


def test_warmup_constant_lambda() -> None:
    factor = warmup_cosine_lambda(0, 20, "constant")
    assert [factor(s) for s in (0, 10, 30)] == [1.0, 1.0, 1.0]


def test_warmup_lambda_unknown_schedule() -> None:
    with pytest.raises(ValueError, match=r"invalid trainer.lr_schedule='linear'"):
        warmup_cosine_lambda(0, 10, "linear")


def test_seed_everything_repeats() -> None:
    seed_everything(3)
    first = torch.rand(3)
    seed_everything(3)
    assert torch.equal(torch.rand(3), first)


def test_seed_everything_negative() -> None:
    with pytest.raises(ValueError, match="invalid seed=-1"):
        seed_everything(-1)
