"""Shared parts of the benchmarks: each measurement runs in a fresh process (its own peak memory), the floor pass,
our init, the authors' released code (given by path, never committed), a profile table, and how every result is
written: `write_results` puts `results.json` and `report.md` in `results/<benchmark>/`, each naming the hardware,
the software versions and the commit it was measured at (`provenance`), with no machine paths in either."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lora_da.bench.memory import PeakRSS, peak_tensor_bytes
from lora_da.gram import packed_size
from lora_da.hooks import FOLD_TOKENS
from lora_da.solver import solve_working_bytes
from lora_da.statistics import GRADIENT_DTYPE, INPUT_CHUNK_DTYPE, INPUT_DTYPE, OUTPUT_DTYPE, statistics_bytes

ROOT = Path(__file__).resolve().parents[1]
#: benchmarks/results: each benchmark writes results/<its name>/{results.json,report.md}
RESULTS = ROOT / "benchmarks" / "results"


def results_dir(name: str) -> Path:
    """Where benchmark `name` (its script's name) writes results.json and report.md by default."""
    return RESULTS / name


def hardware(device: str | torch.device = "cpu") -> str:
    """The GPU's name and memory, or the CPU's model and the cores this process may use."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} CPU cores ({torch.get_num_threads()} torch threads)"


def versions() -> dict[str, str | None]:
    """Python, torch, transformers and peft versions (None where a package is missing)."""
    found: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft"):
        try:
            found[name] = importlib.import_module(name).__version__
        except ImportError:
            found[name] = None
    return found


def commit() -> str | None:
    """`git rev-parse --short HEAD` of this checkout, `+changes` when src/ or the benchmark scripts differ from it;
    $BENCH_COMMIT where there is no git (e.g. a copy of the tree on another machine); None when neither is known."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src", "benchmarks",
                                  ":(exclude)benchmarks/results"], cwd=ROOT, capture_output=True).returncode
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if changed else "")


def provenance(device: str | torch.device = "cpu") -> dict:
    """Hardware, software versions and commit of a measurement, as every results.json records them."""
    return {"hardware": hardware(device), **versions(), "commit": commit()}


def provenance_line(record: dict) -> str:
    """The line near the top of every report.md: hardware, software versions, commit (for results that predate
    recording it, `committed_at`: the commit that added them to the repository)."""
    names = {"python": "Python", "torch": "torch", "transformers": "transformers", "peft": "peft"}
    software = ", ".join(f"{label} {record[key]}" for key, label in names.items() if record.get(key))
    missing = [label for key, label in names.items() if not record.get(key)]
    if missing:
        software += ("; " if software else "") + f"{', '.join(missing)} not recorded"
    commit = record.get("commit") or "not recorded" + (
        f"; committed at {record['committed_at']}" if record.get("committed_at") else "")
    return f"Hardware: {record.get('hardware') or 'not recorded'}. Software: {software}. Commit: {commit}."


def machine_free(text: str) -> str:
    """`text` without machine paths: the checkout's root, the interpreter's library folders (site-packages, the
    standard library) and the home folder are cut from every path that starts with them."""
    root = str(ROOT)
    prefixes = {root, os.path.expanduser("~"), sys.prefix, sys.base_prefix,
                *(entry for entry in sys.path  # script folders inside the checkout keep their path from its root
                  if os.path.isabs(entry) and ("site-packages" in entry or not entry.startswith(root)))}
    for prefix in sorted((p.rstrip(os.sep) for p in prefixes if len(p.rstrip(os.sep)) > 1), key=len, reverse=True):
        text = text.replace(prefix + os.sep, "")
    return text


def command_line(argv: Sequence[str]) -> str:
    """A recorded command line: paths inside the checkout relative to its root, other absolute paths (or ~/...)
    as PATH/<name>."""
    words = []
    for word in argv:
        path = Path(word).expanduser()
        if path.is_absolute():
            try:
                word = str(path.resolve().relative_to(ROOT))
            except ValueError:
                word = f"PATH/{path.name}"
        words.append(word)
    return " ".join(words)


