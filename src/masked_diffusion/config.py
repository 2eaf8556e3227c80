"""Typed experiment configuration: one frozen dataclass per part, loaded from YAML.

An :class:`ExperimentConfig` groups :class:`DataConfig`, :class:`ScheduleConfig`,
:class:`ModelConfig`, :class:`DiffusionConfig` and :class:`TrainerConfig`. Every class
is frozen and keyword-only and checks its values in ``__post_init__``, so an invalid
value fails when the config is built, with a message that names the key.

YAML files use the same nesting (``data:``, ``schedule:``, ...). Loading is strict: an
unknown key is an error that suggests the closest valid key, and values are converted
to the annotated type, so ``3e-4`` (a string for YAML 1.1 parsers) becomes a float.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = [
    "DataConfig",
    "DiffusionConfig",
    "ExperimentConfig",
    "ModelConfig",
    "ScheduleConfig",
    "TrainerConfig",
    "apply_overrides",
    "load_config",
    "save_config",
]

DATASET_NAMES = ("mnist-sample", "mnist", "fashion-mnist")
SCHEDULE_KINDS = ("linear", "cosine", "polynomial")
LOSS_WEIGHTINGS = ("mlm", "elbo")
SAMPLER_NAMES = ("ancestral", "first_hitting", "confidence")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")
LR_SCHEDULES = ("constant", "cosine")
NONFINITE_POLICIES = ("raise", "skip")


def _require(condition: bool, key: str, value: object, allowed: str) -> None:
    if not condition:
        raise ValueError(f"invalid {key}={value!r}: expected {allowed}")


def _require_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"invalid {key}={value!r}: expected one of {list(choices)}{hint}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Dataset, binarization and missing-pixel settings.

    Attributes:
        dataset: ``"mnist-sample"`` (5,000 MNIST digits shipped with the package,
            split 4,500 train / 500 held out), ``"mnist"`` or ``"fashion-mnist"``
            (full sets through torchvision). Default: ``"mnist-sample"``.
        root: Folder for the torchvision datasets. Default: ``"data"``.
        download: Download the torchvision datasets into ``root`` when missing.
            Default: ``False``.
        threshold: Binarization threshold on intensities in ``[0, 1]``; a pixel is
            1 when its intensity is strictly above it. Default: ``0.5``.
        p_missing: Fraction of pixels of every training and validation image that
            was never observed, in ``[0, 1)``. Default: ``0.0``.
        mask_seed: Seed of the fixed per-image observation masks. Default: ``0``.
        batch_size: Training batch size (global, across all processes). Default: ``128``.
        eval_batch_size: Batch size for validation and likelihood. Default: ``500``.

    Example:
        >>> from masked_diffusion import DataConfig
        >>> DataConfig(p_missing=0.5).p_missing
        0.5
        >>> DataConfig(p_missing=1.0)
        Traceback (most recent call last):
        ...
        ValueError: invalid data.p_missing=1.0: expected a value in [0, 1)
    """

    dataset: str = "mnist-sample"
    root: str = "data"
    download: bool = False
    threshold: float = 0.5
    p_missing: float = 0.0
    mask_seed: int = 0
    batch_size: int = 128
    eval_batch_size: int = 500

    def __post_init__(self) -> None:
        _require_choice("data.dataset", self.dataset, DATASET_NAMES)
        _require(0.0 <= self.threshold < 1.0, "data.threshold", self.threshold, "a value in [0, 1)")
        _require(0.0 <= self.p_missing < 1.0, "data.p_missing", self.p_missing, "a value in [0, 1)")
        _require(self.batch_size > 0, "data.batch_size", self.batch_size, "a positive integer")
        _require(
            self.eval_batch_size > 0,
            "data.eval_batch_size",
            self.eval_batch_size,
            "a positive integer",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """Masking schedule ``alpha_t``, the probability that a pixel is still unmasked.

    Attributes:
        kind: ``"linear"`` (``1 - t``), ``"cosine"`` (``cos(pi t / 2)``) or
            ``"polynomial"`` (``1 - t**exponent``). Default: ``"linear"``.
        num_timesteps: Number of steps ``T`` of a discrete schedule on the grid
            ``t_i = i / T``; ``None`` for continuous time. Default: ``None``.
        exponent: Exponent ``w`` of the polynomial schedule. Default: ``1.0``.

    Example:
        >>> from masked_diffusion import ScheduleConfig
        >>> ScheduleConfig(kind="cosine", num_timesteps=1000)
        ScheduleConfig(kind='cosine', num_timesteps=1000, exponent=1.0)
    """

    kind: str = "linear"
    num_timesteps: int | None = None
    exponent: float = 1.0

    def __post_init__(self) -> None:
        _require_choice("schedule.kind", self.kind, SCHEDULE_KINDS)
        if self.num_timesteps is not None:
            _require(
                self.num_timesteps > 0,
                "schedule.num_timesteps",
                self.num_timesteps,
                "a positive integer, or null for continuous time",
            )
        _require(self.exponent > 0, "schedule.exponent", self.exponent, "a positive number")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of the :class:`~masked_diffusion.MDMUNet` denoising network.

    Attributes:
        num_classes: Number of pixel values ``K``; the MASK state is index ``K``.
            Default: ``2``.
        in_channels: Image channels. Default: ``1``.
        image_size: Height and width in pixels. Default: ``(28, 28)``.
        base_channels: Channels of the first level. Default: ``32``.
        channel_mults: Channel multiplier per resolution level; each level after the
            first halves the height and width. Default: ``(1, 2, 2)``.
        num_res_blocks: Residual blocks per level on the way down. Default: ``2``.
        dropout: Dropout probability inside residual blocks. Default: ``0.0``.
        num_groups: Groups of each GroupNorm; must divide every channel count.
            Default: ``8``.
        time_conditioning: Feed ``t`` to the network through a sinusoidal
            embedding. With ``False`` the network ignores ``t``, so samplers reuse its
            outputs across steps in which no pixel changed. Default: ``True``.

    Example:
        >>> from masked_diffusion import ModelConfig
        >>> ModelConfig(base_channels=64, channel_mults=(1, 2)).image_size
        (28, 28)
    """

    num_classes: int = 2
    in_channels: int = 1
    image_size: tuple[int, int] = (28, 28)
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    dropout: float = 0.0
    num_groups: int = 8
    time_conditioning: bool = True

    def __post_init__(self) -> None:
        _require(self.num_classes >= 2, "model.num_classes", self.num_classes, "an integer >= 2")
        _require(self.in_channels > 0, "model.in_channels", self.in_channels, "a positive integer")
        _require(
            len(self.image_size) == 2 and all(s > 0 for s in self.image_size),
            "model.image_size",
            self.image_size,
            "two positive integers [height, width]",
        )
        _require(
            self.base_channels > 0, "model.base_channels", self.base_channels, "a positive integer"
        )
        _require(
            len(self.channel_mults) > 0 and all(m > 0 for m in self.channel_mults),
            "model.channel_mults",
            self.channel_mults,
            "a non-empty list of positive integers",
        )
        _require(
            self.num_res_blocks > 0,
            "model.num_res_blocks",
            self.num_res_blocks,
            "a positive integer",
        )
        _require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a value in [0, 1)")
        _require(self.num_groups > 0, "model.num_groups", self.num_groups, "a positive integer")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiffusionConfig:
    """Training loss and default sampler of the :class:`~masked_diffusion.MaskedDiffusionModel`.

    Attributes:
        loss_weighting: ``"mlm"``, the mean cross-entropy over masked pixels, or
            ``"elbo"``, the per-image continuous- or discrete-time bound in nats.
            Default: ``"mlm"``.
        sampler: Default sampler: ``"ancestral"``, ``"first_hitting"`` or
            ``"confidence"``. Default: ``"ancestral"``.
        sampling_steps: Default number of sampler steps. Default: ``100``.
        temperature: Default sampling temperature; ``0`` takes the most likely
            value. Default: ``1.0``.

    Example:
        >>> from masked_diffusion import DiffusionConfig
        >>> DiffusionConfig(loss_weighting="elbo", sampler="first_hitting").sampler
        'first_hitting'
    """

    loss_weighting: str = "mlm"
    sampler: str = "ancestral"
    sampling_steps: int = 100
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _require_choice("diffusion.loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        _require_choice("diffusion.sampler", self.sampler, SAMPLER_NAMES)
        _require(
            self.sampling_steps > 0,
            "diffusion.sampling_steps",
            self.sampling_steps,
            "a positive integer",
        )
        _require(self.temperature >= 0, "diffusion.temperature", self.temperature, "a number >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """Optimisation, checkpointing and logging of the :class:`~masked_diffusion.Trainer`.

    Attributes:
        output_dir: Run folder for ``config.yaml``, ``checkpoints/``, ``samples/``
            and ``metrics.jsonl``. Default: ``"runs/default"``.
        epochs: Number of passes over the training set. Default: ``10``.
        max_steps: Stop after this many optimizer steps even if epochs remain;
            ``None`` for no limit. A stop inside an epoch writes ``last.pt`` (so
            ``--resume`` continues exactly) but runs no validation, so it writes no
            ``best.pt`` for that partial epoch. Default: ``None``.
        lr: Peak AdamW learning rate. Default: ``1e-3``.
        weight_decay: AdamW weight decay. Default: ``0.0``.
        betas: AdamW ``(beta1, beta2)``. Default: ``(0.9, 0.999)``.
        warmup_steps: Steps of linear learning-rate warmup. Default: ``0``.
        lr_schedule: ``"constant"`` or ``"cosine"`` decay to zero after warmup.
            Default: ``"constant"``.
        grad_clip: Maximum gradient norm; ``None`` disables clipping. Default: ``1.0``.
        ema_decay: Decay of the exponential moving average of the weights, used for
            validation and sampling; ``None`` disables it. Default: ``None``.
        precision: ``"fp32"``, ``"bf16"`` (autocast, CPU or GPU) or ``"fp16"``
            (autocast with a gradient scaler, CUDA only). Default: ``"fp32"``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``. Default: ``"auto"``.
        seed: Seed of model initialisation, data order and diffusion noise.
            Default: ``0``.
        deterministic: Ask PyTorch for deterministic algorithms. Default: ``False``.
        compile: Compile the network with ``torch.compile``. Default: ``False``.
        channels_last: Store the network's convolution weights, and so its
            activations, in the channels-last (NHWC) memory format. Outputs match
            the NCHW layout up to float rounding; ``benchmarks/run.py`` measures
            which layout is faster on a machine. Default: ``False``.
        checkpoint_every_steps: Also write ``last`` every this many steps, so a
            killed run loses at most that many; ``None`` writes only per epoch.
            Default: ``None``.
        num_sample_images: Images in the per-epoch sample grid; ``0`` disables it.
            Default: ``64``.
        sample_every_epochs: Write a sample grid every this many epochs. Default: ``1``.
        nll_samples: Monte Carlo draws per image for the validation bound. Default: ``1``.
        on_nonfinite_loss: ``"raise"`` stops with an error naming the step;
            ``"skip"`` skips the batch and counts it. Default: ``"raise"``.
        progress_bar: Show tqdm progress bars. Default: ``True``.
        log_every_steps: Write a training line to ``metrics.jsonl`` every this many
            steps. Default: ``50``.

    Example:
        >>> from masked_diffusion import TrainerConfig
        >>> TrainerConfig(epochs=5, lr=3e-4, ema_decay=0.999).lr
        0.0003
    """

    output_dir: str = "runs/default"
    epochs: int = 10
    max_steps: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    grad_clip: float | None = 1.0
    ema_decay: float | None = None
    precision: str = "fp32"
    device: str = "auto"
    seed: int = 0
    deterministic: bool = False
    compile: bool = False
    channels_last: bool = False
    checkpoint_every_steps: int | None = None
    num_sample_images: int = 64
    sample_every_epochs: int = 1
    nll_samples: int = 1
    on_nonfinite_loss: str = "raise"
    progress_bar: bool = True
    log_every_steps: int = 50

    def __post_init__(self) -> None:
        _require(bool(self.output_dir), "trainer.output_dir", self.output_dir, "a non-empty path")
        _require(self.epochs > 0, "trainer.epochs", self.epochs, "a positive integer")
        if self.max_steps is not None:
            _require(
                self.max_steps > 0,
                "trainer.max_steps",
                self.max_steps,
                "a positive integer or null",
            )
        _require(self.lr > 0, "trainer.lr", self.lr, "a positive number")
        _require(self.weight_decay >= 0, "trainer.weight_decay", self.weight_decay, "a number >= 0")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "trainer.betas",
            self.betas,
            "two numbers in [0, 1)",
        )
        _require(
            self.warmup_steps >= 0, "trainer.warmup_steps", self.warmup_steps, "an integer >= 0"
        )
        _require_choice("trainer.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.grad_clip is not None:
            _require(
                self.grad_clip > 0, "trainer.grad_clip", self.grad_clip, "a positive number or null"
            )
        if self.ema_decay is not None:
            _require(
                0 < self.ema_decay < 1,
                "trainer.ema_decay",
                self.ema_decay,
                "a value in (0, 1) or null",
            )
        _require_choice("trainer.precision", self.precision, PRECISIONS)
        _require_choice("trainer.device", self.device, DEVICES)
        if self.checkpoint_every_steps is not None:
            _require(
                self.checkpoint_every_steps > 0,
                "trainer.checkpoint_every_steps",
                self.checkpoint_every_steps,
                "a positive integer or null",
            )
        _require(
            self.num_sample_images >= 0,
            "trainer.num_sample_images",
            self.num_sample_images,
            "an integer >= 0",
        )
        _require(
            self.sample_every_epochs > 0,
            "trainer.sample_every_epochs",
            self.sample_every_epochs,
            "a positive integer",
        )
        _require(
            self.nll_samples > 0, "trainer.nll_samples", self.nll_samples, "a positive integer"
        )
        _require_choice("trainer.on_nonfinite_loss", self.on_nonfinite_loss, NONFINITE_POLICIES)
        _require(
            self.log_every_steps > 0,
            "trainer.log_every_steps",
            self.log_every_steps,
            "a positive integer",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """A whole experiment: data, schedule, network, diffusion and training settings.

    Example:
        >>> from masked_diffusion import ExperimentConfig, TrainerConfig
        >>> config = ExperimentConfig(trainer=TrainerConfig(epochs=2))
        >>> config.trainer.epochs, config.data.dataset
        (2, 'mnist-sample')
    """

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)

    def to_dict(self) -> dict[str, Any]:
        """Convert to nested plain dictionaries and lists, ready for YAML or JSON."""
        return _to_plain(self)  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentConfig:
        """Build a config from nested mappings, converting values to the annotated types.

        Raises:
            ValueError: On an unknown key (naming the closest valid key) or an invalid value.
            TypeError: On a value that cannot be converted to its field's type.
        """
        return _build(cls, data, prefix="")

    def replace(self, **sections: Any) -> ExperimentConfig:
        """Return a copy with whole sections replaced, e.g. ``replace(trainer=...)``."""
        return dataclasses.replace(self, **sections)


ConfigT = TypeVar("ConfigT")


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    return value


def _build(cls: type[ConfigT], data: Mapping[str, Any], prefix: str) -> ConfigT:
    if not isinstance(data, Mapping):
        where = prefix.rstrip(".") or "the config"
        raise TypeError(f"invalid {where}: expected a mapping of keys to values, got {data!r}")
    assert dataclasses.is_dataclass(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, raw in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
            raise ValueError(
                f"unknown config key {prefix + str(key)!r}{hint} "
                f"Valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: {sorted(fields)}"
            )
        kwargs[key] = _convert(hints[key], raw, f"{prefix}{key}")
    return cls(**kwargs)


def _convert(annotation: Any, raw: Any, key: str) -> Any:
    """Convert a YAML value to ``annotation``, naming ``key`` in errors."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)

    if dataclasses.is_dataclass(annotation):
        return _build(annotation, raw, prefix=f"{key}.")  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        if raw is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _convert(non_none[0], raw, key)
    if origin is tuple:
        if not isinstance(raw, list | tuple):
            raise TypeError(f"invalid {key}={raw!r}: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], item, key) for item in raw)
        if len(raw) != len(args):
            raise ValueError(f"invalid {key}={raw!r}: expected a list of {len(args)} values")
        return tuple(_convert(a, item, key) for a, item in zip(args, raw, strict=True))
    if annotation is bool:
        if isinstance(raw, bool):
            return raw
        raise TypeError(f"invalid {key}={raw!r}: expected true or false")
    if annotation is int:
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise TypeError(f"invalid {key}={raw!r}: expected an integer")
        try:
            return int(raw)
        except ValueError:
            raise TypeError(f"invalid {key}={raw!r}: expected an integer") from None
    if annotation is float:
        # PyYAML follows YAML 1.1, which reads "3e-4" (no dot) as a string.
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise TypeError(f"invalid {key}={raw!r}: expected a number")
        try:
            return float(raw)
        except ValueError:
            raise TypeError(f"invalid {key}={raw!r}: expected a number") from None
    if annotation is str:
        if not isinstance(raw, str):
            raise TypeError(f"invalid {key}={raw!r}: expected a string")
        return raw
    raise TypeError(f"config key {key} has an unsupported type {annotation!r}")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load an :class:`ExperimentConfig` from a YAML file, then apply ``overrides``.

    Args:
        path: YAML file with the sections ``data``, ``schedule``, ``model``,
            ``diffusion`` and ``trainer``; missing sections and keys take defaults.
        overrides: ``"section.key=value"`` strings, the value written in YAML.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: On an unknown key, an invalid value or a malformed override.

    Example:
        >>> import tempfile
        >>> from masked_diffusion import ExperimentConfig, load_config, save_config
        >>> path = Path(tempfile.mkdtemp()) / "config.yaml"
        >>> save_config(ExperimentConfig(), path)
        >>> load_config(path, ["trainer.epochs=2"]).trainer.epochs
        2
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with path.open(encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"invalid config file {path}: expected a mapping at the top level")
    return ExperimentConfig.from_dict(_merge_overrides(data, overrides))


def apply_overrides(config: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    """Return ``config`` with ``"section.key=value"`` overrides applied and checked.

    Example:
        >>> from masked_diffusion import ExperimentConfig, apply_overrides
        >>> config = apply_overrides(ExperimentConfig(), ["model.channel_mults=[1, 2]"])
        >>> config.model.channel_mults
        (1, 2)
    """
    return ExperimentConfig.from_dict(_merge_overrides(config.to_dict(), overrides))


def _merge_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        name, sep, text = item.partition("=")
        parts = name.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ValueError(
                f"invalid override {item!r}: expected section.key=value, e.g. trainer.epochs=5"
            )
        section, key = parts
        value = yaml.safe_load(text) if text.strip() else None
        target = merged.setdefault(section, {})
        if not isinstance(target, dict):
            raise ValueError(f"invalid override {item!r}: {section!r} is not a config section")
        target[key] = value
    return merged


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    """Write ``config`` as YAML to ``path``, creating parent folders.

    Example:
        >>> import tempfile
        >>> from masked_diffusion import ExperimentConfig, load_config, save_config
        >>> path = Path(tempfile.mkdtemp()) / "run" / "config.yaml"
        >>> save_config(ExperimentConfig(), path)
        >>> load_config(path) == ExperimentConfig()
        True
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None)
    path.write_text(text, encoding="utf-8")
