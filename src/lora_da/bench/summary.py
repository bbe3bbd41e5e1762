"""From run records to results: each method's learning rate, and its metrics as mean +- std over seeds."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from lora_da.bench.config import BenchConfig


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std (0 for a single value) of the non-None values; (None, None) when empty."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def sweep_seeds_of(config: BenchConfig) -> list[int]:
    """Seeds run at every learning rate (the rest only at the chosen rate)."""
    return list(config.seeds[: config.sweep_seeds or len(config.seeds)])


def rates_run(records: Sequence[dict], config: BenchConfig) -> list[float]:
    """The sweep's rates: `config.learning_rates` and those beyond its ends (`BenchConfig.extend_edges`) that
    some record ran."""
    ends = (min(config.learning_rates), max(config.learning_rates))
    beyond = {config.rate_beyond(lr) for lr in ends} & {r["lr"] for r in records}
    return sorted(set(config.learning_rates) | beyond)


def select_learning_rate(records: Sequence[dict], variant: str, rank: int, config: BenchConfig) -> dict | None:
    """Best lr of (variant, rank): lowest mean validation loss over the sweep seeds; ties go to the smaller lr.
    Rates beyond the grid's (`BenchConfig.extend_edges`) compete where they ran.

    Returns {"lr", "val_loss", "by_lr": {lr: mean val loss or None}} or None when no run succeeded.
    """
    sweep = set(sweep_seeds_of(config))
    by_lr: dict[float, float | None] = {}
    cell = [r for r in records if r["method"] == variant and r["rank"] == rank]
    for lr in rates_run(cell, config):
        vals = [r["val_loss"] for r in cell
                if r["lr"] == lr and r["seed"] in sweep and r["status"] == "ok" and r["val_loss"] is not None]
        by_lr[lr] = statistics.fmean(vals) if vals else None
    scored = [(v, lr) for lr, v in by_lr.items() if v is not None]
    if not scored:
        return None
    best_val, best_lr = min(scored)
    return {"lr": best_lr, "val_loss": best_val, "by_lr": {f"{lr:g}": v for lr, v in by_lr.items()}}


def summarize(records: Sequence[dict], config: BenchConfig) -> list[dict]:
    """One row per (variant, rank): chosen lr and test metrics at it (mean +- std over seeds)."""
    rows = []
    sweep = set(sweep_seeds_of(config))
    for rank in config.ranks:
        for variant in config.methods:
            choice = select_learning_rate(records, variant, rank, config)
            row: dict[str, Any] = {"method": variant, "rank": rank, "best_lr": None, "seeds_ok": 0}
            cell = [r for r in records if r["method"] == variant and r["rank"] == rank]
            if not cell:  # e.g. a rank sweep that covers only some methods
                continue
            row["runs"] = len(cell)
            row["failed"] = sum(r["status"] != "ok" for r in cell)
            if choice is not None:
                at_best = [r for r in cell if r["lr"] == choice["lr"] and r["status"] == "ok"]
                swept = {r["lr"] for r in cell if r["seed"] in sweep}
                row.update(best_lr=choice["lr"], seeds_ok=len(at_best), lr_sweep=choice["by_lr"],
                           lrs_tried=len(swept & set(config.learning_rates)))
                for metric in ("val_loss", "test_loss", "accuracy", "init_seconds", "peak_rss_mb"):
                    mean, std = mean_std([r.get(metric) for r in at_best])
                    row[metric] = mean
                    row[metric + "_std"] = std
            rows.append(row)
    return rows