def with_line(report: str, line: str) -> str:
    """`report` with `line` (a provenance line) under its title, replacing one already there."""
    lines = report.splitlines()
    lines = [text for i, text in enumerate(lines) if i > 3 or not text.startswith("Hardware: ")]
    at = 1 if lines and lines[0].startswith("# ") else 0
    body = lines[at:]
    while body and not body[0].strip():
        body = body[1:]
    head = lines[:at] + ([""] if at else [])
    return "\n".join([*head, line, "", *body]) + "\n"


def write_results(out: str | os.PathLike, results: dict, report: str, device: str | torch.device = "cpu") -> Path:
    """`out`/results.json (with `provenance` first, measured here unless `results` has it) and `out`/report.md (with
    its provenance line), both without machine paths. Returns `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"provenance": results.get("provenance") or provenance(device), **results}
    (out / "results.json").write_text(machine_free(json.dumps(results, indent=2)) + "\n")
    (out / "report.md").write_text(machine_free(with_line(report, provenance_line(results["provenance"]))))
    return out


def run_parts(script: str, parts: Sequence[str], argv: Sequence[str]) -> dict[str, dict]:
    """Run `script --part PART argv...` once per part in a fresh process; each prints one JSON line last."""
    results = {}
    for part in parts:
        command = [sys.executable, script, "--part", part, *argv]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        lines = done.stdout.strip().splitlines()
        ok = done.returncode == 0 and lines
        results[part] = json.loads(lines[-1]) if ok else {"error": f"exit status {done.returncode}"}
        print(part, results[part], flush=True)
    return results


def add_parts(script: str, results: dict, parts: Sequence[str], argv: Sequence[str]) -> None:
    """Run `parts` of `script` (see `run_parts`) into existing `results`, each run stamped with this checkout's
    commit (the results' provenance names the commit of the runs they started with)."""
    added = run_parts(script, parts, argv)
    results["runs"].update({part: {**row, "commit": commit()} for part, row in added.items()})
    results["parts"] = best_runs(results["runs"])


def traced_memory(model: nn.Module, batches: list[dict], init: Callable[[], object]) -> dict:
    """The most tensor bytes alive at once (MiB, `lora_da.bench.memory.peak_tensor_bytes`) in the floor's pass over
    `batches`, then in `init()`: what a CPU's tensors take, apart from what its allocator keeps resident."""
    floor = peak_tensor_bytes(lambda: floor_pass(model, batches))
    return {"floor_mib": floor / 2**20, "init_mib": peak_tensor_bytes(init) / 2**20}


def best_runs(runs: dict[str, dict]) -> dict[str, dict]:
    """Per part, the fastest of its repeats `PART#i` (other load on the machine only slows a run down), with the
    seconds of every repeat in `repeat_seconds`; a part whose every repeat failed keeps its first failure."""
    best: dict[str, dict] = {}
    for key, row in runs.items():
        name = key.split("#")[0]
        kept = best.get(name)
        times = (kept or {}).get("repeat_seconds", []) + ([row["seconds"]] if "seconds" in row else [])
        if kept is None or ("seconds" in row and ("seconds" not in kept or row["seconds"] < kept["seconds"])):
            kept = row
        best[name] = {**kept, "repeat_seconds": times}
    return best


def repeated(parts: Sequence[str], repeats: int) -> list[str]:
    """`PART#i` for each repeat i, every other round in reverse order, so that a slow spell of the machine does not
    fall on one part only."""
    return [f"{part}#{i}" for i in range(repeats) for part in (parts if i % 2 == 0 else parts[::-1])]


#: What the `memory-trace` parts count, for the reports.
TRACED_NOTE = ("Resident memory also counts what the allocator keeps of freed blocks; the traced rows (the "
               "`memory-trace` part, torch.profiler) count tensors alone, allocation by allocation, from the start "
               "of each step.")

#: How `measured` counts memory, for the reports.
MEMORY_NOTE = ("memory grown is the peak resident memory while the step runs over what was resident when it "
               "started (sampled every 50 ms; on CUDA the allocator's peak over its memory in use)")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured(device: torch.device, work: Callable[[], dict | None]) -> dict:
    """Seconds, peak memory and memory grown over what was in use when `work()` started (CPU: resident memory
    sampled while it runs; CUDA: the allocator's peak); an exception is a result too."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        gpu_before = torch.cuda.memory_allocated(device) / 2**20
    start = time.perf_counter()
    with PeakRSS() as rss:
        try:
            extra = work() or {}
        except Exception as exc:  # a failure of the released code is a result, not a crash of the benchmark
            return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                    "traceback_tail": traceback.format_exc().splitlines()[-3:]}
        synchronize(device)
    seconds = time.perf_counter() - start
    peak, before = rss.peak_mb, rss.start_mb
    if cuda:
        peak, before = torch.cuda.max_memory_allocated(device) / 2**20, gpu_before
    return {"seconds": seconds, "peak_mib": peak, "grown_mib": peak - before, **extra}


def target_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Weights of every linear layer of the blocks (the LoRA targets of "all-linear")."""
    from lora_da.layers import match_target_modules

    return {name: model.get_submodule(name).weight for name in match_target_modules(model)}


def floor_pass(model: nn.Module, batches: list[dict], head_rows: bool = False) -> None:
    """One forward+backward over `batches` forming every target layer's weight gradient (LoRA-DA's G needs
    the same products), nothing else trainable. The model's own loss projects every position onto the
    vocabulary; `head_rows`: only the positions that predict a supervised token, as our statistics pass does."""
    from lora_da.evaluate import supervised_logits, supervised_loss_sum

    flags = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    for weight in target_weights(model).values():
        weight.requires_grad_(True)
    for batch in batches:
        if head_rows:
            total, count = supervised_loss_sum(*supervised_logits(model, batch))
            (total / count).backward()
        else:
            model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    for parameter, flag in flags:
        parameter.requires_grad_(flag)


def load_released(path: str):
    """The authors' `lora_da.py` as a module named `released_lora_da` (never the project's own package)."""
    spec = importlib.util.spec_from_file_location("released_lora_da", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def released_init(path: str, model: nn.Module, batches: list[dict], rank: int, population_size: int) -> dict:
    """The released pipeline with its published settings: a gradient pass (target weights only, which is less
    work than its own script, whose model trains every weight), then its Fisher passes and solve."""
    released = load_released(path)
    weights = target_weights(model)
    start = time.perf_counter()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for weight in weights.values():
        weight.requires_grad_(True)
    examples = 0
    for batch in batches:
        size = batch["input_ids"].shape[0]
        (model(**batch).loss * size).backward()
        examples += size
    named_grads = {f"{name}.weight": w.grad.detach() / examples for name, w in weights.items()}
    model.zero_grad(set_to_none=True)
    gradient_seconds = time.perf_counter() - start
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in weights})
    start = time.perf_counter()
    factors = released.estimate_lora_da_initializations(
        model=model, dataset=batches, named_grads=named_grads, target_modules=suffixes, rank=rank,
        population_size=population_size, batch_size=None, variance_beta=0.03, damping=1e-6, gamma=1024,
        lobpcg_niter=10, fisher_layers_per_pass=8, deterministic_seed=9,
    )
    bad = [name for name, f in factors.items() if not all(torch.isfinite(t).all() for t in f.values())]
    if bad:
        raise FloatingPointError(f"non-finite factors in {len(bad)} layer(s), e.g. {bad[0]}")
    return {"gradient_seconds": gradient_seconds, "fisher_and_solve_seconds": time.perf_counter() - start,
            "layers": len(factors)}


