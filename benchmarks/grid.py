"""The committed LoRA initialization benchmark: SmolLM2-135M on the built-in `arith` and `stdlib-code` tasks.

One grid (see `jobs()`), cut into shards of one (task, variant, ranks) each. A shard is a resumable `run_bench`
in its own folder, so several worker processes can share one device and a stopped run continues where it was:

    python benchmarks/grid.py run --device cuda --workers 8   # rerun to resume; shards in benchmarks/results/grid/runs
    python benchmarks/grid.py merge                           # results.json, report.md, plots per task and set

`merge` writes benchmarks/results/grid/<task>-<set>/, task `arith` or `stdlib-code-py3.X`, set `standard` (the
method comparison and rank sweep), `lora-da-options` (LoRA-DA's options and ablations), `ranks` (data-aware rank
allocations against uniform ranks at the same trainable parameters), `lora-fa`, `lora-plus` (other training
regimes) or `short` (the 25-step budget).

`run --device cpu --workers 1` runs the same grid on a CPU (13-15 minutes per arith run on 2 cores). Two 1-thread
workers train 1.38x faster in total; on stdlib-code each run then takes 20-28 minutes and peaks at 9-12 GB of RSS,
so two of them fit in 24 GB.
`--lrs` / `--seeds` / `--ranks` run part of each shard now (e.g. a one-lr screen); a later run without them adds
the rest.
`--regime lora_fa|lora_plus` trains every shard that way, in folders of their own (`<variant>-r8-lora_fa`);
`merge` reports each regime apart (`arith-lora-fa`, ...); other regimes run the variants of
REGIME_METHODS. `--budget short` runs SHORT_METHODS at 25 steps (`<variant>-r8-short`).
Shards run in priority order: the method comparison first, then the rank allocations, LoRA-DA's options, the rank
sweep, ablations.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _harness import with_line

#: Training and evaluation budget shared by every run (BenchConfig fields).
PROTOCOL = dict(
    model="smollm2-135m", steps=100, batch_size=8, max_length=128, num_train=800, num_val=64, num_test=128,
    num_accuracy=64, max_new_tokens=64, eval_every=10, eval_batch_size=64, calibration_examples=256,
    calibration_batch_size=16, learning_rates=[1e-4, 3e-4, 1e-3, 3e-3], seeds=[0, 1, 2], sweep_seeds=1,
    extend_edges=True,
)
#: `run --budget short`: 25 steps, the short budget (the full budget is PROTOCOL's 100).
SHORT_BUDGET = dict(steps=25, eval_every=5)
#: `run --smoke`: the same grid at a size that checks the plumbing in minutes on a CPU.
SMOKE = dict(steps=2, num_train=16, num_val=4, num_test=4, num_accuracy=2, max_new_tokens=8, eval_every=1,
             calibration_examples=8, calibration_batch_size=4, learning_rates=[1e-3, 3e-3])
TASKS = ("arith", "stdlib-code")
METHODS = ["lora", "lora_da", "pissa", "milora", "lora_one", "lora_ga", "eva"]
#: Most promising first: the svd split moves as slowly as the released one (benchmarks/results/first_steps/).
LORA_DA_OPTIONS = [
    "lora_da@factor_balance=kaiming",
    "lora_da@factor_balance=kaiming,output_scaling=token,damping_mode=relative",
    "lora_da@output_scaling=token",
    "lora_da@damping_mode=relative",
    "lora_da@factor_balance=svd",
]
RANK_SWEEP = (["lora", "lora_da"], [2, 32])
ABLATIONS = [
    "lora_da-bias-only", "lora_da-variance-only", "lora_da-identity-fisher", "lora_da-calib32", "lora_da-calib64",
    "lora_da@calibration=128", "lora_da-gamma64", "lora_da-gamma256", "lora_da-gamma4096",
    "lora_da@variance_weight=0.3",
]
MORE_METHODS = ["olora", "gaussian", "corda"]
#: Data-aware ranks at the trainable parameters of ranks 8 and 32: LoRA-DA's own allocation, the gradient
#: sensitivity allocation (GoRA-style) with LoRA-DA's factors and with PEFT's default init, and LoRA-DA's own
#: allocation with every weight at rank 4 or more (half the rank-8 budget spread uniformly: its unbounded ranks
#: pile up in the first blocks); in standard training also PEFT's AdaLoRA, which re-allocates during training (an
#: SVD-form adapter, not a LoRA for LoRA+).
RANK_ALLOCATION = ["lora_da@rank_allocation=lora_da", "lora_da@rank_allocation=gradient", "lora_gradient_ranks",
                   "lora_da@rank_allocation=lora_da,min_rank=4"]
ALLOCATION_RANKS = (8, 32)
#: Where a data-aware start may pay off: the variants compared in another regime, or at the short budget.
#: With A frozen, LoRA-DA's Fisher-preconditioned row space sees little of the inputs (benchmarks/results/
#: frozen_subspace/); `fisher=identity` gives it LoRA-One's row space (top right singular vectors of G), here at
#: Kaiming scale.
REGIME_METHODS = {
    "lora_fa": ["lora", "lora_da", "lora_da@factor_balance=kaiming", "lora_da@factor_balance=kaiming,fisher=identity",
                "pissa", "lora_one", "lora_ga"],
    "lora_plus": ["lora", "lora_da"] + RANK_ALLOCATION,
}
SHORT_METHODS = ["lora", "lora_da", "pissa", "lora_one"]

#: Sets that `merge` reports from the standard regime at the full budget: set -> its variants (lora and lora_da
#: runs appear in both).
STUDIES = {
    "standard": METHODS + MORE_METHODS,
    "lora-da-options": ["lora", "lora_da"] + LORA_DA_OPTIONS + ABLATIONS,
    "ranks": ["lora", "lora_da"] + RANK_ALLOCATION + ["adalora"],
}
GRID = Path(__file__).resolve().parent / "results" / "grid"
#: Where `run` keeps the resumable shards (and environment.json) and `merge` reads them by default.
RUNS = GRID / "runs"


@dataclass(frozen=True)
class Shard:
    """One resumable run_bench: a variant on a task at some ranks (every lr on seed 0, then seeds 1-2)."""

    task: str
    variant: str
    ranks: tuple[int, ...]
    regime: str = "standard"
    budget: str = "full"

    @property
    def folder(self) -> str:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.variant)
        # standard shards at the full budget keep the folders they had before regimes and budgets
        regime = "" if self.regime == "standard" else f"-{self.regime}"
        budget = "" if self.budget == "full" else f"-{self.budget}"
        return f"{task_folder(self.task)}/{safe}-r{'-'.join(map(str, self.ranks))}{regime}{budget}"


def task_folder(task: str) -> str:
    """A task's folder; stdlib-code's data is the running interpreter's standard library, so it names the version."""
    if task == "stdlib-code":
        return f"{task}-py{sys.version_info.major}.{sys.version_info.minor}"
    return task


