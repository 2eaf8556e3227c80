"""Command-line interface: ``masked-diffusion train | sample | evaluate | impute``.

Commands:

- ``train --config FILE [--set section.key=value ...] [--resume CHECKPOINT]`` trains
  a model; the run folder (``trainer.output_dir``) receives ``config.yaml``,
  ``checkpoints/``, ``samples/`` and ``metrics.jsonl``.
- ``sample CHECKPOINT --num-samples N --output FILE.png`` writes a grid of generated
  images and prints the number of network evaluations.
- ``evaluate CHECKPOINT`` prints one JSON object with the likelihood bound in nats
  per image and bits per dimension, with standard errors, on a dataset split.
- ``impute CHECKPOINT --input FILE --output FILE`` completes the missing pixels of
  partially observed images.

``CHECKPOINT`` is a checkpoint file (``best.pt``, ``last.pt``, ``epoch_NNN.pt``), a
run folder or a folder written by ``save_pretrained``.

Impute file formats:

- Input ``.npz``: array ``images`` of shape ``(N, 1, H, W)``, ``(N, H, W)`` or
  ``(H, W)``, dtype bool or integer with values in {0, 1} (integers up to 255 are
  binarized as ``value > 127``; floats in [0, 1] as ``value > 0.5``), and array
  ``obs_mask`` of the same shape, bool or 0/1, 1 where the pixel is observed.
  ``--mask FILE.png`` replaces ``obs_mask`` for every image.
- Input ``.png``: one image, binarized as gray level > 127; needs ``--mask FILE.png``
  of the same size, white (gray level > 127) where observed.
- Output ``.npz``: ``completions`` ``(N, S, 1, H, W)`` uint8 for ``S`` completions
  per image, ``images`` ``(N, 1, H, W)`` uint8 and ``obs_mask`` ``(N, 1, H, W)`` bool.
- Output ``.png``: a grid whose first row is the inputs (missing pixels in red) and
  whose row ``s + 1`` contains completion ``s`` of every input.

Exit status: 0 on success, 2 on invalid input (missing file, invalid config key or
value, unreadable checkpoint), with one line on stderr; ``--verbose`` adds the
traceback. Other failures raise with a traceback (exit status 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch
from tqdm import tqdm

from masked_diffusion._version import __version__
from masked_diffusion.checkpoint import load_model
from masked_diffusion.config import (
    DATASET_NAMES,
    DEVICES,
    SAMPLER_NAMES,
    DataConfig,
    load_config,
)
from masked_diffusion.data import load_dataset_from_config
from masked_diffusion.images import (
    load_image_png,
    load_mask_png,
    save_comparison_grid,
    save_image_grid,
)
from masked_diffusion.metrics import sample_quality
from masked_diffusion.trainer import Trainer

if TYPE_CHECKING:
    from masked_diffusion.diffusion import MaskedDiffusionModel

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)

PROG = "masked-diffusion"
EXIT_USAGE = 2
DEFAULT_SAMPLING_BATCH = 256
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class CLIError(Exception):
    """Invalid command-line input; ``main`` prints the message and exits with status 2."""


# Exceptions that mean invalid input when they escape a command. Config validation
# raises ValueError or TypeError, and a missing file FileNotFoundError (also the base
# of the data and checkpoint modules' not-found errors). CheckpointError, raised for
# unreadable checkpoints, is a ValueError. FileExistsError means a fresh training run
# would write into the folder of an earlier one.
_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    CLIError,
    FileExistsError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    ValueError,
    TypeError,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit status.

    Args:
        argv: Arguments without the program name. Default: ``sys.argv[1:]``.

    Returns:
        0 on success, 2 on invalid input, 130 when interrupted.

    Example:
        >>> main(["--version"])  # doctest: +SKIP
        masked-diffusion 0.1.0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    verbosity = getattr(args, "verbose", 0) - getattr(args, "quiet", 0)
    _configure_logging(verbosity)

    command: Callable[[argparse.Namespace], int] = args.handler
    try:
        return command(args)
    except _INPUT_ERRORS as error:
        if verbosity > 0:
            logger.exception("%s %s failed", PROG, args.command)
        message = str(error) or type(error).__name__
        show_hint = verbosity <= 0 and not isinstance(error, CLIError)
        hint = " (run with --verbose for the traceback)" if show_hint else ""
        print(f"{PROG} {args.command}: error: {message}{hint}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with one subcommand per command."""
    common = argparse.ArgumentParser(add_help=False)
    _add_logging_options(common)

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train, sample, evaluate and impute with masked diffusion models "
        "on binarized images.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train_parser(commands, common)
    _add_sample_parser(commands, common)
    _add_evaluate_parser(commands, common)
    _add_impute_parser(commands, common)
    return parser


