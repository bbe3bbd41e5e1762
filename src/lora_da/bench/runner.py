"""Running the grid: one cell (initialize, fine-tune, evaluate; never raises), and the resumable grid of cells."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lora_da.bench.config import PROTOCOL_FIELDS, BenchConfig, Variant, parse_variant
from lora_da.bench.memory import PeakRSS
from lora_da.bench.report import RESULTS_FILE, read_results, write_outputs
from lora_da.bench.summary import select_learning_rate, sweep_seeds_of
from lora_da.bench.task import BenchTask, load_bench_task
from lora_da.cache import model_fingerprint
from lora_da.evaluate import evaluate_loss, evaluate_model
from lora_da.layers import model_device
from lora_da.methods import adapt_model
from lora_da.models import load_model_and_tokenizer
from lora_da.train import TrainingDiverged, train


def cell_key(variant: str, rank: int, lr: float, seed: int, regime: str = "standard") -> str:
    """Stable identifier of one run of the grid (runs of the standard regime keep the keys they had before
    regimes existed)."""
    return f"{variant}|r{rank}|lr{lr:g}|s{seed}" + ("" if regime == "standard" else f"|{regime}")


def _finite(value: Any) -> Any:
    """NaN/inf -> None so that results.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _device_name(device: torch.device) -> str:
    """'cpu', or 'cuda (NVIDIA H200)': where a run's numbers and timings come from."""
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


def _quiet(_: str) -> None:
    """Default progress callback: say nothing."""