def ours_init(peft_model: nn.Module, batches: list[dict], population_size: int) -> dict:
    """`initialize_lora_da` with its defaults; the report's timings and solver summary."""
    from lora_da import LoraDAConfig, initialize_lora_da

    report = initialize_lora_da(peft_model, batches, LoraDAConfig(population_size=population_size))
    return init_summary(report.to_dict())


def init_summary(report: dict) -> dict:
    """Timings and solver summary of a LoRA-DA init's report (`LoraDAReport.to_dict()`)."""
    layers = report["layers"].values()
    return {"statistics_seconds": report["statistics_seconds"], "solve_seconds": report["solve_seconds"],
            "passes": report["passes"], "micro_batch_examples": report.get("micro_batch_examples"),
            "layers": len(layers),
            "solvers_used": sorted({v["eigensolver"] for v in layers}),
            "max_residual": max(v["residual"] for v in layers), "iterations": iteration_ranges(report["layers"])}


def iteration_ranges(layers: dict[str, dict]) -> dict[str, list[int]]:
    """Per kind of layer (the last part of its name), the fewest and the most iterations of an iterative
    eigensolver (none where every layer was solved dense)."""
    ranges: dict[str, list[int]] = {}
    for name, info in layers.items():
        if info.get("iterations") is not None:
            kind = name.rsplit(".", 1)[-1]
            low, high = ranges.get(kind, [info["iterations"]] * 2)
            ranges[kind] = [min(low, info["iterations"]), max(high, info["iterations"])]
    return ranges