# --- parsers -----------------------------------------------------------------------


def _add_logging_options(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS keeps a subcommand from resetting a flag given before the subcommand.
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="log more: once for debug messages; also prints tracebacks of input errors",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="count",
        default=argparse.SUPPRESS,
        help="log less: once for warnings and errors only, twice for errors only",
    )


def _add_train_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "train",
        parents=[common],
        help="train a model from a YAML config",
        description="Train a model. The run folder (trainer.output_dir) receives "
        "config.yaml, checkpoints/{best,last,epoch_NNN}.pt, samples/epoch_NNN.png and "
        "metrics.jsonl. Prints the final metrics as one JSON object.",
        epilog="Example: masked-diffusion train --config configs/quickstart.yaml "
        "--set trainer.epochs=2 --set trainer.output_dir=runs/try",
    )
    parser.add_argument(
        "--config", required=True, metavar="FILE", help="YAML experiment config file"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, written in YAML (e.g. trainer.lr=3e-4); repeatable",
    )
    parser.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help="continue training from this checkpoint file, or from a run folder's "
        "checkpoints/last.pt",
    )
    parser.set_defaults(handler=_run_train)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="checkpoint file, run folder or save_pretrained folder",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="device to run the model on; auto picks cuda, then mps, then cpu "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--no-ema",
        dest="use_ema",
        action="store_false",
        help="use the raw trained weights instead of their exponential moving average",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random draws (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="B",
        help="images per forward pass (default: 256 for sampling, the config's "
        "data.eval_batch_size for likelihoods)",
    )


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sampler",
        choices=SAMPLER_NAMES,
        help="sampling algorithm (default: the checkpoint config's diffusion.sampler)",
    )
    parser.add_argument(
        "--steps",
        type=_positive_int,
        metavar="S",
        help="number of sampler steps (default: the config's diffusion.sampling_steps)",
    )
    parser.add_argument(
        "--temperature",
        type=_non_negative_float,
        metavar="T",
        help="softmax temperature of the draws; 0 takes the most likely value "
        "(default: the config's diffusion.temperature)",
    )


def _add_sample_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "sample",
        parents=[common],
        help="generate images into a PNG grid",
        description="Generate images with a trained model and write them as a PNG grid. "
        "Prints the output path and the number of network evaluations.",
        epilog="Example: masked-diffusion sample runs/quickstart --num-samples 64 "
        "--output samples.png --steps 50",
    )
    _add_model_options(parser)
    _add_sampling_options(parser)
    parser.add_argument(
        "--num-samples",
        type=_positive_int,
        default=64,
        metavar="N",
        help="number of images to generate (default: %(default)s)",
    )
    parser.add_argument(
        "--output", required=True, metavar="FILE.png", help="PNG file for the image grid"
    )
    parser.add_argument(
        "--nrow",
        type=_positive_int,
        metavar="N",
        help="images per grid row (default: ceil(sqrt(num-samples)))",
    )
    parser.add_argument(
        "--scale",
        type=_positive_int,
        default=2,
        metavar="F",
        help="upscaling factor of the PNG, in output pixels per image pixel (default: %(default)s)",
    )
    parser.add_argument(
        "--save-npz",
        metavar="FILE.npz",
        help="also save the images as array 'samples' (N, C, H, W) uint8 in this file",
    )
    parser.set_defaults(handler=_run_sample)