def run_cell(
    base_model: torch.nn.Module,
    tokenizer,
    task: BenchTask,
    config: BenchConfig,
    variant: Variant,
    rank: int,
    lr: float,
    seed: int,
    progress: Callable[[str], None] = _quiet,
    model_hash: str | None = None,
    reusable_inits: dict | None = None,
    statistics_cache: str | os.PathLike | None = None,
) -> dict:
    """Initialize, fine-tune and evaluate one run; never raises: a failure is a record with status 'failed'.

    `progress` receives a line at the start of each phase. With `config.detailed_records` the record also
    holds the step history, the init report and the metrics before and after training. `model_hash` (see
    `lora_da.cache.model_fingerprint`) is recorded so that a resumed grid never mixes two models' runs.
    `reusable_inits`, a dict the caller keeps across runs, holds the last initialized model: a run of the same
    variant, rank and seed at another lr starts from a copy of it instead of initializing again (the init is
    the same; its `init_seconds` are those of the init, and the record says `init_reused`).
    `statistics_cache`: a folder where data-aware inits keep their calibration statistics (see
    `lora_da.methods.create_adapted_model`); a run that reads them says `statistics_reused`.
    """
    device = model_device(base_model)
    record: dict[str, Any] = {
        "key": cell_key(variant.name, rank, lr, seed, config.regime),
        "method": variant.name,
        "base_method": variant.method,
        "overrides": variant.overrides,
        "rank": rank,
        "seed": seed,
        "lr": lr,
        "regime": config.regime,
        "status": "running",
        "error": None,
        "init_seconds": None,
        "final_eval_loss": None,
        "val_loss": None,
        "test_loss": None,
        "accuracy": None,
        "device": _device_name(device),
        "data_hash": task.fingerprint,
        "model_hash": model_hash,
    }
    pad_id = tokenizer.pad_token_id
    evaluation = config.eval_config()
    scored_examples = task.test_examples if task.qa else []  # exact match only on all-QA test data
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with PeakRSS() as rss:
        try:
            init = config.init_config(variant, rank, seed)
            progress(f"initializing ({init.calibration_size(len(task.train)) if init.needs_calibration else 0} "
                     "calibration examples)")
            reuse_key = (variant.name, rank, seed)
            if reusable_inits is not None and reuse_key in reusable_inits:
                initialized, info = reusable_inits[reuse_key]
                model = copy.deepcopy(initialized)
                record["init_reused"] = True
            else:
                model, info = adapt_model(copy.deepcopy(base_model), task.train, init, pad_id,
                                          statistics_cache=statistics_cache)
                if reusable_inits is not None:  # one kept at a time: runs of one init follow each other
                    reusable_inits.clear()
                    reusable_inits[reuse_key] = (copy.deepcopy(model), info)
            record["init_seconds"] = info.init_seconds
            if (info.report or {}).get("statistics_cache", {}).get("reused"):
                record["statistics_reused"] = True
            record["modifies_base"] = info.modifies_base
            record["calibration_examples"] = init.num_calibration if init.needs_calibration else 0
            record["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

            def val_loss() -> float:
                return evaluate_loss(model, task.val, pad_id, evaluation.batch_size, evaluation.dtype,
                                     show_progress=False)["loss"]

            progress(f"initialized in {info.init_seconds:.1f} s; evaluating before training")
            initial = val_loss()
            if config.detailed_records:
                before = evaluate_model(model, tokenizer, task.val, scored_examples, evaluation, known_loss=initial)
                record.update(init_report=info.report, before=before)
            progress(f"training {config.steps} steps at lr {lr:g}")
            started = time.perf_counter()
            history = train(model, task.train, config.train_config(lr, seed), pad_id, eval_features=task.val)
            record["train_curve"] = [[h["step"], _finite(h["loss"])] for h in history]
            record["eval_curve"] = [[0, _finite(initial)]] + [
                [h["step"], _finite(h["eval_loss"])] for h in history if "eval_loss" in h
            ]
            if config.detailed_records:
                record.update(history=history, train_seconds=time.perf_counter() - started)
            final_val = history[-1].get("eval_loss", None)
            final_val = val_loss() if final_val is None else final_val
            record["val_loss"] = _finite(final_val)
            progress("evaluating after training")
            # the demo evaluates on one set: its final validation loss is the test loss
            known = final_val if task.test is task.val else None
            after = evaluate_model(model, tokenizer, task.test, scored_examples, evaluation, known_loss=known)
            test = after["eval_loss"]
            record["test_loss"] = record["final_eval_loss"] = _finite(test)
            record["accuracy"] = after.get("accuracy")
            if config.detailed_records:
                record["after"] = after
            record["status"] = "ok" if math.isfinite(final_val) and math.isfinite(test) else "diverged"
        except TrainingDiverged as err:  # a result of this learning rate, not a fault: kept on resume
            record["status"] = "diverged"
            record["error"] = str(err)
        except Exception as err:  # a failed cell is a row, never a crash of the whole grid
            record["status"] = "failed"
            record["error"] = f"{type(err).__name__}: {err}"
            record["traceback"] = traceback.format_exc(limit=8)
        finally:
            model = None  # free the copy before the next cell
    record["peak_rss_mb"] = round(rss.peak_mb, 1)
    if device.type == "cuda":
        record["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    record["wall_seconds"] = round(time.perf_counter() - start, 3)
    return record


def _load_previous(path: Path, config: BenchConfig) -> list[dict]:
    """Records of an earlier run of the same protocol; ValueError when its settings differ."""
    payload = read_results(path)
    before = {"regime": "standard", **payload.get("config", {})}  # files from before regimes: standard training
    now = config.to_dict()
    changed = [k for k in PROTOCOL_FIELDS if k in before and before[k] != now[k]]
    if changed:
        raise ValueError(
            f"{path} was made with different settings ({', '.join(changed)}); "
            "use another output folder or resume=False to start over"
        )
    return payload["records"]


def _plan(config: BenchConfig) -> int:
    """Number of runs in the grid (sweep seeds at every lr, the other seeds at the chosen lr)."""
    k = len(sweep_seeds_of(config))
    per = len(config.learning_rates) * k + (len(config.seeds) - k)
    return len(config.methods) * len(config.ranks) * per


def run_bench(
    output_dir: str | os.PathLike,
    config: BenchConfig | None = None,
    *,
    base_model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    resume: bool = True,
    retry_failed: bool = False,
    show_progress: bool = True,
    plots: bool = True,
    statistics_cache: str | os.PathLike | None = None,
    **overrides: Any,
) -> list[dict]:
    """Run (or resume) the grid and write results.json, report.md and PNG plots into `output_dir`.

    `config` or keyword overrides of BenchConfig fields (methods, ranks, seeds, learning_rates, steps, ...).
    `base_model`/`tokenizer` skip loading `config.model` (the model is deep-copied for every run);
    `plots=False` writes no PNGs (e.g. for shards of a grid that are merged later).
    `statistics_cache`: a folder where lora_da and lora_one keep their calibration statistics, so that variants
    and runs that read the same calibration batches (same seed) gather them once (see `run_cell`).
    Returns the list of run records.
    """
    config = dataclasses.replace(config, **overrides) if config is not None else BenchConfig(**overrides)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    results_path = output / RESULTS_FILE
    records = _load_previous(results_path, config) if resume and results_path.exists() else []
    done = {r["key"]: r for r in records}

    if base_model is None:
        base_model, loaded_tokenizer = load_model_and_tokenizer(config.model, dtype="float32")
        tokenizer = tokenizer or loaded_tokenizer
    if tokenizer is None:
        raise ValueError("run_bench needs the tokenizer of base_model (tokenizer=...)")
    base_model.eval()
    task = load_bench_task(config, tokenizer)
    other_data = {r["data_hash"] for r in records if r.get("data_hash")} - {task.fingerprint}
    if other_data:
        raise ValueError(
            f"{results_path} holds runs on other data than {config.data!r} encodes to here (hash "
            f"{task.fingerprint} vs {', '.join(sorted(other_data))}): e.g. another tokenizer or, for "
            "stdlib-code, another Python version; use another output folder"
        )
    model_hash = model_fingerprint(base_model)
    other_models = {r["model_hash"] for r in records if r.get("model_hash")} - {model_hash}
    if other_models:
        raise ValueError(
            f"{results_path} holds runs of another model than {config.model!r} is here (weights hash "
            f"{model_hash} vs {', '.join(sorted(other_models))}): its weights changed; use another output folder"
        )
    variants = {spec: parse_variant(spec) for spec in config.methods}
    reusable_inits: dict = {}  # see run_cell: the lr sweep of one (variant, rank, seed) initializes once

    def run(spec: str, rank: int, lr: float, seed: int, bar) -> None:
        key = cell_key(spec, rank, lr, seed, config.regime)
        previous = done.get(key)
        if previous is not None and (previous["status"] != "failed" or not retry_failed):
            bar.update(1)
            return
        bar.set_postfix_str(key)
        record = run_cell(base_model, tokenizer, task, config, variants[spec], rank, lr, seed, model_hash=model_hash,
                          reusable_inits=reusable_inits, statistics_cache=statistics_cache)
        if previous is not None:
            records.remove(previous)
        records.append(record)
        done[key] = record
        write_outputs(output, records, config, plots=False)  # after every run: a kill loses at most one
        bar.update(1)

    sweep = sweep_seeds_of(config)
    with tqdm(total=_plan(config), desc="bench", unit="run", disable=not show_progress) as bar:
        for rank in config.ranks:
            for spec in config.methods:
                for lr in config.learning_rates:
                    for seed in sweep:
                        run(spec, rank, lr, seed, bar)
                choice = select_learning_rate(records, spec, rank, config)
                beyond = None if choice is None else config.rate_beyond(choice["lr"])
                if beyond is not None:  # the best rate is at an end of the sweep: try one step past it
                    bar.total += len(sweep)
                    for seed in sweep:
                        run(spec, rank, beyond, seed, bar)
                    choice = select_learning_rate(records, spec, rank, config)
                for seed in config.seeds[len(sweep):]:
                    if choice is None:
                        bar.update(1)  # no learning rate worked: nothing to confirm on more seeds
                        continue
                    run(spec, rank, choice["lr"], seed, bar)
                # plots and report once per finished (method, rank): a long grid has partial figures
                write_outputs(output, records, config, plots)
    return records
