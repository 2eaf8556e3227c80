"""Train from incomplete data at several missing fractions and compare the models.

For each ``p_missing`` (default 0, 0.5, 0.75 and 0.9) the script trains the
quickstart configuration on ``mnist-sample`` with that fraction of every training
image missing, under one compute budget: the same number of optimizer steps, batch
size and network for every run. It then reports, per run:

- the clean held-out bound on ``-log p(x)`` in nats per image (``nll`` over the 500
  fully observed held-out digits, ``--nll-samples`` Monte Carlo draws each);
- the completion accuracy on held-out digits corrupted with the same ``p_missing``
  (for ``p_missing = 0``, with 50 % missing): the share of missing pixels that the
  argmax completion and one sampled completion get right, next to the accuracy of
  always predicting 0 (background), the majority value;
- a grid of 64 samples and a grid of completions.

Outputs: ``OUTPUT/results.json``, ``OUTPUT/results.md`` (a markdown table) and
``OUTPUT/p*/samples.png``, ``OUTPUT/p*/completions.png``.

Usage::

    python scripts/ambient_experiment.py --output docs/_static/ambient --epochs 20
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from masked_diffusion import Trainer, load_config, load_dataset, load_model
from masked_diffusion.images import save_comparison_grid, save_image_grid

logger = logging.getLogger("ambient_experiment")

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        default=str(REPO / "configs" / "quickstart.yaml"),
        help="base experiment config (default: configs/quickstart.yaml)",
    )
    parser.add_argument(
        "--p-missing",
        type=float,
        nargs="+",
        default=[0.0, 0.5, 0.75, 0.9],
        help="missing fractions to train at (default: 0 0.5 0.75 0.9)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs per run (default: the config's trainer.epochs)",
    )
    parser.add_argument(
        "--output",
        default="runs/ambient_experiment",
        help="folder for the runs, the table and the grids",
    )
    parser.add_argument(
        "--nll-samples",
        type=int,
        default=4,
        help="Monte Carlo draws per image for the clean bound (default: 4)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=100,
        help="ancestral sampler steps for samples and completions (default: 100)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="extra config override, repeatable",
    )
    return parser.parse_args()


def completion_accuracy(model: Any, p_missing: float, steps: int) -> dict[str, float]:
    """Complete held-out digits with ``p_missing`` of their pixels missing."""
    heldout = load_dataset("mnist-sample", "heldout", p_missing=p_missing, mask_seed=1234)
    x0, obs_mask = heldout.images, heldout.obs_mask
    missing = ~obs_mask
    generator = torch.Generator().manual_seed(0)
    argmax = model.impute(x0, obs_mask, temperature=0.0, steps=steps, generator=generator)[:, 0]
    sampled = model.impute(x0, obs_mask, steps=steps, generator=generator)[:, 0]
    total = missing.sum().item()
    return {
        "completion_p_missing": p_missing,
        "argmax_accuracy": (argmax == x0)[missing].sum().item() / total,
        "sampled_accuracy": (sampled == x0)[missing].sum().item() / total,
        "background_accuracy": (x0 == 0)[missing].sum().item() / total,
    }


def run_one(args: argparse.Namespace, p_missing: float, output: Path) -> dict[str, Any]:
    run_dir = output / f"p{p_missing:g}"
    overrides = [
        f"data.p_missing={p_missing}",
        f"trainer.output_dir={run_dir / 'run'}",
        "trainer.progress_bar=false",
        *args.overrides,
    ]
    if args.epochs is not None:
        overrides.append(f"trainer.epochs={args.epochs}")
    config = load_config(args.config, overrides)

    start = time.perf_counter()
    trainer = Trainer.from_config(config)
    final = trainer.fit()
    train_seconds = time.perf_counter() - start

    # best.pt (else last.pt) of the run, with EMA weights when the config has them.
    model = load_model(run_dir / "run")

    clean = load_dataset("mnist-sample", "heldout")
    estimate = model.nll(
        clean.images, num_samples=args.nll_samples, generator=torch.Generator().manual_seed(0)
    )
    nats = estimate.nats
    completion = completion_accuracy(model, p_missing if p_missing > 0 else 0.5, args.steps)

    generator = torch.Generator().manual_seed(0)
    samples = model.sample(64, steps=args.steps, generator=generator)
    save_image_grid(samples, run_dir / "samples.png", nrow=8)
    corrupted = load_dataset(
        "mnist-sample", "heldout", p_missing=completion["completion_p_missing"], mask_seed=1234
    )
    x0, obs_mask = corrupted.images[:16], corrupted.obs_mask[:16]
    completed = model.impute(
        x0, obs_mask, num_completions=1, steps=args.steps, generator=generator
    )[:, 0]
    save_comparison_grid([x0, torch.where(obs_mask, x0, 2), completed], run_dir / "completions.png")

    return {
        "p_missing": p_missing,
        "clean_nll_nats": nats.mean().item(),
        "clean_nll_stderr": (nats.std() / len(nats) ** 0.5).item(),
        "clean_bits_per_dim": estimate.bits_per_dim.mean().item(),
        **completion,
        "train_seconds": train_seconds,
        "final_metrics": final,
    }


def write_table(results: list[dict[str, Any]], output: Path, command: str) -> None:
    lines = [
        "| p_missing | clean held-out bound (nats) | bits/dim | completion p_missing | "
        "argmax acc. | sampled acc. | background acc. | train time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        lines.append(
            f"| {row['p_missing']:g} | {row['clean_nll_nats']:.1f} ± {row['clean_nll_stderr']:.1f} "
            f"| {row['clean_bits_per_dim']:.4f} | {row['completion_p_missing']:g} "
            f"| {row['argmax_accuracy']:.3f} | {row['sampled_accuracy']:.3f} "
            f"| {row['background_accuracy']:.3f} | {row['train_seconds']:.0f} |"
        )
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    lines += ["", f"Command: `{command}`", f"Machine: {machine}, torch {torch.__version__}."]
    (output / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    results = []
    for p_missing in args.p_missing:
        logger.info("training with p_missing=%g", p_missing)
        results.append(run_one(args, p_missing, output))
        (output / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    write_table(results, output, "python " + " ".join(sys.argv))
    print((output / "results.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
