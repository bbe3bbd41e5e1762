"""`lora-da demo`: compare initializations with the same budget; write report.md, results.json and a PNG."""

from __future__ import annotations

import copy
import gc
import json
import platform
import resource
import shlex
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch


def _status(message: str) -> None:
    """Progress line on stderr."""
    print(f"[lora-da] {message}", file=sys.stderr, flush=True)


def _fmt(value, spec: str) -> str:
    """Format a number, or '-' when missing."""
    return "-" if value is None else format(value, spec)


def results_table(rows: list[dict]) -> str:
    """A Markdown table: init seconds, eval loss before/after, exact match before/after per method."""
    header = ("| method | init s | eval loss before | eval loss after | exact match before | exact match after |\n"
              "| --- | ---: | ---: | ---: | ---: | ---: |")
    lines = [header]
    for row in rows:
        before, after = row["before"], row["after"]
        lines.append(
            f"| {row['method']} | {row['init_seconds']:.1f} | {before['eval_loss']:.4f} | "
            f"{after['eval_loss']:.4f} | {_fmt(before.get('accuracy'), '.1%')} | "
            f"{_fmt(after.get('accuracy'), '.1%')} |"
        )
    return "\n".join(lines)


def plot_loss_curves(rows: list[dict], path: Path, title: str) -> None:
    """PNG of training loss (lines) and eval loss (markers) per method against the step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the demo plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, row in enumerate(rows):
        color = f"C{i}"
        steps = [h["step"] for h in row["history"]]
        ax.plot(steps, [h["loss"] for h in row["history"]], color=color, alpha=0.8,
                label=f"{row['method']} train")
        evals = [(0, row["before"]["eval_loss"])] + [
            (h["step"], h["eval_loss"]) for h in row["history"] if "eval_loss" in h
        ]
        ax.plot(*zip(*evals, strict=True), color=color, marker="o", linestyle="--", label=f"{row['method']} eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _report(args: Namespace, rows: list[dict], setup: dict, seconds: float) -> str:
    """report.md text."""
    lines = [
        "# lora-da demo",
        "",
        f"Model `{args.model}`, data `{args.data}` ({setup['num_train']} training examples), evaluation on "
        f"`{setup['eval_data']}` ({setup['num_eval']} examples for the loss, {setup['num_generate']} for exact "
        "match by greedy generation).",
        f"Same budget for every method: rank {args.rank}, lora_alpha {args.lora_alpha:g}, "
        f"rsLoRA {'on' if args.rslora else 'off'}, target modules {args.target_modules}, {args.steps} steps of "
        f"batch {args.batch_size} x {args.grad_accum}, lr {args.lr:g} ({args.schedule}, warmup "
        f"{args.warmup_ratio:g}), max length {args.max_length}, seed {args.seed}; data-aware methods use "
        f"{setup['num_calibration']} calibration examples.",
        "",
        results_table(rows),
        "",
        "'before' is the adapted model right after initialization (for LoRA it equals the base model, "
        "since B = 0); 'after' is after fine-tuning. 'init s' is the initialization wall time "
        "(calibration statistics and solve for data-aware methods).",
        "",
        "![loss curves](loss_curves.png)",
        "",
        f"Total time {seconds:.0f} s ({setup['cpu_seconds']:.0f} CPU seconds) on {setup['device']} "
        f"({platform.processor() or platform.machine()}, torch threads: {torch.get_num_threads()}). "
        "A single seed and a short run: differences of a few "
        "hundredths in loss or a few examples in accuracy are within noise; see `lora-da bench` for "
        "seeds and tuned learning rates.",
        "",
        "Command:",
        "",
        "```",
        setup["command"],
        "```",
        "",
    ]
    return "\n".join(lines)


def run_demo(args: Namespace) -> dict:
    """Run the comparison described by the demo flags; returns results with a 'table' string."""
    from .cli import _adapt, _check_positive, _default_num_train, _eval_examples, _evaluate, _load, _train_config
    from .data import encode_examples, load_examples
    from .methods import normalize_method
    from .train import train

    _check_positive(args, "rank", "batch_size", "num_calibration", "max_length", "num_train", "num_eval", "steps")
    methods = [normalize_method(m) for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ValueError("--methods is empty; pass e.g. lora,lora_da")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    examples = load_examples(args.data, "train", _default_num_train(args), args.data_seed)
    eval_examples = _eval_examples(args)
    if eval_examples is None:
        raise ValueError("--eval-data is required when --data is not a built-in task")
    base, tokenizer = _load(args)
    features = encode_examples(examples, tokenizer, args.max_length)
    eval_features = encode_examples(eval_examples, tokenizer, args.max_length)
    rows = []
    for method in methods:
        _status(f"=== {method} ===")
        model, info = _adapt(copy.deepcopy(base), tokenizer, features, method, args, len(features))
        _status(f"{method}: initialized in {info.init_seconds:.1f} s; evaluating before training")
        before = _evaluate(model, tokenizer, eval_features, eval_examples, args)
        config = _train_config(args, output / f"train_log_{method}.jsonl")
        started = time.perf_counter()
        history = train(model, features, config, tokenizer.pad_token_id, eval_features)
        train_seconds = time.perf_counter() - started
        _status(f"{method}: evaluating after training")
        after = _evaluate(model, tokenizer, eval_features, eval_examples, args, history[-1]["eval_loss"])
        rows.append({"method": method, "init_seconds": info.init_seconds, "before": before, "after": after,
                     "train_seconds": train_seconds, "history": history, "init_report": info.report})
        del model
        gc.collect()
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    setup = {
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "num_train": len(features), "eval_data": args.eval_data or f"{args.data.partition(':')[0]}:test",
        "num_eval": len(eval_features), "num_generate": min(args.num_generate, len(eval_examples)),
        "num_calibration": min(args.num_calibration, len(features)), "device": str(next(base.parameters()).device),
        "command": "lora-da " + shlex.join(getattr(args, "argv", None) or ["demo"]),
    }
    table = results_table(rows)
    plot_loss_curves(rows, output / "loss_curves.png", f"{args.model} on {args.data}: " + " vs ".join(methods))
    (output / "report.md").write_text(_report(args, rows, setup, seconds), encoding="utf-8")
    flags = {k: v for k, v in vars(args).items() if k not in ("func", "argv")}
    payload = {"args": flags, "setup": setup, "seconds": seconds, "runs": rows}
    (output / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return {"table": table, "rows": rows, "seconds": seconds}

