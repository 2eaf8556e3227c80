"""Safe, atomic checkpoints and pretrained-model folders.

A checkpoint is a ``torch.save`` file holding one dictionary of tensors, plain
containers and numbers. :func:`save_checkpoint` adds a format marker and version
and writes atomically: the data go to a temporary file in the target folder,
which is flushed, synced to disk and renamed over the target, so a crash or a
full disk during a save leaves the previous file intact. :func:`load_checkpoint`
reads with ``torch.load(weights_only=True)``, which never runs code stored in the
file, and checks the marker and version.

A pretrained folder (:func:`save_pretrained`) contains ``config.yaml``, the
:class:`~masked_diffusion.ExperimentConfig` the model was built from, and
``model.pt``, its ``state_dict`` without optimizer state. :func:`load_model`
accepts either a training checkpoint or such a folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from masked_diffusion._version import __version__
from masked_diffusion.config import ExperimentConfig, load_config, save_config

if TYPE_CHECKING:
    from masked_diffusion.diffusion import MaskedDiffusionModel

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_VERSION",
    "PRETRAINED_CONFIG_NAME",
    "PRETRAINED_WEIGHTS_NAME",
    "CheckpointError",
    "CheckpointNotFoundError",
    "load_checkpoint",
    "load_model",
    "load_pretrained",
    "save_checkpoint",
    "save_pretrained",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "masked-diffusion-checkpoint"
"""Value of the ``"format"`` key that marks a file written by :func:`save_checkpoint`."""

CHECKPOINT_FORMAT_VERSION = 1
"""Layout version of the checkpoint dictionary; files with a higher version are rejected."""

PRETRAINED_CONFIG_NAME = "config.yaml"
PRETRAINED_WEIGHTS_NAME = "model.pt"

_RESERVED_KEYS = ("format", "format_version", "library_version")


class CheckpointError(ValueError):
    """A file that is not a readable masked-diffusion checkpoint of a supported version."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint file or pretrained folder that does not exist."""


# --------------------------------------------------------------------------- atomic writes


def _fsync_directory(directory: Path) -> None:
    """Sync a folder so that a rename inside it survives a power loss (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _temporary_sibling(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary path next to ``path``; remove it unless it was renamed away.

    The file lives in the same folder as ``path`` so that the final ``os.replace``
    is an atomic rename on the same file system.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(name)
    try:
        yield tmp_path
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def _exists_message(path: Path) -> str:
    return f"{path} already exists and overwrite=False; move it away or write elsewhere"


def _publish(tmp_path: Path, path: Path, *, overwrite: bool) -> None:
    """Move a finished temporary file to ``path`` atomically, then sync the folder.

    Raises:
        FileExistsError: If ``overwrite`` is false and ``path`` exists.
    """
    if overwrite:
        os.replace(tmp_path, path)
    else:
        # A hard link fails with FileExistsError instead of replacing, so two
        # writers can never clobber each other's file.
        try:
            os.link(tmp_path, path)
        except FileExistsError:
            raise FileExistsError(_exists_message(path)) from None
        except OSError:
            # File systems without hard links: check, then rename (not race-free).
            if path.exists():
                raise FileExistsError(_exists_message(path)) from None
            os.replace(tmp_path, path)
    _fsync_directory(path.parent)


def save_checkpoint(path: str | Path, state: Mapping[str, Any], *, overwrite: bool = True) -> None:
    """Write ``state`` to ``path`` atomically, adding the format marker and version.

    The dictionary is saved to a temporary file in the same folder, flushed and
    synced, then renamed over ``path``. If serialisation or the disk fails, the
    temporary file is removed and any previous file at ``path`` is left as it was.

    Args:
        path: Target file; missing parent folders are created.
        state: Tensors, numbers, strings and nested dicts, lists and tuples of
            them, everything that ``torch.load(weights_only=True)`` can read back.
            The keys ``"format"``, ``"format_version"`` and ``"library_version"``
            are set by this function.
        overwrite: Replace an existing file. With ``False`` an existing file
            raises :class:`FileExistsError` and is left untouched. Default: ``True``.

    Raises:
        TypeError: If ``state`` is not a mapping or contains a reserved key.
        FileExistsError: If ``overwrite`` is false and ``path`` exists.
        OSError: If the disk write fails (the previous file is kept).

    Example:
        >>> import tempfile, torch
        >>> from masked_diffusion.checkpoint import load_checkpoint, save_checkpoint
        >>> folder = tempfile.mkdtemp()
        >>> save_checkpoint(f"{folder}/state.pt", {"step": 3, "weight": torch.ones(2)})
        >>> load_checkpoint(f"{folder}/state.pt")["step"]
        3
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping of names to values, got {type(state).__name__}")
    reserved = [key for key in _RESERVED_KEYS if key in state]
    if reserved:
        raise TypeError(
            f"state must not contain the reserved keys {reserved}; save_checkpoint sets them"
        )
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "library_version": __version__,
        **state,
    }
    if not overwrite and path.exists():
        raise FileExistsError(_exists_message(path))
    with _temporary_sibling(path) as tmp_path:
        with tmp_path.open("wb") as handle:
            try:
                torch.save(payload, handle)
            except RuntimeError as error:
                # torch.save reports a failed write (full disk, quota) as a
                # RuntimeError raised while handling the OSError.
                cause = error.__context__
                if isinstance(cause, OSError):
                    raise OSError(
                        cause.errno,
                        f"cannot write checkpoint {path}: {cause.strerror}; any previous "
                        "file at that path is unchanged",
                    ) from error
                raise
            handle.flush()
            os.fsync(handle.fileno())
        _publish(tmp_path, path, overwrite=overwrite)
    logger.debug("wrote checkpoint %s", path)