def set_name(regime: str = "standard", budget: str = "full", study: str = "standard") -> str:
    """The set part of a merged folder's name `<task>-<set>`: the study of the standard regime at the full budget
    (`standard`, `lora-da-options`), else the regime and budget (`lora-fa`, `lora-plus`, `short`, `lora-fa-short`)."""
    if regime == "standard" and budget == "full":
        return study
    return "-".join(part.replace("_", "-") for part in (regime, budget) if part not in ("standard", "full"))


def selects(only: list[str] | None, folder: str) -> bool:
    """Whether `run --only ONLY` runs the shard in `folder` (no --only: every shard)."""
    return not only or any(part in folder for part in only)


def invocations_of(env: list[dict], task_dir: str, shard_names: list[str], regime: str = "standard",
                   budget: str = "full") -> list[dict]:
    """The entries of environment.json that may have run these shards of `task_dir` (stdlib-code: same Python)
    in `regime` at `budget`."""
    task, _, version = task_dir.partition("-py")
    # older entries name stdlib-code's folder without the version
    folders = [f"{prefix}/{name}" for prefix in dict.fromkeys([task_dir, task]) for name in shard_names]
    parser = build_parser()
    chosen = []
    for entry in env:
        if version and not entry["python"].startswith(version + "."):
            continue
        # the recorded argv (after the script), parsed as `run` parsed it; extra notes such as "resumed with" are left
        args, _ = parser.parse_known_args(entry["command"].replace(",", " ").split()[1:])
        if (args.regime, args.budget) == (regime, budget) and any(selects(args.only, folder) for folder in folders):
            chosen.append(entry)
    return chosen


