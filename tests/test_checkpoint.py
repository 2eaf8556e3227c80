"""Tests of atomic checkpoint files, safe loading and pretrained-model folders."""

from __future__ import annotations

import errno
import pickle
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from masked_diffusion.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_FORMAT_VERSION,
    CheckpointError,
    CheckpointNotFoundError,
    load_checkpoint,
    load_model,
    load_pretrained,
    save_checkpoint,
    save_pretrained,
)
from masked_diffusion.config import DiffusionConfig, ExperimentConfig, ModelConfig
from masked_diffusion.diffusion import MaskedDiffusionModel
from masked_diffusion.network import MDMUNet


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run on one CPU thread, which is faster on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _tiny_config() -> ExperimentConfig:
    return ExperimentConfig(
        model=ModelConfig(
            image_size=(8, 8),
            base_channels=8,
            channel_mults=(1, 2),
            num_res_blocks=1,
            num_groups=4,
        ),
        diffusion=DiffusionConfig(sampling_steps=4),
    )


def _tiny_model() -> MaskedDiffusionModel:
    torch.manual_seed(0)
    return MaskedDiffusionModel.from_config(_tiny_config())


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _write_marker(path: str) -> None:
    """Stand-in for an attacker's payload: proves that unpickling ran code."""
    Path(path).write_text("code ran", encoding="utf-8")


class _Exploit:
    """An object whose unpickling calls ``_write_marker(marker)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return _write_marker, (str(self.marker),)


# --------------------------------------------------------------------------- save / load


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    weight = torch.randn(3, 4)
    save_checkpoint(path, {"weight": weight, "step": 7, "nested": {"values": [1, 2.5, None]}})

    state = load_checkpoint(path)

    assert torch.equal(state["weight"], weight)
    assert state["step"] == 7
    assert state["nested"] == {"values": [1, 2.5, None]}
    assert state["format"] == CHECKPOINT_FORMAT
    assert state["format_version"] == CHECKPOINT_FORMAT_VERSION


def test_checkpoint_save_leaves_no_temporary_file(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "a.pt", {"x": torch.ones(2)})
    save_checkpoint(tmp_path / "a.pt", {"x": torch.zeros(2)})

    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]
    assert torch.equal(load_checkpoint(tmp_path / "a.pt")["x"], torch.zeros(2))


def test_checkpoint_save_creates_parent_folders(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "state.pt"
    save_checkpoint(path, {"x": 1})
    assert load_checkpoint(path)["x"] == 1


def test_checkpoint_no_overwrite_keeps_existing(tmp_path: Path) -> None:
    path = tmp_path / "epoch_001.pt"
    save_checkpoint(path, {"x": 1})

    with pytest.raises(FileExistsError, match="already exists and overwrite=False"):
        save_checkpoint(path, {"x": 2}, overwrite=False)

    assert load_checkpoint(path)["x"] == 1
    assert _leftovers(tmp_path) == []


def test_checkpoint_interrupted_save_keeps_previous(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"weight": torch.arange(4.0)})
    before = path.read_bytes()
    # torch.save writes the tensors, then fails on the lock, which cannot be
    # pickled: the write stops halfway through the temporary file.
    broken = {"weight": torch.full((1000,), 3.0), "lock": threading.Lock()}

    with pytest.raises((TypeError, pickle.PicklingError, AttributeError)):
        save_checkpoint(path, broken)

    assert path.read_bytes() == before
    assert torch.equal(load_checkpoint(path)["weight"], torch.arange(4.0))
    assert _leftovers(tmp_path) == []


_FULL_DISK_SCRIPT = """
import resource, signal, sys
import torch
from masked_diffusion.checkpoint import save_checkpoint

path = sys.argv[1]
save_checkpoint(path, {"weight": torch.arange(4.0)})
# Writes past 256 KiB now fail with EFBIG, as on a full disk.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))
try:
    save_checkpoint(path, {"weight": torch.zeros(1_000_000)})
except OSError as error:
    print("OSError", error.errno, error.strerror)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX file-size limits")
def test_checkpoint_full_disk_keeps_previous(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    completed = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.stdout.startswith(f"OSError {errno.EFBIG} cannot write checkpoint"), (
        completed.stderr
    )
    assert torch.equal(load_checkpoint(path)["weight"], torch.arange(4.0))
    assert _leftovers(tmp_path) == []


def test_checkpoint_reserved_key_rejected(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="reserved keys"):
        save_checkpoint(tmp_path / "a.pt", {"format": "mine"})


def test_checkpoint_non_mapping_rejected(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="must be a mapping"):
        save_checkpoint(tmp_path / "a.pt", [1, 2])  # type: ignore[arg-type]


def test_checkpoint_map_location_cpu(tmp_path: Path) -> None:
    # NOTE: this runs the map_location="cpu" path with a CPU-saved file; moving
    # CUDA tensors to the CPU is exercised by the next test only where CUDA exists.
    path = tmp_path / "state.pt"
    save_checkpoint(path, {"weight": torch.ones(2)})
    assert load_checkpoint(path, map_location="cpu")["weight"].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_checkpoint_cuda_saved_loads_on_cpu(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    save_checkpoint(path, {"weight": torch.ones(2, device="cuda")})
    assert load_checkpoint(path, map_location="cpu")["weight"].device.type == "cpu"


# --------------------------------------------------------------------------- rejected files


def test_load_checkpoint_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="checkpoint file not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_load_checkpoint_missing_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_load_checkpoint_folder_rejected(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)


def test_load_checkpoint_pickle_exploit_rejected(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    with path.open("wb") as handle:
        # Protocol 2, the one torch.save uses, reaches the payload's GLOBAL opcode.
        pickle.dump({"format": CHECKPOINT_FORMAT, "payload": _Exploit(marker)}, handle, protocol=2)

    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(path)

    assert not marker.exists()


def test_load_checkpoint_torch_exploit_rejected(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "weight": torch.ones(2), "x": _Exploit(marker)}, path)

    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(path)

    assert not marker.exists()


def test_exploit_runs_code_with_plain_pickle(tmp_path: Path) -> None:
    # Control for the two tests above: the payload does run when unpickled unsafely.
    marker = tmp_path / "marker.txt"
    data = pickle.dumps(_Exploit(marker))
    pickle.loads(data)
    assert marker.read_text(encoding="utf-8") == "code ran"


def test_load_checkpoint_truncated(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"weight": torch.randn(256)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_checkpoint(path)


def test_load_checkpoint_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes(range(256)) * 4)

    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_load_checkpoint_pickle_protocol_4_rejected(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    with path.open("wb") as handle:
        pickle.dump({"payload": _Exploit(marker)}, handle, protocol=4)

    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch checkpoint"):
        load_checkpoint(path)

    assert not marker.exists()


def test_load_checkpoint_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")

    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_load_checkpoint_foreign_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"weight": torch.ones(2)}}, path)

    with pytest.raises(CheckpointError, match="not a masked-diffusion checkpoint"):
        load_checkpoint(path)