# --------------------------------------------------------------------------- loading


def load_checkpoint(
    path: str | Path, map_location: str | torch.device | None = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, without running stored code.

    The file is read with ``torch.load(weights_only=True)``, so a file crafted to
    execute code on unpickling is rejected before any of it runs.

    Args:
        path: Checkpoint file.
        map_location: Device that every tensor is moved to, as in :func:`torch.load`;
            ``"cpu"`` loads a GPU checkpoint on a machine without one. ``None`` keeps
            the devices recorded in the file. Default: ``"cpu"``.

    Returns:
        The saved dictionary, including ``"format"``, ``"format_version"`` and
        ``"library_version"``.

    Raises:
        CheckpointNotFoundError: If ``path`` does not exist (also a
            :class:`FileNotFoundError`).
        CheckpointError: If the file is truncated or corrupt, contains objects other
            than tensors and plain containers, is not a masked-diffusion checkpoint,
            or has a format version newer than this library reads.

    Example:
        >>> from masked_diffusion.checkpoint import CheckpointError, load_checkpoint
        >>> try:
        ...     load_checkpoint("missing.pt")
        ... except CheckpointError as error:
        ...     print(type(error).__name__)
        CheckpointNotFoundError
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint file not found: {path}")
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint path {path} is a folder; pass the .pt file inside it, "
            "or use load_model for a pretrained folder or run folder"
        )
    try:
        with warnings.catch_warnings():
            # Plain pickle files trigger this protocol warning; they are rejected
            # below unless they contain only tensors and containers.
            warnings.filterwarnings(
                "ignore", message="Detected pickle protocol", category=UserWarning
            )
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        detail = _unpickler_detail(error)
        found = re.search(r"GLOBAL ([\w.]+)", detail)
        if found:
            raise CheckpointError(
                f"refusing to load {path}: it references the Python object {found.group(1)}, "
                "which could run code when unpickled. masked-diffusion checkpoints contain only "
                "tensors and plain containers, so the file was written by other software or "
                "tampered with"
            ) from error
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is corrupt or not a PyTorch "
            f"checkpoint ({detail})"
        ) from error
    except OSError:
        raise
    except Exception as error:  # Corrupt data surfaces as many exception types.
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated, corrupt or not a PyTorch "
            f"file ({type(error).__name__}: {_first_line(error)})"
        ) from error
    _check_format(state, path)
    return state  # type: ignore[no-any-return]