def on_devices(invocations: list[dict], records: list[dict]) -> list[dict]:
    """The invocations whose device type (cpu, cuda) ran some of `records` (each record names its device)."""
    kinds = {r["device"].split(" ")[0].split(":")[0] for r in records if r.get("device")}
    return [e for e in invocations if e["device"].split(":")[0] in kinds]


def jobs(regime: str = "standard", budget: str = "full") -> list[Shard]:
    """Every shard of the grid in `regime` at `budget`, most important first, alternating tasks: the whole grid for
    standard training at the full budget, else the comparison of REGIME_METHODS or SHORT_METHODS."""
    if budget == "short":
        groups = [[(v, (8,)) for v in SHORT_METHODS]]
    elif regime in REGIME_METHODS:
        groups = [[(v, (8,)) for v in REGIME_METHODS[regime]]]
        if regime == "lora_plus":  # the larger budget of the rank allocations, for them and their references
            groups.append([(v, ALLOCATION_RANKS[1:]) for v in ["lora", "lora_da"] + RANK_ALLOCATION])
    else:
        groups = [[(v, (8,)) for v in METHODS], [(v, ALLOCATION_RANKS) for v in RANK_ALLOCATION + ["adalora"]],
                  [(v, (8,)) for v in LORA_DA_OPTIONS],
                  [(v, tuple(RANK_SWEEP[1])) for v in RANK_SWEEP[0]], [(v, (8,)) for v in ABLATIONS],
                  [(v, (8,)) for v in MORE_METHODS]]
    return [Shard(task, variant, ranks, regime, budget)
            for group in groups for variant, ranks in group for task in TASKS]


def bench_config(task: str, variants: list[str], ranks: list[int], smoke: bool = False, regime: str = "standard",
                 budget: str = "full", **subset):
    """The BenchConfig of a shard; `subset` may narrow `learning_rates` or `seeds` (runs outside it wait)."""
    from lora_da.bench import BenchConfig

    settings = {**PROTOCOL, **(SHORT_BUDGET if budget == "short" else {}), **(SMOKE if smoke else {})}
    for key, values in subset.items():
        unknown = set(values or ()) - set(settings[key])
        if unknown:
            raise ValueError(f"{key} {sorted(unknown)} are not in the grid's {settings[key]}")
        settings[key] = [v for v in settings[key] if not values or v in values]
    if settings["seeds"][: settings["sweep_seeds"]] != PROTOCOL["seeds"][: settings["sweep_seeds"]]:
        raise ValueError(f"seeds must include the sweep seeds {PROTOCOL['seeds'][: settings['sweep_seeds']]}")
    return BenchConfig(data=task, methods=variants, ranks=ranks, regime=regime, **settings)


