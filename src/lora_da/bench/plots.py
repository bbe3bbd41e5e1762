"""The benchmark's plots (matplotlib, optional): validation curves, metric vs rank, init overhead, and the
demo's training curves."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from lora_da.bench.config import BenchConfig
from lora_da.bench.summary import mean_std, summarize


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib  # optional dependency: pip install 'lora-da[plots]'
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_curve(curves: Sequence[Sequence[Sequence[float]]]) -> tuple[list[float], list[float]]:
    """Average several [[step, value], ...] curves over the steps they share."""
    by_step: dict[float, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            if value is not None:
                by_step.setdefault(step, []).append(value)
    steps = sorted(s for s, v in by_step.items() if len(v) == len(curves))
    return steps, [statistics.fmean(by_step[s]) for s in steps]


def write_plots(output_dir: Path, records: Sequence[dict], config: BenchConfig) -> list[str]:
    """PNG plots: validation-loss curves at the best lr (per rank), final metric vs rank, init overhead."""
    plt = _pyplot()
    if plt is None:  # plots are optional
        return []
    rows = summarize(records, config)
    written = []
    for rank in config.ranks:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn = False
        for row in (r for r in rows if r["rank"] == rank and r["best_lr"] is not None):
            curves = [r["eval_curve"] for r in records if r["method"] == row["method"] and r["rank"] == rank
                      and r["lr"] == row["best_lr"] and r["status"] == "ok" and r.get("eval_curve")]
            steps, values = _mean_curve(curves)
            if steps:
                ax.plot(steps, values, marker="o", ms=3, label=f"{row['method']} (lr {row['best_lr']:g})")
                drawn = True
        if drawn:
            ax.set_yscale("log")  # the end of the curves, where methods differ, is otherwise flat
            ax.set(xlabel="optimizer step", ylabel="validation loss (log scale)",
                   title=f"Validation loss at each method's best lr (rank {rank}, mean over seeds)")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
            name = f"loss_curves_r{rank}.png"
            fig.tight_layout()
            fig.savefig(output_dir / name, dpi=110)
            written.append(name)
        plt.close(fig)

    metrics = [("test_loss", "test loss")] + (
        [("accuracy", "exact-match accuracy")] if any(r.get("accuracy") is not None for r in rows) else [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    for ax, (metric, label) in zip(axes[0], metrics, strict=True):
        for variant in config.methods:
            pts = [(r["rank"], r.get(metric), r.get(metric + "_std")) for r in rows
                   if r["method"] == variant and r.get(metric) is not None]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] or 0 for p in pts],
                            marker="o", capsize=3, label=variant)
        ax.set(xlabel="rank", ylabel=label, title=f"{label} at the tuned lr vs rank")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output_dir / "metric_vs_rank.png", dpi=110)
    plt.close(fig)
    written.append("metric_vs_rank.png")

    main_rank = max(config.ranks, key=lambda rank: sum(r["rank"] == rank for r in records))  # most methods
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(config.methods) + 1.5))
    means = []
    for variant in config.methods:
        mean, std = mean_std([r.get("init_seconds") for r in records if r["method"] == variant
                               and r["status"] == "ok" and r["rank"] == main_rank])
        means.append((variant, mean or 0.0, std or 0.0))
    ax.barh([m[0] for m in means], [m[1] for m in means], xerr=[m[2] for m in means], color="tab:blue")
    ax.set(xlabel="initialization seconds (mean over runs)", title=f"Init overhead (rank {main_rank})")
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(output_dir / "init_overhead.png", dpi=110)
    plt.close(fig)
    written.append("init_overhead.png")
    return written




def plot_training_curves(runs: Sequence[dict], path: Path, title: str) -> bool:
    """PNG of training loss (lines) and eval loss (markers, from step 0) per run against the step.

    Each run is {"method", "history": [{step, loss[, eval_loss]}], "before": {"eval_loss"}}; returns False
    when matplotlib is missing.
    """
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, run in enumerate(runs):
        color = f"C{i}"
        ax.plot([h["step"] for h in run["history"]], [h["loss"] for h in run["history"]], color=color, alpha=0.8,
                label=f"{run['method']} train")
        evals = [(0, run["before"]["eval_loss"])] + [
            (h["step"], h["eval_loss"]) for h in run["history"] if "eval_loss" in h
        ]
        ax.plot(*zip(*evals, strict=True), color=color, marker="o", linestyle="--", label=f"{run['method']} eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