def _unpickler_detail(error: BaseException) -> str:
    """Pick the informative line out of the long message of the weights-only unpickler."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line:
            return line
    for index, line in enumerate(lines):
        if line.endswith("WeightsUnpickler error:") and index + 1 < len(lines):
            return lines[index + 1]
    return lines[0] if lines else type(error).__name__


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_format(state: object, path: Path) -> None:
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is a PyTorch file but not a masked-diffusion checkpoint (no "
            f"format={CHECKPOINT_FORMAT!r} entry); pass a file written by the Trainer, "
            "save_checkpoint or save_pretrained"
        )
    version = state.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(
            f"{path} has an invalid format_version={version!r}; the file is corrupt"
        )
    if version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}, written by masked-diffusion "
            f"{state.get('library_version', 'unknown')}; this version ({__version__}) reads "
            f"format versions up to {CHECKPOINT_FORMAT_VERSION}. Upgrade masked-diffusion."
        )
    if version < 1:
        raise CheckpointError(
            f"{path} has an invalid format_version={version}; the file is corrupt"
        )


# --------------------------------------------------------------------------- models


def save_pretrained(model: MaskedDiffusionModel, directory: str | Path) -> None:
    """Write ``model`` to a folder with ``config.yaml`` and ``model.pt`` (weights only).

    Both files are written atomically, so an interrupted save leaves any earlier
    version of each file readable.

    Args:
        model: A model built by :meth:`MaskedDiffusionModel.from_config`, whose
            ``config`` describes its architecture.
        directory: Target folder, created if missing. Existing ``config.yaml`` and
            ``model.pt`` inside it are replaced.

    Raises:
        ValueError: If ``model.config`` is ``None``.

    Example:
        >>> model = MaskedDiffusionModel.from_config(ExperimentConfig())  # doctest: +SKIP
        >>> save_pretrained(model, "my-model")  # doctest: +SKIP
        >>> same = load_pretrained("my-model")  # doctest: +SKIP
    """
    config = getattr(model, "config", None)
    if not isinstance(config, ExperimentConfig):
        raise ValueError(
            f"save_pretrained needs model.config to be an ExperimentConfig, got {config!r}; "
            "build the model with MaskedDiffusionModel.from_config(config) so that its "
            "architecture can be rebuilt when loading"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / PRETRAINED_CONFIG_NAME
    with _temporary_sibling(config_path) as tmp_path:
        save_config(config, tmp_path)
        _publish(tmp_path, config_path, overwrite=True)
    state_dict = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    save_checkpoint(
        directory / PRETRAINED_WEIGHTS_NAME,
        {"kind": "pretrained", "config": config.to_dict(), "model": state_dict},
    )
    logger.info("saved pretrained model to %s", directory)


def load_pretrained(
    directory: str | Path, map_location: str | torch.device | None = None
) -> MaskedDiffusionModel:
    """Rebuild a model saved by :func:`save_pretrained`.

    Args:
        directory: Folder with ``config.yaml`` and ``model.pt``.
        map_location: Device to put the model on; ``None`` leaves it on the CPU.
            Default: ``None``.

    Returns:
        The model in eval mode, with ``config`` set.

    Raises:
        CheckpointNotFoundError: If the folder or one of its two files is missing.
        CheckpointError: If ``model.pt`` is not a valid checkpoint or its weights do
            not fit the architecture in ``config.yaml``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"pretrained model folder not found: {directory}")
    config_path = directory / PRETRAINED_CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointNotFoundError(
            f"{directory} is not a pretrained model folder: {PRETRAINED_CONFIG_NAME} is missing"
        )
    config = load_config(config_path)
    state = load_checkpoint(directory / PRETRAINED_WEIGHTS_NAME, map_location="cpu")
    model = _build_model(config, state["model"], source=directory / PRETRAINED_WEIGHTS_NAME)
    return _finish(model, map_location)


