"""Render benchmark results as markdown tables and matplotlib plots.

``render_markdown(results)`` returns the ``README.md`` text of a results folder and
``save_plots(results, folder)`` writes the PNG plots next to it. Both read the
dictionary that ``benchmarks/run.py`` writes to ``results.json``, so a report can be
rebuilt without rerunning the benchmark::

    python benchmarks/report.py benchmarks/results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["render_markdown", "save_plots"]

TARGET_FRACTION_OF_MATMUL = 0.5
TARGET_BOUND_NATS = 65.0
TARGET_TRAIN_SECONDS = 300.0
TARGET_TIME_SHARE = 0.2


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def _machine_section(results: dict[str, Any]) -> list[str]:
    machine = results["machine"]
    load_start = ", ".join(f"{x:.1f}" for x in machine["load_average"])
    load_end = ", ".join(f"{x:.1f}" for x in machine.get("load_average_end", []))
    lines = [
        "## Machine",
        "",
        f"- CPU: {machine['cpu_model']}, {machine['cpu_count']} cores, "
        f"{machine['torch_threads']} PyTorch threads",
        f"- Device: {machine['device']}" + (f" ({machine['gpu']})" if "gpu" in machine else ""),
        f"- PyTorch {machine['torch_version']}, Python {machine['python_version']}, "
        f"commit {machine.get('git_commit') or 'unknown'}",
        f"- Load average (1, 5, 15 min) at start: {load_start}; at end: {load_end}",
        f"- Command: `{machine['command']}`",
        f"- Total wall time: {results.get('total_wall_s', 0.0) / 60:.1f} min",
        "",
    ]
    if "matmul" in results:
        matmul = results["matmul"]
        lines += [
            f"Matrix multiply ({matmul['size']} x {matmul['size']}): "
            f"fp32 {matmul['fp32_gflops']:.1f} GFLOP/s, bf16 {matmul['bf16_gflops']:.1f} GFLOP/s.",
            "",
        ]
    return lines


def _training_section(results: dict[str, Any]) -> list[str]:
    records = results.get("training")
    if not records:
        return []
    lines = [
        "## Training throughput",
        "",
        "One optimizer step (loss, backward, gradient clipping, AdamW, EMA update) on "
        "bundled digits. `matmul` is the FLOP/s of a large matrix multiply of the same "
        "dtype measured in the same round; `share` is achieved / matmul FLOP/s. FLOPs "
        "count convolutions and matrix multiplies of one forward and backward pass "
        "(`FlopCounterMode`), so normalisation and activations add time but no FLOPs.",
        "",
    ]
    rows = []
    for r in records:
        if r.get("error"):
            rows.append(
                [
                    r["model"],
                    r["batch_size"],
                    r["precision"],
                    r["memory_format"],
                    r["compiled"],
                    "failed",
                    "-",
                    "-",
                    "-",
                    "-",
                ]
            )
            continue
        rows.append(
            [
                r["model"],
                r["batch_size"],
                r["precision"],
                r["memory_format"],
                r["compiled"],
                round(r["images_per_s"], 1),
                round(r["median_step_s"], 3),
                round(r["achieved_gflops"], 1),
                round(r["matmul_gflops"], 1),
                f"{100 * r['fraction_of_matmul']:.0f}%",
            ]
        )
    lines += _table(
        [
            "model",
            "batch",
            "precision",
            "layout",
            "compiled",
            "images/s",
            "step s",
            "GFLOP/s",
            "matmul GFLOP/s",
            "share",
        ],
        rows,
    )
    if "training_peak_memory_mb" in results:
        lines += [
            f"Peak memory after this section: {results['training_peak_memory_mb']:.0f} MiB "
            "(process maximum RSS on the CPU, allocated memory on CUDA).",
            "",
        ]
    return lines


def _ttq_section(results: dict[str, Any]) -> list[str]:
    ttq = results.get("time_to_quality")
    if not ttq:
        return []
    lines = [
        "## Time to quality (quickstart config)",
        "",
        f"Training with `Trainer` on the 4,500 bundled digits; elapsed time includes the "
        f"per-epoch validation. FDD: Frechet digit distance of {ttq['quality_samples']} "
        f"samples ({ttq['quality_sampler']}, {ttq['quality_steps']} steps, EMA weights) "
        f"against the 500 held-out digits (lower is better).",
        "",
    ]
    rows = [
        [
            p["epoch"],
            p["step"],
            round(p["elapsed_s"] or 0.0, 1),
            p.get("val_nll"),
            p.get("val_bits_per_dim"),
            p.get("frechet_digit_distance"),
        ]
        for p in ttq["points"]
    ]
    lines += _table(
        ["epoch", "step", "elapsed s", "held-out bound (nats)", "bits/dim", "FDD"], rows
    )
    return lines


def _sampling_section(results: dict[str, Any]) -> list[str]:
    records = results.get("sampling")
    if not records:
        return []
    counts = sorted({r["num_samples"] for r in records if r.get("timed")})
    lines = [
        "## Sampling",
        "",
        "Trained quickstart model (EMA weights). Wall time per batch of samples; NFE: "
        "network evaluations; FDD on the scored batch against the 500 held-out digits.",
        "",
    ]
    reference = results.get("sampling_reference")
    if reference:
        lines += [
            f"Reference: {reference['description']} score FDD "
            f"{reference['frechet_digit_distance']:.3g}.",
            "",
        ]
    by_key: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for r in records:
        by_key.setdefault((r["label"], r["precision"]), {})[r["num_samples"]] = r
    rows = []
    for (label, precision), per_count in by_key.items():
        scored = next((r for r in per_count.values() if "frechet_digit_distance" in r), {})
        any_record = next(iter(per_count.values()))
        row = [label, precision, any_record["num_function_evals"]]
        row += [round(per_count[c]["wall_s"], 2) if c in per_count else "-" for c in counts]
        row += [scored.get("frechet_digit_distance"), scored.get("mean_confidence")]
        rows.append(row)
    lines += _table(
        ["sampler", "precision", "NFE", *[f"s / {c} samples" for c in counts], "FDD", "confidence"],
        rows,
    )
    cache = results.get("cache")
    if cache:
        lines += [
            "Output cache of a time-agnostic network (`model.time_conditioning: false`, "
            "untrained, so only cost is shown): image evaluations are images passed "
            "through the network over all calls.",
            "",
        ]
        lines += _table(
            ["steps", "cache", "samples", "NFE", "image evaluations", "wall s"],
            [
                [
                    r["steps"],
                    r["cache"],
                    r["num_samples"],
                    r["num_function_evals"],
                    r["num_image_evals"],
                    round(r["wall_s"], 2),
                ]
                for r in cache
            ],
        )
    return lines


def _targets_section(results: dict[str, Any]) -> list[str]:
    lines = ["## Targets", ""]
    training = [r for r in results.get("training", []) if not r.get("error")]
    quick = [r for r in training if r["model"] == "quickstart"]
    if quick:
        best = max(quick, key=lambda r: r["fraction_of_matmul"])
        lines.append(
            f"- Quickstart training at >= {TARGET_FRACTION_OF_MATMUL:.0%} of matmul FLOP/s: "
            f"best {best['fraction_of_matmul']:.0%} (batch {best['batch_size']}, "
            f"{best['precision']}, {best['memory_format']})."
        )
    ttq = results.get("time_to_quality")
    if ttq and ttq["points"]:
        within = [
            p
            for p in ttq["points"]
            if p["elapsed_s"] is not None
            and p["elapsed_s"] <= TARGET_TRAIN_SECONDS
            and p.get("val_nll") is not None
        ]
        last = ttq["points"][-1]
        if within:
            best_bound = min(p["val_nll"] for p in within)
            text = f"best {best_bound:.1f} nats within {TARGET_TRAIN_SECONDS:.0f} s"
        else:
            text = "no epoch finished within the time"
        lines.append(
            f"- Held-out bound <= {TARGET_BOUND_NATS:.0f} nats after "
            f"{TARGET_TRAIN_SECONDS / 60:.0f} min of training: {text}; last epoch "
            f"{_fmt(last.get('val_nll'))} nats at {_fmt(last['elapsed_s'])} s."
        )
    sampling = [r for r in results.get("sampling", []) if "frechet_digit_distance" in r]
    baseline = next(
        (
            r
            for r in sampling
            if r["sampler"] == "ancestral" and r["steps"] == 100 and r["precision"] == "fp32"
        ),
        None,
    )
    if baseline:
        budget = TARGET_TIME_SHARE * baseline["wall_s"]
        fast = [r for r in sampling if r["wall_s"] <= budget]
        if fast:
            best = min(fast, key=lambda r: r["frechet_digit_distance"])
            lines.append(
                f"- Quality of 100-step ancestral (FDD {baseline['frechet_digit_distance']:.3g}, "
                f"{baseline['wall_s']:.1f} s) in a fifth of its time: best within "
                f"{budget:.1f} s is {best['label']} ({best['precision']}) with FDD "
                f"{best['frechet_digit_distance']:.3g} in {best['wall_s']:.1f} s."
            )
    return [*lines, ""]


def render_markdown(results: dict[str, Any]) -> str:
    """Return the markdown report of ``results``."""
    lines = ["# Benchmark results", ""]
    lines += _machine_section(results)
    lines += _targets_section(results)
    lines += _training_section(results)
    lines += _ttq_section(results)
    lines += _sampling_section(results)
    if results.get("profile"):
        lines += ["## Top operators by self CPU time", ""]
        for name, ops in results["profile"].items():
            lines += [f"{name}:", ""]
            lines += _table(
                ["op", "self %", "calls"],
                [[o["op"], round(o["self_cpu_percent"], 1), o["calls"]] for o in ops],
            )
    return "\n".join(lines)


def save_plots(results: dict[str, Any], folder: Path) -> list[Path]:
    """Write the PNG plots of ``results`` into ``folder``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sampling = [r for r in results.get("sampling", []) if "frechet_digit_distance" in r]
    if sampling:
        fig, ax = plt.subplots(figsize=(6, 4))
        for sampler in sorted({r["sampler"] for r in sampling}):
            points = sorted(
                (r["wall_s"], r["frechet_digit_distance"], r["label"])
                for r in sampling
                if r["sampler"] == sampler
            )
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=sampler)
        ax.set_xscale("log")
        ax.set_xlabel(f"wall time for {sampling[0]['num_samples']} samples (s)")
        ax.set_ylabel("Frechet digit distance (lower is better)")
        ax.legend()
        ax.grid(alpha=0.3)
        path = folder / "sampling_quality_vs_time.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    ttq = results.get("time_to_quality")
    if ttq and ttq["points"]:
        points = [p for p in ttq["points"] if p.get("elapsed_s") is not None]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(
            [p["elapsed_s"] for p in points],
            [p.get("val_nll") for p in points],
            marker="o",
            color="C0",
        )
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel("held-out bound (nats / image)", color="C0")
        fdd = [p for p in points if p.get("frechet_digit_distance") is not None]
        if fdd:
            twin = ax.twinx()
            twin.plot(
                [p["elapsed_s"] for p in fdd],
                [p["frechet_digit_distance"] for p in fdd],
                marker="s",
                color="C1",
            )
            twin.set_ylabel("Frechet digit distance", color="C1")
        ax.grid(alpha=0.3)
        path = folder / "time_to_quality.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    training = [r for r in results.get("training", []) if not r.get("error")]
    if training:
        fig, ax = plt.subplots(figsize=(7, 4))
        labels = [
            f"{r['model']} b{r['batch_size']}\n{r['precision']} "
            f"{'CL' if r['memory_format'] == 'channels_last' else 'NCHW'}"
            f"{' C' if r['compiled'] else ''}"
            for r in training
        ]
        ax.bar(range(len(training)), [r["images_per_s"] for r in training])
        ax.set_xticks(range(len(training)), labels, fontsize=6, rotation=90)
        ax.set_ylabel("training images / s")
        fig.tight_layout()
        path = folder / "training_throughput.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("benchmarks/results")
    data = json.loads((target / "results.json").read_text(encoding="utf-8"))
    (target / "README.md").write_text(render_markdown(data), encoding="utf-8")
    save_plots(data, target)