def _add_evaluate_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "evaluate",
        parents=[common],
        help="print the likelihood bound on a dataset split as JSON",
        description="Estimate the negative log-likelihood bound of a trained model on "
        "a dataset split and print one JSON object: nll_nats (nats per image), "
        "bits_per_dim, their standard errors over images, num_images, dataset, split "
        "and num_samples. With data.p_missing > 0 in the config it adds obs_nll_nats "
        "and obs_bits_per_dim, the bound on the observed pixels of the corrupted "
        "images. --num-generated adds sample-quality scores.",
        epilog="Example: masked-diffusion evaluate runs/quickstart --max-images 200",
    )
    _add_model_options(parser)
    parser.add_argument(
        "--split",
        choices=("heldout", "train"),
        default="heldout",
        help="dataset split (default: %(default)s)",
    )
    parser.add_argument(
        "--num-samples",
        type=_positive_int,
        default=1,
        metavar="N",
        help="Monte Carlo draws of the bound per image (default: %(default)s)",
    )
    parser.add_argument(
        "--dataset",
        choices=DATASET_NAMES,
        help="dataset to evaluate on (default: the checkpoint config's data.dataset)",
    )
    parser.add_argument(
        "--root",
        metavar="DIR",
        help="folder of the torchvision datasets (default: the config's data.root)",
    )
    parser.add_argument(
        "--max-images",
        type=_positive_int,
        metavar="N",
        help="evaluate on N images evenly spaced through the split instead of all",
    )
    parser.add_argument(
        "--num-generated",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="also generate N images (N >= 2) and score them against the held-out "
        "split with a digit classifier: Frechet digit distance, mean confidence, "
        "class entropy (default: %(default)s, off)",
    )
    _add_sampling_options(parser)
    parser.set_defaults(handler=_run_evaluate)


def _add_impute_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "impute",
        parents=[common],
        help="complete the missing pixels of partially observed images",
        description="Fill the missing pixels of images given with an observation mask.\n"
        "Observed pixels are kept as they are.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_IMPUTE_EPILOG,
    )
    _add_model_options(parser)
    _add_sampling_options(parser)
    parser.add_argument(
        "--input", required=True, metavar="FILE", help="input .npz or .png file (see below)"
    )
    parser.add_argument(
        "--mask",
        metavar="FILE.png",
        help="observation mask PNG, white where observed; required for a PNG input, "
        "replaces obs_mask of an .npz input",
    )
    parser.add_argument(
        "--output", required=True, metavar="FILE", help="output .npz or .png file (see below)"
    )
    parser.add_argument(
        "--num-completions",
        type=_positive_int,
        default=1,
        metavar="S",
        help="completions drawn per input image (default: %(default)s)",
    )
    parser.add_argument(
        "--argmax",
        action="store_true",
        help="take the most likely value at every step (temperature 0); "
        "cannot be combined with --temperature",
    )
    parser.add_argument(
        "--scale",
        type=_positive_int,
        default=2,
        metavar="F",
        help="upscaling factor of a PNG output, in output pixels per image pixel "
        "(default: %(default)s)",
    )
    parser.set_defaults(handler=_run_impute)


