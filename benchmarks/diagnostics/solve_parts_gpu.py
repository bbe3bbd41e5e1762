"""Where LoRA-DA's solve spends its time on a GPU: each linear-algebra step of the dense path timed alone
(device-synchronized, median of `--repeats`) at SmolLM2-135M's layer shapes on synthetic statistics, beside the
whole `solve_layer` under each eigensolver; then `solve_all` over the 210 layers of 30 such blocks (the default,
batched, and eigh) with a torch.profiler table of the default. `--wide` adds the parts of a block Davidson
iteration at Llama-7B's widest shapes.

Synthetic statistics are built the way the hooks build them, from T tokens: inputs x_t with a decaying spectrum
and a mean offset, output gradients g_t that depend on x_t through a low-rank map plus noise, G = sum_t g_t x_t^T /
examples, Z = mean x x^T (float64), y = mean g^2 (far below the damping, as with a token-mean loss).

    python benchmarks/diagnostics/solve_parts_gpu.py [--device cuda] [--wide]
    # writes benchmarks/results/solve_parts_gpu/{results.json,report.md} (or --out DIR)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from lora_da import LoraDAConfig, solve_all, solve_layer
from lora_da.eigensolvers import filtered_subspace
from lora_da.gram import PackedGram, pack
from lora_da.input_factor import factor_input
from lora_da.layer_solvers import ImplicitGuidance, variance_term

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _harness
from _harness import results_dir, synchronize, write_results  # noqa: E402

#: layer name -> (m, n, input group): layers of one group share their input
SMOL = {"q_proj": (576, 576, "x"), "k_proj": (192, 576, "x"), "v_proj": (192, 576, "x"), "o_proj": (576, 576, "o"),
        "gate_proj": (1536, 576, "h"), "up_proj": (1536, 576, "h"), "down_proj": (576, 1536, "d")}
LLAMA7B = {"q_proj": (4096, 4096, "x"), "k_proj": (4096, 4096, "x"), "v_proj": (4096, 4096, "x"),
           "o_proj": (4096, 4096, "o"), "gate_proj": (11008, 4096, "h"), "up_proj": (11008, 4096, "h"),
           "down_proj": (4096, 11008, "d")}


class SyntheticStatistics:
    """The `LayerStatistics` protocol over precomputed means (G float32 [m, n], Z float64 [n, n], y [m])."""

    def __init__(self, examples: int):
        self.num_examples = examples
        self.gradients, self.outputs, self.inputs, self.groups = {}, {}, {}, {}

    @property
    def layer_names(self) -> list[str]:
        return list(self.gradients)

    @property
    def gradient_sums(self) -> dict[str, torch.Tensor]:
        return self.gradients

    def gradient(self, name: str) -> torch.Tensor:
        return self.gradients[name]

    def input_factor(self, name: str) -> torch.Tensor:
        return self.inputs[self.groups[name]]

    def packed_input_factor(self, name: str) -> PackedGram:
        z = self.input_factor(name)
        return PackedGram(pack(z), z.shape[0])

    def output_factor(self, name: str) -> torch.Tensor:
        return self.outputs[name]

    def input_group(self, name: str) -> str:
        return self.groups[name]


def synthetic_inputs(tokens: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """x [T, n] float32: power-law scales (a decaying spectrum), 32 shared correlated directions, a mean."""
    scales = torch.arange(1, n + 1, dtype=torch.float32) ** -0.5 * 2.0
    x = torch.randn(tokens, n, generator=gen) * scales[torch.randperm(n, generator=gen)]
    x += torch.randn(tokens, 32, generator=gen) @ (torch.randn(32, n, generator=gen) / math.sqrt(n) * 3.0)
    return x + 0.3 * torch.randn(n, generator=gen)


def synthetic_layer(x: torch.Tensor, m: int, examples: int, gen: torch.Generator) -> tuple:
    """G [m, n] float32 and y [m] float64 from output gradients g_t = low-rank function of x_t + noise."""
    n = x.shape[1]
    mix = (x @ (torch.randn(n, 16, generator=gen) / math.sqrt(n))) @ (torch.randn(16, m, generator=gen) / 4.0)
    g = (mix + torch.randn(x.shape[0], m, generator=gen)) * 1e-4 / math.sqrt(m)
    gradient = g.T @ x / examples
    return gradient, (g.double() ** 2).mean(0)


def build(shapes: dict, blocks: int, tokens: int, examples: int, seed: int) -> SyntheticStatistics:
    """Synthetic statistics of `blocks` blocks of `shapes` (name -> (m, n, input group)) from `tokens` tokens."""
    stats = SyntheticStatistics(examples)
    for block in range(blocks):
        gen = torch.Generator().manual_seed(seed * 1000 + block)
        inputs = {}
        for name, (m, n, group) in shapes.items():
            key = f"layers.{block}.{group}"
            if key not in inputs:
                inputs[key] = synthetic_inputs(tokens, n, gen)
                x64 = inputs[key].double()
                stats.inputs[key] = x64.T @ x64 / tokens
                del x64
            layer = f"layers.{block}.{name}"
            stats.gradients[layer], stats.outputs[layer] = synthetic_layer(inputs[key], m, examples, gen)
            stats.groups[layer] = key
    return stats


SHAPES = {name: SMOL[name][:2] for name in ("q_proj", "k_proj", "gate_proj", "down_proj")}
WIDE = {name: LLAMA7B[name][:2] for name in ("q_proj", "gate_proj", "down_proj")}
BATCH = 30  # layers of one shape in SmolLM2-135M
DEFAULT = "solve_layer, default (eigensolver='auto': 'chebyshev' on CUDA, a batch of one)"


def milliseconds(device: torch.device, work: Callable[[], object], repeats: int) -> float:
    """Median wall milliseconds of `work()` after one warm-up, the device synchronized around each run."""
    work()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def synthetic(m: int, n: int, tokens: int, device: torch.device, gen: torch.Generator) -> tuple:
    """G [m, n], y [m] and Z [n, n] (float64) of one synthetic layer on `device`."""
    x = synthetic_inputs(tokens, n, gen)
    gradient, y = synthetic_layer(x, m, 32, gen)
    x = x.to(device).double()
    return gradient.to(device), y.to(device), x.T @ x / tokens


def steps(m: int, n: int, tokens: int, device: torch.device) -> dict[str, Callable[[], object]]:
    """The dense path's steps for one synthetic [m, n] layer, each a closure over prepared inputs."""
    gen = torch.Generator().manual_seed(0)
    gradient, y, z = synthetic(m, n, tokens, device, gen)
    config = LoraDAConfig(population_size=100_000, show_progress=False)
    davidson = LoraDAConfig(population_size=100_000, show_progress=False, eigensolver="lobpcg")
    exact = LoraDAConfig(population_size=100_000, show_progress=False, eigensolver="eigh")
    factor = factor_input(z, config)
    damped = z + config.damping * torch.eye(n, dtype=z.dtype, device=device)
    g = gradient.double()
    step = -torch.cholesky_solve(g.T, factor.cholesky) / (y + config.damping)[None, :]
    outer = step @ step.T
    smaller = outer if n <= m else step.T @ step
    guidance = -outer / float(outer.diagonal().max()) + 1e-3 * torch.cholesky_inverse(factor.cholesky)
    guidance = ((guidance + guidance.T) / 2).float()
    batch = guidance.expand(BATCH, n, n).contiguous()
    omega = torch.randn(m, 16, generator=gen, dtype=torch.float64).to(device)
    starts = (step @ omega).expand(BATCH, n, 16).contiguous()
    return {
        DEFAULT: lambda: solve_layer(gradient, z, y, 8, config),
        "solve_layer, Davidson (eigensolver='lobpcg')": lambda: solve_layer(gradient, z, y, 8, davidson),
        "solve_layer, eigensolver='eigh'": lambda: solve_layer(gradient, z, y, 8, exact),
        "Cholesky of Z + lam I (float64)": lambda: torch.linalg.cholesky_ex(damped),
        "cholesky_solve with G^T (float64)": lambda: torch.cholesky_solve(g.T, factor.cholesky),
        "D D^T (float64)": lambda: step @ step.T,
        "cholesky_inverse (float64)": lambda: torch.cholesky_inverse(factor.cholesky),
        "eigvalsh of the smaller Gram (float32), for sigma": lambda: torch.linalg.eigvalsh(smaller.float()),
        "eigh of M (float32)": lambda: torch.linalg.eigh(guidance),
        "eigh of M (float64)": lambda: torch.linalg.eigh(guidance.double()),
        f"eigh of {BATCH} M at once (float32), per matrix": lambda: torch.linalg.eigh(batch),
        f"filtered_subspace of {BATCH} M at once (float64), per matrix": lambda: filtered_subspace(
            batch.double(), starts, 8, 1e-4, list(range(BATCH))),
        "one host sync (float of a tensor)": lambda: float(guidance[0, 0]),
    }


