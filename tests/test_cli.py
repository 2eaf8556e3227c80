"""End-to-end tests of the ``masked-diffusion`` command line.

Most tests run ``python -m masked_diffusion`` as a real subprocess. A module-scoped
fixture trains one tiny model (2 levels of 8 channels) on a 96-image MNIST-format
dataset written to a temporary folder. With batches of 32, one epoch is 3 steps, so
every per-epoch file (best, epoch_001, sample grid) appears, and the other commands
reuse that run. Checks of argument handling that need no model call ``main``
in-process, which skips the interpreter start-up.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from masked_diffusion import cli
from masked_diffusion.checkpoint import save_pretrained
from masked_diffusion.config import load_config
from masked_diffusion.diffusion import MaskedDiffusionModel

TINY_CONFIG = """\
data: {dataset: mnist, root: data, batch_size: 32, eval_batch_size: 32}
model: {base_channels: 8, channel_mults: [1, 2], num_res_blocks: 1, num_groups: 4}
diffusion: {sampling_steps: 4}
trainer:
  output_dir: run
  epochs: 1
  max_steps: 3
  num_sample_images: 4
  progress_bar: false
"""
NUM_TRAIN, NUM_HELDOUT = 96, 32
SUBPROCESS_TIMEOUT_S = 300


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "masked_diffusion", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write uint8 images (N, 28, 28) or labels (N,) as an uncompressed IDX file."""
    magic = 2049 if array.ndim == 1 else 2051
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_tiny_mnist(root: Path) -> None:
    """Write real digits from the bundled sample in torchvision's MNIST raw layout."""
    source = resources.files("masked_diffusion").joinpath("data_files/mnist_5k.npz")
    with source.open("rb") as stream, np.load(stream) as arrays:
        images, labels = arrays["images"], arrays["labels"]
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    heldout = slice(NUM_TRAIN, NUM_TRAIN + NUM_HELDOUT)
    write_idx(raw / "train-images-idx3-ubyte", images[:NUM_TRAIN])
    write_idx(raw / "train-labels-idx1-ubyte", labels[:NUM_TRAIN])
    write_idx(raw / "t10k-images-idx3-ubyte", images[heldout])
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[heldout])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``tiny.yaml`` and the tiny dataset under ``data/``."""
    folder = tmp_path_factory.mktemp("cli")
    write_tiny_mnist(folder / "data")
    (folder / "tiny.yaml").write_text(TINY_CONFIG, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def trained(workspace: Path) -> subprocess.CompletedProcess[str]:
    """The result of ``train --config tiny.yaml`` in ``workspace`` (run folder ``run``)."""
    return run_cli("train", "--config", "tiny.yaml", cwd=workspace)


@pytest.fixture(scope="module")
def checkpoint(workspace: Path, trained: subprocess.CompletedProcess[str]) -> Path:
    assert trained.returncode == 0, trained.stderr
    return workspace / "run" / "checkpoints" / "best.pt"


# --- help and argument parsing -----------------------------------------------------

EXPECTED_OPTIONS = {
    "train": ["--config", "--set", "--resume", "--verbose", "--quiet"],
    "sample": [
        "CHECKPOINT", "--num-samples", "--output", "--steps", "--seed", "--sampler",
        "--temperature", "--batch-size", "--save-npz", "--device", "--no-ema", "--nrow",
        "--scale",
    ],
    "evaluate": [
        "CHECKPOINT", "--split", "--num-samples", "--dataset", "--root", "--max-images",
        "--batch-size", "--seed", "--num-generated", "--device", "--no-ema", "--sampler",
        "--steps", "--temperature",
    ],
    "impute": [
        "CHECKPOINT", "--input", "--output", "--num-completions", "--sampler", "--steps",
        "--temperature", "--argmax", "--seed", "--mask", "--device", "--batch-size",
        "--no-ema", "--scale",
    ],
}  # fmt: skip


def test_help_lists_commands(tmp_path: Path) -> None:
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("train", "sample", "evaluate", "impute", "--version", "--verbose"):
        assert command in result.stdout, command


@pytest.mark.parametrize("command", sorted(EXPECTED_OPTIONS))
def test_help_mentions_each_option(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in EXPECTED_OPTIONS[command]:
        assert option in text, option


def test_help_text_for_every_option() -> None:
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name, subparser in subparsers.choices.items():  # type: ignore[attr-defined]
        for action in subparser._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_impute_help_documents_formats(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["impute", "--help"])
    text = capsys.readouterr().out
    for fact in ("obs_mask", "completions", "(N, S, 1, H, W)", "white", "> 127"):
        assert fact in text, fact


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"masked-diffusion {cli.__version__}"


def test_missing_command_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert "required: COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["sample", "x.pt", "--output", "s.png", "--num-samples", "0"], "positive integer"),
        (["sample", "x.pt", "--output", "s.png", "--steps", "many"], "expected an integer"),
        (["impute", "x.pt", "--input", "a", "--output", "b", "--temperature", "-1"], ">= 0"),
        (["evaluate", "x.pt", "--split", "test"], "invalid choice: 'test'"),
    ],
)
def test_invalid_option_values(
    args: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err


# --- input errors: one line on stderr, exit status 2 ---------------------------------


def test_unknown_config_key_subprocess(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("trainer: {epoch: 3}\n", encoding="utf-8")
    result = run_cli("train", "--config", "bad.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown config key 'trainer.epoch'" in result.stderr
    assert "did you mean 'trainer.epochs'" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["train", "--config", str(tmp_path / "absent.yaml")])
    assert status == 2
    assert "config file not found" in error_line(capsys)


def test_bad_set_syntax(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ok.yaml").write_text("{}\n", encoding="utf-8")
    status = cli.main(["train", "--config", str(tmp_path / "ok.yaml"), "--set", "epochs=3"])
    assert status == 2
    assert "expected section.key=value" in error_line(capsys)


def test_invalid_set_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ok.yaml").write_text("{}\n", encoding="utf-8")
    status = cli.main(["train", "--config", str(tmp_path / "ok.yaml"), "--set", "trainer.lr=-1"])
    assert status == 2
    assert "invalid trainer.lr=-1.0" in error_line(capsys)


def test_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["sample", str(tmp_path / "absent.pt"), "--output", "s.png"])
    assert status == 2
    assert "checkpoint not found" in error_line(capsys)


def test_sample_output_suffix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["sample", "x.pt", "--output", str(tmp_path / "s.jpg")])
    assert status == 2
    assert "expected a file name ending in .png" in error_line(capsys)


@pytest.fixture
def impute_npz(tmp_path: Path) -> Path:
    """Three 28x28 images (N, H, W) uint8 0/255 with random observation masks."""
    rng = np.random.default_rng(0)
    images = np.where(rng.random((3, 28, 28)) > 0.5, 255, 0).astype(np.uint8)
    obs_mask = rng.random((3, 28, 28)) > 0.4
    path = tmp_path / "corrupted.npz"
    np.savez(path, images=images, obs_mask=obs_mask)
    return path


def test_impute_argmax_with_temperature(
    impute_npz: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["impute", "x.pt", "--input", str(impute_npz), "--output", "o.npz"]
    status = cli.main([*args, "--argmax", "--temperature", "0.5"])
    assert status == 2
    assert "pass either --argmax or --temperature" in error_line(capsys)


def test_impute_npz_without_obs_mask(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "in.npz", images=np.zeros((2, 28, 28), dtype=np.uint8))
    status = cli.main(["impute", "x.pt", "--input", str(tmp_path / "in.npz"), "--output", "o.npz"])
    assert status == 2
    assert "no array 'obs_mask'" in error_line(capsys)


def test_impute_png_without_mask(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(tmp_path / "in.png")
    status = cli.main(["impute", "x.pt", "--input", str(tmp_path / "in.png"), "--output", "o.png"])
    assert status == 2
    assert "needs --mask FILE.png" in error_line(capsys)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"images": np.full((1, 28, 28), 300)}, r"values in \[300, 300\]"),
        ({"images": np.full((1, 28, 28), 0.5) + 1}, r"must lie in \[0, 1\]"),
        ({"images": np.zeros((1, 28, 28)), "obs_mask": np.full((1, 28, 28), 2)}, "obs_mask"),
        ({"pictures": np.zeros((1, 28, 28))}, r"no array 'images' \(arrays found: \['pictures'\]"),
    ],
)
def test_impute_invalid_npz(
    tmp_path: Path, arrays: dict[str, np.ndarray], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    np.savez(tmp_path / "in.npz", **arrays)  # type: ignore[arg-type]
    status = cli.main(["impute", "x.pt", "--input", str(tmp_path / "in.npz"), "--output", "o.npz"])
    assert status == 2
    line = error_line(capsys)
    assert re.search(match, line), line


# --- train, resume and the commands on a trained run ---------------------------------


@pytest.mark.slow
def test_train_writes_run_folder(
    workspace: Path, trained: subprocess.CompletedProcess[str]
) -> None:
    assert trained.returncode == 0, trained.stderr
    run = workspace / "run"
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "checkpoints/best.pt",
        "checkpoints/last.pt",
        "checkpoints/epoch_001.pt",
        "samples/epoch_001.png",
    ):
        assert (run / name).is_file(), name


@pytest.mark.slow
def test_train_prints_final_metrics(trained: subprocess.CompletedProcess[str]) -> None:
    summary = json.loads(trained.stdout)
    assert summary["global_step"] == 3
    assert summary["output_dir"] == "run"
    assert math.isfinite(summary["val_nll"])


@pytest.mark.slow
def test_train_saves_effective_config(workspace: Path, checkpoint: Path) -> None:
    config = load_config(workspace / "run" / "config.yaml")
    assert config.model.base_channels == 8
    assert config.trainer.max_steps == 3


@pytest.mark.slow
def test_train_resume_from_run_folder(workspace: Path, checkpoint: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(workspace, copy)
    overrides = ["--set", "trainer.epochs=2", "--set", "trainer.max_steps=6"]
    result = run_cli(
        "-q", "train", "--config", "tiny.yaml", "--resume", "run", *overrides, cwd=copy
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["global_step"] == 6
    assert (copy / "run" / "checkpoints" / "epoch_002.pt").is_file()


@pytest.mark.slow
def test_sample_writes_png_and_npz(checkpoint: Path, tmp_path: Path) -> None:
    result = run_cli(
        "sample", str(checkpoint), "--num-samples", "6", "--steps", "3", "--nrow", "3",
        "--scale", "1", "--output", "out/grid.png", "--save-npz", "out/grid.npz",
        "--device", "cpu", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "out/grid.png" in result.stdout
    assert "3 network evaluations" in result.stdout
    with Image.open(tmp_path / "out" / "grid.png") as image:
        assert image.size == (2 + 3 * 30, 2 + 2 * 30)
    with np.load(tmp_path / "out" / "grid.npz") as arrays:
        samples = arrays["samples"]
    assert samples.shape == (6, 1, 28, 28)
    assert samples.dtype == np.uint8
    assert set(np.unique(samples).tolist()) <= {0, 1}


@pytest.mark.slow
def test_evaluate_prints_json(checkpoint: Path, workspace: Path) -> None:
    result = run_cli(
        "evaluate", str(checkpoint), "--max-images", "8", "--batch-size", "4",
        "--num-samples", "2", cwd=workspace,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["num_images"] == 8
    assert report["num_samples"] == 2
    assert report["dataset"] == "mnist"
    assert report["split"] == "heldout"
    assert "obs_nll_nats" not in report
    for key in ("nll_nats", "nll_nats_stderr", "bits_per_dim", "bits_per_dim_stderr"):
        assert math.isfinite(report[key]), key
    expected_bits = report["nll_nats"] / (784 * math.log(2))
    assert report["bits_per_dim"] == pytest.approx(expected_bits, rel=1e-9)


@pytest.fixture(scope="module")
def ambient_pretrained(workspace: Path) -> Path:
    """An untrained tiny model whose config has p_missing=0.5, saved with save_pretrained."""
    config = load_config(workspace / "tiny.yaml", ["data.p_missing=0.5"])
    folder = workspace / "ambient_pretrained"
    save_pretrained(MaskedDiffusionModel.from_config(config), folder)
    return folder


@pytest.mark.slow
def test_evaluate_observed_bound_and_quality(ambient_pretrained: Path, workspace: Path) -> None:
    result = run_cli(
        "evaluate", str(ambient_pretrained), "--max-images", "6", "--num-generated", "4",
        "--steps", "2", "--dataset", "mnist-sample", cwd=workspace,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dataset"] == "mnist-sample"
    assert report["num_images"] == 6
    assert report["p_missing"] == 0.5
    assert 0.3 < report["observed_fraction"] < 0.7
    assert report["obs_nll_nats"] < report["nll_nats"]
    assert math.isfinite(report["obs_bits_per_dim"])
    assert math.isfinite(report["obs_nll_nats_stderr"])
    assert report["num_generated"] == 4
    assert report["num_reference"] == 500  # the whole held-out split of mnist-sample
    for key in ("frechet_digit_distance", "mean_confidence", "class_entropy"):
        assert math.isfinite(report[key]), key


@pytest.mark.slow
def test_impute_npz_keeps_observed(checkpoint: Path, impute_npz: Path, tmp_path: Path) -> None:
    result = run_cli(
        "impute", str(checkpoint), "--input", str(impute_npz), "--output", "filled.npz",
        "--num-completions", "2", "--steps", "3", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "filled.npz") as arrays:
        completions, images, obs_mask = arrays["completions"], arrays["images"], arrays["obs_mask"]
    assert completions.shape == (3, 2, 1, 28, 28)
    assert completions.dtype == np.uint8
    assert obs_mask.dtype == np.bool_
    with np.load(impute_npz) as original:
        assert np.array_equal(images[:, 0], (original["images"] > 127).astype(np.uint8))
        assert np.array_equal(obs_mask[:, 0], original["obs_mask"])
    for s in range(2):
        assert np.array_equal(completions[:, s][obs_mask], images[obs_mask]), s
    assert set(np.unique(completions).tolist()) <= {0, 1}


@pytest.mark.slow
def test_impute_png_grid(checkpoint: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    Image.fromarray(np.where(rng.random((28, 28)) > 0.5, 255, 0).astype(np.uint8)).save(
        tmp_path / "digit.png"
    )
    mask = np.zeros((28, 28), dtype=np.uint8)
    mask[:14] = 255  # top half observed
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = run_cli(
        "impute", str(checkpoint), "--input", "digit.png", "--mask", "mask.png",
        "--output", "filled.png", "--num-completions", "2", "--argmax", "--scale", "1",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "filled.png") as image:
        assert image.height == 2 + 3 * 30  # input row and two completion rows


@pytest.mark.slow
def test_sample_seed_reproducible_across_batches(checkpoint: Path, tmp_path: Path) -> None:
    """Same seed, same images; a smaller --batch-size only changes how they are cut."""
    common = [str(checkpoint), "--num-samples", "5", "--steps", "3", "--seed", "7"]
    for name, extra in (("a", []), ("b", []), ("c", ["--batch-size", "2"])):
        output = [
            "--output",
            str(tmp_path / f"{name}.png"),
            "--save-npz",
            str(tmp_path / f"{name}.npz"),
        ]
        assert cli.main(["-q", "sample", *common, *output, *extra]) == 0
    arrays = {}
    for name in "abc":
        with np.load(tmp_path / f"{name}.npz") as loaded:
            arrays[name] = loaded["samples"]
    assert np.array_equal(arrays["a"], arrays["b"])
    assert arrays["c"].shape == (5, 1, 28, 28)


def test_evaluate_one_generated_image(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["evaluate", "x.pt", "--num-generated", "1"]) == 2
    assert "invalid --num-generated 1" in error_line(capsys)
