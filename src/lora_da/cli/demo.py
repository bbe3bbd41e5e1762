"""`lora-da demo`: a one-seed, one-lr run of the bench runner over a few methods with the same budget.

Checks its optional dependencies before any work, prints a progress line per phase, and rewrites report.md,
results.json and loss_curves.png after every method, so a late failure never loses the finished runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import resource
import shlex
import time
from pathlib import Path

import torch

from lora_da.bench import BenchConfig, BenchTask, Variant, before_after_table, plot_training_curves, run_cell
from lora_da.bench.report import write_text
from lora_da.cli.common import eval_data_spec, eval_examples, load_model, method_options, one_epoch, status
from lora_da.cli.common import target_modules as parse_targets
from lora_da.data import encode_examples, load_examples
from lora_da.files import write_json
from lora_da.layers import model_device
from lora_da.methods import normalize_method
from lora_da.models import missing_model_packages

DEMO_OUTPUT = "./lora-da-demo"
DEMO_METHODS = "lora,lora_da"
#: The demo's budget where it differs from a single `lora-da train` run.
DEMO_DEFAULTS = dict(max_length=192, num_calibration=32, steps=12, lr=1e-3, eval_every=6, num_eval=32,
                     num_generate=16, max_new_tokens=80)
#: Printed beside the demo's table, so that a one-seed run is read against what the full benchmark measured.
BENCHMARK_VERDICT = (
    "What the benchmark measured (SmolLM2-135M, two tasks, each method at its tuned learning rate, 3 seeds): "
    "with standard training a LoRA-DA start ties LoRA; under LoRA+ it is ahead by small margins; with A frozen "
    "it is behind. This demo is one seed and one short run, so either method may come out ahead here. "
    "The numbers and the protocol: docs/benchmarks.md."
)


def missing_dependencies(model: str) -> list[str]:
    """pip install commands for the demo's optional packages that are missing (plot, default model)."""
    missing = [] if importlib.util.find_spec("matplotlib") else ["pip install matplotlib"]
    return missing + missing_model_packages(model)


def demo_config(args: argparse.Namespace, methods: list[str], num_train: int, num_eval: int) -> BenchConfig:
    """The demo as a one-seed, one-lr bench whose validation and test set are the evaluation examples."""
    return BenchConfig(
        model=args.model, data=args.data, methods=methods, ranks=[args.rank], seeds=[args.seed],
        learning_rates=[args.lr], steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_length=args.max_length, num_train=num_train, num_val=num_eval, num_test=num_eval,
        num_accuracy=args.num_generate, max_new_tokens=args.max_new_tokens, eval_every=args.eval_every,
        calibration_examples=args.num_calibration, calibration_batch_size=args.batch_size,
        lora_alpha=args.lora_alpha, use_rslora=args.rslora, target_modules=parse_targets(args.target_modules),
        warmup_ratio=args.warmup_ratio, schedule=args.schedule, dtype=args.dtype, data_seed=args.data_seed,
        eval_batch_size=args.batch_size, generate_batch_size=max(args.batch_size, 16), detailed_records=True,
        regime=args.regime,
    )


def demo_row(record: dict) -> dict:
    """A finished bench record as a row of the demo's table and results.json."""
    return {"method": record["method"], "init_seconds": record["init_seconds"], "before": record["before"],
            "after": record["after"], "train_seconds": record["train_seconds"], "history": record["history"],
            "init_report": record["init_report"]}


def _report(args: argparse.Namespace, rows: list[dict], setup: dict, seconds: float) -> str:
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
        before_after_table(rows),
        "",
        BENCHMARK_VERDICT,
        "",
        "'before' is the adapted model right after initialization (for LoRA it equals the base model, "
        "since B = 0); 'after' is after fine-tuning. 'init s' is the initialization wall time "
        "(calibration statistics and solve for data-aware methods).",
        "",
        "![loss curves](loss_curves.png)",
        "",
        f"Total time {seconds:.0f} s ({setup['cpu_seconds']:.0f} CPU seconds) on {setup['device']} "
        f"({platform.processor() or platform.machine()}, torch threads: {torch.get_num_threads()}). "
        "Differences of a few hundredths in loss or a few examples in accuracy are within one seed's noise; "
        "`lora-da bench` runs seeds and tuned learning rates on your data.",
        "",
        "Command:",
        "",
        "```",
        setup["command"],
        "```",
        "",
    ]
    return "\n".join(lines)


def _write_files(args: argparse.Namespace, output: Path, rows: list[dict], setup: dict, start: float,
                 methods: list[str]) -> None:
    """Rewrite results.json, loss_curves.png and report.md with the methods finished so far."""
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    setup["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    flags = {k: v for k, v in vars(args).items() if k not in ("func", "argv")}
    write_json(output / "results.json", {"args": flags, "setup": setup, "seconds": seconds, "runs": rows})
    plot_training_curves(rows, output / "loss_curves.png", f"{args.model} on {args.data}: " + " vs ".join(methods))
    write_text(output / "report.md", _report(args, rows, setup, seconds))


def run_demo(args: argparse.Namespace) -> dict:
    """Run the comparison described by the demo flags; returns results with a 'table' string."""
    methods = [normalize_method(m) for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ValueError("--methods is empty; pass e.g. lora,lora_da")
    missing = missing_dependencies(args.model)
    if missing:
        raise ImportError(f"the demo needs: {' && '.join(missing)}")
    start = time.perf_counter()
    examples = load_examples(args.data, "train", one_epoch(args), args.data_seed)
    held_out = eval_examples(args)
    if held_out is None:
        raise ValueError("--eval-data is required when --data is not a built-in task")
    base, tokenizer = load_model(args)
    status("encoding data", start)
    features = encode_examples(examples, tokenizer, args.max_length)
    eval_features = encode_examples(held_out, tokenizer, args.max_length)
    config = demo_config(args, methods, len(features), len(eval_features))
    task = BenchTask(features, eval_features, eval_features, list(held_out), qa=any(ex.is_qa for ex in held_out))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    setup = {
        "num_train": len(features), "eval_data": eval_data_spec(args), "num_eval": len(eval_features),
        "num_generate": min(args.num_generate, len(held_out)),
        "num_calibration": min(args.num_calibration, len(features)), "device": str(model_device(base)),
        "command": "lora-da " + shlex.join(getattr(args, "argv", None) or ["demo"]),
    }
    rows = []
    for method in methods:
        variant = Variant(method, method, method_options(args, method))
        record = run_cell(base, tokenizer, task, config, variant, args.rank, args.lr, args.seed,
                          progress=lambda line, method=method: status(f"{method}: {line}", start))
        if record["status"] == "failed":
            _write_files(args, output, rows, setup, start, methods)
            raise ValueError(f"{method} failed: {record['error']}")
        rows.append(demo_row(record))
        _write_files(args, output, rows, setup, start, methods)
        status(f"{method}: done; wrote {output}/report.md, results.json, loss_curves.png", start)
    return {"table": before_after_table(rows), "rows": rows, "seconds": time.perf_counter() - start}


def cmd_demo(args: argparse.Namespace) -> int:
    """`lora-da demo`: LoRA vs LoRA-DA with the same budget; table, report.md, results.json, PNG."""
    start = time.perf_counter()
    results = run_demo(args)
    print(results["table"])
    print(f"\n{BENCHMARK_VERDICT}")
    print(f"\nwrote {args.output}/report.md, results.json, loss_curves.png "
          f"({time.perf_counter() - start:.0f} s in all)")
    return 0
