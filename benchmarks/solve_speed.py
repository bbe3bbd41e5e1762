"""Per-layer LoRA-DA solve: the explicit-M solver (`--old-ref`, by default the last commit before the implicit
path) vs the working tree's, on synthetic statistics.

Statistics are built the way the hooks build them, from T synthetic tokens: inputs x_t with a decaying spectrum
and a mean offset (so Z has rank min(T, n), rank-deficient when T < n), output gradients g_t that depend on x_t
through a low-rank map plus noise, G = sum_t g_t x_t^T / examples, Z = mean x x^T (float64), y = mean g^2 (far
below the damping, as with a token-mean loss). Cases:

  (a) SmolLM2-135M shapes (q 576x576, k/v 192x576, o 576x576, gate/up 1536x576, down 576x1536), `--blocks`
      blocks of 7 layers (the model has 30; times are also scaled to 30), T = 4 and 32 examples x 150 tokens;
  (b) one Llama-7B block (q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008), T = 2048 and 4096 tokens;
      the old solver took ~900 s there, so it runs on `--old-7b-layers` only (default q_proj and down_proj,
      down_proj only at the first T).

Both solvers run in this one process, side by side, `--repeats` times each (the machine is shared: compare
within a row). Reports seconds, each layer's residual and eigensolver, and the agreement of the two subspaces
(||U U^T - U' U'^T||_F) and updates (relative ||B A - B' A'||_F):

    python benchmarks/solve_speed.py            # writes benchmarks/results/solve_speed.{json,md}
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lora_da import LoraDAConfig
from lora_da import solver as new_solver
from lora_da.gram import PackedGram, pack

RESULTS = Path(__file__).parent / "results"
SMOL = {"q_proj": (576, 576, "x"), "k_proj": (192, 576, "x"), "v_proj": (192, 576, "x"), "o_proj": (576, 576, "o"),
        "gate_proj": (1536, 576, "h"), "up_proj": (1536, 576, "h"), "down_proj": (576, 1536, "d")}
LLAMA7B = {"q_proj": (4096, 4096, "x"), "k_proj": (4096, 4096, "x"), "v_proj": (4096, 4096, "x"),
           "o_proj": (4096, 4096, "o"), "gate_proj": (11008, 4096, "h"), "up_proj": (11008, 4096, "h"),
           "down_proj": (4096, 11008, "d")}


# The last commit with the explicit-M solver (dense eigh / torch.lobpcg on M), before the implicit path.
OLD_REF = "569b500"


def load_head_solver(ref: str = OLD_REF):
    """The solver module as committed at `ref`, imported from a temporary file inside the package."""
    source = subprocess.run(["git", "show", f"{ref}:src/lora_da/solver.py"], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).parent).stdout
    path = Path(tempfile.mkdtemp()) / "solver_head.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("lora_da._solver_head", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


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

    def input_factor(self, name: str) -> torch.Tensor:  # what the old solver (`--old-ref`) reads
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


def compare(old: dict, new: dict) -> dict:
    """Per layer: subspace distance ||U U^T - U' U'^T||_F and relative update difference."""
    out = {}
    for name in new:
        if name not in old:
            continue
        u, v = old[name].A.double().T, new[name].A.double().T
        u, v = u / u.norm(dim=0), v / v.norm(dim=0)
        ba_old, ba_new = old[name].B.double() @ old[name].A.double(), new[name].B.double() @ new[name].A.double()
        out[name] = {"subspace_distance": float((u @ u.T - v @ v.T).norm()),
                     "update_rel_diff": float((ba_old - ba_new).norm() / ba_old.norm())}
    return out


def timed(module, stats, rank: int, config: LoraDAConfig, layers: list[str] | None) -> tuple[float, dict]:
    start = time.perf_counter()
    solutions = module.solve_all(stats, rank, config, layers=layers, progress=False)
    return time.perf_counter() - start, solutions


def layer_rows(solutions: dict) -> dict:
    return {name: {k: s.info.get(k) for k in ("eigensolver", "residual", "seconds", "iterations", "eigengap")}
            for name, s in solutions.items()}


def run_case(label: str, stats, old_module, old_layers, args, config, scale_to: int = 1) -> dict:
    record = {"case": label, "layers": len(stats.layer_names), "old_layers": old_layers, "new_seconds": [],
              "old_seconds": [], "scale_to_model": scale_to}
    for _ in range(args.repeats):
        seconds, new = timed(new_solver, stats, args.rank, config, None)
        record["new_seconds"].append(seconds)
        if old_layers is None or old_layers:
            seconds, old = timed(old_module, stats, args.rank, config, old_layers)
            record["old_seconds"].append(seconds)
        print(f"{label}: new {record['new_seconds'][-1]:.2f} s, old {record['old_seconds'][-1:]} s", flush=True)
    record["new_on_old_layers_seconds"] = sum(new[name].info["seconds"] for name in (old_layers or new))
    record["new_layers"] = layer_rows(new)
    if record["old_seconds"]:
        record["old_layers_info"] = layer_rows(old)
        record["agreement"] = compare(old, new)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=6, help="SmolLM2 blocks of 7 layers (the model has 30)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-7b", action="store_true")
    parser.add_argument("--old-7b-layers", default="q_proj,down_proj")
    parser.add_argument("--population-size", type=int, default=100_000)
    parser.add_argument("--old-ref", default=OLD_REF, help="git revision of the solver to compare against")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = LoraDAConfig(population_size=args.population_size, show_progress=False)
    old_module = load_head_solver(args.old_ref)
    cases = []
    for examples in (4, 32):
        stats = build(SMOL, args.blocks, examples * 150, examples, seed=examples)
        cases.append(run_case(f"smollm2 x{args.blocks} blocks, {examples} examples ({examples * 150} tokens)",
                              stats, old_module, None, args, config, scale_to=30 // args.blocks))
    if not args.skip_7b:
        for index, tokens in enumerate((2048, 4096)):
            build_start = time.perf_counter()
            stats = build(LLAMA7B, 1, tokens, tokens // 128, seed=7)
            print(f"7b statistics built in {time.perf_counter() - build_start:.0f} s", flush=True)
            wanted = [f"layers.0.{name}" for name in args.old_7b_layers.split(",") if name]
            if index > 0:
                wanted = [name for name in wanted if not name.endswith("down_proj")]
            repeats, args.repeats = args.repeats, 1  # minutes per run: once
            cases.append(run_case(f"llama-7b block, {tokens} tokens", stats, old_module, wanted, args, config))
            args.repeats = repeats
            del stats
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "rank": args.rank, "population_size": args.population_size, "cases": cases}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "solve_speed.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "solve_speed.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [f"# Per-layer solve speed: solver at {OLD_REF} (old) vs working tree (new)", "",
             f"`python benchmarks/solve_speed.py` on {result['machine']}, rank {result['rank']}, "
             f"population_size {result['population_size']}, synthetic statistics (see the script's docstring). "
             "Times are the best of the repeats, in one process, old and new alternating.", "",
             "| case | layers | old s | new s | new s on the old's layers | speedup | max subspace dist | "
             "max update rel diff | new max residual |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for case in result["cases"]:
        new, old = min(case["new_seconds"]), min(case["old_seconds"]) if case["old_seconds"] else math.nan
        same = case["new_on_old_layers_seconds"] if case["old_layers"] else new
        agreement = case.get("agreement", {})
        dist = max((a["subspace_distance"] for a in agreement.values()), default=math.nan)
        diff = max((a["update_rel_diff"] for a in agreement.values()), default=math.nan)
        residual = max(row["residual"] for row in case["new_layers"].values())
        old_label = "all" if case["old_layers"] is None else ", ".join(n.split(".")[-1] for n in case["old_layers"])
        lines.append(f"| {case['case']} (old on: {old_label}) | {case['layers']} | {old:.2f} | {new:.2f} | "
                     f"{same:.2f} | {old / same:.1f}x | {dist:.1e} | {diff:.1e} | {residual:.1e} |")
        if case["scale_to_model"] > 1:
            lines.append(f"| - scaled to 30 blocks | {case['layers'] * case['scale_to_model']} | "
                         f"{old * case['scale_to_model']:.1f} | {new * case['scale_to_model']:.1f} | | | | | |")
    lines += ["", "Per layer (7B block): new solver's eigensolver, iterations, residual and seconds; old solver's "
              "seconds where it ran.", "", "| case | layer | new | iterations | residual | new s | old | old s |",
              "| --- | --- | --- | ---: | ---: | ---: | --- | ---: |"]
    for case in result["cases"]:
        if case["scale_to_model"] > 1:
            continue
        old_info = case.get("old_layers_info", {})
        for name, row in case["new_layers"].items():
            o = old_info.get(name, {})
            lines.append(f"| {case['case']} | {name.split('.')[-1]} | {row['eigensolver']} | {row['iterations']} | "
                         f"{row['residual']:.1e} | {row['seconds']:.1f} | {o.get('eigensolver', '-')} | "
                         f"{o['seconds']:.1f} |" if o else
                         f"| {case['case']} | {name.split('.')[-1]} | {row['eigensolver']} | {row['iterations']} | "
                         f"{row['residual']:.1e} | {row['seconds']:.1f} | - | - |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