def test_load_checkpoint_foreign_tensor_file(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pt"
    torch.save(torch.ones(2), path)

    with pytest.raises(CheckpointError, match="not a masked-diffusion checkpoint"):
        load_checkpoint(path)


def test_load_checkpoint_newer_format_version(tmp_path: Path) -> None:
    path = tmp_path / "future.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "format_version": 99, "library_version": "9.0"}, path)

    with pytest.raises(CheckpointError, match=r"format version 99.*Upgrade masked-diffusion"):
        load_checkpoint(path)


def test_load_checkpoint_invalid_format_version(tmp_path: Path) -> None:
    path = tmp_path / "broken.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "format_version": "one"}, path)

    with pytest.raises(CheckpointError, match="invalid format_version"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- pretrained folders


def test_pretrained_round_trip_same_samples(tmp_path: Path) -> None:
    model = _tiny_model()
    save_pretrained(model, tmp_path / "model")

    loaded = load_pretrained(tmp_path / "model")

    expected = model.sample(3, generator=torch.Generator().manual_seed(5))
    actual = loaded.sample(3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(actual, expected)
    assert loaded.config == model.config


def test_pretrained_round_trip_same_weights(tmp_path: Path) -> None:
    model = _tiny_model()
    save_pretrained(model, tmp_path / "model")

    loaded = load_pretrained(tmp_path / "model")

    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_pretrained_folder_contains_weights_only(tmp_path: Path) -> None:
    save_pretrained(_tiny_model(), tmp_path / "model")

    state = load_checkpoint(tmp_path / "model" / "model.pt")

    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.yaml", "model.pt"]
    assert "optimizer" not in state
    assert state["kind"] == "pretrained"


def test_model_methods_delegate_to_pretrained(tmp_path: Path) -> None:
    model = _tiny_model()
    model.save_pretrained(tmp_path / "model")

    loaded = MaskedDiffusionModel.from_pretrained(tmp_path / "model")

    assert torch.equal(
        loaded.state_dict()["network.conv_in.weight"], model.state_dict()["network.conv_in.weight"]
    )


def test_save_pretrained_needs_config(tmp_path: Path) -> None:
    model = MaskedDiffusionModel(
        MDMUNet(_tiny_config().model), image_shape=(1, 8, 8), sampling_steps=4
    )
    with pytest.raises(ValueError, match=r"build the model with MaskedDiffusionModel.from_config"):
        save_pretrained(model, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_load_pretrained_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="pretrained model folder not found"):
        load_pretrained(tmp_path / "nothing")


def test_load_pretrained_missing_config(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    with pytest.raises(CheckpointNotFoundError, match=r"config\.yaml is missing"):
        load_pretrained(tmp_path / "model")


# --------------------------------------------------------------------------- load_model


def test_load_model_from_folder_and_file(tmp_path: Path) -> None:
    model = _tiny_model()
    save_pretrained(model, tmp_path / "model")

    from_folder = load_model(tmp_path / "model")
    from_file = load_model(tmp_path / "model" / "model.pt")

    reference = model.state_dict()["network.conv_in.weight"]
    assert torch.equal(from_folder.state_dict()["network.conv_in.weight"], reference)
    assert torch.equal(from_file.state_dict()["network.conv_in.weight"], reference)


def test_load_model_returns_eval_mode(tmp_path: Path) -> None:
    save_pretrained(_tiny_model(), tmp_path / "model")
    assert not load_model(tmp_path / "model").training


def test_load_model_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="checkpoint file not found"):
        load_model(tmp_path / "missing.pt")


def test_load_model_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="neither a pretrained model folder"):
        load_model(tmp_path)


def test_load_model_needs_config(tmp_path: Path) -> None:
    path = tmp_path / "bare.pt"
    save_checkpoint(path, {"model": _tiny_model().state_dict()})
    with pytest.raises(CheckpointError, match="no 'config' entry"):
        load_model(path)


def test_load_model_weights_must_fit(tmp_path: Path) -> None:
    config = _tiny_config()
    wider = config.replace(
        model=ModelConfig(
            **{
                **config.to_dict()["model"],
                "base_channels": 12,
                "channel_mults": (1, 2),
                "image_size": (8, 8),
            }
        )
    )
    path = tmp_path / "mismatch.pt"
    save_checkpoint(path, {"config": wider.to_dict(), "model": _tiny_model().state_dict()})
    with pytest.raises(CheckpointError, match="do not fit the architecture"):
        load_model(path)
