"""LoRA-DA init overhead on the embedded SmolLM2-135M: statistics + solve vs one forward+backward pass.

Each measurement runs in a fresh process so that its peak RSS is its own:
    python benchmarks/init_overhead.py            # writes benchmarks/results/init_overhead.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def load(args):
    from peft import LoraConfig, get_peft_model

    from lora_da.data import calibration_batches, encode_examples, load_examples
    from lora_da.models import load_model_and_tokenizer

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(args.model)
    examples = load_examples("arith", num_examples=args.examples, seed=0)
    features = encode_examples(examples, tokenizer, max_length=args.max_length)
    batches = calibration_batches(features, args.examples, args.batch_size, tokenizer.pad_token_id)
    lora = LoraConfig(r=args.rank, lora_alpha=16, use_rslora=True, target_modules="all-linear", lora_dropout=0.0)
    return get_peft_model(model, lora), batches


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_part(args) -> dict:
    model, batches = load(args)
    tokens = int(sum(b["attention_mask"].sum() for b in batches))
    rss_loaded = peak_rss_mib()
    if args.part == "floor":
        start = time.perf_counter()
        for batch in batches:
            model(**batch).loss.backward()
        return {"seconds": time.perf_counter() - start, "tokens": tokens, "peak_rss_mib": peak_rss_mib(),
                "rss_after_load_mib": rss_loaded}
    from lora_da import LoraDAConfig, initialize_lora_da, solve_all

    config = LoraDAConfig(population_size=100_000, eigensolver=args.eigensolver)
    report = initialize_lora_da(model, batches, config)
    result = {"seconds": report.total_seconds, "statistics_seconds": report.statistics_seconds,
              "solve_seconds": report.solve_seconds, "tokens": tokens, "peak_rss_mib": peak_rss_mib(),
              "rss_after_load_mib": rss_loaded, "layers": len(report.layers),
              "solvers_used": sorted({v["eigensolver"] for v in report.layers.values()})}
    # Solve-only timings of each eigensolver on the same statistics (no model pass).
    from lora_da import collect_statistics

    with model.disable_adapter():
        stats = collect_statistics(model, batches, list(report.layers), LoraDAConfig(variance_weight=0,
                                                                                     show_progress=False))
    for solver in ("eigh", "lobpcg", "auto"):
        start = time.perf_counter()
        solve_all(stats, args.rank, LoraDAConfig(population_size=100_000, eigensolver=solver, show_progress=False))
        result[f"solve_seconds_{solver}"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--eigensolver", default="auto")
    parser.add_argument("--part", choices=["floor", "lora-da"], help="internal: run one measurement")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    if args.part:
        print(json.dumps(run_part(args)))
        return
    results = {"model": args.model, "examples": args.examples, "max_length": args.max_length,
               "batch_size": args.batch_size, "rank": args.rank, "target_modules": "all-linear",
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    for part in ("floor", "lora-da"):
        command = [sys.executable, __file__, "--part", part, *sys.argv[1:]]
        output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
        results[part] = json.loads(output.strip().splitlines()[-1])
        print(part, results[part], flush=True)
    results["ratio_to_floor"] = results["lora-da"]["seconds"] / results["floor"]["seconds"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "init_overhead.json").write_text(json.dumps(results, indent=2) + "\n")
    floor, init = results["floor"], results["lora-da"]
    table = [
        "# LoRA-DA init overhead",
        "",
        f"`python benchmarks/init_overhead.py` on {results['machine']}: {args.model}, {args.examples} `arith` "
        f"examples ({floor['tokens']} tokens, batch {args.batch_size}), rank {args.rank}, all linear layers "
        f"of the blocks ({init['layers']} layers).",
        "",
        "| step | seconds | peak RSS (MiB) |",
        "| --- | ---: | ---: |",
        f"| floor: one forward+backward pass (LoRA training step) | {floor['seconds']:.1f} | "
        f"{floor['peak_rss_mib']:.0f} |",
        f"| LoRA-DA init, total | {init['seconds']:.1f} | {init['peak_rss_mib']:.0f} |",
        f"| - statistics (one pass, hooks) | {init['statistics_seconds']:.1f} | |",
        f"| - solve ({', '.join(init['solvers_used'])}) | {init['solve_seconds']:.1f} | |",
        "",
        f"LoRA-DA init / floor = **{results['ratio_to_floor']:.2f}x** (target <= 1.3x).",
        "",
        "Solve only, same statistics: "
        + ", ".join(f"`{s}` {init[f'solve_seconds_{s}']:.1f} s" for s in ("eigh", "lobpcg", "auto"))
        + ".",
        "",
    ]
    (RESULTS / "init_overhead.md").write_text("\n".join(table))
    print("\n".join(table))


if __name__ == "__main__":
    main()
