"""A fair comparison of LoRA initializations: methods x ranks x seeds x learning rates, lr tuned per method.

Protocol: every (method, rank) gets its own learning rate, picked by the mean validation loss over the sweep
seeds; test metrics are reported at that rate as mean +- std over seeds. Every run is a record in
`results.json` (written atomically after each run, so a rerun resumes); failed runs stay as rows with their
error. `report.md` and PNG plots are regenerated from the records.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import random
import statistics
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_da.layers import model_device
from lora_da.methods import METHODS, create_adapted_model, normalize_method

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
CALIBRATION_KEY = "calibration"

#: Named LoRA-DA ablations: name -> (method, overrides). Overrides are LoraDAConfig fields, plus
#: `calibration` (number of calibration examples).
ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora_da-bias-only": ("lora_da", {"variance_weight": 0.0}),
    "lora_da-variance-only": ("lora_da", {"bias_weight": 0.0}),
    "lora_da-identity-fisher": ("lora_da", {"fisher": "identity"}),
    "lora_da-calib32": ("lora_da", {CALIBRATION_KEY: 32}),
    "lora_da-calib64": ("lora_da", {CALIBRATION_KEY: 64}),
    "lora_da-calib256": ("lora_da", {CALIBRATION_KEY: 256}),
    "lora_da-gamma64": ("lora_da", {"gamma": 64.0}),
    "lora_da-gamma256": ("lora_da", {"gamma": 256.0}),
    "lora_da-gamma4096": ("lora_da", {"gamma": 4096.0}),
}

#: Settings that change what a run measures; a resumed results.json must agree on all of them.
PROTOCOL_FIELDS = (
    "model", "data", "steps", "batch_size", "max_length", "num_train", "num_val", "num_test", "num_accuracy",
    "max_new_tokens", "calibration_examples", "calibration_batch_size", "lora_alpha", "use_rslora",
    "target_modules", "warmup_ratio", "schedule", "weight_decay", "dtype", "data_seed",
)


@dataclass(frozen=True)
class Variant:
    """One row of the grid: a registry method plus LoRA-DA config overrides and a calibration size."""

    name: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)
    calibration: int | None = None


def _parse_value(text: str) -> Any:
    """'0' -> 0, '1e-3' -> 0.001, 'true' -> True, anything else stays a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_variant(spec: str) -> Variant:
    """A method name, a named ablation (see ABLATIONS) or 'method@key=value,key=value' -> Variant."""
    spec = str(spec).strip()
    if spec in ABLATIONS:
        method, overrides = ABLATIONS[spec]
    else:
        method, _, options = spec.partition("@")
        overrides = {}
        for item in filter(None, (part.strip() for part in options.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"bad method option {item!r} in {spec!r}: write key=value, e.g. lora_da@gamma=256")
            overrides[key.strip()] = _parse_value(value)
    method = normalize_method(method)
    overrides = dict(overrides)
    calibration = overrides.pop(CALIBRATION_KEY, None)
    if calibration is not None and (not isinstance(calibration, int) or calibration < 1):
        raise ValueError(f"{CALIBRATION_KEY} must be a positive integer in {spec!r}, got {calibration!r}")
    if overrides:
        from lora_da import LoraDAConfig

        known = {f.name for f in dataclasses.fields(LoraDAConfig)}
        unknown = sorted(set(overrides) - known)
        if method not in ("lora_da", "lora_one") or unknown:
            raise ValueError(
                f"bad options in {spec!r}: only lora_da/lora_one take LoraDAConfig fields "
                f"({', '.join(sorted(known))}) and '{CALIBRATION_KEY}'"
                + (f"; unknown: {', '.join(unknown)}" if unknown else "")
            )
    return Variant(spec, method, overrides, calibration)


@dataclass
class BenchConfig:
    """The grid and the training/evaluation budget of a benchmark."""

    model: str = "smollm2-135m"
    data: str = "arith"
    methods: list[str] = field(default_factory=lambda: ["lora", "lora_da"])
    ranks: list[int] = field(default_factory=lambda: [8])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    learning_rates: list[float] = field(default_factory=lambda: [2e-4, 5e-4, 1e-3])
    sweep_seeds: int | None = None  # seeds used to pick the lr (first k); None = every seed at every lr
    steps: int = 100
    batch_size: int = 4
    max_length: int = 128
    num_train: int = 1000
    num_val: int = 64
    num_test: int = 128
    num_accuracy: int = 64  # test examples scored by greedy generation (QA data); 0 = skip
    max_new_tokens: int = 64
    eval_every: int = 20
    calibration_examples: int = 32
    calibration_batch_size: int = 8
    lora_alpha: float = 16
    use_rslora: bool = True
    target_modules: str | list[str] = "all-linear"
    warmup_ratio: float = 0.03
    schedule: str = "cosine"
    weight_decay: float = 0.0
    dtype: str = "float32"
    data_seed: int = 0
    eval_batch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("methods", "ranks", "seeds", "learning_rates"):
            values = list(getattr(self, name))
            if not values:
                raise ValueError(f"bench needs at least one value in {name}")
            if len(set(map(str, values))) != len(values):
                raise ValueError(f"{name} has duplicates: {values}")
            setattr(self, name, values)
        for spec in self.methods:
            parse_variant(spec)
        if any(int(r) != r or r < 1 for r in self.ranks):
            raise ValueError(f"ranks must be positive integers, got {self.ranks}")
        if any(not (lr > 0 and math.isfinite(lr)) for lr in self.learning_rates):
            raise ValueError(f"learning rates must be positive numbers, got {self.learning_rates}")
        if self.sweep_seeds is not None and not 1 <= self.sweep_seeds <= len(self.seeds):
            raise ValueError(f"sweep_seeds must be between 1 and the number of seeds ({len(self.seeds)})")
        for name in ("steps", "batch_size", "num_train", "num_val", "num_test", "calibration_examples",
                     "calibration_batch_size", "eval_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")

    def to_dict(self) -> dict:
        """JSON-ready settings."""
        return dataclasses.asdict(self)


def cell_key(variant: str, rank: int, lr: float, seed: int) -> str:
    """Stable identifier of one run of the grid."""
    return f"{variant}|r{rank}|lr{lr:g}|s{seed}"


def _finite(value: Any) -> Any:
    """NaN/inf -> None so that results.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON to a temp file in the same folder, then rename over `path` (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, allow_nan=False))
    os.replace(tmp, path)


class PeakRSS:
    """Peak resident memory (MiB) of this process while the context is open, sampled from /proc."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def current_mb() -> float:
        """Resident set size now (Linux /proc; falls back to the process-lifetime peak elsewhere)."""
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.current_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak_mb = self.current_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, self.current_mb())


