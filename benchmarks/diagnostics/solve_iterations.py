"""How many block Davidson iterations each kind of layer needs, on the statistics of a trained model and on those
of the random 7B-shaped block that stands in for big models, with how steeply the wanted end of M's spectrum
falls: lambda_r / lambda_1 of its r smallest eigenvalues (near 1 where they are about equal). The iteration starts
from a random sketch of the natural-gradient step's range, which finds a few dominant directions at once but not
r directions of about equal weight. Counts, not seconds: the numbers do not depend on the machine or its load.

- SmolLM2-135M (trained, float32): all 210 linear layers of its blocks, 32 `arith` examples of up to 256 tokens in
  batches of 8;
- one Llama block of hidden 4096 and intermediate 11008 with random weights (as `scale_7b.py` builds it), 32
  random sequences of 128 tokens in batches of 8.

Rank 8, the default configuration (`population_size` 100000):

    python benchmarks/diagnostics/solve_iterations.py
    # writes benchmarks/results/solve_iterations/{results.json,report.md}
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _harness, scale_7b
import scale_7b  # noqa: E402
from _harness import results_dir, write_results  # noqa: E402

from lora_da import LoraDAConfig, collect_statistics, solve_all  # noqa: E402
from lora_da.data import calibration_batches, encode_examples, load_examples  # noqa: E402
from lora_da.models import load_model_and_tokenizer  # noqa: E402

RANK = 8
CONFIG = LoraDAConfig(population_size=100_000, show_progress=False)


def smollm2() -> tuple[torch.nn.Module, list[dict], list[str]]:
    model, tokenizer = load_model_and_tokenizer("smollm2-135m", dtype="float32")
    features = encode_examples(load_examples("arith", num_examples=32, seed=0), tokenizer, 256)
    return model, calibration_batches(features, 32, 8, tokenizer.pad_token_id), linear_layers(model)


def block_7b() -> tuple[torch.nn.Module, list[dict], list[str]]:
    args = SimpleNamespace(blocks=1, examples=32, tokens=128, batch_size=8, rank=RANK, device="cpu")
    model, batches, _, _ = scale_7b.build(args)
    return model, batches, linear_layers(model)


def linear_layers(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.model.layers.named_modules(prefix="model.layers")
            if isinstance(module, torch.nn.Linear)]


def by_kind(model: torch.nn.Module, batches: list[dict], names: list[str]) -> dict[str, dict]:
    """Per kind of layer: its layers' iterations, and lambda_r / lambda_1 of M's r smallest eigenvalues (the
    median over the layers)."""
    model.requires_grad_(False)
    stats = collect_statistics(model, batches, names, CONFIG)
    kinds: dict[str, dict] = {}
    for name, solution in solve_all(stats, RANK, CONFIG).items():
        info = solution.info
        values = info["eigenvalues"]
        row = kinds.setdefault(name.rsplit(".", 1)[-1], {"iterations": [], "falls": []})
        row["iterations"].append(info.get("iterations"))
        row["falls"].append(values[-1] / values[0])
    return {kind: {"layers": len(row["iterations"]), "iterations": [min(row["iterations"]), max(row["iterations"])],
                   "median_iterations": statistics.median(row["iterations"]),
                   "median_last_over_first": statistics.median(row["falls"])}
            for kind, row in kinds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=results_dir("solve_iterations"))
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"rank": RANK, "models": {"SmolLM2-135M (trained)": by_kind(*smollm2()),
                                        "7B-shaped block (random weights)": by_kind(*block_7b())}}
    lines = ["# Block Davidson iterations by layer kind", "",
             "`python benchmarks/diagnostics/solve_iterations.py`: rank 8, the default configuration. Iterations of "
             "the solve of each kind of layer (fewest-most over the model's layers; the 7B-shaped block has one of "
             "each), and the median of lambda_8 / lambda_1 of the 8 smallest eigenvalues of M.", "",
             "| model | layer | layers | iterations | median | lambda_8 / lambda_1 |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for model, kinds in results["models"].items():
        for kind, row in kinds.items():
            low, high = row["iterations"]
            lines.append(f"| {model} | {kind} | {row['layers']} | {low}-{high} | {row['median_iterations']:g} | "
                         f"{row['median_last_over_first']:.3g} |")
    lines.append("")
    write_results(args.out, results, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
