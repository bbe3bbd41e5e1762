"""The memory plan with and without the shared-input count, on SmolLM2-135M with a `memory_budget` that needs
several passes: before any forward each layer is counted with a Z of its own (q/k/v and gate/up share one);
one gradient-free forward of the first batch finds the shared inputs and the plan counts each Z once. Both
plans run here side by side (the per-layer count by skipping that forward), with the passes, seconds, peak
resident memory grown and whether the factors are identical.

    python benchmarks/diagnostics/shared_inputs_plan.py [--budget-mib 680]
    # writes benchmarks/results/shared_inputs_plan/{results.json,report.md}
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from lora_da import LoraDAConfig, adapter, initialize_lora_da
from lora_da.data import calibration_batches, encode_examples, load_examples
from lora_da.models import load_model_and_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _harness
from _harness import measured, results_dir, write_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-mib", type=int, default=680, help="per-layer count: 3 passes, shared: 2")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=results_dir("shared_inputs_plan"))
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    features = encode_examples(load_examples("arith", num_examples=args.examples, seed=0), tokenizer, 256)
    batches = calibration_batches(features, args.examples, args.batch_size, tokenizer.pad_token_id)
    lora = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear", lora_dropout=0.0)
    config = LoraDAConfig(population_size=100_000, show_progress=False)
    budget = args.budget_mib * 2**20
    results, factors = {}, {}
    discover = adapter._input_groups
    plans = {"a Z per layer": lambda *a: None, "each shared Z once": discover}
    # each plan twice, in the order A B B A (the first run also warms the allocator up); the faster run is kept
    for name in [*plans, *reversed(plans)]:
        adapter._input_groups = plans[name]
        peft_model = get_peft_model(copy.deepcopy(model), lora)

        def run(peft_model=peft_model) -> dict:
            report = initialize_lora_da(peft_model, batches, config, memory_budget=budget)
            return {"passes": report.passes, "statistics_seconds": report.statistics_seconds,
                    "solve_seconds": report.solve_seconds,
                    "statistics_estimate_mib": report.statistics_bytes_estimate / 2**20}

        row = measured(torch.device("cpu"), run)
        print(name, json.dumps(row), flush=True)
        if name not in results or row["seconds"] < results[name]["seconds"]:
            results[name] = row
        factors[name] = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    adapter._input_groups = discover
    first, second = factors.values()
    results["identical factors"] = all(torch.equal(first[k], second[k]) for k in first)
    lines = ["# Memory plan: a Z per layer vs each shared Z once", "",
             f"`python benchmarks/diagnostics/shared_inputs_plan.py --budget-mib {args.budget_mib}`: "
             f"SmolLM2-135M, {args.examples} `arith` "
             f"examples in batches of {args.batch_size}, rank 8, all 210 linear layers, memory_budget "
             f"{args.budget_mib} MiB; each plan twice, alternating, the faster run shown.", "",
             "| plan | passes | init s | statistics s | solve s | largest pass (est. MiB) | memory grown (MiB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in ("a Z per layer", "each shared Z once"):
        row = results[name]
        lines.append(f"| {name} | {row['passes']} | {row['seconds']:.1f} | {row['statistics_seconds']:.1f} | "
                     f"{row['solve_seconds']:.1f} | {row['statistics_estimate_mib']:.0f} | {row['grown_mib']:.0f} |")
    lines += ["", f"Identical factors: {results['identical factors']}.", ""]
    write_results(args.out, results, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