@dataclass
class BenchTask:
    """Encoded splits of the benchmark data: train (fine-tuning + calibration), val (lr choice), test."""

    train: list[dict]
    val: list[dict]
    test: list[dict]
    test_examples: list  # raw Examples of the test split, for exact-match accuracy
    qa: bool

    @functools.cached_property
    def fingerprint(self) -> str:
        """Hash of the encoded splits: catches data that changed under the same name (e.g. stdlib-code of
        another Python version)."""
        import hashlib

        digest = hashlib.sha256()
        for split in (self.train, self.val, self.test):
            for features in split:
                digest.update(json.dumps([list(map(int, features["input_ids"])),
                                          list(map(int, features["labels"]))]).encode())
            digest.update(b"|")
        return digest.hexdigest()[:16]


def load_bench_task(config: BenchConfig, tokenizer) -> BenchTask:
    """Built-in tasks: val is cut from the train split, test is the task's test split; JSONL: a seeded split."""
    from lora_da.data import encode_examples, is_builtin, load_examples, parse_spec

    if is_builtin(config.data):
        name, _ = parse_spec(config.data)
        train_all = load_examples(f"{name}:train", num_examples=config.num_train + config.num_val,
                                  seed=config.data_seed)
        train_raw, val_raw = train_all[: config.num_train], train_all[config.num_train :]
        test_raw = load_examples(f"{name}:test", num_examples=config.num_test, seed=config.data_seed)
    else:
        everything = list(load_examples(config.data))
        random.Random(config.data_seed).shuffle(everything)
        if len(everything) < config.num_val + config.num_test + 1:
            raise ValueError(
                f"{config.data} has {len(everything)} examples; need more than num_val + num_test = "
                f"{config.num_val + config.num_test}"
            )
        test_raw = everything[: config.num_test]
        val_raw = everything[config.num_test : config.num_test + config.num_val]
        train_raw = everything[config.num_test + config.num_val :][: config.num_train]
    if not val_raw:
        raise ValueError("the validation split is empty: raise num_val or provide more training examples")

    def encode(examples):
        return encode_examples(examples, tokenizer, max_length=config.max_length)

    qa = all(ex.is_qa for ex in test_raw)
    return BenchTask(encode(train_raw), encode(val_raw), encode(test_raw), list(test_raw), qa)