def environment(device: str) -> dict:
    """Versions, hardware, commit and command line (no machine paths) of one invocation of `run`."""
    import torch
    from _harness import command_line, commit, hardware, versions

    info = {**versions(), "device": device, "command": command_line(["benchmarks/grid.py", *sys.argv[1:]]),
            "hardware": hardware(device), "commit": commit()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def prepare_model(model: str, folder: Path) -> str:
    """Load `model` once (a GGUF is de-quantized) and save it as a plain HF folder that workers load quickly."""
    from lora_da.models import load_model_and_tokenizer

    if (folder / "config.json").exists():
        return str(folder)
    loaded, tokenizer = load_model_and_tokenizer(model, dtype="float32")
    loaded.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def worker(model_dir: str, device: str, threads: int, out: str, todo, deadline: float, smoke: bool,
           subset: dict, ranks: list[int] | None, statistics_cache: str) -> None:
    """Take shards from the queue until it is empty or the deadline has passed; `ranks` narrows each shard's."""
    import torch

    from lora_da.bench import run_bench
    from lora_da.models import load_model_and_tokenizer

    torch.set_num_threads(threads)
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype="float32", device=device)
    while time.time() < deadline:
        try:
            shard = todo.get_nowait()
        except queue.Empty:
            return
        start = time.time()
        chosen = [rank for rank in shard.ranks if not ranks or rank in ranks]
        config = bench_config(shard.task, [shard.variant], chosen, smoke, shard.regime, shard.budget, **subset)
        records = run_bench(Path(out) / shard.folder, config, base_model=model, tokenizer=tokenizer,
                            show_progress=False, plots=False, statistics_cache=statistics_cache)
        label_shard(Path(out), Path(out) / shard.folder)
        bad = sum(r["status"] != "ok" for r in records)
        print(f"done {shard.folder}: {len(records)} runs ({bad} not ok) in {time.time() - start:.0f} s", flush=True)


def run(args: argparse.Namespace) -> None:
    """Run (or resume) every shard with `args.workers` processes on `args.device`."""
    from lora_da.files import write_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model(args.model, Path(args.model_cache).expanduser())
    history = out / "environment.json"  # one entry per invocation: shards may be finished elsewhere
    runs = json.loads(history.read_text()) if history.exists() else []
    # atomic: a second invocation starting at the same moment must never read a half-written file
    write_json(history, runs + [environment(args.device)], indent=1)
    subset = {"learning_rates": args.lrs, "seeds": args.seeds}
    bench_config(TASKS[0], METHODS[:1], [8], args.smoke, args.regime, args.budget, **subset)  # bad subset fails here
    start = time.time()
    deadline = start + args.deadline_s
    context = mp.get_context("spawn")
    todo = context.Queue()
    for shard in jobs(args.regime, args.budget):
        if selects(args.only, shard.folder) and (not args.ranks or set(args.ranks) & set(shard.ranks)):
            todo.put(shard)
    # daemon workers, and SIGTERM as a normal exit: stopping this process also stops its workers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    procs = [context.Process(target=worker, daemon=True,
                             args=(model_dir, args.device, args.threads, str(out), todo, deadline, args.smoke, subset,
                                   args.ranks, str(Path(args.statistics_cache).expanduser())))
             for _ in range(args.workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=None if deadline == float("inf") else max(0.0, deadline + 5 - time.time()))
    for proc in procs:
        if proc.is_alive():  # past the deadline: the shard in progress keeps every finished run
            proc.kill()
            proc.join()
    print(f"stopped after {time.time() - start:.0f} s", flush=True)