def wide_steps(m: int, n: int, tokens: int, device: torch.device) -> tuple[dict[str, Callable[[], object]], dict]:
    """One Davidson iteration's parts for a synthetic wide [m, n] layer (7B shapes), and the whole solve's
    iterations: where a wide layer's ~240 ms on a GPU go."""
    gen = torch.Generator().manual_seed(0)
    gradient, y, z = synthetic(m, n, tokens, device, gen)
    config = LoraDAConfig(population_size=100_000, show_progress=False, eigensolver="lobpcg")
    factor = factor_input(z, config)
    inv_y = 1.0 / (y + config.damping)
    g = gradient.double()
    operator = ImplicitGuidance(factor, g, inv_y, config.bias_weight, float(variance_term(inv_y, config)))
    block = torch.randn(n, 32, generator=gen, dtype=torch.float64).to(device)
    narrow = block[:, :9].contiguous()
    rayleigh = torch.randn(192, 192, generator=gen, dtype=torch.float64).to(device)
    rayleigh = rayleigh + rayleigh.T
    solution = solve_layer(gradient, factor, y, 8, config)
    info = {key: solution.info.get(key) for key in ("eigensolver", "iterations", "residual", "block_size")}
    return {
        "solve_layer, Davidson (eigensolver='lobpcg')": lambda: solve_layer(gradient, factor, y, 8, config),
        DEFAULT: lambda: solve_layer(gradient, factor, y, 8, replace(config, eigensolver="auto")),
        "Cholesky of Z + lam I (float64)": lambda: factor_input(z, config),
        "operator on 32 columns (4 triangular solves, 2 GEMMs)": lambda: operator.guidance(block),
        "K^-1 on 32 columns (2 triangular solves)": lambda: factor.solve(block),
        "K^-1 on 9 columns": lambda: factor.solve(narrow),
        "G products on 32 columns (2 GEMMs)": lambda: ((block.T @ g.T) * inv_y) @ g,
        "eigh of a 192 x 192 Rayleigh matrix (float64)": lambda: torch.linalg.eigh(rayleigh),
        "QR of n x 32 (float64)": lambda: torch.linalg.qr(block),
    }, info


