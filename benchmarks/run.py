"""Benchmark training speed, sampling speed and sample quality of masked-diffusion.

One command runs every section and writes ``results.json``, ``README.md`` (markdown
tables) and PNG plots to the output folder::

    python benchmarks/run.py --output benchmarks/results
    python benchmarks/run.py --quick --output /tmp/bench   # smoke run, tiny model

Sections:

- ``matmul``: FLOP/s of a large fp32 and bf16 matrix multiply, the reference that
  training FLOP/s are divided by.
- ``training``: images per second and achieved FLOP/s of one optimizer step (AdamW,
  gradient clipping and EMA update, as in the trainer). It covers the quickstart and
  full-MNIST models for each batch size, precision (fp32 / bf16 autocast) and memory
  format (contiguous / channels_last). Configurations run round-robin, with a matrix-multiply
  measurement in every round, so that all of them see the same machine load.
  FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on one forward and
  backward pass; it counts matrix multiplies and convolutions only.
- ``time_to_quality``: trains the quickstart configuration with the library's
  ``Trainer`` (or reuses the run cached in the output folder), then records the
  held-out bound and the Frechet digit distance of every epoch's EMA weights against
  the training wall time.
- ``sampling``: wall time, network evaluations and sample quality of each sampler
  and step count with the trained model, and the output cache of a time-agnostic
  network (``model.time_conditioning: false``).

Timings depend on the load of the machine, so every record stores
``os.getloadavg()``. On a CUDA machine the same command also measures the GPU
path (bf16, channels_last, ``torch.compile``).

NOTE: the CUDA path has only been written, not run: the benchmarks were developed
on a 2-core CPU machine without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.flop_counter import FlopCounterMode

from masked_diffusion.checkpoint import load_model
from masked_diffusion.config import ExperimentConfig, ModelConfig, apply_overrides, load_config
from masked_diffusion.data import BinaryImageDataset, load_dataset
from masked_diffusion.diffusion import MaskedDiffusionModel
from masked_diffusion.metrics import load_digit_classifier, sample_quality
from masked_diffusion.trainer import Trainer

__all__ = ["main"]

logger = logging.getLogger("benchmarks")

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
MODEL_CONFIGS = {"quickstart": "quickstart.yaml", "mnist": "mnist.yaml"}
# A network small enough for the --quick smoke run.
QUICK_MODEL = ModelConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, num_groups=4)


# --------------------------------------------------------------------------- machine


def machine_info(device: torch.device) -> dict[str, Any]:
    """Describe the CPU, GPU, software versions and load of this machine."""
    cpu_model = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": str(torch.__version__),
        "python_version": platform.python_version(),
        "device": str(device),
        "load_average": list(os.getloadavg()),
        "git_commit": _git_commit(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def peak_memory_mb(device: torch.device) -> float:
    """Return the peak memory in MiB: CUDA allocations, else the process's maximum RSS.

    On Linux ``ru_maxrss`` is in KiB and is the maximum over the whole process
    lifetime, so on the CPU it never goes down between sections.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- matmul