_IMPUTE_EPILOG = """\
input formats:
  .npz  array 'images' of shape (N, 1, H, W), (N, H, W) or (H, W); bool, or integers
        in {0, 1} (integers up to 255 are binarized as value > 127, floats in [0, 1]
        as value > 0.5); array 'obs_mask' of the same shape, bool or 0/1, 1 where the
        pixel is observed (or pass --mask).
  .png  one image, binarized as gray level > 127; requires --mask.

output formats:
  .npz  'completions' (N, S, 1, H, W) uint8, 'images' (N, 1, H, W) uint8 and
        'obs_mask' (N, 1, H, W) bool, for S = --num-completions.
  .png  grid: first row the inputs with missing pixels in red, then one row per
        completion.

example:
  masked-diffusion impute runs/ambient --input corrupted.npz --output filled.png \\
      --num-completions 4
"""


# --- train -------------------------------------------------------------------------


def _run_train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    trainer = Trainer.from_config(config)
    result = trainer.fit(resume_from=args.resume)

    summary = {"output_dir": config.trainer.output_dir, **dict(result)}
    # Under torchrun every process runs this; only rank 0 prints the summary.
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(_json_ready(summary), sort_keys=True))
    return 0


# --- sample ------------------------------------------------------------------------


def _run_sample(args: argparse.Namespace) -> int:
    output = _require_suffix(args.output, ".png", "--output")
    npz_path = _require_suffix(args.save_npz, ".npz", "--save-npz") if args.save_npz else None
    device = _resolve_device(args.device)
    model = _load_model(args.checkpoint, device, use_ema=args.use_ema)
    generator = _make_generator(device, args.seed)

    start = time.perf_counter()
    samples, num_evals, num_batches = _generate(
        model,
        args.num_samples,
        batch_size=args.batch_size or DEFAULT_SAMPLING_BATCH,
        sampler=args.sampler,
        steps=args.steps,
        temperature=args.temperature,
        generator=generator,
        device=device,
    )
    seconds = time.perf_counter() - start

    samples = samples.cpu()
    save_image_grid(
        samples, output, nrow=args.nrow, num_classes=model.num_classes, scale=args.scale
    )
    if npz_path is not None:
        _save_npz(npz_path, samples=samples.numpy().astype(np.uint8))
    logger.info("generated %d images in %.1f s", args.num_samples, seconds)
    batch_size = args.batch_size or DEFAULT_SAMPLING_BATCH
    print(
        f"wrote {output}: {args.num_samples} samples, {num_evals} network evaluations "
        f"in {num_batches} batch(es) of up to {batch_size} images"
    )
    if npz_path is not None:
        print(f"wrote {npz_path}")
    return 0


def _generate(
    model: MaskedDiffusionModel,
    num_samples: int,
    *,
    batch_size: int,
    sampler: str | None,
    steps: int | None,
    temperature: float | None,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, int, int]:
    """Sample in batches; return the images, total network evaluations and batch count."""
    batches = []
    num_evals = 0
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        with torch.no_grad():
            result = model.sample(
                count,
                sampler=sampler,
                steps=steps,
                temperature=temperature,
                generator=generator,
                device=device,
                return_info=True,
            )
        batches.append(result.samples)
        num_evals += int(result.num_function_evals)
    return torch.cat(batches), num_evals, len(batches)


# --- evaluate ----------------------------------------------------------------------


