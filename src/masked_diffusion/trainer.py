"""Training loop for :class:`~masked_diffusion.MaskedDiffusionModel`: resumable and auditable.

:class:`Trainer` runs epochs of AdamW over a :class:`~masked_diffusion.data.TensorBatchLoader`
with learning-rate warmup and cosine decay, gradient clipping, an exponential moving
average (EMA) of the weights, bf16/fp16 mixed precision, and data-parallel training
under ``torchrun``. Every epoch it measures the validation loss and the likelihood
bound, writes a sample grid and checkpoints.

Run folder (``trainer.output_dir``)::

    config.yaml                 resolved configuration of the run
    metrics.jsonl               one JSON object per line: "train", "epoch" and "resume" records
    loss_curve.png              curves of the losses and bounds in metrics.jsonl
    checkpoints/last.pt         latest state, every epoch and every checkpoint_every_steps steps
    checkpoints/best.pt         state with the lowest validation bound so far
    checkpoints/epoch_NNN.pt    state after epoch NNN (1-based), never overwritten
    samples/epoch_NNN.png       samples of the (EMA) model after epoch NNN
    samples/completion_epoch_NNN.png   clean / observed / completed validation images
                                (runs with missing pixels only)
    tensorboard/                TensorBoard events, when ``tensorboard`` is installed

Resuming is exact: a checkpoint stores the weights, EMA weights, optimizer, learning-rate
schedule, gradient scaler, position inside the epoch and every random-number-generator
state, so an interrupted and resumed run on the CPU ends with the same bits as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from masked_diffusion import distributed
from masked_diffusion._version import __version__
from masked_diffusion.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from masked_diffusion.config import ExperimentConfig, save_config
from masked_diffusion.data import BinaryImageDataset, TensorBatchLoader
from masked_diffusion.distributed import DistributedContext

if TYPE_CHECKING:
    from masked_diffusion.diffusion import MaskedDiffusionModel

__all__ = [
    "NonFiniteLossError",
    "Trainer",
    "configure_determinism",
    "resolve_device",
    "seed_everything",
    "warmup_cosine_lambda",
]

logger = logging.getLogger(__name__)

# A fresh run raises FileExistsError if its folder contains any of these.
RUN_ARTIFACTS = (
    "config.yaml",
    "metrics.jsonl",
    "loss_curve.png",
    "checkpoints",
    "samples",
    "tensorboard",
)

# Seeds of the generators used for validation and pictures. They are fixed so that
# every epoch is measured on the same noise, and separate from the training stream.
_VALIDATION_SEED_OFFSET = 1_000_003
_SAMPLING_SEED_OFFSET = 2_000_003

# Completion pictures show this many validation images.
_NUM_COMPLETION_IMAGES = 8

# Skipped non-finite batches are logged one by one up to this count, then every 100th.
_SKIP_LOG_LIMIT = 10


class NonFiniteLossError(FloatingPointError):
    """A NaN or infinite training loss or gradient norm under ``on_nonfinite_loss="raise"``."""


# --------------------------------------------------------------------------- setup helpers


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and PyTorch on every device.

    :meth:`Trainer.from_config` calls this before building the model, so the
    initial weights follow ``trainer.seed``. The trainer itself draws diffusion
    noise from its own :class:`torch.Generator` and never reseeds the global RNGs.

    Args:
        seed: Non-negative integer.

    Raises:
        ValueError: If ``seed`` is negative.

    Example:
        >>> seed_everything(0)
        >>> a = torch.rand(2)
        >>> seed_everything(0)
        >>> torch.equal(a, torch.rand(2))
        True
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"invalid seed={seed!r}: expected a non-negative integer")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(enabled: bool) -> None:
    """Ask PyTorch for deterministic algorithms (``trainer.deterministic``).

    With ``enabled`` this calls ``torch.use_deterministic_algorithms(True)``, turns
    off cuDNN benchmarking and sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` when unset,
    which cuBLAS needs for deterministic results (it must be set before the first
    cuBLAS call of the process). Operations without a deterministic implementation
    then raise a ``RuntimeError``. With ``False`` the PyTorch defaults are restored.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = enabled


def resolve_device(name: str | torch.device, local_rank: int = 0) -> torch.device:
    """Turn ``trainer.device`` into a :class:`torch.device`, checking that it exists.

    Args:
        name: ``"auto"`` (CUDA, else MPS, else CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:N"``, ``"mps"`` or a :class:`torch.device`.
        local_rank: Process rank on this machine; ``"auto"`` and ``"cuda"`` pick
            CUDA device ``local_rank``. Default: ``0``.

    Returns:
        The device.

    Raises:
        ValueError: If the device name is unknown or the device is not available.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(name, str) and name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"invalid trainer.device={name!r}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"trainer.device={name!r} requested, but CUDA is not available on this "
                "machine; use trainer.device=cpu or trainer.device=auto"
            )
        index = device.index if device.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"trainer.device={name!r} requested CUDA device {index}, but only "
                f"{torch.cuda.device_count()} are visible; use a smaller index"
            )
        return torch.device("cuda", index)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(
                f"trainer.device={name!r} requested, but MPS is not available on this "
                "machine; use trainer.device=cpu or trainer.device=auto"
            )
        return device
    if device.type != "cpu":
        raise ValueError(
            f"invalid trainer.device={name!r}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        )
    return device


def warmup_cosine_lambda(
    warmup_steps: int, total_steps: int, schedule: str
) -> Callable[[int], float]:
    """Build the learning-rate factor of step ``s`` for :class:`torch.optim.lr_scheduler.LambdaLR`.

    The factor rises linearly as ``(s + 1) / warmup_steps`` during warmup, then stays
    at 1 (``"constant"``) or follows ``0.5 * (1 + cos(pi * p))`` with ``p`` the
    fraction of post-warmup steps done, reaching 0 at ``total_steps`` (``"cosine"``).

    Args:
        warmup_steps: Steps of linear warmup (``>= 0``).
        total_steps: Optimizer steps of the whole run.
        schedule: ``"constant"`` or ``"cosine"``.

    Returns:
        The function ``step -> factor``.

    Example:
        >>> factor = warmup_cosine_lambda(2, 10, "cosine")
        >>> [round(factor(s), 3) for s in (0, 1, 2, 6, 10)]
        [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(
            f"invalid trainer.lr_schedule={schedule!r}: expected 'constant' or 'cosine'"
        )
    decay_steps = max(1, total_steps - warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# --------------------------------------------------------------------------- RNG state


def _capture_rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Collect every RNG state of this process that training may touch."""
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "diffusion": generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    if device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def _restore_rng_state(state: Mapping[str, Any], generator: torch.Generator) -> None:
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {
                "key": numpy_state["key"].numpy().astype(np.uint32),
                "pos": numpy_state["pos"],
            },
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"].cpu())
    generator.set_state(state["diffusion"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning(
                "checkpoint contains CUDA RNG states of %d devices but %d are visible, so "
                "the global CUDA RNG is not restored",
                len(cuda_states),
                torch.cuda.device_count(),
            )
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"].cpu())


# --------------------------------------------------------------------------- small pieces


@dataclasses.dataclass
class _Progress:
    """Counters that locate training in time and are saved in every checkpoint."""

    epoch: int = 0  # epoch in progress (0-based); equals the completed count when batch is 0
    batch_in_epoch: int = 0  # batches of ``epoch`` already consumed
    global_step: int = 0  # optimizer steps taken
    skipped_batches: int = 0  # batches skipped for a non-finite loss, whole run
    best_metric: float | None = None
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    log_loss_sum: float = 0.0
    log_loss_count: int = 0
    elapsed_s: float = 0.0


class _MetricsLog:
    """Append-only ``metrics.jsonl`` plus optional TensorBoard mirror (rank 0 only)."""

    def __init__(self, run_dir: Path, *, enabled: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        self._writer: Any = None
        if not enabled:
            return
        if self.path.exists():
            self.records = _read_jsonl(self.path)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            logger.debug("TensorBoard logging off: %s", error)
        else:
            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def truncate_after(self, global_step: int) -> None:
        """Drop records of steps after ``global_step``, which a resumed run repeats."""
        if not self.enabled:
            return
        kept_records = [r for r in self.records if int(r.get("step", 0)) <= global_step]
        if len(kept_records) != len(self.records):
            logger.info(
                "removing %d records after step %d from %s; the resumed run writes them again",
                len(self.records) - len(kept_records),
                global_step,
                self.path,
            )
            text = "".join(json.dumps(r) + "\n" for r in kept_records)
            tmp_path = self.path.with_name(f".{self.path.name}.tmp")
            tmp_path.write_text(text, encoding="utf-8")
            os.replace(tmp_path, self.path)
            self.records = kept_records

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            step = int(record.get("step", 0))
            for key, value in record.items():
                if key not in ("step", "epoch", "time") and isinstance(value, int | float):
                    self._writer.add_scalar(f"{record.get('kind', 'misc')}/{key}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # A process killed mid-write leaves a partial last line; drop it.
            logger.warning("ignoring unreadable line %d of %s", number, path)
    return records


# Pixels per image pixel in the per-epoch pictures: 28x28 digits at 1:1 are too small to read.
_PICTURE_SCALE = 3


_TensorList = tuple[torch.Tensor, ...] | list[torch.Tensor]


def _ema_with_warmup(
    decay: float,
) -> Callable[[_TensorList, _TensorList, torch.Tensor | int], None]:
    """EMA update whose decay grows as ``min(decay, (1 + n) / (10 + n))`` with the count n.

    A fixed decay of 0.995 leaves 0.995**72 = 70 % of the initial random weights in the
    average after 72 steps, so short runs would validate and sample a mostly untrained
    network. The warmup weights early steps more, as in TensorFlow's
    ExponentialMovingAverage with ``num_updates``.
    """

    @torch.no_grad()
    def update(
        averaged: _TensorList, current: _TensorList, num_averaged: torch.Tensor | int
    ) -> None:
        count = float(num_averaged)
        step_decay = min(decay, (1.0 + count) / (10.0 + count))
        torch._foreach_lerp_(list(averaged), list(current), 1.0 - step_decay)

    return update


def _epoch_name(epoch_number: int) -> str:
    return f"epoch_{epoch_number:03d}"


def _fully_observed(dataset: BinaryImageDataset | None) -> bool:
    return dataset is not None and bool(dataset.obs_mask.all())


# --------------------------------------------------------------------------- trainer


class Trainer:
    """Train a :class:`~masked_diffusion.MaskedDiffusionModel` with checkpoints and validation.

    Args:
        model: The model to train; its parameters are moved to the training device.
        config: Experiment settings; ``config.trainer`` drives the loop and
            ``config.data`` the batch sizes.
        train_data: Training images and observation masks. Required by :meth:`fit`.
        val_data: Validation images as the model receives them (with their observation
            masks in runs with missing pixels), or ``None`` to skip validation (then
            no ``best.pt`` is written). Default: ``None``.
        clean_val_data: The same validation images fully observed, for the clean
            likelihood bound ``val_nll`` in runs with missing pixels. Default: ``None``.
        device: Overrides ``config.trainer.device``. Default: ``None``.

    Raises:
        ValueError: If the device is unavailable, ``precision="fp16"`` is requested
            off CUDA, or a dataset's image shape or class count differs from the model's.

    Example:
        >>> config = load_config("configs/mnist_sample.yaml")  # doctest: +SKIP
        >>> metrics = Trainer.from_config(config).fit()  # doctest: +SKIP
        >>> metrics["val_bits_per_dim"]  # doctest: +SKIP
    """

    def __init__(
        self,
        model: MaskedDiffusionModel,
        config: ExperimentConfig,
        *,
        train_data: BinaryImageDataset | None = None,
        val_data: BinaryImageDataset | None = None,
        clean_val_data: BinaryImageDataset | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if not isinstance(config, ExperimentConfig):
            raise TypeError(f"config must be an ExperimentConfig, got {type(config).__name__}")
        if not isinstance(model, nn.Module) or not hasattr(model, "compute_loss"):
            raise TypeError(
                f"model must be a MaskedDiffusionModel (an nn.Module with compute_loss), "
                f"got {type(model).__name__}"
            )
        self.config = config
        self.model = model

        self.context = distributed.env_context()
        self.device = resolve_device(
            device if device is not None else config.trainer.device, self.context.local_rank
        )
        if config.trainer.precision == "fp16" and self.device.type != "cuda":
            raise ValueError(
                f"trainer.precision='fp16' needs a CUDA device for gradient scaling, but "
                f"training runs on {self.device}; use trainer.precision=bf16 or fp32"
            )

        for name, dataset in (
            ("train_data", train_data),
            ("val_data", val_data),
            ("clean_val_data", clean_val_data),
        ):
            self._check_dataset(name, dataset)
        if (
            val_data is not None
            and clean_val_data is not None
            and len(val_data) != len(clean_val_data)
        ):
            raise ValueError(
                f"clean_val_data has {len(clean_val_data)} images but val_data has "
                f"{len(val_data)}; pass the same images, fully observed"
            )

        self.train_data = train_data
        self.val_data = val_data
        self.clean_val_data = clean_val_data
        self.run_dir = Path(config.trainer.output_dir)
        self.model.to(self.device)

    def _check_dataset(self, name: str, dataset: BinaryImageDataset | None) -> None:
        if dataset is None:
            return
        if not isinstance(dataset, BinaryImageDataset):
            raise TypeError(
                f"{name} must be a BinaryImageDataset, got {type(dataset).__name__}; "
                "wrap tensors with BinaryImageDataset.from_tensor"
            )
        image_shape = getattr(self.model, "image_shape", None)
        if image_shape is not None and tuple(dataset.image_shape) != tuple(image_shape):
            raise ValueError(
                f"{name} has images of shape {dataset.image_shape}, but the model expects "
                f"{tuple(image_shape)}; set model.image_size and model.in_channels to match"
            )
        num_classes = getattr(self.model, "num_classes", None)
        if num_classes is not None and dataset.num_classes != num_classes:
            raise ValueError(
                f"{name} has num_classes={dataset.num_classes}, but the model has "
                f"num_classes={num_classes}; set model.num_classes to match"
            )

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> Trainer:
        """Build the model and datasets that ``config`` describes.

        Seeds every global RNG with ``config.trainer.seed`` (see
        :func:`seed_everything`) before building the model, so the initial weights
        are reproducible. The training split is ``"train"``; validation uses the
        ``"heldout"`` split with its observation masks and, when ``data.p_missing > 0``,
        the same images fully observed as ``clean_val_data``.

        Args:
            config: The experiment.

        Returns:
            A trainer ready for :meth:`fit`.

        Raises:
            ValueError, DatasetNotFoundError: From the dataset loader or the checks of
                :class:`Trainer`.
        """
        from masked_diffusion.data import load_dataset_from_config
        from masked_diffusion.diffusion import MaskedDiffusionModel

        seed_everything(config.trainer.seed)
        model = MaskedDiffusionModel.from_config(config)
        train_data = load_dataset_from_config(config.data, "train")
        val_data = load_dataset_from_config(config.data, "heldout")
        clean_val_data = None
        if not _fully_observed(val_data):
            clean_val_data = BinaryImageDataset(
                val_data.images,
                torch.ones_like(val_data.obs_mask),
                val_data.labels,
                num_classes=val_data.num_classes,
                name=val_data.name,
                split=val_data.split,
            )
        return cls(
            model, config, train_data=train_data, val_data=val_data, clean_val_data=clean_val_data
        )

    # ----------------------------------------------------------------------- fit

    def fit(self, resume_from: str | Path | None = None) -> dict[str, float]:
        """Train for ``trainer.epochs`` epochs (or until ``trainer.max_steps``).

        Args:
            resume_from: A checkpoint file, or a run folder whose
                ``checkpoints/last.pt`` is used, to continue training exactly where it
                stopped. ``None`` starts a fresh run, which requires that
                ``trainer.output_dir`` contains no earlier run. Default: ``None``.

        Returns:
            Final metrics: ``epoch``, ``global_step``, ``skipped_batches``, the last
            epoch's ``train_loss`` and validation values (``val_loss``, ``val_nll``,
            ``val_bits_per_dim`` and, with missing pixels, ``val_obs_nll``,
            ``val_obs_bits_per_dim``), ``lr`` and ``best_<metric>``.

        Raises:
            ValueError: If ``train_data`` is missing, ``data.batch_size`` does not split
                across processes, or the checkpoint does not match the configuration.
            FileExistsError: If a fresh run would write into an earlier run's folder.
            CheckpointError: If ``resume_from`` is not a readable checkpoint.
            NonFiniteLossError: On a NaN or infinite loss with ``on_nonfinite_loss="raise"``.

        NOTE: under ``torchrun`` each call creates and destroys the process group.
        Re-creating it for a second ``fit`` in the same job hung once in testing
        (PyTorch 2.14, Gloo). To run several fits in one job, call
        ``torch.distributed.init_process_group`` first, and the trainer uses that group.
        """
        if self.train_data is None:
            raise ValueError(
                "Trainer.fit needs training data: pass train_data=BinaryImageDataset(...) to "
                "Trainer, or build the trainer with Trainer.from_config(config)"
            )
        trainer_config = self.config.trainer
        per_rank_batch = distributed.per_rank_batch_size(
            self.config.data.batch_size, self.context.world_size
        )
        resume_path = self._resolve_resume_path(resume_from) if resume_from is not None else None
        if resume_path is None:
            self._check_fresh_run_dir()

        previous_determinism = torch.are_deterministic_algorithms_enabled()
        if trainer_config.deterministic:
            configure_determinism(True)
        self.context = distributed.init_distributed(self.device)
        metrics_log: _MetricsLog | None = None
        try:
            run = _Run(self, per_rank_batch)
            metrics_log = run.metrics_log
            if resume_path is not None:
                run.load(resume_path)
            else:
                run.start_fresh()
            return run.train()
        finally:
            if metrics_log is not None:
                metrics_log.close()
            if trainer_config.deterministic:
                configure_determinism(previous_determinism)
            distributed.cleanup_distributed(self.context)

    def _resolve_resume_path(self, resume_from: str | Path) -> Path:
        path = Path(resume_from)
        if path.is_dir():
            candidate = path / "checkpoints" / "last.pt"
            if not candidate.is_file():
                raise FileNotFoundError(
                    f"cannot resume from folder {path}: it has no checkpoints/last.pt; pass a "
                    "run folder of an earlier run or a checkpoint file"
                )
            return candidate
        if not path.is_file():
            raise FileNotFoundError(
                f"cannot resume: checkpoint {path} not found; pass a checkpoint file or a "
                "run folder"
            )
        return path

    def _check_fresh_run_dir(self) -> None:
        existing = [name for name in RUN_ARTIFACTS if (self.run_dir / name).exists()]
        if existing:
            raise FileExistsError(
                f"trainer.output_dir={str(self.run_dir)!r} already contains a training run "
                f"({', '.join(existing)}); resume it with resume_from={str(self.run_dir)!r} "
                "(CLI: --resume), or choose another trainer.output_dir. Nothing was written."
            )


class _Run:
    """State of one :meth:`Trainer.fit` call: optimizer, schedules, counters and files."""

    def __init__(self, trainer: Trainer, per_rank_batch: int) -> None:
        self.trainer = trainer
        self.config = trainer.config
        self.tc = trainer.config.trainer
        self.context: DistributedContext = trainer.context
        self.device = trainer.device
        self.model = trainer.model
        self.run_dir = trainer.run_dir
        self.is_main = self.context.is_main
        assert trainer.train_data is not None

        self.loader = TensorBatchLoader(
            trainer.train_data,
            per_rank_batch,
            shuffle=True,
            seed=self.tc.seed,
            rank=self.context.rank,
            world_size=self.context.world_size,
            device=self.device,
        )
        self.steps_per_epoch = len(self.loader)
        self.total_steps = self.steps_per_epoch * self.tc.epochs

        if self.tc.channels_last:
            # Before the EMA copy is made, so that it has the same layout.
            self.model.network.to(memory_format=torch.channels_last)
        self.ema: AveragedModel | None = None
        if self.tc.ema_decay is not None:
            self.ema = AveragedModel(self.model, multi_avg_fn=_ema_with_warmup(self.tc.ema_decay))
        if self.tc.compile:
            # Module.compile keeps parameter names, so checkpoints stay loadable
            # without torch.compile.
            self.model.network.compile()
        # The model's forward is compute_loss, so DDP wraps the whole loss computation.
        self.loss_module: nn.Module = self.model
        if self.context.enabled:
            self.loss_module = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )

        self.optimizer = self._build_optimizer()
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            warmup_cosine_lambda(self.tc.warmup_steps, self.total_steps, self.tc.lr_schedule),
        )
        self.grad_scaler = torch.amp.GradScaler("cuda", enabled=self.tc.precision == "fp16")
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.tc.seed + self.context.rank)
        self.progress = _Progress()
        self.best_metric_name = (
            "val_nll"
            if trainer.clean_val_data is not None or _fully_observed(trainer.val_data)
            else "val_obs_nll"
        )
        self.last_metrics: dict[str, float] = {}
        self._skip_warnings = 0
        self._last_saved_step = -1
        self._ambient_training = not _fully_observed(trainer.train_data)
        self._start_time = time.monotonic()
        self._elapsed_at_start = 0.0

        self.metrics_log = _MetricsLog(self.run_dir, enabled=self.is_main)

    def _log(self, level: int, message: str, *args: object) -> None:
        """Log on rank 0 only; the other processes would repeat the same lines."""
        if self.is_main:
            logger.log(level, message, *args)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        # Weight decay on weight matrices and kernels only, not on biases and norms.
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": self.tc.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(
            groups,
            lr=self.tc.lr,
            betas=self.tc.betas,
            weight_decay=self.tc.weight_decay,
            foreach=None,
        )

    # ----------------------------------------------------------------------- start / resume

    def start_fresh(self) -> None:
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _atomic_save_config(self.config, self.run_dir / "config.yaml")
        distributed.barrier(self.context)
        self._log(
            logging.INFO,
            "starting training in %s on %s: %s parameters, %d training images, %d validation "
            "images, %d steps per epoch, %d epochs, %d process(es)",
            self.run_dir,
            self.device,
            f"{sum(p.numel() for p in self.model.parameters()):,}",
            len(self.loader.dataset),
            0 if self.trainer.val_data is None else len(self.trainer.val_data),
            self.steps_per_epoch,
            self.tc.epochs,
            self.context.world_size,
        )

    def load(self, path: Path) -> None:
        state = load_checkpoint(path, map_location="cpu")
        if state.get("kind") != "training":
            raise CheckpointError(
                f"cannot resume from {path}: it contains weights only "
                f"(kind={state.get('kind')!r}), not a training state; pass "
                "checkpoints/last.pt of a run"
            )
        self._check_compatible(state, path)
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            if state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            else:
                self._log(
                    logging.WARNING,
                    "%s has no EMA weights; the EMA starts from the current weights",
                    path,
                )
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.grad_scaler.load_state_dict(state["grad_scaler"])
        counters = state["progress"]
        self.progress = _Progress(**counters)
        self._elapsed_at_start = self.progress.elapsed_s
        self.last_metrics = dict(state.get("metrics", {}))

        rng_states = state["rng"]
        if len(rng_states) == self.context.world_size:
            _restore_rng_state(rng_states[self.context.rank], self.generator)
        else:
            self._log(
                logging.WARNING,
                "checkpoint was written by %d processes, this run has %d: random streams "
                "restart from trainer.seed, so the run continues but not bit-exactly",
                len(rng_states),
                self.context.world_size,
            )
            # A new stream per rank and resume point (7919 is an arbitrary prime).
            self.generator.manual_seed(
                self.tc.seed + self.context.rank + 7919 * self.progress.global_step
            )

        if self.is_main:
            self._adopt_existing_best()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _atomic_save_config(self.config, self.run_dir / "config.yaml")
            self.metrics_log.truncate_after(self.progress.global_step)
            self.metrics_log.write(
                {
                    "kind": "resume",
                    "step": self.progress.global_step,
                    "epoch": self.progress.epoch,
                    "batch_in_epoch": self.progress.batch_in_epoch,
                    "checkpoint": str(path),
                    "time": time.time(),
                }
            )
        distributed.barrier(self.context)
        self._log(
            logging.INFO,
            "resumed from %s at epoch %d, batch %d of %d, global step %d",
            path,
            self.progress.epoch + 1,
            self.progress.batch_in_epoch,
            self.steps_per_epoch,
            self.progress.global_step,
        )

    def _check_compatible(self, state: Mapping[str, Any], path: Path) -> None:
        saved = state.get("config", {})
        current = self.config.to_dict()
        if saved.get("model") != current["model"]:
            raise ValueError(
                f"cannot resume from {path}: its model settings {saved.get('model')} differ from "
                f"the config's {current['model']}; resume with the run's config.yaml"
            )
        for section in ("schedule", "diffusion", "data"):
            if saved.get(section) != current[section]:
                self._log(
                    logging.WARNING,
                    "resuming from %s with changed %s settings: %s -> %s",
                    path,
                    section,
                    saved.get(section),
                    current[section],
                )
        counters = state.get("progress", {})
        saved_world = int(state.get("world_size", 1))
        mid_epoch = int(counters.get("batch_in_epoch", 0)) > 0
        batch_changed = saved.get("data", {}).get("batch_size") != current["data"]["batch_size"]
        if mid_epoch and (batch_changed or saved_world != self.context.world_size):
            raise ValueError(
                f"cannot resume from {path} inside an epoch with a different data.batch_size "
                f"or process count (checkpoint: batch_size="
                f"{saved.get('data', {}).get('batch_size')}, {saved_world} processes; now: "
                f"batch_size={current['data']['batch_size']}, {self.context.world_size}); "
                "resume from an end-of-epoch checkpoint (checkpoints/epoch_NNN.pt) instead"
            )
        if int(counters.get("batch_in_epoch", 0)) > self.steps_per_epoch:
            raise ValueError(
                f"cannot resume from {path}: it stopped at batch {counters.get('batch_in_epoch')}"
                f" of an epoch, but an epoch now has {self.steps_per_epoch} batches"
            )

    def _adopt_existing_best(self) -> None:
        """Keep ``best.pt`` if it is better than the resumed checkpoint's best value.

        This matters when resuming from an older checkpoint: ``best.pt`` may hold a
        later, better model that a worse value must not replace.
        """
        best_path = self.run_dir / "checkpoints" / "best.pt"
        if not best_path.is_file():
            return
        try:
            best_state = load_checkpoint(best_path)
        except CheckpointError as error:
            logger.warning("ignoring unreadable %s: %s", best_path, error)
            return
        if best_state.get("best_metric_name") != self.best_metric_name:
            return
        value = best_state.get("progress", {}).get("best_metric")
        current = self.progress.best_metric
        if isinstance(value, float) and (current is None or value < current):
            logger.info("keeping %s with %s=%.6g", best_path, self.best_metric_name, value)
            self.progress.best_metric = value

    # ----------------------------------------------------------------------- loop

    def train(self) -> dict[str, float]:
        progress = self.progress
        if progress.epoch >= self.tc.epochs:
            self._log(
                logging.INFO, "training already finished (%d epochs); nothing to do", progress.epoch
            )
            return self._final_metrics()
        try:
            while progress.epoch < self.tc.epochs:
                if self._max_steps_reached():
                    break
                finished_epoch = self._train_epoch()
                if finished_epoch:
                    self._end_epoch()
                elif self._last_saved_step != progress.global_step:
                    self._save_last()  # stopped by max_steps inside the epoch
        finally:
            if self.is_main:
                self._write_loss_curve()
        if self._max_steps_reached() and progress.epoch < self.tc.epochs:
            self._log(
                logging.INFO,
                "stopped at trainer.max_steps=%d (epoch %d, batch %d of %d)",
                self.tc.max_steps,
                progress.epoch + 1,
                progress.batch_in_epoch,
                self.steps_per_epoch,
            )
        return self._final_metrics()

    def _max_steps_reached(self) -> bool:
        return self.tc.max_steps is not None and self.progress.global_step >= self.tc.max_steps

    def _train_epoch(self) -> bool:
        """Train the rest of the current epoch; return whether it ran to its end."""
        progress = self.progress
        self.loader.set_epoch(progress.epoch)
        self.model.train()
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=progress.batch_in_epoch,
            desc=f"epoch {progress.epoch + 1}/{self.tc.epochs}",
            disable=not (self.tc.progress_bar and self.is_main),
            leave=False,
            dynamic_ncols=True,
        )
        try:
            for x0, obs_mask in self.loader.iter_from(progress.batch_in_epoch):
                self._train_step(x0, obs_mask)
                progress.batch_in_epoch += 1
                bar.update(1)
                if progress.log_loss_count and progress.global_step % self.tc.log_every_steps == 0:
                    record = self._log_train()
                    bar.set_postfix(loss=f"{record['train_loss']:.4f}", lr=f"{record['lr']:.2e}")
                every = self.tc.checkpoint_every_steps
                at_epoch_end = progress.batch_in_epoch == self.steps_per_epoch
                # The end-of-epoch save follows at the epoch end. Skipped batches leave
                # global_step unchanged, so a step is checkpointed once.
                if (
                    every is not None
                    and progress.global_step % every == 0
                    and progress.global_step != self._last_saved_step
                    and not at_epoch_end
                ):
                    self._save_last()
                if self._max_steps_reached():
                    return progress.batch_in_epoch == self.steps_per_epoch
        finally:
            bar.close()
        return True

    def _train_step(self, x0: torch.Tensor, obs_mask: torch.Tensor) -> None:
        progress = self.progress
        self.optimizer.zero_grad(set_to_none=True)
        # Without missing pixels the model gets no mask, as outside the trainer.
        mask_arg = obs_mask if self._ambient_training else None
        with self._autocast():
            loss = self.loss_module(x0, mask_arg, generator=self.generator)
        all_finite, mean_loss = self._global_loss(loss)
        if not all_finite:
            self._handle_nonfinite("loss", mean_loss, loss)
            return
        self.grad_scaler.scale(loss).backward()
        if self.tc.grad_clip is not None:
            self.grad_scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
            # fp16 overflows are expected: the scaler skips those steps by itself.
            if self.tc.precision != "fp16" and not bool(torch.isfinite(grad_norm)):
                self._handle_nonfinite("gradient norm", float(grad_norm.item()), None)
                return
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        progress.global_step += 1
        progress.epoch_loss_sum += mean_loss
        progress.epoch_loss_count += 1
        progress.log_loss_sum += mean_loss
        progress.log_loss_count += 1

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.tc.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.tc.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _global_loss(self, loss: torch.Tensor) -> tuple[bool, float]:
        """Return whether every process's loss is finite, and their mean.

        One collective carries both, so that all processes skip or step together
        and the running sums in :class:`_Progress` are the same on every rank
        (only rank 0's copy is checkpointed).
        """
        value = loss.detach().float().reshape(1)
        packed = torch.cat([torch.isfinite(value).float(), value])
        if self.context.enabled:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        finite_count, loss_sum = packed.tolist()
        world_size = self.context.world_size
        return finite_count == world_size, loss_sum / world_size

    def _handle_nonfinite(self, quantity: str, value: float, loss: torch.Tensor | None) -> None:
        progress = self.progress
        where = (
            f"global step {progress.global_step + 1} (epoch {progress.epoch + 1}, batch "
            f"{progress.batch_in_epoch + 1} of {self.steps_per_epoch})"
        )
        if self.tc.on_nonfinite_loss == "raise":
            raise NonFiniteLossError(
                f"non-finite training {quantity} {value} at {where}; the weights were not "
                "updated. Lower trainer.lr, keep trainer.grad_clip set, use "
                "trainer.precision=fp32, or set trainer.on_nonfinite_loss=skip to skip such "
                "batches. Resume from checkpoints/last.pt."
            )
        if loss is not None and self.context.enabled:
            # DDP expects a backward pass after each forward; run one and discard it.
            (loss * 0.0).backward()  # type: ignore[no-untyped-call]
        self.optimizer.zero_grad(set_to_none=True)
        progress.skipped_batches += 1
        self._skip_warnings += 1
        if self._skip_warnings <= _SKIP_LOG_LIMIT or progress.skipped_batches % 100 == 0:
            self._log(
                logging.WARNING,
                "skipped batch at %s: non-finite %s %s (%d skipped so far)",
                where,
                quantity,
                value,
                progress.skipped_batches,
            )

    def _log_train(self) -> dict[str, Any]:
        progress = self.progress
        record = {
            "kind": "train",
            "step": progress.global_step,
            "epoch": progress.epoch + 1,
            "train_loss": progress.log_loss_sum / progress.log_loss_count,
            "lr": self.lr_scheduler.get_last_lr()[0],
            "skipped_batches": progress.skipped_batches,
            "time": time.time(),
        }
        progress.log_loss_sum = 0.0
        progress.log_loss_count = 0
        self.metrics_log.write(record)
        return record

    # ----------------------------------------------------------------------- epoch end

    def _end_epoch(self) -> None:
        progress = self.progress
        epoch_number = progress.epoch + 1
        train_loss = (
            progress.epoch_loss_sum / progress.epoch_loss_count
            if progress.epoch_loss_count
            else float("nan")
        )
        eval_model = self._eval_model()
        metrics: dict[str, float] = {"train_loss": train_loss}
        metrics.update(self._validate(eval_model))
        if (
            self.is_main
            and self.tc.num_sample_images > 0
            and (epoch_number % self.tc.sample_every_epochs == 0 or epoch_number == self.tc.epochs)
        ):
            self._write_pictures(eval_model, epoch_number)
        distributed.barrier(self.context)

        progress.epoch += 1
        progress.batch_in_epoch = 0
        progress.epoch_loss_sum = 0.0
        progress.epoch_loss_count = 0
        metric = metrics.get(self.best_metric_name)
        improved = (
            metric is not None
            and math.isfinite(metric)
            and (progress.best_metric is None or metric < progress.best_metric)
        )
        if improved:
            progress.best_metric = metric
        metrics["lr"] = float(self.lr_scheduler.get_last_lr()[0])
        metrics["skipped_batches"] = float(progress.skipped_batches)
        if progress.best_metric is not None:
            metrics[f"best_{self.best_metric_name}"] = progress.best_metric
        self.last_metrics = metrics
        record: dict[str, Any] = {
            "kind": "epoch",
            "step": progress.global_step,
            "epoch": epoch_number,
            **metrics,
            "elapsed_s": self._elapsed(),
            "time": time.time(),
        }
        self.metrics_log.write(record)
        self._log(
            logging.INFO,
            "epoch %d/%d (step %d): %s",
            epoch_number,
            self.tc.epochs,
            progress.global_step,
            ", ".join(f"{k}={v:.5g}" for k, v in metrics.items()),
        )

        state = self._checkpoint_state()
        checkpoints = self.run_dir / "checkpoints"
        if self.is_main:
            epoch_path = checkpoints / f"{_epoch_name(epoch_number)}.pt"
            try:
                save_checkpoint(epoch_path, state, overwrite=False)
                logger.info("wrote %s", epoch_path)
            except FileExistsError:
                logger.warning(
                    "kept existing %s; per-epoch checkpoints are never overwritten", epoch_path
                )
            if improved:
                save_checkpoint(checkpoints / "best.pt", state)
                logger.info(
                    "wrote %s (%s=%.6g)", checkpoints / "best.pt", self.best_metric_name, metric
                )
            save_checkpoint(checkpoints / "last.pt", state)
            self._write_loss_curve()
        self._last_saved_step = progress.global_step
        distributed.barrier(self.context)

    def _eval_model(self) -> MaskedDiffusionModel:
        model = self.ema.module if self.ema is not None else self.model
        return model  # type: ignore[return-value]

    @contextlib.contextmanager
    def _evaluation(self, model: nn.Module) -> Iterator[None]:
        """Eval mode, no gradients, and global RNG streams left as they were."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                yield
        finally:
            model.train(was_training)

    def _validate(self, model: MaskedDiffusionModel) -> dict[str, float]:
        """Validation loss and likelihood bounds, averaged over all images of all processes."""
        val_data = self.trainer.val_data
        clean_data = self.trainer.clean_val_data
        totals: dict[str, list[float]] = {}  # metric -> [sum over images, image count]
        with self._evaluation(model):
            if val_data is not None:
                prefix = "val" if _fully_observed(val_data) else "val_obs"
                self._evaluate(model, val_data, prefix, with_loss=True, totals=totals)
            if clean_data is not None:
                self._evaluate(model, clean_data, "val", with_loss=val_data is None, totals=totals)
        if not totals:
            return {}
        names = sorted(totals)
        flat = torch.tensor(
            [value for name in names for value in totals[name]],
            dtype=torch.float64,
            device=self.device,
        )
        distributed.all_reduce_sum(flat, self.context)
        pairs = flat.view(-1, 2).tolist()
        return {name: total / count for name, (total, count) in zip(names, pairs, strict=True)}

    def _evaluate(
        self,
        model: MaskedDiffusionModel,
        dataset: BinaryImageDataset,
        prefix: str,
        *,
        with_loss: bool,
        totals: dict[str, list[float]],
    ) -> None:
        """Add this process's sums of loss and bounds over its share of ``dataset`` to ``totals``.

        The generators are seeded afresh on every call, so each epoch is measured
        on the same noise and the training streams are not touched.
        """
        generator_seed = self.tc.seed + _VALIDATION_SEED_OFFSET + self.context.rank
        loss_generator = torch.Generator(device=self.device).manual_seed(generator_seed)
        nll_generator = torch.Generator(device=self.device).manual_seed(generator_seed + 1)
        # Rank r evaluates images r, r + world_size, ..., so every image counts once.
        indices = torch.arange(self.context.rank, len(dataset), self.context.world_size)
        ambient = not _fully_observed(dataset)
        names = [f"{prefix}_nll", f"{prefix}_bits_per_dim"] + (["val_loss"] if with_loss else [])
        for name in names:
            totals.setdefault(name, [0.0, 0.0])
        for start in range(0, len(indices), self.config.data.eval_batch_size):
            index = indices[start : start + self.config.data.eval_batch_size]
            x0 = dataset.images[index].to(self.device)
            obs_mask = dataset.obs_mask[index].to(self.device) if ambient else None
            estimate = model.nll(
                x0, obs_mask, num_samples=self.tc.nll_samples, generator=nll_generator
            )
            totals[f"{prefix}_nll"][0] += float(estimate.nats.sum().item())
            totals[f"{prefix}_bits_per_dim"][0] += float(estimate.bits_per_dim.sum().item())
            if with_loss:
                loss = model.compute_loss(x0, obs_mask, generator=loss_generator)
                totals["val_loss"][0] += float(loss.item()) * len(index)
            for name in names:
                totals[name][1] += len(index)

    def _write_pictures(self, model: MaskedDiffusionModel, epoch_number: int) -> None:
        from masked_diffusion.images import save_comparison_grid, save_image_grid

        samples_dir = self.run_dir / "samples"
        name = _epoch_name(epoch_number)
        sample_path = samples_dir / f"{name}.png"
        seed = self.tc.seed + _SAMPLING_SEED_OFFSET
        with self._evaluation(model):
            if sample_path.exists():
                logger.debug("kept existing %s", sample_path)
            else:
                generator = torch.Generator(device=self.device).manual_seed(seed)
                samples = model.sample(
                    self.tc.num_sample_images, generator=generator, device=self.device
                )
                save_image_grid(
                    samples.cpu(),
                    sample_path,
                    num_classes=self.config.model.num_classes,
                    scale=_PICTURE_SCALE,
                )
                logger.info("wrote %s", sample_path)

            val_data = self.trainer.val_data
            if val_data is None or _fully_observed(val_data):
                return
            completion_path = samples_dir / f"completion_{name}.png"
            if completion_path.exists():
                logger.debug("kept existing %s", completion_path)
                return
            count = min(_NUM_COMPLETION_IMAGES, len(val_data))
            x0 = val_data.images[:count].to(self.device)
            obs_mask = val_data.obs_mask[:count].to(self.device)
            generator = torch.Generator(device=self.device).manual_seed(seed + 1)
            completion = model.impute(x0, obs_mask, num_completions=1, generator=generator)[:, 0]
            rows: list[torch.Tensor] = []
            masks: list[torch.Tensor | None] = []
            labels: list[str] = []
            if self.trainer.clean_val_data is not None:
                rows.append(self.trainer.clean_val_data.images[:count].cpu())
                masks.append(None)
                labels.append("clean")
            rows += [x0.cpu(), completion.cpu()]
            masks += [obs_mask.cpu(), None]
            labels += ["observed", "completion"]
            save_comparison_grid(
                rows,
                completion_path,
                obs_masks=masks,
                labels=labels,
                num_classes=self.config.model.num_classes,
                scale=_PICTURE_SCALE,
            )
            logger.info("wrote %s", completion_path)

    def _write_loss_curve(self) -> None:
        from masked_diffusion.images import save_loss_curve

        records: list[dict[str, Any]] = []
        for record in self.metrics_log.records:
            if record.get("kind") == "train":
                records.append(record)
            elif record.get("kind") == "epoch":
                # An epoch's mean train_loss on the 10-step curve would draw false jumps.
                records.append({k: v for k, v in record.items() if k != "train_loss"})
        if not records:
            return
        try:
            save_loss_curve(records, self.run_dir / "loss_curve.png")
        except ValueError as error:
            logger.debug("no loss curve written: %s", error)

    # ----------------------------------------------------------------------- checkpoints

    def _elapsed(self) -> float:
        return self._elapsed_at_start + time.monotonic() - self._start_time

    def _checkpoint_state(self) -> dict[str, Any]:
        """Collect the full training state; every process must call this together."""
        rng_state = _capture_rng_state(self.generator, self.device)
        if self.context.enabled:
            rng_states: list[Any] = [None] * self.context.world_size
            dist.all_gather_object(rng_states, rng_state)
        else:
            rng_states = [rng_state]
        self.progress.elapsed_s = self._elapsed()
        return {
            "kind": "training",
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "grad_scaler": self.grad_scaler.state_dict(),
            "progress": dataclasses.asdict(self.progress),
            "best_metric_name": self.best_metric_name,
            "metrics": dict(self.last_metrics),
            "rng": rng_states,
            "world_size": self.context.world_size,
            "config": self.config.to_dict(),
            "torch_version": str(torch.__version__),
            "masked_diffusion_version": __version__,
        }

    def _save_last(self) -> None:
        state = self._checkpoint_state()
        if self.is_main:
            path = self.run_dir / "checkpoints" / "last.pt"
            save_checkpoint(path, state)
            logger.info(
                "wrote %s (epoch %d, batch %d of %d, step %d)",
                path,
                self.progress.epoch + 1,
                self.progress.batch_in_epoch,
                self.steps_per_epoch,
                self.progress.global_step,
            )
        self._last_saved_step = self.progress.global_step
        distributed.barrier(self.context)

    def _final_metrics(self) -> dict[str, float]:
        progress = self.progress
        metrics = dict(self.last_metrics)
        metrics["epoch"] = float(progress.epoch)
        metrics["global_step"] = float(progress.global_step)
        metrics["skipped_batches"] = float(progress.skipped_batches)
        metrics["lr"] = float(self.lr_scheduler.get_last_lr()[0])
        if progress.best_metric is not None:
            metrics[f"best_{self.best_metric_name}"] = progress.best_metric
        return metrics


def _atomic_save_config(config: ExperimentConfig, path: Path) -> None:
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_config(config, tmp_path)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