def matmul_flops(dtype: torch.dtype, device: torch.device, size: int, repeats: int = 5) -> float:
    """Measure the FLOP/s of a ``size x size`` matrix multiply (best of ``repeats``)."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)
    torch.mm(a, b)  # warm-up: library initialisation and kernel choice
    _synchronize(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


# --------------------------------------------------------------------------- training


@dataclasses.dataclass
class TrainingCase:
    """One training configuration and its live model, optimizer and timings."""

    model_name: str
    batch_size: int
    precision: str
    memory_format: str
    compiled: bool
    model: MaskedDiffusionModel
    optimizer: torch.optim.Optimizer
    ema: AveragedModel
    flops_per_step: float = 0.0
    step_times: list[float] = dataclasses.field(default_factory=list)
    reference_flops: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32


def _build_case(
    model_name: str,
    model_config: ModelConfig,
    batch_size: int,
    precision: str,
    memory_format: str,
    compiled: bool,
    device: torch.device,
) -> TrainingCase:
    torch.manual_seed(0)
    config = ExperimentConfig(model=model_config)
    model = MaskedDiffusionModel.from_config(config).to(device)
    if memory_format == "channels_last":
        model.network.to(memory_format=torch.channels_last)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99))  # type: ignore[no-untyped-call]
    if compiled:
        model.network.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return TrainingCase(
        model_name, batch_size, precision, memory_format, compiled, model, optimizer, ema
    )


def _train_step(case: TrainingCase, x0: torch.Tensor, generator: torch.Generator) -> None:
    """Run one optimizer step with the operations of ``Trainer``: loss, clip, AdamW, EMA."""
    case.optimizer.zero_grad(set_to_none=True)
    autocast: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if case.precision == "bf16":
        autocast = torch.autocast(device_type=x0.device.type, dtype=torch.bfloat16)
    with autocast:
        loss = case.model.compute_loss(x0, generator=generator)
    loss.backward()  # type: ignore[no-untyped-call]
    torch.nn.utils.clip_grad_norm_(case.model.parameters(), 1.0)
    case.optimizer.step()
    case.ema.update_parameters(case.model)


def _count_flops(case: TrainingCase, x0: torch.Tensor) -> float:
    """Count the FLOPs of one forward and backward pass on an fp32 eager copy."""
    config = ExperimentConfig(model=case.model.network.config)
    model = MaskedDiffusionModel.from_config(config).to(x0.device)
    with FlopCounterMode(display=False) as counter:
        model.compute_loss(x0).backward()  # type: ignore[no-untyped-call]
    return float(counter.get_total_flops())


def bench_training(
    model_configs: dict[str, ModelConfig],
    batch_sizes: dict[str, Sequence[int]],
    precisions: Sequence[str],
    memory_formats: Sequence[str],
    compile_options: Sequence[bool],
    device: torch.device,
    *,
    warmup_steps: int,
    rounds: int,
    matmul_size: int,
) -> list[dict[str, Any]]:
    """Time training steps of every configuration, round-robin, with matmul references."""
    images = load_dataset("mnist-sample", "train").images.to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    cases: list[TrainingCase] = []
    for model_name, model_config in model_configs.items():
        for batch_size in batch_sizes[model_name]:
            for precision in precisions:
                for memory_format in memory_formats:
                    for compiled in compile_options:
                        cases.append(
                            _build_case(
                                model_name,
                                model_config,
                                batch_size,
                                precision,
                                memory_format,
                                compiled,
                                device,
                            )
                        )

    def batch(size: int) -> torch.Tensor:
        index = torch.randint(0, images.shape[0], (size,), device=device, generator=generator)
        return images[index]

    for case in cases:
        logger.info(
            "warming up %s batch %d %s %s%s",
            case.model_name,
            case.batch_size,
            case.precision,
            case.memory_format,
            " compiled" if case.compiled else "",
        )
        try:
            case.flops_per_step = _count_flops(case, batch(case.batch_size))
            for _ in range(warmup_steps):
                _train_step(case, batch(case.batch_size), generator)
        except RuntimeError as error:  # e.g. bf16 or compile unsupported here
            case.error = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            logger.warning("skipping a training case: %s", case.error)

    live = [case for case in cases if case.error is None]
    for round_index in range(rounds):
        logger.info("training round %d of %d", round_index + 1, rounds)
        for case in live:
            case.reference_flops.append(matmul_flops(case.dtype, device, matmul_size, repeats=3))
            x0 = batch(case.batch_size)
            _synchronize(device)
            start = time.perf_counter()
            _train_step(case, x0, generator)
            _synchronize(device)
            case.step_times.append(time.perf_counter() - start)

    records = []
    for case in cases:
        record: dict[str, Any] = {
            "model": case.model_name,
            "parameters": sum(p.numel() for p in case.model.parameters()),
            "batch_size": case.batch_size,
            "precision": case.precision,
            "memory_format": case.memory_format,
            "compiled": case.compiled,
            "error": case.error,
            "load_average": list(os.getloadavg()),
        }
        if case.error is None and case.step_times:
            step_time = statistics.median(case.step_times)
            reference = statistics.median(case.reference_flops)
            achieved = case.flops_per_step / step_time
            record.update(
                {
                    "step_times_s": case.step_times,
                    "median_step_s": step_time,
                    "images_per_s": case.batch_size / step_time,
                    "gflop_per_step": case.flops_per_step / 1e9,
                    "achieved_gflops": achieved / 1e9,
                    "matmul_gflops": reference / 1e9,
                    "fraction_of_matmul": achieved / reference,
                }
            )
        records.append(record)
    return records


# --------------------------------------------------------------------------- time to quality


def train_quickstart(
    config: ExperimentConfig, run_dir: Path, reference: torch.Tensor, args: argparse.Namespace
) -> dict[str, Any]:
    """Train (or reuse) the quickstart run and score every epoch checkpoint."""
    finished = run_dir / "checkpoints" / "last.pt"
    if finished.is_file():
        logger.info("reusing the training run in %s", run_dir)
    else:
        logger.info("training %s", run_dir)
        trainer = Trainer.from_config(config)
        if args.train_images is not None:
            # A subset keeps the --quick run short; the full run uses every image.
            trainer.train_data = _subset(trainer.train_data, args.train_images)
            trainer.val_data = _subset(trainer.val_data, args.train_images)
        trainer.fit()

    metrics_path = run_dir / "metrics.jsonl"
    lines = metrics_path.read_text(encoding="utf-8").splitlines() if metrics_path.is_file() else []
    records = [json.loads(line) for line in lines if line.strip()]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    classifier = load_digit_classifier(args.device)
    points = []
    for record in epochs:
        checkpoint = run_dir / "checkpoints" / f"epoch_{int(record['epoch']):03d}.pt"
        point: dict[str, Any] = {
            "epoch": record["epoch"],
            "step": record["step"],
            "elapsed_s": record.get("elapsed_s"),
            "val_nll": record.get("val_nll"),
            "val_bits_per_dim": record.get("val_bits_per_dim"),
        }
        if checkpoint.is_file():
            model = load_model(checkpoint, map_location=args.device)
            generator = torch.Generator(device=args.device).manual_seed(0)
            samples = model.sample(
                args.quality_samples,
                sampler=args.ttq_sampler,
                steps=args.ttq_steps,
                generator=generator,
            )
            quality = sample_quality(samples, reference, classifier=classifier)
            point["frechet_digit_distance"] = quality.frechet_digit_distance
            point["mean_confidence"] = quality.mean_confidence
        points.append(point)
        logger.info("epoch %s: %s", record["epoch"], point)
    return {
        "run_dir": str(run_dir),
        "quality_sampler": args.ttq_sampler,
        "quality_steps": args.ttq_steps,
        "quality_samples": args.quality_samples,
        "points": points,
        "peak_memory_mb": peak_memory_mb(args.device),
        "load_average": list(os.getloadavg()),
    }


def _subset(dataset: BinaryImageDataset | None, count: int) -> BinaryImageDataset | None:
    if dataset is None:
        return None
    return BinaryImageDataset(
        dataset.images[:count],
        dataset.obs_mask[:count],
        dataset.labels[:count] if dataset.labels is not None else None,
        num_classes=dataset.num_classes,
        name=dataset.name,
        split=dataset.split,
    )


# --------------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """One sampler setting of the sampling table."""

    sampler: str
    steps: int | None = None
    pixels_per_event: int = 1

    @property
    def label(self) -> str:
        if self.sampler == "first_hitting":
            return f"first_hitting (k={self.pixels_per_event})"
        return f"{self.sampler} ({self.steps} steps)"


def sampler_specs(steps: Sequence[int], pixels_per_event: Sequence[int]) -> list[SamplerSpec]:
    """Build the ancestral and confidence settings per step count, then first-hitting."""
    specs = [SamplerSpec("ancestral", s) for s in steps]
    specs += [SamplerSpec("confidence", s) for s in steps]
    specs += [SamplerSpec("first_hitting", None, k) for k in pixels_per_event]
    return specs


@contextlib.contextmanager
def _precision_context(precision: str, device: torch.device) -> Iterator[None]:
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def time_sampling(
    model: MaskedDiffusionModel,
    spec: SamplerSpec,
    num_samples: int,
    device: torch.device,
    precision: str = "fp32",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Draw ``num_samples`` images with ``spec`` and return them with the cost record."""
    generator = torch.Generator(device=device).manual_seed(0)
    load_before = os.getloadavg()
    _synchronize(device)
    start = time.perf_counter()
    with _precision_context(precision, device):
        result = model.sample(
            num_samples,
            sampler=spec.sampler,
            steps=spec.steps,
            pixels_per_event=spec.pixels_per_event,
            generator=generator,
            device=device,
            return_info=True,
        )
    _synchronize(device)
    elapsed = time.perf_counter() - start
    record = {
        "sampler": spec.sampler,
        "steps": spec.steps,
        "pixels_per_event": spec.pixels_per_event,
        "label": spec.label,
        "precision": precision,
        "num_samples": num_samples,
        "wall_s": elapsed,
        "num_function_evals": result.num_function_evals,
        "num_image_evals": result.num_image_evals,
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
    }
    return result.samples, record


