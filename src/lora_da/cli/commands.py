"""The commands of `lora-da` (init, stats, train, eval, bench, methods): each builds its step settings once,
then runs the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

from peft import LoraConfig, get_peft_model

from lora_da import LoraDAConfig, compute_and_save_statistics, init_distributed_from_env, initialize_lora_da
from lora_da.bench import BenchConfig, run_bench
from lora_da.cli.common import (
    check_model_args,
    eval_config,
    eval_examples,
    init_config,
    load_model,
    one_epoch,
    status,
    target_modules,
    train_config,
)
from lora_da.cli.output import check_output_folder, staged_output
from lora_da.data import LazyFeatures, calibration_batches, encode_examples, is_builtin, load_examples
from lora_da.distributed import barrier, is_main_process
from lora_da.evaluate import evaluate_model
from lora_da.files import write_json
from lora_da.methods import METHODS, InitInfo, adapt_model, check_adapter_fits, save_adapter
from lora_da.models import check_adapter_folder, load_adapter
from lora_da.train import train


def _write_adapter(folder: Path, model, info: InitInfo, tokenizer, args: argparse.Namespace) -> None:
    """Write the adapter (or, for `full`, the model with its tokenizer) and init_report.json into `folder`."""
    save_adapter(model, info, folder)
    if info.method == "full":
        tokenizer.save_pretrained(folder)  # a full model folder is used as --model, so it needs its tokenizer
    report = {"method": info.method, "init_seconds": info.init_seconds, "modifies_base": info.modifies_base,
              "rank": args.rank, "lora_alpha": args.lora_alpha, "use_rslora": args.rslora,
              "target_modules": args.target_modules, "model": args.model, "data": args.data,
              "seed": args.seed, "report": info.report}
    write_json(folder / "init_report.json", report)


def _save_initialized(model, info: InitInfo, tokenizer, output: Path, args: argparse.Namespace) -> None:
    """Save the initialized adapter folder (under torchrun: rank 0 writes, the others wait)."""
    if is_main_process():
        with staged_output(output, args.overwrite) as folder:
            _write_adapter(folder, model, info, tokenizer, args)
    barrier()


def _adapt(base, tokenizer, features, init) -> tuple:
    """adapt_model with a progress line about the calibration data."""
    if init.needs_calibration:
        status(f"calibration: {init.calibration_size(len(features))} examples for {init.method}")
    return adapt_model(base, features, init, tokenizer.pad_token_id)


def _load_checked_model(args: argparse.Namespace, init):
    """(model, tokenizer), refused before any data is encoded when the adapter does not fit the model."""
    base, tokenizer = load_model(args)
    check_adapter_fits(base, init.method, init.rank, init.target_modules)
    return base, tokenizer


def cmd_init(args: argparse.Namespace) -> int:
    """`lora-da init`: initialize an adapter and save it."""
    init = init_config(args)
    check_model_args(args)
    output = check_output_folder(args.output, args.overwrite)
    init_distributed_from_env()  # under torchrun every rank gathers statistics, rank 0 saves
    if args.stats is not None:
        return _init_from_statistics(args, init, output)
    if args.data is None:
        raise ValueError("--data is required (or --stats FILE from `lora-da stats`)")
    examples = load_examples(args.data, "train", args.num_train, args.data_seed)
    base, tokenizer = _load_checked_model(args, init)
    # encoded on demand: a data-aware method encodes only the calibration examples it draws
    features = LazyFeatures(examples, tokenizer, args.max_length)
    model, info = _adapt(base, tokenizer, features, init)
    _save_initialized(model, info, tokenizer, output, args)
    print(f"{info.method}: initialized rank {args.rank} in {info.init_seconds:.2f} s; saved to {args.output}")
    _print_coverage(info)
    return 0


def _print_coverage(info: InitInfo) -> None:
    """LoRA-DA's line on how many adapted weights got its factors (and which kept PEFT's default init)."""
    if isinstance(info.report, dict) and "coverage" in info.report:
        print(info.report["coverage"])


def _init_from_statistics(args: argparse.Namespace, init, output: Path) -> int:
    """`lora-da init --stats FILE`: LoRA-DA factors solved from saved statistics, no model pass."""
    if init.method != "lora_da":
        raise ValueError("--stats works with --method lora_da only")
    if not Path(args.stats).is_file():
        raise FileNotFoundError(f"statistics file not found: {args.stats}")
    if args.population_size is None and args.variance_weight != 0:
        raise ValueError("--population-size is required with --stats (the size of your fine-tuning set)")
    base, tokenizer = _load_checked_model(args, init)
    model = get_peft_model(base, LoraConfig(r=init.rank, lora_alpha=init.lora_alpha, use_rslora=init.use_rslora,
                                            target_modules=init.target_modules, lora_dropout=0.0))
    start = time.perf_counter()
    report = initialize_lora_da(model, None, init.method_options(args.population_size), statistics=args.stats)
    info = InitInfo("lora_da", time.perf_counter() - start, False, report.to_dict())
    _save_initialized(model, info, tokenizer, output, args)
    print(f"lora_da: solved rank {args.rank} from {args.stats} in {info.init_seconds:.2f} s; saved to {args.output}")
    _print_coverage(info)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """`lora-da stats`: gather and save LoRA-DA statistics."""
    config = LoraDAConfig(variance_weight=0.0, token_mask=args.token_mask)
    check_model_args(args)
    if args.num_calibration < 1:
        raise ValueError(f"--num-calibration must be >= 1, got {args.num_calibration}")
    init_distributed_from_env()
    examples = load_examples(args.data, "train", args.num_train, args.data_seed)
    base, tokenizer = load_model(args)
    features = LazyFeatures(examples, tokenizer, args.max_length)  # only the drawn examples are encoded
    batches = calibration_batches(features, args.num_calibration, args.batch_size, tokenizer.pad_token_id,
                                  args.seed)
    stats = compute_and_save_statistics(base, batches, args.output, config,
                                        target_modules=target_modules(args.target_modules), model_name=args.model,
                                        shard=True)
    if is_main_process():
        print(f"statistics of {len(stats.layer_names)} layers from {stats.num_examples} examples "
              f"({stats.num_tokens} tokens) saved to {args.output}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """`lora-da bench`: run (or resume) a comparison grid; status 1 when every run failed."""

    def numbers(text: str, kind):
        return [kind(v) for v in text.split(",") if v.strip()]

    config = BenchConfig(model=args.model, data=args.data, methods=args.methods.split(),
                         ranks=numbers(args.ranks, int), seeds=numbers(args.seeds, int),
                         learning_rates=numbers(args.lrs, float), sweep_seeds=args.sweep_seeds, steps=args.steps,
                         batch_size=args.batch_size, max_length=args.max_length, regime=args.regime,
                         extend_edges=args.extend_edges)
    records = run_bench(args.output, config, retry_failed=args.retry_failed,
                        statistics_cache=args.statistics_cache)
    bad = [r for r in records if r["status"] != "ok"]
    if records and len(bad) == len(records):
        raise ValueError(f"no run of the grid finished ({len(bad)} failed or diverged; first: {bad[0]['key']}: "
                         f"{bad[0]['error']}); see {args.output}/report.md")
    failed = [r for r in bad if r["status"] == "failed"]
    if failed:
        status(f"{len(failed)} of {len(records)} runs failed (listed in {args.output}/report.md); "
               "rerun with --retry-failed to try them again")
    print(f"results in {args.output}/results.json and {args.output}/report.md")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """`lora-da train`: initialize, fine-tune, evaluate, save (see `cli.output`: all or nothing)."""
    init = init_config(args)
    check_model_args(args)
    output = check_output_folder(args.output, args.overwrite)
    config = train_config(args)
    evaluation = eval_config(args)
    examples = load_examples(args.data, "train", one_epoch(args) if is_builtin(args.data) else args.num_train,
                             args.data_seed)
    held_out = eval_examples(args)
    base, tokenizer = _load_checked_model(args, init)
    features = encode_examples(examples, tokenizer, args.max_length)
    eval_features = encode_examples(held_out, tokenizer, args.max_length) if held_out else None
    model, info = _adapt(base, tokenizer, features, init)
    status(f"{init.method}: initialized in {info.init_seconds:.2f} s; training {config.steps} steps")
    with staged_output(output, args.overwrite) as folder:
        config = dataclasses.replace(config, log_path=str(folder / "train_log.jsonl"))
        history = train(model, features, config, tokenizer.pad_token_id, eval_features)
        metrics = {}
        if eval_features:
            metrics = evaluate_model(model, tokenizer, eval_features, held_out, evaluation,
                                     history[-1]["eval_loss"])
        _write_adapter(folder, model, info, tokenizer, args)
        summary = {"method": init.method, "init_options": init.options, "regime": config.regime,
                   "init_seconds": info.init_seconds, "train_config": config.to_dict(),
                   "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"], **metrics}
        write_json(folder / "results.json", summary)
    regime = "" if config.regime == "standard" else f" ({config.regime})"
    line = f"{init.method}{regime}: train loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}"
    if metrics:
        line += f"; eval loss {metrics['eval_loss']:.4f} (ppl {metrics['perplexity']:.2f})"
    if "accuracy" in metrics:
        line += f"; exact match {metrics['accuracy']:.1%}"
    print(line + f"; saved to {output}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """`lora-da eval`: loss, perplexity and exact-match accuracy."""
    evaluation = eval_config(args)
    check_model_args(args)
    if args.adapter is not None:
        check_adapter_folder(args.adapter)
    examples = load_examples(args.data, "test", args.num_eval, args.data_seed)
    model, tokenizer = load_model(args)
    if args.adapter is not None:
        model = load_adapter(model, args.adapter)
    features = encode_examples(examples, tokenizer, args.max_length)
    metrics = {"examples": len(features), **evaluate_model(model, tokenizer, features, examples, evaluation)}
    if not math.isfinite(metrics["eval_loss"]):
        raise ValueError(f"the eval loss is {metrics['eval_loss']}: the model (or adapter) computes NaN or infinity")
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"eval loss   {metrics['eval_loss']:.4f}")
    print(f"perplexity  {metrics['perplexity']:.2f}")
    if "accuracy" in metrics:
        print(f"exact match {metrics['accuracy']:.1%} ({metrics['correct']}/{metrics['total']})")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """`lora-da methods`: list the registry."""
    for name, spec in METHODS.items():
        flags = []
        if spec.needs_calibration:
            flags.append("calibration data")
        if spec.modifies_base:
            flags.append("modifies base weights")
        print(f"{name:10s} {spec.description}" + (f" [{', '.join(flags)}]" if flags else ""))
    return 0
