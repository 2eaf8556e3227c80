"""Tests of data-parallel training: environment parsing and a real two-process Gloo run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from masked_diffusion.checkpoint import load_checkpoint
from masked_diffusion.config import (
    DataConfig,
    DiffusionConfig,
    ExperimentConfig,
    ModelConfig,
    TrainerConfig,
)
from masked_diffusion.data import BinaryImageDataset, TensorBatchLoader
from masked_diffusion.diffusion import MaskedDiffusionModel
from masked_diffusion.distributed import (
    DistributedContext,
    all_reduce_mean,
    env_context,
    init_distributed,
    per_rank_batch_size,
)

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Remove torchrun's variables, so each test sets exactly the ones it needs."""
    for name in DIST_ENV:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch


# --------------------------------------------------------------------------- single process


def test_per_rank_batch_size_splits() -> None:
    assert per_rank_batch_size(128, 4) == 32


def test_per_rank_batch_size_indivisible() -> None:
    with pytest.raises(ValueError, match=r"invalid data\.batch_size=10 for 4 processes"):
        per_rank_batch_size(10, 4)


def test_env_context_single_process(clean_env: pytest.MonkeyPatch) -> None:
    assert env_context() == DistributedContext()


def test_env_context_reads_torchrun_variables(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RANK", "3")
    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("LOCAL_RANK", "1")

    context = env_context()

    assert (context.rank, context.world_size, context.local_rank) == (3, 4, 1)
    assert not context.is_main


def test_env_context_invalid_integer(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="invalid environment variable WORLD_SIZE='two'"):
        env_context()


def test_env_context_rank_out_of_range(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RANK", "2")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="expected 0 <= RANK < WORLD_SIZE"):
        env_context()


def test_init_distributed_single_process_noop(clean_env: pytest.MonkeyPatch) -> None:
    context = init_distributed(torch.device("cpu"))
    assert not context.owns_process_group
    assert not torch.distributed.is_initialized()


def test_init_distributed_needs_master_address(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"\['MASTER_ADDR', 'MASTER_PORT'\] are not"):
        init_distributed(torch.device("cpu"))


def test_all_reduce_mean_single_process() -> None:
    values = {"loss": 1.5, "nll": 2.0}
    assert all_reduce_mean(values, DistributedContext(), torch.device("cpu")) == values


# --------------------------------------------------------------------------- two processes

_DDP_SCRIPT = """
import os
import sys
from pathlib import Path

import torch

from masked_diffusion.config import (
    DataConfig, DiffusionConfig, ExperimentConfig, ModelConfig, TrainerConfig,
)
from masked_diffusion.data import BinaryImageDataset
from masked_diffusion.diffusion import MaskedDiffusionModel
from masked_diffusion.trainer import Trainer

torch.set_num_threads(1)
out_dir = Path(sys.argv[1])
inputs = torch.load(sys.argv[2], weights_only=True)
rank = int(os.environ["RANK"])


def run(name, resume=False, **trainer):
    config = ExperimentConfig.from_dict(inputs["config"])
    settings = {**config.trainer.__dict__, "output_dir": str(out_dir / name), **trainer}
    config = config.replace(trainer=TrainerConfig(**settings))
    model = MaskedDiffusionModel.from_config(config)
    model.load_state_dict(inputs["init"])
    trainer = Trainer(
        model,
        config,
        train_data=BinaryImageDataset.from_tensor(inputs["train"]),
        val_data=BinaryImageDataset.from_tensor(inputs["val"]),
    )
    result = trainer.fit(resume_from=out_dir / name if resume else None)
    torch.save(
        {"model": model.state_dict(), "result": result},
        out_dir / f"{name}_rank{rank}.pt",
    )


if sys.argv[3] == "first":
    # One process group for both runs, because re-creating the default group within
    # one torchrun job hung once in testing (PyTorch 2.14, Gloo).
    torch.distributed.init_process_group("gloo")
    run("straight")
    run("resumed", max_steps=3, checkpoint_every_steps=1)
    torch.distributed.destroy_process_group()
else:
    # A restarted job: here the Trainer creates and destroys the process group.
    run("resumed", resume=True)
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ddp_config() -> ExperimentConfig:
    # Per-image ELBO loss: the mean of the two ranks' batch means is then the mean
    # over the global batch, so DDP's gradient average matches one process.
    return ExperimentConfig(
        data=DataConfig(batch_size=8, eval_batch_size=2),
        model=ModelConfig(
            image_size=(14, 14),
            base_channels=8,
            channel_mults=(1, 2),
            num_res_blocks=1,
            num_groups=4,
            dropout=0.0,
        ),
        diffusion=DiffusionConfig(loss_weighting="elbo", sampling_steps=4),
        trainer=TrainerConfig(
            epochs=2,
            lr=1e-2,
            grad_clip=None,
            seed=5,
            device="cpu",
            progress_bar=False,
            num_sample_images=2,
            log_every_steps=1,
        ),
    )


def _reference_weights(inputs: dict[str, Any], config: ExperimentConfig) -> dict[str, torch.Tensor]:
    """Train in one process on the union of both ranks' batches and noise streams."""
    model = MaskedDiffusionModel.from_config(config)
    model.load_state_dict(inputs["init"])
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.trainer.lr, betas=config.trainer.betas, weight_decay=0.0
    )
    train = BinaryImageDataset.from_tensor(inputs["train"])
    loaders = [
        TensorBatchLoader(train, 4, seed=config.trainer.seed, rank=rank, world_size=2)
        for rank in range(2)
    ]
    generators = [torch.Generator().manual_seed(config.trainer.seed + rank) for rank in range(2)]
    model.train()
    for epoch in range(config.trainer.epochs):
        for loader in loaders:
            loader.set_epoch(epoch)
        for (x0_a, _), (x0_b, _) in zip(loaders[0], loaders[1], strict=True):
            loss_a = model.compute_loss(x0_a, generator=generators[0])
            loss_b = model.compute_loss(x0_b, generator=generators[1])
            optimizer.zero_grad()
            ((loss_a + loss_b) / 2).backward()
            optimizer.step()
    return model.state_dict()


@pytest.fixture(scope="module")
def ddp_run(
    tmp_path_factory: pytest.TempPathFactory, mnist_sample_heldout: BinaryImageDataset
) -> tuple[Path, dict[str, Any]]:
    """Run the training script under ``torchrun --nproc_per_node=2`` (Gloo, 127.0.0.1)."""
    out_dir = tmp_path_factory.mktemp("ddp")

    images = F.max_pool2d(mnist_sample_heldout.images[:22].float(), 2).long()
    config = _ddp_config()
    torch.manual_seed(0)
    inputs = {
        "config": config.to_dict(),
        "init": MaskedDiffusionModel.from_config(config).state_dict(),
        "train": images[:16],
        "val": images[16:22],
    }
    torch.save(inputs, out_dir / "inputs.pt")

    script = out_dir / "ddp_script.py"
    script.write_text(textwrap.dedent(_DDP_SCRIPT), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    for name in DIST_ENV:
        env.pop(name, None)

    for stage in ("first", "resume"):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            str(script),
            str(out_dir),
            str(out_dir / "inputs.pt"),
            stage,
        ]
        completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert completed.returncode == 0, completed.stderr[-4000:]
    return out_dir, inputs


def _rank_output(out_dir: Path, name: str, rank: int) -> dict[str, Any]:
    return torch.load(out_dir / f"{name}_rank{rank}.pt", weights_only=True)  # type: ignore[no-any-return]


@pytest.mark.slow
def test_ddp_ranks_same_weights(ddp_run: tuple[Path, dict[str, Any]]) -> None:
    out_dir, _ = ddp_run
    rank_0 = _rank_output(out_dir, "straight", 0)["model"]
    rank_1 = _rank_output(out_dir, "straight", 1)["model"]
    for name, tensor in rank_0.items():
        assert torch.equal(rank_1[name], tensor), name


@pytest.mark.slow
def test_ddp_matches_one_process(ddp_run: tuple[Path, dict[str, Any]]) -> None:
    out_dir, inputs = ddp_run
    torch.set_num_threads(1)
    expected = _reference_weights(inputs, ExperimentConfig.from_dict(inputs["config"]))
    actual = _rank_output(out_dir, "straight", 0)["model"]
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_ddp_metrics_agree_across_ranks(ddp_run: tuple[Path, dict[str, Any]]) -> None:
    out_dir, _ = ddp_run
    result_0 = _rank_output(out_dir, "straight", 0)["result"]
    result_1 = _rank_output(out_dir, "straight", 1)["result"]
    assert result_0 == result_1
    assert {"val_loss", "val_nll", "val_bits_per_dim"} <= set(result_0)


@pytest.mark.slow
def test_ddp_only_rank_0_writes(ddp_run: tuple[Path, dict[str, Any]]) -> None:
    out_dir, _ = ddp_run
    run_dir = out_dir / "straight"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert train_steps == [1, 2, 3, 4]  # each step logged once, by rank 0
    assert checkpoints == ["best.pt", "epoch_001.pt", "epoch_002.pt", "last.pt"]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "epoch_001.png",
        "epoch_002.png",
    ]


@pytest.mark.slow
def test_ddp_checkpoint_has_every_rank_rng(ddp_run: tuple[Path, dict[str, Any]]) -> None:
    out_dir, _ = ddp_run
    state = load_checkpoint(out_dir / "straight" / "checkpoints" / "last.pt")
    assert state["world_size"] == 2
    assert len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["diffusion"], state["rng"][1]["diffusion"])


@pytest.mark.slow
def test_ddp_resume_bit_identical(ddp_run: tuple[Path, dict[str, Any]]) -> None:
    out_dir, _ = ddp_run
    for rank in range(2):
        straight = _rank_output(out_dir, "straight", rank)["model"]
        resumed = _rank_output(out_dir, "resumed", rank)["model"]
        for name, tensor in straight.items():
            assert torch.equal(resumed[name], tensor), f"rank {rank}: {name}"