def load_model(
    path: str | Path,
    map_location: str | torch.device | None = None,
    *,
    use_ema: bool = True,
) -> MaskedDiffusionModel:
    """Load a model from a training checkpoint, a run folder or a pretrained folder.

    Args:
        path: A checkpoint file written by the :class:`~masked_diffusion.Trainer`
            (``best.pt``, ``last.pt``, ``epoch_NNN.pt``), a run folder (its
            ``checkpoints/best.pt``, else ``checkpoints/last.pt``, is used) or a
            folder written by :func:`save_pretrained`.
        map_location: Device to put the model on; ``None`` leaves it on the CPU.
            Default: ``None``.
        use_ema: Take the exponential-moving-average weights when the checkpoint
            has them; otherwise, or with ``False``, take the raw weights.
            Default: ``True``.

    Returns:
        The model in eval mode, with ``config`` set.

    Raises:
        CheckpointNotFoundError: If ``path`` does not exist, or is a folder with
            neither ``config.yaml`` nor a ``checkpoints`` subfolder.
        CheckpointError: If the file is not a valid checkpoint or has no config.

    Example:
        >>> model = load_model("runs/mnist/checkpoints/best.pt")  # doctest: +SKIP
        >>> images = model.sample(16)  # doctest: +SKIP
    """
    path = Path(path)
    if path.is_dir():
        if (path / PRETRAINED_CONFIG_NAME).is_file() and (path / PRETRAINED_WEIGHTS_NAME).exists():
            return load_pretrained(path, map_location=map_location)
        for name in ("best.pt", "last.pt"):
            candidate = path / "checkpoints" / name
            if candidate.is_file():
                path = candidate
                break
        else:
            raise CheckpointNotFoundError(
                f"{path} is neither a pretrained model folder (config.yaml and "
                f"{PRETRAINED_WEIGHTS_NAME}) nor a run folder with checkpoints/best.pt or "
                "checkpoints/last.pt"
            )
    state = load_checkpoint(path, map_location="cpu")
    config_dict = state.get("config")
    if not isinstance(config_dict, dict):
        raise CheckpointError(
            f"{path} has no 'config' entry, so the model architecture is unknown; "
            "pass a checkpoint written by the Trainer or save_pretrained"
        )
    try:
        config = ExperimentConfig.from_dict(config_dict)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path} has an invalid config: {error}") from error
    weights = state.get("model")
    ema_weights = state.get("ema")
    if use_ema and isinstance(ema_weights, dict):
        weights = _strip_averaged_model_prefix(ema_weights)
        logger.debug("loading EMA weights from %s", path)
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path} has no 'model' weights entry")
    model = _build_model(config, weights, source=path)
    return _finish(model, map_location)


def _strip_averaged_model_prefix(ema_state: Mapping[str, Any]) -> dict[str, Any]:
    """Turn an ``AveragedModel.state_dict()`` into the wrapped model's ``state_dict``."""
    return {
        name.removeprefix("module."): value
        for name, value in ema_state.items()
        if name.startswith("module.")
    }


def _build_model(
    config: ExperimentConfig, weights: Mapping[str, Any], *, source: Path
) -> MaskedDiffusionModel:
    from masked_diffusion.diffusion import MaskedDiffusionModel

    model = MaskedDiffusionModel.from_config(config)
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(
            f"the weights in {source} do not fit the architecture in its config: "
            f"{_first_line(error)}"
        ) from error
    return model


def _finish(
    model: MaskedDiffusionModel, map_location: str | torch.device | None
) -> MaskedDiffusionModel:
    if map_location is not None:
        model.to(torch.device(map_location))
    model.eval()
    return model