def merge(args: argparse.Namespace) -> list[Path]:
    """One folder per task and study with results.json, report.md and plots from every shard's records."""
    from lora_da.bench import RESULTS_FILE, BenchConfig
    from lora_da.bench.report import read_results

    raw = Path(args.raw)
    env = json.loads((raw / "environment.json").read_text()) if (raw / "environment.json").exists() else []
    written = []
    for task_dir in sorted(p for p in raw.iterdir() if p.is_dir()):  # see task_folder
        shards = {path.parent.name: read_results(path) for path in sorted(task_dir.glob(f"*/{RESULTS_FILE}"))}
        if not shards:
            continue
        groups: dict[tuple[str, str], list[str]] = {}  # (regime, budget) -> shards; each is a study of its own
        for name, shard in shards.items():
            budget = "short" if shard["config"]["steps"] == SHORT_BUDGET["steps"] else "full"
            groups.setdefault((shard["config"].get("regime", "standard"), budget), []).append(name)
        for (regime, budget), group in sorted(groups.items()):
            protocol = dict(shards[group[0]]["config"])
            records = [record for name in group for record in shards[name]["records"]]
            # a shard's config holds the subset of its last call (`--lrs`, `--seeds`): the sweep is every grid rate
            # and seed that some call ran (rates beyond the grid's stay beyond, see BenchConfig.rate_beyond)
            for key, field, values in (("learning_rates", "lr", PROTOCOL["learning_rates"]), ("seeds", "seed", None)):
                protocol[key] = sorted({value for name in group for value in shards[name]["config"][key]}
                                       | {r[field] for r in records if values is None or r[field] in values})
            studies = STUDIES if (regime, budget) == ("standard", "full") else {
                set_name(regime, budget): list(dict.fromkeys(s.variant for s in jobs(regime, budget)))}
            for study, variants in studies.items():
                chosen = [r for r in records if r["method"] in variants]
                present = [v for v in variants if v in {r["method"] for r in chosen}]
                if not present or (study in STUDIES and study != "standard"
                                   and set(present) <= set(STUDIES["standard"])):
                    continue  # a study beside the method comparison needs a variant of its own
                names = [name for name in group if any(r["method"] in variants for r in shards[name]["records"])]
                dest = Path(args.dest) / f"{task_dir.name}-{set_name(regime, budget, study)}"
                write_study(dest, chosen, BenchConfig(**{**protocol, "methods": present,
                                                         "ranks": sorted({r["rank"] for r in chosen})}),
                            on_devices(invocations_of(env, task_dir.name, names, regime, budget), chosen))
                written.append(dest)
    return written


def _hardware(entry: dict) -> str:
    return entry.get("hardware") or entry.get("gpu") or entry["device"]


def _software(entry: dict) -> str:
    return (f"Python {entry['python']}, torch {entry['torch']}, transformers {entry['transformers']}, "
            f"peft {entry['peft']}")


def provenance_line(invocations: list[dict]) -> str:
    """Hardware, software versions and commits of the invocations of `run` behind a merged report, in one line.
    Invocations that predate recording the commit name the commit that added them to environment.json."""
    machines = list(dict.fromkeys(_hardware(e) for e in invocations))
    software = list(dict.fromkeys((_software(e), _hardware(e)) for e in invocations))
    recorded = list(dict.fromkeys(e["commit"] for e in invocations if e.get("commit")))
    committed = list(dict.fromkeys(e["committed_at"] for e in invocations
                                   if not e.get("commit") and e.get("committed_at")))
    commits = ", ".join(recorded)
    if committed or len(recorded) < len(invocations):
        unknown = "not recorded" + (f" (run records committed at {committed[0]})" if len(committed) == 1 else
                                    f" (run records committed at {committed[0]} to {committed[-1]})" if committed
                                    else "")
        commits = f"{commits}; otherwise {unknown}" if commits else unknown
    versions = "; ".join(f"{text} ({machine})" if len(machines) > 1 else text for text, machine in software)
    return (f"Hardware: {'; '.join(machines) or 'not recorded'}. Software: {versions or 'not recorded'}. "
            f"Commit: {commits or 'not recorded'}.")


def label_shard(raw: Path, shard_dir: Path) -> None:
    """Put the provenance line of the invocations that may have run a shard (see `invocations_of`, on the devices
    its records name) under the title of its report.md."""
    from lora_da.bench import REPORT_FILE, RESULTS_FILE
    from lora_da.bench.report import read_results, write_text

    report = shard_dir / REPORT_FILE
    if not report.exists() or not (raw / "environment.json").exists():
        return
    results = read_results(shard_dir / RESULTS_FILE)
    config = results["config"]
    budget = "short" if config["steps"] == SHORT_BUDGET["steps"] else "full"
    env = json.loads((raw / "environment.json").read_text())
    invocations = on_devices(invocations_of(env, shard_dir.parent.name, [shard_dir.name],
                                            config.get("regime", "standard"), budget), results["records"])
    write_text(report, with_line(report.read_text(), provenance_line(invocations)))