def _run_evaluate(args: argparse.Namespace) -> int:
    if args.num_generated == 1:
        raise CLIError("invalid --num-generated 1: expected 0 (off) or at least 2 images")
    device = _resolve_device(args.device)
    model = _load_model(args.checkpoint, device, use_ema=args.use_ema)
    data_config = _evaluation_data_config(model, args.dataset, args.root)
    dataset = load_dataset_from_config(data_config, args.split)
    images, obs_mask = dataset.images, dataset.obs_mask
    heldout_images = images if args.split == "heldout" else None
    if args.max_images is not None and args.max_images < len(images):
        # Evenly spaced, so a small subset still covers every class of a sorted split.
        index = torch.linspace(0, len(images) - 1, args.max_images).round().long()
        images, obs_mask = images[index], obs_mask[index]

    batch_size = args.batch_size or data_config.eval_batch_size
    generator = _make_generator(device, args.seed)
    start = time.perf_counter()
    nats, bits = _estimate_nll(model, images, None, args, batch_size, generator, device)
    report: dict[str, Any] = {
        "dataset": data_config.dataset,
        "split": args.split,
        "num_images": len(images),
        "num_samples": args.num_samples,
        **_mean_and_stderr("nll_nats", nats),
        **_mean_and_stderr("bits_per_dim", bits),
    }

    # With missing pixels, also the bound on -log p(x_obs) of the corrupted images, in
    # bits per observed pixel: what can be measured when no clean data exists.
    if data_config.p_missing > 0:
        nats, bits = _estimate_nll(model, images, obs_mask, args, batch_size, generator, device)
        report["p_missing"] = data_config.p_missing
        report["observed_fraction"] = float(obs_mask.float().mean())
        report.update(_mean_and_stderr("obs_nll_nats", nats))
        report.update(_mean_and_stderr("obs_bits_per_dim", bits))

    if args.num_generated > 0:
        if heldout_images is None:
            heldout_images = load_dataset_from_config(data_config, "heldout").images
        report.update(_sample_quality_report(model, heldout_images, args, generator, device))
    report.update(
        checkpoint=str(args.checkpoint),
        seed=args.seed,
        seconds=round(time.perf_counter() - start, 3),
    )
    print(json.dumps(_json_ready(report), sort_keys=True))
    return 0


def _evaluation_data_config(
    model: MaskedDiffusionModel, dataset: str | None, root: str | None
) -> DataConfig:
    config = getattr(model, "config", None)
    if config is None and dataset is None:
        raise CLIError("the checkpoint stores no config, so the dataset is unknown: pass --dataset")
    data_config = config.data if config is not None else DataConfig()
    changes: dict[str, Any] = {}
    if dataset is not None:
        changes["dataset"] = dataset
    if root is not None:
        changes["root"] = root
    return dataclasses.replace(data_config, **changes) if changes else data_config