def profile_statistics(peft_model: nn.Module, batches: list[dict], rows: int = 12) -> str:
    """torch.profiler table (top ops by self time) of our statistics pass."""
    from torch.profiler import ProfilerActivity, profile

    from lora_da import LoraDAConfig, collect_statistics
    from lora_da.layers import target_layer_names

    activities = [ProfilerActivity.CPU]
    device = next(peft_model.parameters()).device
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    names = target_layer_names(peft_model)
    base = peft_model.get_base_model()
    with profile(activities=activities) as prof, peft_model.disable_adapter():
        collect_statistics(base, batches, names, LoraDAConfig(variance_weight=0, show_progress=False))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--rank, --released and the internal --part of the init benchmarks."""
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--released", default=None, help="path of the authors' lora_da.py, run side by side")
    parser.add_argument("--part", help="internal: run one measurement")


def step_rows(cells: str, label: str, row: dict, floor: dict) -> list[str]:
    """Markdown rows of one measured step (after the leading `cells`): seconds, x floor, memory grown, and our
    init's statistics / solve split; a failure is a row too."""
    if "error" in row:
        return [f"| {cells}{label} | failed: {row['error']} | | |"]
    ratio = row["seconds"] / floor["seconds"] if "seconds" in floor else float("nan")
    rows = [f"| {cells}{label} | {row['seconds']:.1f} | {ratio:.2f} | {row['grown_mib']:.0f} |"]
    if "statistics_seconds" in row:
        passes = f"{row['passes']} pass" + ("es" if row["passes"] != 1 else "")
        rows.append(f"| {cells}- statistics ({passes}) | {row['statistics_seconds']:.1f} | "
                    f"{row['statistics_seconds'] / floor['seconds']:.2f} | |")
        iterations = ", ".join(f"{kind} {low}-{high}" if low != high else f"{kind} {low}"
                               for kind, (low, high) in row.get("iterations", {}).items())
        rows.append(f"| {cells}- solve ({', '.join(row['solvers_used'])}; max residual {row['max_residual']:.1e}"
                    f"{'; iterations: ' if iterations else ''}{iterations}) | "
                    f"{row['solve_seconds']:.1f} | {row['solve_seconds'] / floor['seconds']:.2f} | |")
    return rows