def _lora_da_config(variant: Variant, population_size: int, seed: int):
    """The LoraDAConfig of a lora_da / lora_one variant (defaults + its overrides); None for other methods."""
    if variant.method not in ("lora_da", "lora_one"):
        return None
    from lora_da import LoraDAConfig

    options = {"population_size": population_size, "seed": seed, "show_progress": False}
    options.update(variant.overrides)
    return LoraDAConfig(**options)


def run_cell(
    base_model: torch.nn.Module,
    tokenizer,
    task: BenchTask,
    config: BenchConfig,
    variant: Variant,
    rank: int,
    lr: float,
    seed: int,
) -> dict:
    """Initialize, fine-tune and evaluate one run; never raises: a failure is a record with status 'failed'."""
    from lora_da.data import calibration_batches
    from lora_da.evaluate import evaluate_loss, exact_match
    from lora_da.train import TrainConfig, train

    record: dict[str, Any] = {
        "key": cell_key(variant.name, rank, lr, seed),
        "method": variant.name,
        "base_method": variant.method,
        "overrides": variant.overrides,
        "rank": rank,
        "seed": seed,
        "lr": lr,
        "status": "running",
        "error": None,
        "init_seconds": None,
        "final_eval_loss": None,
        "val_loss": None,
        "test_loss": None,
        "accuracy": None,
        "device": _device_name(model_device(base_model)),
        "data_hash": task.fingerprint,
    }
    pad_id = tokenizer.pad_token_id
    on_gpu = model_device(base_model).type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with PeakRSS() as rss:
        try:
            model = copy.deepcopy(base_model)
            n_calib = variant.calibration or config.calibration_examples
            calib = None
            if METHODS[variant.method].needs_calibration:
                calib = calibration_batches(task.train, n_calib, config.calibration_batch_size, pad_id, seed=seed)
            lora_da_config = _lora_da_config(variant, len(task.train), seed)
            model, info = create_adapted_model(
                model, variant.method, rank=rank, lora_alpha=config.lora_alpha, use_rslora=config.use_rslora,
                target_modules=config.target_modules, calibration_batches=calib,
                population_size=len(task.train), lora_da_config=lora_da_config, seed=seed, tokenizer=tokenizer,
            )
            record["init_seconds"] = info.init_seconds
            record["modifies_base"] = info.modifies_base
            record["calibration_examples"] = n_calib if calib is not None else 0
            record["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

            def val_loss() -> float:
                return evaluate_loss(model, task.val, pad_id, config.eval_batch_size, config.dtype,
                                     show_progress=False)["loss"]

            initial = val_loss()
            train_config = TrainConfig(
                steps=config.steps, lr=lr, batch_size=config.batch_size, schedule=config.schedule,
                warmup_ratio=config.warmup_ratio, weight_decay=config.weight_decay, dtype=config.dtype,
                eval_every=config.eval_every, eval_batch_size=config.eval_batch_size, seed=seed,
                show_progress=False,
            )
            history = train(model, task.train, train_config, pad_id, eval_features=task.val)
            record["train_curve"] = [[h["step"], _finite(h["loss"])] for h in history]
            record["eval_curve"] = [[0, _finite(initial)]] + [
                [h["step"], _finite(h["eval_loss"])] for h in history if "eval_loss" in h
            ]
            final_val = history[-1].get("eval_loss", None)
            final_val = val_loss() if final_val is None else final_val
            record["val_loss"] = _finite(final_val)
            test = evaluate_loss(model, task.test, pad_id, config.eval_batch_size, config.dtype,
                                 show_progress=False)["loss"]
            record["test_loss"] = record["final_eval_loss"] = _finite(test)
            if task.qa and config.num_accuracy > 0:
                scored = exact_match(model, tokenizer, task.test_examples[: config.num_accuracy],
                                     batch_size=config.eval_batch_size, max_new_tokens=config.max_new_tokens,
                                     max_length=config.max_length, show_progress=False)
                record["accuracy"] = scored["accuracy"]
            record["status"] = "ok" if math.isfinite(final_val) and math.isfinite(test) else "diverged"
        except Exception as err:  # a failed cell is a row, never a crash of the whole grid
            record["status"] = "failed"
            record["error"] = f"{type(err).__name__}: {err}"
            record["traceback"] = traceback.format_exc(limit=8)
        finally:
            model = None  # free the copy before the next cell
    record["peak_rss_mb"] = round(rss.peak_mb, 1)
    if on_gpu:
        record["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    record["wall_seconds"] = round(time.perf_counter() - start, 3)
    return record


def _device_name(device: torch.device) -> str:
    """'cpu', or 'cuda (NVIDIA H200)': where a run's numbers and timings come from."""
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (0 for a single value) of the non-None values; (None, None) when empty."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def sweep_seeds_of(config: BenchConfig) -> list[int]:
    """Seeds run at every learning rate (the rest only at the chosen rate)."""
    return list(config.seeds[: config.sweep_seeds or len(config.seeds)])


def select_learning_rate(records: Sequence[dict], variant: str, rank: int, config: BenchConfig) -> dict | None:
    """Best lr of (variant, rank): lowest mean validation loss over the sweep seeds; ties go to the smaller lr.

    Returns {"lr", "val_loss", "by_lr": {lr: mean val loss or None}} or None when no run succeeded.
    """
    sweep = set(sweep_seeds_of(config))
    by_lr: dict[float, float | None] = {}
    for lr in config.learning_rates:
        vals = [r["val_loss"] for r in records
                if r["method"] == variant and r["rank"] == rank and r["lr"] == lr and r["seed"] in sweep
                and r["status"] == "ok" and r["val_loss"] is not None]
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
                    mean, std = _mean_std([r.get(metric) for r in at_best])
                    row[metric] = mean
                    row[metric + "_std"] = std
            rows.append(row)
    return rows


def _fmt(mean: float | None, std: float | None = None, digits: int = 4) -> str:
    """'1.2345 ± 0.0100', or '-' when missing."""
    if mean is None:
        return "-"
    text = f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if std is not None else "")


def write_report(output_dir: Path, records: Sequence[dict], config: BenchConfig, plots: Sequence[str]) -> Path:
    """report.md: tuned-lr table per rank, the lr sweep, failed runs, and the plots."""
    rows = summarize(records, config)
    sweep = sweep_seeds_of(config)
    lines = [
        "# LoRA initialization benchmark",
        "",
        f"Model `{config.model}`, data `{config.data}`; {config.steps} steps of batch {config.batch_size}, "
        f"max length {config.max_length}, {config.schedule} schedule (warmup {config.warmup_ratio}), "
        f"lora_alpha {config.lora_alpha}, rsLoRA {config.use_rslora}, targets `{config.target_modules}`; "
        f"{len(config.learning_rates)} learning rates; calibration {config.calibration_examples} train examples.",
        "",
        f"Protocol: each method's learning rate is chosen by the mean validation loss over seeds {sweep} "
        f"({config.num_val} held-out train examples); the other seeds run only at that rate. Test metrics "
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
                     _fmt(r.get("val_loss"), r.get("val_loss_std")), _fmt(r.get("test_loss"), r.get("test_loss_std"))]
            if has_accuracy:
                cells.append(_fmt(r.get("accuracy"), r.get("accuracy_std"), 3))
            cells += [_fmt(r.get("init_seconds"), None, 2), _fmt(r.get("peak_rss_mb"), None, 0),
                      f"{r['failed']}/{r['runs']}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Learning-rate sweep (mean validation loss over the sweep seeds; best in bold)", ""]
    header = "| method | rank | " + " | ".join(f"lr {lr:g}" for lr in config.learning_rates) + " |"
    lines += [header, "|" + " --- |" * (header.count("|") - 1)]
    for r in rows:
        sweep_values = r.get("lr_sweep") or {}
        cells = []
        for lr in config.learning_rates:
            value = sweep_values.get(f"{lr:g}")
            text = _fmt(value)
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
    path = output_dir / REPORT_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path


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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional: pip install 'lora-da[plots]'
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
        mean, std = _mean_std([r.get("init_seconds") for r in records if r["method"] == variant
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


def write_outputs(output_dir: str | os.PathLike, records: Sequence[dict], config: BenchConfig,
                  plots: bool = True) -> None:
    """results.json (config, records, summary), the PNG plots and report.md of a set of run records."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(output / RESULTS_FILE, {"config": config.to_dict(), "records": list(records),
                                               "summary": summarize(records, config), "updated": time.time()})
    write_report(output, records, config, write_plots(output, records, config) if plots else [])


def _load_previous(path: Path, config: BenchConfig) -> list[dict]:
    """Records of an earlier run of the same protocol; ValueError when its settings differ."""
    payload = json.loads(path.read_text())
    before = payload.get("config", {})
    now = config.to_dict()
    changed = [k for k in PROTOCOL_FIELDS if k in before and before[k] != now[k]]
    if changed:
        raise ValueError(
            f"{path} was made with different settings ({', '.join(changed)}); "
            "use another output folder or resume=False to start over"
        )
    return list(payload.get("records", []))


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
    **overrides: Any,
) -> list[dict]:
    """Run (or resume) the grid and write results.json, report.md and PNG plots into `output_dir`.

    `config` or keyword overrides of BenchConfig fields (methods, ranks, seeds, learning_rates, steps, ...).
    `base_model`/`tokenizer` skip loading `config.model` (the model is deep-copied for every run);
    `plots=False` writes no PNGs (e.g. for shards of a grid that are merged later).
    Returns the list of run records.
    """
    from tqdm.auto import tqdm

    config = dataclasses.replace(config, **overrides) if config is not None else BenchConfig(**overrides)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    results_path = output / RESULTS_FILE
    records = _load_previous(results_path, config) if resume and results_path.exists() else []
    done = {r["key"]: r for r in records}

    if base_model is None:
        from lora_da.models import load_model_and_tokenizer

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
    variants = {spec: parse_variant(spec) for spec in config.methods}

    def run(spec: str, rank: int, lr: float, seed: int, bar) -> None:
        key = cell_key(spec, rank, lr, seed)
        previous = done.get(key)
        if previous is not None and (previous["status"] != "failed" or not retry_failed):
            bar.update(1)
            return
        bar.set_postfix_str(key)
        record = run_cell(base_model, tokenizer, task, config, variants[spec], rank, lr, seed)
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
                for seed in config.seeds[len(sweep):]:
                    if choice is None:
                        bar.update(1)  # no learning rate worked: nothing to confirm on more seeds
                        continue
                    run(spec, rank, choice["lr"], seed, bar)
                # plots and report once per finished (method, rank): a long grid has partial figures
                write_outputs(output, records, config, plots)
    return records