def _estimate_nll(
    model: MaskedDiffusionModel,
    images: torch.Tensor,
    obs_mask: torch.Tensor | None,
    args: argparse.Namespace,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimate the bound per image in batches: ``(nats, bits_per_dim)``, float64 ``(N,)``."""
    starts = range(0, len(images), batch_size)
    description = "observed-pixel bound" if obs_mask is not None else "likelihood bound"
    # disable=None turns the bar off when stderr is not a terminal.
    disable = None if getattr(args, "quiet", 0) == 0 and len(starts) > 1 else True
    nats, bits = [], []
    for start in tqdm(starts, desc=description, unit="batch", file=sys.stderr, disable=disable):
        x0 = images[start : start + batch_size].to(device)
        mask = obs_mask[start : start + batch_size].to(device) if obs_mask is not None else None
        estimate = model.nll(x0, mask, num_samples=args.num_samples, generator=generator)
        nats.append(estimate.nats.to("cpu", torch.float64))
        bits.append(estimate.bits_per_dim.to("cpu", torch.float64))
    return torch.cat(nats), torch.cat(bits)


def _mean_and_stderr(name: str, values: torch.Tensor) -> dict[str, float | None]:
    """Mean over images and its standard error (None for a single image)."""
    count = values.numel()
    stderr = float(values.std(correction=1)) / math.sqrt(count) if count > 1 else None
    return {name: float(values.mean()), f"{name}_stderr": stderr}


def _sample_quality_report(
    model: MaskedDiffusionModel,
    reference: torch.Tensor,
    args: argparse.Namespace,
    generator: torch.Generator,
    device: torch.device,
) -> dict[str, Any]:
    generated, num_evals, _ = _generate(
        model,
        args.num_generated,
        batch_size=args.batch_size or DEFAULT_SAMPLING_BATCH,
        sampler=args.sampler,
        steps=args.steps,
        temperature=args.temperature,
        generator=generator,
        device=device,
    )
    quality = sample_quality(generated, reference.to(generated.device))
    return {**quality.to_dict(), "sampling_network_evals": num_evals}


# --- impute ------------------------------------------------------------------------


def _run_impute(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.suffix.lower() not in (".npz", ".png"):
        raise CLIError(f"invalid --output {output}: expected a file name ending in .npz or .png")
    if args.argmax and args.temperature is not None:
        raise CLIError(
            "invalid options: --argmax sets the temperature to 0, so pass either --argmax "
            "or --temperature"
        )
    images, obs_mask = _read_impute_input(Path(args.input), Path(args.mask) if args.mask else None)

    device = _resolve_device(args.device)
    model = _load_model(args.checkpoint, device, use_ema=args.use_ema)
    expected = tuple(model.image_shape)
    if tuple(images.shape[1:]) != expected:
        raise CLIError(
            f"invalid --input {args.input}: images of shape {tuple(images.shape[1:])}, "
            f"the model expects {expected} (channels, height, width)"
        )

    temperature = 0.0 if args.argmax else args.temperature
    generator = _make_generator(device, args.seed)
    batch_size = args.batch_size or DEFAULT_SAMPLING_BATCH
    batches = []
    for start in range(0, len(images), batch_size):
        with torch.no_grad():
            completed = model.impute(
                images[start : start + batch_size].to(device),
                obs_mask[start : start + batch_size].to(device),
                num_completions=args.num_completions,
                sampler=args.sampler,
                steps=args.steps,
                temperature=temperature,
                generator=generator,
            )
        batches.append(completed.cpu())
    completions = torch.cat(batches)  # (N, S, C, H, W)

    if output.suffix.lower() == ".npz":
        _save_npz(
            output,
            completions=completions.numpy().astype(np.uint8),
            images=images.numpy().astype(np.uint8),
            obs_mask=obs_mask.numpy(),
        )
    else:
        rows = [images] + [completions[:, s] for s in range(args.num_completions)]
        masks = [obs_mask] + [None] * args.num_completions
        labels = ["input"] + [f"completion {s + 1}" for s in range(args.num_completions)]
        save_comparison_grid(
            rows,
            output,
            obs_masks=masks,
            labels=labels,
            num_classes=model.num_classes,
            scale=args.scale,
        )
    print(f"wrote {output}: {args.num_completions} completion(s) of {len(images)} image(s)")
    return 0


def _read_impute_input(path: Path, mask_path: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``(images (N, 1, H, W) long, obs_mask (N, 1, H, W) bool)`` from npz or png."""
    if not path.is_file():
        raise CLIError(f"input file not found: {path} (from --input)")
    suffix = path.suffix.lower()
    if suffix == ".png":
        if mask_path is None:
            raise CLIError(
                f"a PNG input ({path}) needs --mask FILE.png, white where the pixel is observed"
            )
        images = load_image_png(path).unsqueeze(0)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            if "images" not in arrays:
                raise CLIError(
                    f"invalid --input {path}: no array 'images' (arrays found: {sorted(arrays)})"
                )
            images = _as_batch(torch.from_numpy(_binarize_array(arrays["images"], path)))
            npz_mask = arrays.get("obs_mask")
        if npz_mask is None and mask_path is None:
            raise CLIError(
                f"invalid --input {path}: no array 'obs_mask'; add one (1 where observed) "
                "or pass --mask FILE.png"
            )
        if mask_path is None:
            obs_mask = _as_batch(torch.from_numpy(_mask_array(npz_mask, path)))
            return images, _broadcast_mask(obs_mask, images, path)
    else:
        raise CLIError(f"invalid --input {path}: expected a file name ending in .npz or .png")

    assert mask_path is not None
    if not mask_path.is_file():
        raise CLIError(f"mask file not found: {mask_path} (from --mask)")
    return images, _broadcast_mask(load_mask_png(mask_path).unsqueeze(0), images, mask_path)


def _binarize_array(array: npt.NDArray[Any], path: Path) -> npt.NDArray[np.int64]:
    if array.dtype == np.bool_:
        return array.astype(np.int64)
    if array.size == 0:
        raise CLIError(f"invalid --input {path}: 'images' is empty")
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise CLIError(
                f"invalid --input {path}: 'images' has values in [{low}, {high}]; "
                "expected {0, 1} or gray levels 0..255"
            )
        return (array > 127 if high > 1 else array).astype(np.int64)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise CLIError(
                f"invalid --input {path}: float 'images' must lie in [0, 1]; "
                "store integers 0..255 or {0, 1} instead"
            )
        return (array > 0.5).astype(np.int64)
    raise CLIError(
        f"invalid --input {path}: 'images' has dtype {array.dtype}; expected bool or int"
    )


def _mask_array(array: npt.NDArray[Any], path: Path) -> npt.NDArray[np.bool_]:
    if array.dtype == np.bool_:
        return array
    values = np.unique(array)
    if not np.isin(values, (0, 1)).all():
        first_values = values[:10].tolist()
        raise CLIError(
            f"invalid --input {path}: 'obs_mask' has values {first_values}; expected bool or 0/1"
        )
    return array.astype(np.bool_)


def _as_batch(array: torch.Tensor) -> torch.Tensor:
    """Reshape ``(H, W)`` or ``(N, H, W)`` to ``(N, 1, H, W)``."""
    if array.dim() == 2:
        return array[None, None]
    if array.dim() == 3:
        return array[:, None]
    return array


def _broadcast_mask(obs_mask: torch.Tensor, images: torch.Tensor, source: Path) -> torch.Tensor:
    if obs_mask.shape == images.shape:
        return obs_mask
    if obs_mask.shape[0] == 1 and obs_mask.shape[1:] == images.shape[1:]:
        return obs_mask.expand_as(images).clone()
    raise CLIError(
        f"invalid mask from {source}: shape {tuple(obs_mask.shape)} does not match the "
        f"images' shape {tuple(images.shape)}"
    )


# --- shared helpers ----------------------------------------------------------------


def _configure_logging(verbosity: int) -> None:
    level = {1: logging.DEBUG, 0: logging.INFO, -1: logging.WARNING}.get(
        max(-2, min(1, verbosity)), logging.ERROR
    )
    logging.basicConfig(level=level, format=_LOG_FORMAT, datefmt="%H:%M:%S", stream=sys.stderr)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda requested, but no CUDA device is available; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise CLIError("--device mps requested, but MPS is not available; use --device cpu")
    return torch.device(name)


def _load_model(path_text: str, device: torch.device, *, use_ema: bool) -> MaskedDiffusionModel:
    path = Path(path_text)
    if not path.exists():
        raise CLIError(f"checkpoint not found: {path}")
    model = load_model(path, map_location=device, use_ema=use_ema)
    model.to(device)
    model.eval()
    logger.info("loaded %s on %s", path, device)
    return model


def _make_generator(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _require_suffix(path_text: str, suffix: str, option: str) -> Path:
    path = Path(path_text)
    if path.suffix.lower() != suffix:
        raise CLIError(f"invalid {option} {path}: expected a file name ending in {suffix}")
    return path


def _save_npz(path: Path, **arrays: npt.NDArray[Any]) -> None:
    """Write arrays to ``path`` atomically (temporary file, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        # A file object, because np.savez appends ".npz" to file names without it.
        with open(temporary, "xb") as stream:
            np.savez_compressed(stream, **arrays)  # type: ignore[arg-type]
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _json_ready(value: Any) -> Any:
    """Convert tensors, paths and non-finite floats so ``json.dumps`` emits valid JSON."""
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _positive_int(text: str) -> int:
    value = _parse_int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = _parse_int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected an integer >= 0")
    return value


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected an integer") from None


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a number >= 0")
    return value
