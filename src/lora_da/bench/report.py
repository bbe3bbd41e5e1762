"""The benchmark's report: report.md (tuned-lr tables, the lr sweep, failed runs), results.json, and the demo's
before/after table."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from lora_da.bench.config import BenchConfig, clean_rate
from lora_da.bench.plots import write_plots
from lora_da.bench.summary import rates_run, summarize, sweep_seeds_of
from lora_da.files import write_atomic, write_json

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"


def fmt(value: float | None, spec: str = ".4f", std: float | None = None) -> str:
    """A number formatted by `spec` ('1.2345', or '1.2345 ± 0.0100' with a std), or '-' when missing."""
    if value is None:
        return "-"
    return format(value, spec) + (f" ± {format(std, spec)}" if std is not None else "")


def read_results(path: str | os.PathLike) -> dict:
    """A results.json written by `write_outputs`, its records' rates rounded (see `clean_rate`: rates past a sweep
    were once stored unrounded)."""
    payload = json.loads(Path(path).read_text())
    payload["records"] = [{**record, "lr": clean_rate(record["lr"])} for record in payload.get("records", [])]
    return payload


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (a crash never leaves half a report)."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), suffix=Path(path).suffix)


def before_after_table(rows: Sequence[dict]) -> str:
    """A Markdown table: init seconds, eval loss before/after, exact match before/after per method."""
    lines = ["| method | init s | eval loss before | eval loss after | exact match before | exact match after |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        before, after = row["before"], row["after"]
        lines.append(
            f"| {row['method']} | {row['init_seconds']:.1f} | {before['eval_loss']:.4f} | "
            f"{after['eval_loss']:.4f} | {fmt(before.get('accuracy'), '.1%')} | "
            f"{fmt(after.get('accuracy'), '.1%')} |"
        )
    return "\n".join(lines)


def write_report(output_dir: Path, records: Sequence[dict], config: BenchConfig, plots: Sequence[str]) -> Path:
    """report.md: tuned-lr table per rank, the lr sweep, failed runs, and the plots."""
    rows = summarize(records, config)
    sweep = sweep_seeds_of(config)
    lines = [
        "# LoRA initialization benchmark",
        "",
        f"Model `{config.model}`, data `{config.data}`; {config.steps} steps of batch {config.batch_size}, "
        f"max length {config.max_length}, {config.schedule} schedule (warmup {config.warmup_ratio}), "
        f"lora_alpha {config.lora_alpha}, rsLoRA {config.use_rslora}, targets `{config.target_modules}`, "
        f"training regime `{config.regime}`; "
        f"{len(config.learning_rates)} learning rates; calibration {config.calibration_examples} train examples.",
        "",
        f"Protocol: each method's learning rate is chosen by the mean validation loss over seeds {sweep} "
        f"({config.num_val} held-out train examples)"
        + ("; where the best was the smallest or largest rate, one rate beyond it was run too" if config.extend_edges
           else "")
        + "; the other seeds run only at the chosen rate. Test metrics "
        f"({config.num_test} test examples; accuracy = exact match on the first {config.num_accuracy}) are "
        "mean ± std over all seeds at the chosen rate. Failed runs are listed, never dropped.",
        "",
    ]
    has_accuracy = any(r.get("accuracy") is not None for r in records)
    for rank in config.ranks:
        lines += [f"## Rank {rank}: each method at its tuned learning rate", ""]
        header = "| method | best lr | seeds ok | val loss | test loss | " + (
            "accuracy | " if has_accuracy else "") + "init s | peak RSS MiB | failed runs |"
        lines += [header, "|" + " --- |" * (header.count("|") - 1)]
        ranked = sorted((r for r in rows if r["rank"] == rank),
                        key=lambda r: (r.get("test_loss") is None, r.get("test_loss") or 0.0))
        for r in ranked:
            best = "-" if not r["best_lr"] else f"{r['best_lr']:g}" + (
                "" if r["lrs_tried"] == len(config.learning_rates)
                else f" ({r['lrs_tried']}/{len(config.learning_rates)} lrs run)")
            cells = [f"`{r['method']}`", best, str(r["seeds_ok"]),
                     fmt(r.get("val_loss"), std=r.get("val_loss_std")),
                     fmt(r.get("test_loss"), std=r.get("test_loss_std"))]
            if has_accuracy:
                cells.append(fmt(r.get("accuracy"), ".3f", r.get("accuracy_std")))
            cells += [fmt(r.get("init_seconds"), ".2f"), fmt(r.get("peak_rss_mb"), ".0f"),
                      f"{r['failed']}/{r['runs']}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Learning-rate sweep (mean validation loss over the sweep seeds; best in bold)", ""]
    rates = rates_run(records, config)
    header = "| method | rank | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |"
    lines += [header, "|" + " --- |" * (header.count("|") - 1)]
    for r in rows:
        sweep_values = r.get("lr_sweep") or {}
        cells = []
        for lr in rates:
            value = sweep_values.get(f"{lr:g}")
            text = fmt(value)
            cells.append(f"**{text}**" if r["best_lr"] == lr else text)
        lines.append(f"| `{r['method']}` | {r['rank']} | " + " | ".join(cells) + " |")
    lines.append("")
    failed = [r for r in records if r["status"] != "ok"]
    lines += ["## Failed or diverged runs", ""]
    if failed:
        lines += ["| run | status | error |", "| --- | --- | --- |"]
        for r in failed:
            error = (r.get("error") or "non-finite loss").replace("|", "\\|").replace("\n", " ")[:300]
            key = r["key"].replace("|", "\\|")  # GitHub tables split cells on bare pipes, even in code
            lines.append(f"| `{key}` | {r['status']} | {error} |")
    else:
        lines.append("None.")
    lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    path = Path(output_dir) / REPORT_FILE
    write_text(path, "\n".join(lines))
    return path



def write_outputs(output_dir: str | os.PathLike, records: Sequence[dict], config: BenchConfig,
                  plots: bool = True) -> None:
    """results.json (config, records, summary), the PNG plots and report.md of a set of run records."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / RESULTS_FILE, {"config": config.to_dict(), "records": list(records),
                                       "summary": summarize(records, config), "updated": time.time()}, indent=1)
    write_report(output, records, config, write_plots(output, records, config) if plots else [])