@dataclass(frozen=True)
class Shape:
    """A Llama-family model: blocks, widths and key-value width (GQA)."""

    name: str
    blocks: int
    hidden: int
    intermediate: int
    kv_width: int

    def layers(self) -> list[tuple[int, int]]:
        """(out, in) of the seven projections of one block."""
        h, i, kv = self.hidden, self.intermediate, self.kv_width
        return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]

    def block_parameters(self) -> int:
        return sum(m * n for m, n in self.layers())

    def block_gradient_bytes(self) -> int:
        """G and y of one block."""
        return sum(statistics_bytes(m, n) - statistics_bytes(0, n) for m, n in self.layers())

    def input_widths(self) -> list[int]:
        """Width of each distinct input of one block: q/k/v share one, o, gate/up share one, down."""
        return [self.hidden, self.hidden, self.hidden, self.intermediate]

    def block_input_bytes(self) -> int:
        """Z's float64 totals of one block."""
        return sum(INPUT_DTYPE.itemsize * packed_size(n) for n in self.input_widths())

    def input_groups(self) -> list[list[tuple[int, int]]]:
        """The layers of one block that read one input, in the order they are solved: q/k/v, o, gate/up, down."""
        q, k, v, o, gate, up, down = self.layers()
        return [[q, k, v], [o], [gate, up], [down]]

    def block_statistics_bytes(self) -> int:
        """Accumulators of one block as gathered (Z with its float32 chunk)."""
        return self.block_gradient_bytes() + sum(statistics_bytes(0, n) for n in self.input_widths())


def memory_account(shape: Shape, blocks: int, floor: dict, ours: dict, weight_itemsize: int,
                   smallest_batch_tokens: int, traced: dict | None = None) -> list[str]:
    """Rows: what the init of `blocks` blocks of `shape` holds during its pass (the floor's activations, its
    statistics in place of the weight gradients) and after it (solving the layers of one input together,
    releasing each group's statistics: the group's working set beside the statistics not yet solved), against its
    measured growth; with `traced` (`floor_mib`, `init_mib`: the most tensor bytes alive at once over those alive
    at the start, see `lora_da.bench.memory.peak_tensor_bytes`) the same account from the floor's tensors, against
    the init's."""
    mib = 2**20
    groups = shape.input_groups() * blocks
    chunked = smallest_batch_tokens < FOLD_TOKENS  # a float32 chunk of Z; else each batch goes straight to the total
    z_itemsize = INPUT_DTYPE.itemsize + (INPUT_CHUNK_DTYPE.itemsize if chunked else 0)

    def held(group: list[tuple[int, int]]) -> int:
        return (sum(GRADIENT_DTYPE.itemsize * m * n + OUTPUT_DTYPE.itemsize * m for m, n in group)
                + z_itemsize * packed_size(group[0][1]))

    def working(group: list[tuple[int, int]]) -> int:  # the layers iterate in step, each with a float64 G
        return max(solve_working_bytes(m, n) - 8 * m * n for m, n in group) + sum(8 * m * n for m, n in group)

    traced_at = f" (commit {traced['commit']})" if traced and traced.get("commit") else ""
    weight_gradients = sum(weight_itemsize * m * n for group in groups for m, n in group)
    statistics = sum(map(held, groups))
    during = floor["grown_mib"] * mib - weight_gradients + statistics
    after = max(working(group) + sum(map(held, groups[index + 1:])) for index, group in enumerate(groups))
    return [
        "| memory | MiB |",
        "| --- | ---: |",
        f"| floor, grown: activations + weight gradients ({weight_gradients / mib:.0f}) | {floor['grown_mib']:.0f} |",
        f"| statistics: G and y per layer, Z per input (packed float64) | {statistics / mib:.0f} |",
        f"| during the pass: the floor's activations + statistics | {during / mib:.0f} |",
        f"| after it: a group's solve beside the statistics not yet solved, at most | {after / mib:.0f} |",
        f"| LoRA-DA init, grown (measured) | {ours['grown_mib']:.0f} |",
    ] + ([
        f"| floor, tensors traced{traced_at}: activations + weight gradients | {traced['floor_mib']:.0f} |",
        f"| during the pass, from the floor's traced tensors: activations + statistics | "
        f"{traced['floor_mib'] - (weight_gradients - statistics) / mib:.0f} |",
        f"| LoRA-DA init, tensors traced{traced_at} | {traced['init_mib']:.0f} |",
    ] if traced and "error" not in traced else [])