def bench_sampling(
    model: MaskedDiffusionModel,
    specs: Sequence[SamplerSpec],
    sample_counts: Sequence[int],
    quality_samples: int,
    reference: torch.Tensor,
    device: torch.device,
    precisions: Sequence[str],
) -> list[dict[str, Any]]:
    """Time every sampler setting; score the ``quality_samples`` run against ``reference``."""
    classifier = load_digit_classifier(device)
    counts = sorted(set(sample_counts) | {quality_samples})
    records = []
    for precision in precisions:
        for spec in specs:
            for count in counts:
                samples, record = time_sampling(model, spec, count, device, precision)
                record["timed"] = count in sample_counts
                if count == quality_samples:
                    quality = sample_quality(samples, reference, classifier=classifier)
                    record.update(
                        {
                            "frechet_digit_distance": quality.frechet_digit_distance,
                            "mean_confidence": quality.mean_confidence,
                            "class_entropy": quality.class_entropy,
                        }
                    )
                logger.info("sampling: %s", record)
                records.append(record)
    return records


def bench_cache(
    model_config: ModelConfig,
    steps: Sequence[int],
    num_samples: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    """Compare ancestral sampling cost with and without the time-agnostic output cache.

    The network is untrained: which images change in a step, and so how often
    the cache is hit, does not depend on the weights, but the samples are noise,
    so no quality is reported.
    """
    config = ExperimentConfig(model=dataclasses.replace(model_config, time_conditioning=False))
    torch.manual_seed(0)
    model = MaskedDiffusionModel.from_config(config).to(device)
    records = []
    for step_count in steps:
        for use_cache in (False, True):
            model.network_uses_time = not use_cache
            _, record = time_sampling(
                model, SamplerSpec("ancestral", step_count), num_samples, device
            )
            record["cache"] = use_cache
            records.append(record)
            logger.info("cache: %s", record)
    return records


# --------------------------------------------------------------------------- profile


def profile_costs(
    model: MaskedDiffusionModel, device: torch.device, batch_size: int, sample_steps: int
) -> dict[str, list[dict[str, Any]]]:
    """Return the top 5 operators by self time of a training step and of sampling."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    images = load_dataset("mnist-sample", "train").images[:batch_size].to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.compute_loss(images).backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    results = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        name = "channels_last" if layout == torch.channels_last else "contiguous"
        model.network.to(memory_format=layout)
        train_step()
        with profile(activities=activities) as prof:
            train_step()
        results[f"training step, batch {batch_size}, {name}"] = _top_ops(prof)
        generator = torch.Generator(device=device).manual_seed(0)
        with profile(activities=activities) as prof:
            model.sample(
                64, sampler="ancestral", steps=sample_steps, generator=generator, device=device
            )
        results[f"sampling 64 images, {sample_steps} ancestral steps, {name}"] = _top_ops(prof)
    model.network.to(memory_format=torch.contiguous_format)
    return results


def _top_ops(prof: Any, count: int = 5) -> list[dict[str, Any]]:
    events = prof.key_averages()
    total = sum(event.self_cpu_time_total for event in events) or 1.0
    ranked = sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)
    return [
        {
            "op": event.key,
            "self_cpu_percent": 100.0 * event.self_cpu_time_total / total,
            "calls": event.count,
        }
        for event in ranked[:count]
    ]


# --------------------------------------------------------------------------- report


def write_report(results: dict[str, Any], output: Path) -> None:
    """Write ``README.md`` with markdown tables of ``results``."""
    from benchmarks.report import render_markdown, save_plots

    (output / "README.md").write_text(render_markdown(results), encoding="utf-8")
    save_plots(results, output)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO_ROOT / "benchmarks" / "results",
        help="folder for results.json, README.md, the plots and the cached training run",
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (under a minute)")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="trained quickstart model (checkpoint or run folder) for the sampling section; "
        "skips training, and so the time-to-quality section",
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["matmul", "training", "time_to_quality", "sampling"],
        choices=["matmul", "training", "time_to_quality", "sampling", "profile"],
        help="sections to run (default: all but profile)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["quickstart", "mnist"],
        choices=sorted(MODEL_CONFIGS),
        help="training section: model configs",
    )
    parser.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        default=[32, 128, 256],
        help="training section: batch sizes of the quickstart model",
    )
    parser.add_argument(
        "--mnist-batch-sizes",
        nargs="+",
        type=int,
        default=[32, 128, 256],
        help="training section: batch sizes of the full-MNIST model",
    )
    parser.add_argument(
        "--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"]
    )
    parser.add_argument(
        "--memory-formats",
        nargs="+",
        default=["contiguous", "channels_last"],
        choices=["contiguous", "channels_last"],
    )
    parser.add_argument(
        "--compile",
        choices=["auto", "on", "off", "both"],
        default="auto",
        help="torch.compile the network in the training section "
        "(auto: both on CUDA, off on the CPU)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument(
        "--train-overrides",
        nargs="*",
        default=[],
        help="extra section.key=value overrides of configs/quickstart.yaml",
    )
    parser.add_argument(
        "--steps",
        nargs="+",
        type=int,
        default=[10, 20, 50, 100, 200],
        help="sampling section: ancestral and confidence step counts",
    )
    parser.add_argument(
        "--pixels-per-event",
        nargs="+",
        type=int,
        default=[1, 8],
        help="sampling section: first-hitting pixels per event",
    )
    parser.add_argument(
        "--sample-counts",
        nargs="+",
        type=int,
        default=[64, 1024],
        help="sampling section: batch sizes whose wall time is reported",
    )
    parser.add_argument(
        "--quality-samples",
        type=int,
        default=1024,
        help="images scored by the Frechet digit distance",
    )
    parser.add_argument(
        "--sample-precisions",
        nargs="+",
        default=None,
        choices=["fp32", "bf16"],
        help="default: fp32 (CPU), fp32 bf16 (CUDA)",
    )
    parser.add_argument(
        "--cache-steps",
        nargs="+",
        type=int,
        default=[100, 1000],
        help="ancestral step counts of the time-agnostic cache comparison",
    )
    parser.add_argument(
        "--cache-samples", type=int, default=64, help="images per run of the cache comparison"
    )
    parser.add_argument(
        "--train-images",
        type=int,
        default=None,
        help="train and validate on the first N images only (default: all)",
    )
    parser.add_argument(
        "--ttq-sampler",
        default="ancestral",
        help="sampler that scores each epoch in the time-to-quality section",
    )
    parser.add_argument("--ttq-steps", type=int, default=100)
    args = parser.parse_args(argv)
    if args.quick:
        args.models = ["quick"]
        args.batch_sizes = [8]
        args.rounds = 1
        args.warmup_steps = 1
        args.matmul_size = 512
        args.train_images = 128
        args.steps = [2]
        args.pixels_per_event = [392]
        args.sample_counts = [8]
        args.quality_samples = 8
        args.cache_steps = [2]
        args.cache_samples = 8
        args.ttq_steps = 2
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the selected sections and write the results; return them."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.device = resolve_device(args.device)
    device: torch.device = args.device
    output: Path = args.output
    output.mkdir(parents=True, exist_ok=True)
    on_gpu = device.type == "cuda"
    compile_options = {
        "auto": [False, True] if on_gpu else [False],
        "on": [True],
        "off": [False],
        "both": [False, True],
    }[args.compile]
    sample_precisions = args.sample_precisions or (["fp32", "bf16"] if on_gpu else ["fp32"])

    quickstart = load_config(CONFIG_DIR / "quickstart.yaml")
    model_configs = {
        name: load_config(CONFIG_DIR / file).model for name, file in MODEL_CONFIGS.items()
    }
    model_configs["quick"] = QUICK_MODEL
    run_overrides = [
        f"trainer.output_dir={output / 'quickstart_run'}",
        "trainer.progress_bar=false",
        f"trainer.device={device.type}",
        "trainer.num_sample_images=0",
    ]
    if args.quick:
        run_overrides += [
            "model.base_channels=8",
            "model.channel_mults=[1, 2]",
            "model.num_groups=4",
            "trainer.epochs=1",
            "data.batch_size=64",
            "data.eval_batch_size=256",
        ]
    if on_gpu:
        run_overrides += ["trainer.precision=bf16", "trainer.channels_last=true"]
    train_config = apply_overrides(quickstart, [*run_overrides, *args.train_overrides])

    results: dict[str, Any] = {
        "machine": machine_info(device),
        "settings": {
            k: str(v) if isinstance(v, Path | torch.device) else v for k, v in vars(args).items()
        },
    }
    start = time.perf_counter()

    def save() -> None:
        # Written after every section, so an interrupted run keeps what it measured.
        results["machine"]["load_average_end"] = list(os.getloadavg())
        results["total_wall_s"] = time.perf_counter() - start
        (output / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")

    if "matmul" in args.sections:
        results["matmul"] = {
            "size": args.matmul_size,
            "fp32_gflops": matmul_flops(torch.float32, device, args.matmul_size) / 1e9,
            "bf16_gflops": matmul_flops(torch.bfloat16, device, args.matmul_size) / 1e9,
            "load_average": list(os.getloadavg()),
        }
        logger.info("matmul: %s", results["matmul"])
        save()

    if "training" in args.sections:
        results["training"] = bench_training(
            {name: model_configs[name] for name in args.models},
            {
                "quickstart": args.batch_sizes,
                "quick": args.batch_sizes,
                "mnist": args.mnist_batch_sizes,
            },
            args.precisions,
            args.memory_formats,
            compile_options,
            device,
            warmup_steps=args.warmup_steps,
            rounds=args.rounds,
            matmul_size=args.matmul_size,
        )
        results["training_peak_memory_mb"] = peak_memory_mb(device)
        save()

    reference = load_dataset("mnist-sample", "heldout").images
    run_dir = Path(train_config.trainer.output_dir)
    if "time_to_quality" in args.sections and args.checkpoint is None:
        results["time_to_quality"] = train_quickstart(train_config, run_dir, reference, args)
        save()

    if "sampling" in args.sections or "profile" in args.sections:
        source = args.checkpoint if args.checkpoint is not None else run_dir
        if not Path(source).exists():
            raise FileNotFoundError(
                f"no trained model at {source}: run the time_to_quality section first or "
                "pass --checkpoint"
            )
        model = load_model(source, map_location=device)
        if "sampling" in args.sections:
            train_images = load_dataset("mnist-sample", "train").images
            count = min(args.quality_samples, train_images.shape[0])
            # A random subset: the bundled training split is ordered by digit class.
            order = torch.randperm(
                train_images.shape[0], generator=torch.Generator().manual_seed(0)
            )
            baseline = sample_quality(train_images[order[:count]], reference)
            results["sampling_reference"] = {
                "description": f"{count} random training digits scored like samples",
                "frechet_digit_distance": baseline.frechet_digit_distance,
                "mean_confidence": baseline.mean_confidence,
            }
            results["sampling"] = bench_sampling(
                model,
                sampler_specs(args.steps, args.pixels_per_event),
                args.sample_counts,
                args.quality_samples,
                reference,
                device,
                sample_precisions,
            )
            results["cache"] = bench_cache(
                model.network.config, args.cache_steps, args.cache_samples, device
            )
            results["sampling_peak_memory_mb"] = peak_memory_mb(device)
            save()
        if "profile" in args.sections:
            results["profile"] = profile_costs(model, device, 128 if not args.quick else 8, 20)

    save()
    write_report(results, output)
    logger.info("wrote %s", output)
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    main()