def smollm2_statistics(tokens: int, device: torch.device) -> SyntheticStatistics:
    """Synthetic statistics of SmolLM2-135M's 30 blocks (210 layers) from `tokens` tokens, on `device`."""
    stats = build(SMOL, BATCH, tokens, 32, seed=0)
    for means in (stats.gradients, stats.outputs, stats.inputs):
        means.update({name: value.to(device) for name, value in means.items()})
    return stats


def profile_table(work: Callable[[], object], device: torch.device, rows: int = 20) -> str:
    """torch.profiler table of `work()` (after one warm-up call): top ops by host time, where a solve of many
    small layers waits (launches, syncs), with each op's device time beside it."""
    work()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        work()
        synchronize(device)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def table(milliseconds: dict[str, dict[str, float]]) -> list[str]:
    """Markdown rows: one per step, one column per layer shape."""
    shapes = list(milliseconds)
    lines = ["| step | " + " | ".join(shapes) + " |", "| --- |" + " ---: |" * len(shapes)]
    for step in milliseconds[shapes[0]]:
        lines.append(f"| {step} | " + " | ".join(f"{milliseconds[s][step]:.2f}" for s in shapes) + " |")
    return lines


def report(results: dict) -> str:
    """The markdown page of `results`."""
    lines = [f"# One narrow layer's solve, step by step, on {results['device']} (torch {results['torch']})", "",
             f"`python benchmarks/diagnostics/solve_parts_gpu.py{' --wide' if 'wide' in results else ''}`: synthetic "
             f"statistics from {results['tokens']} tokens, rank 8; median milliseconds of "
             f"{results.get('repeats', 5)} runs, each synchronized.", "",
             *table(results["milliseconds"])]
    if "wide" in results:
        lines += ["", "Wide layers (7B shapes): the whole solve, and the parts of a block Davidson iteration on the "
                  "implicit operator; median ms of up to 3 runs:", "", *table(results["wide"])]
        lines.append("| the solve's iterations | " + " | ".join(
            str(results["wide_solves"][s].get("iterations")) for s in results["wide"]) + " |")
    everything = results.get("solve_all_ms")  # absent from results that predate it
    heading = ("`solve_layer` of q_proj under torch.profiler:" if everything is None else
               f"`solve_all` of 210 layers ({BATCH} synthetic SmolLM2-135M blocks), median ms of 2 runs: "
               + ", ".join(f"{solver} {ms:.0f}" for solver, ms in everything.items())
               + ". The default under torch.profiler:")
    lines += ["", heading, "", "```", results["profile"].rstrip(), "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=6080, help="calibration tokens (gpu_check.py's 32 examples)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=results_dir("solve_parts_gpu"))
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite report.md from results.json in --out")
    parser.add_argument("--wide", action="store_true", help="also the parts of a Davidson iteration at 7B shapes")
    args = parser.parse_args()
    if args.report_only:
        results = json.loads((args.out / "results.json").read_text())
        write_results(args.out, results, report(results))
        return
    device = torch.device(args.device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
               "torch": torch.__version__, "tokens": args.tokens, "repeats": args.repeats, "milliseconds": {}}
    for name, (m, n) in SHAPES.items():
        work = steps(m, n, args.tokens, device)
        times = {step: milliseconds(device, run, args.repeats) for step, run in work.items()}
        times[f"eigh of {BATCH} M at once (float32), per matrix"] /= BATCH
        times[f"filtered_subspace of {BATCH} M at once (float64), per matrix"] /= BATCH
        results["milliseconds"][f"{name} [{m}, {n}]"] = times
        print(name, json.dumps(times), flush=True)
    if args.wide:
        results["wide"], results["wide_solves"] = {}, {}
        for name, (m, n) in WIDE.items():
            work, info = wide_steps(m, n, args.tokens, device)
            key = f"{name} [{m}, {n}]"
            results["wide"][key] = {step: milliseconds(device, run, min(args.repeats, 3)) for step, run in work.items()}
            results["wide_solves"][key] = info
            print(name, json.dumps(results["wide"][key]), info, flush=True)
    stats = smollm2_statistics(args.tokens, device)
    config = LoraDAConfig(population_size=100_000, show_progress=False)
    runs = {solver: lambda solver=solver: solve_all(stats, 8, replace(config, eigensolver=solver))
            for solver in ("auto", "eigh")}
    results["solve_all_ms"] = {solver: milliseconds(device, run, 2) for solver, run in runs.items()}
    print("solve_all", results["solve_all_ms"], flush=True)
    results["profile"] = profile_table(runs["auto"], device)
    write_results(args.out, results, report(results), device)
    print(report(results))


if __name__ == "__main__":
    main()