def write_study(dest: Path, records: list[dict], config, invocations: list[dict]) -> None:
    """results.json, report.md and plots of one study, with how it was run."""
    from lora_da.bench import REPORT_FILE, write_outputs
    from lora_da.bench.report import write_text

    write_outputs(dest, records, config)
    commands = "".join(f"\n- {_software(e)}, {_hardware(e)}: `python {e['command']}`" for e in invocations)
    finished = sum(r["status"] == "ok" for r in records)
    write_text(dest / REPORT_FILE, (
        with_line((dest / REPORT_FILE).read_text(), provenance_line(invocations))
        + "\n## How this was run\n\n"
        f"{finished} finished runs of {len(records)} recorded. Command: "
        "`python benchmarks/grid.py run ...` (shards in benchmarks/results/grid/runs) then "
        "`python benchmarks/grid.py merge` (see benchmarks/grid.py for the grid). Each record's `device` says where "
        "it ran. Init and wall seconds of runs that shared a device with other workers are inflated by that "
        "sharing; quiet-machine init overhead is in benchmarks/results/init_overhead/.\n\n"
        f"Invocations of `run` that wrote these shards (from runs/environment.json):\n{commands}\n"
    ))
    print(f"{dest}: {len(records)} runs, {len(config.methods)} variants, ranks {config.ranks}")


def build_parser() -> argparse.ArgumentParser:
    """The command line of `run` and `merge`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run", help="run or resume the grid")
    go.add_argument("--out", default=str(RUNS), help="folder of the shards (resumable); default "
                    "benchmarks/results/grid/runs")
    go.add_argument("--model", default="smollm2-135m", help="model alias, .gguf file or folder")
    go.add_argument("--model-cache", default="~/.cache/lora-da/grid-model",
                    help="where the de-quantized model is saved once for the workers")
    go.add_argument("--statistics-cache", default="~/.cache/lora-da/grid-statistics",
                    help="where lora_da and lora_one keep calibration statistics: every variant, regime and budget "
                    "of one (task, seed) gathers them once (about 1 GB a file for SmolLM2-135M)")
    go.add_argument("--device", default="cpu")
    go.add_argument("--workers", type=int, default=1, help="processes sharing the device")
    go.add_argument("--threads", type=int, default=2, help="CPU threads per worker")
    go.add_argument("--deadline-s", type=float, default=float("inf"),
                    help="seconds after which workers stop (a run in progress is lost, finished runs are kept)")
    go.add_argument("--only", nargs="*", help="run only shards whose folder contains one of these, e.g. arith/")
    go.add_argument("--lrs", type=float, nargs="*", help="run only these of the grid's learning rates for now "
                    "(e.g. a screen at one lr; seeds beyond the sweep seed then run at the best of these)")
    go.add_argument("--seeds", type=int, nargs="*", help="run only these of the grid's seeds for now")
    go.add_argument("--ranks", type=int, nargs="*", help="run only these of each shard's ranks for now")
    go.add_argument("--regime", default="standard",
                    help="how adapters are trained, one of lora_da.train.REGIMES (standard, lora_fa, lora_plus); "
                    "other regimes than standard get shard folders of their own")
    go.add_argument("--budget", default="full", choices=["full", "short"],
                    help="full: PROTOCOL's 100 steps; short: 25 steps (SHORT_BUDGET, SHORT_METHODS), "
                    "in folders of their own")
    go.add_argument("--smoke", action="store_true", help="tiny budget: checks the plumbing")
    together = sub.add_parser("merge", help="merge shard results into one folder per task and study")
    together.add_argument("raw", nargs="?", default=str(RUNS),
                          help="the --out folder of run (default benchmarks/results/grid/runs)")
    together.add_argument("dest", nargs="?", default=str(GRID),
                          help="where the merged <task>-<set> folders go (default benchmarks/results/grid)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    run(args) if args.command == "run" else merge(args)


if __name__ == "__main__":
    main()
