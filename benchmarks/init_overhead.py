"""LoRA-DA init overhead on the embedded SmolLM2-135M: our init (statistics + solve) against the floor, one
forward+backward pass that forms every target layer's weight gradient, and against PEFT's LoRA-GA (which needs
a gradient pass too), at several batch sizes; optionally the authors' released implementation side by side (its
`lora_da.py` given by path, never committed). Both inits are timed as PEFT's wrap plus the init.

Each measurement runs in a fresh process, so that its peak memory is its own:
    python benchmarks/init_overhead.py [--released PATH/lora_da.py] [--device cuda]
writes benchmarks/results/init_overhead/{results.json,report.md} (with --device cuda: init_overhead_gpu/), including
a torch.profiler table of our statistics pass.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from _harness import (
    MEMORY_NOTE,
    TRACED_NOTE,
    Shape,
    add_common_arguments,
    add_parts,
    best_runs,
    command_line,
    floor_pass,
    hardware,
    measured,
    memory_account,
    ours_init,
    profile_statistics,
    released_init,
    repeated,
    results_dir,
    run_parts,
    step_rows,
    traced_memory,
    write_results,
)

POPULATION = 100_000
#: The embedded model's blocks, for the memory account (its output head is not adapted).
SMOLLM2 = Shape("SmolLM2-135M", 30, 576, 1536, 192)


def load(args, batch_size: int):
    from lora_da.data import calibration_batches, encode_examples, load_examples
    from lora_da.models import load_model_and_tokenizer

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device)
    examples = load_examples("arith", num_examples=args.examples, seed=0)
    features = encode_examples(examples, tokenizer, max_length=args.max_length)
    batches = calibration_batches(features, args.examples, batch_size, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    return model, batches


def run_part(args) -> dict:
    part, _, size = args.part.split("#")[0].partition("@")
    model, batches = load(args, int(size))
    device = next(model.parameters()).device
    per_batch = [int(b["attention_mask"].sum()) for b in batches]
    floor_pass(model, batches[:1])  # warm-up in every process: kernels and thread pools, not the measured work
    if part in ("floor", "floor-rows"):
        result = measured(device, lambda: floor_pass(model, batches, head_rows=part == "floor-rows"))
    elif part == "released":
        result = measured(device, lambda: released_init(args.released, model, batches, args.rank, POPULATION))
    elif part == "lora-ga":
        from lora_da.methods import create_adapted_model

        def peft_lora_ga() -> None:
            create_adapted_model(model, "lora_ga", rank=args.rank, calibration_batches=batches)

        result = measured(device, peft_lora_ga)
    else:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=args.rank, lora_alpha=16, use_rslora=True, target_modules="all-linear", lora_dropout=0.0)
        if part == "profile":
            return {"table": profile_statistics(get_peft_model(model, lora), batches)}
        if part == "memory-trace":
            return traced_memory(model, batches, lambda: ours_init(get_peft_model(model, lora), batches, POPULATION))
        result = measured(device, lambda: ours_init(get_peft_model(model, lora), batches, POPULATION))
    return {**result, "tokens": sum(per_batch), "smallest_batch_tokens": min(per_batch)}


def parts_for(args) -> list[str]:
    parts = []
    for size in args.batch_sizes:
        parts += repeated([f"floor@{size}", f"floor-rows@{size}", f"lora-da@{size}", f"lora-ga@{size}"], args.repeats)
        parts += [f"released@{size}"] if args.released else []
        parts += [f"memory-trace@{size}"] if args.device == "cpu" else []
    return parts + [f"profile@{args.batch_sizes[-1]}"]


def report(args, results: dict) -> str:
    machine = results["machine"]
    lines = [
        "# LoRA-DA init overhead",
        "",
        f"`{' '.join(['python benchmarks/init_overhead.py', results.get('command', '')]).strip()}` on {machine}: "
        f"{args.model}, "
        f"{args.examples} `arith` examples, rank {args.rank}, all linear layers of the blocks. Floor: one "
        "forward+backward pass forming every target layer's weight gradient (what LoRA-DA's G needs), with "
        "the model's own loss, which projects every position onto the vocabulary; our statistics pass projects "
        "only the positions that predict a supervised token, so a second floor does the same. Both inits are timed as "
        "PEFT's wrap plus the init. Each "
        f"row is a fresh process, the fastest of {args.repeats} for the floors and the inits (the runs alternate; "
        f"every run's seconds are in the JSON file); {MEMORY_NOTE}.",
        "",
        "| batch | step | seconds | x floor | memory grown (MiB) |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for size in args.batch_sizes:
        floor = results["parts"][f"floor@{size}"]
        rows = [("floor", floor), ("floor, supervised positions projected", results["parts"][f"floor-rows@{size}"]),
                ("LoRA-DA (ours)", results["parts"][f"lora-da@{size}"]),
                ("PEFT LoRA-GA", results["parts"][f"lora-ga@{size}"])]
        if args.released:
            rows.append(("released implementation", results["parts"][f"released@{size}"]))
        for label, row in rows:
            lines += step_rows(f"{size} | ", label, row, floor)
        ours, released = results["parts"][f"lora-da@{size}"], results["parts"].get(f"released@{size}", {})
        tight = results["parts"][f"floor-rows@{size}"]
        if "statistics_seconds" in ours and "seconds" in tight:
            lines.append(f"| {size} | ours / floor with supervised positions projected: total "
                         f"{ours['seconds'] / tight['seconds']:.2f}x, statistics "
                         f"{ours['statistics_seconds'] / tight['seconds']:.2f}x | | |")
        peer = results["parts"][f"lora-ga@{size}"]
        if "seconds" in ours and "seconds" in peer:
            lines.append(f"| {size} | ours / PEFT LoRA-GA | {ours['seconds'] / peer['seconds']:.2f}x | | |")
        if "seconds" in ours and "seconds" in released:
            lines.append(f"| {size} | released / ours | {released['seconds'] / ours['seconds']:.2f}x | | |")
    if args.model == "smollm2-135m":
        lines += ["", "## Memory", "",
                  "The init holds the floor's activations with its statistics in place of the weight gradients, then "
                  "solves the layers of one input at a time, each group's statistics released as it is solved "
                  "(`lora_da.solver.solve_working_bytes` bounds a solve's working set)."]
        for size in args.batch_sizes:
            floor, ours = results["parts"][f"floor@{size}"], results["parts"][f"lora-da@{size}"]
            if "grown_mib" in floor and "grown_mib" in ours:
                smallest = ours.get("smallest_batch_tokens", 0)  # 0: not recorded, so a chunk of Z is counted
                lines += ["", f"Batch {size}:", "", *memory_account(SMOLLM2, SMOLLM2.blocks, floor, ours, 4, smallest,
                                                                      results["parts"].get(f"memory-trace@{size}"))]
        if any(f"memory-trace@{size}" in results["parts"] for size in args.batch_sizes):
            lines += ["", TRACED_NOTE]
    profile = results["parts"][f"profile@{args.batch_sizes[-1]}"]
    lines += ["", f"Our statistics pass under torch.profiler (batch {args.batch_sizes[-1]}):", "", "```",
              profile.get("table", profile.get("error", "")).rstrip(), "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="runs of the floors and of our init (fastest kept)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/init_overhead (init_overhead_gpu with --device cuda)")
    add_common_arguments(parser)
    parser.add_argument("--report-only", action="store_true", help="rewrite report.md from results.json")
    parser.add_argument("--add-parts", nargs="+", metavar="PART",
                        help="run only these parts (e.g. memory-trace@8) and add them to the results in --out")
    args = parser.parse_args()
    if args.part:
        print(json.dumps(run_part(args)))
        return
    out = args.out or results_dir("init_overhead_gpu" if args.device.startswith("cuda") else "init_overhead")
    if args.report_only or args.add_parts:
        results = json.loads((out / "results.json").read_text())
        for key in ("model", "examples", "max_length", "rank", "batch_sizes"):
            setattr(args, key, results[key])
        args.released = results["released"]
        args.repeats = max(len([r for r in results["runs"] if r.startswith(f"floor@{args.batch_sizes[0]}")]), 1)
        if args.add_parts:
            add_parts(__file__, results, args.add_parts, ["--model", args.model, "--device", args.device,
                                                          "--examples", str(args.examples),
                                                          "--max-length", str(args.max_length),
                                                          "--rank", str(args.rank)])
    else:
        results = {"model": args.model, "examples": args.examples, "max_length": args.max_length, "rank": args.rank,
                   "batch_sizes": args.batch_sizes, "released": bool(args.released),
                   "machine": hardware(args.device), "command": command_line(sys.argv[1:]),
                   "runs": run_parts(__file__, parts_for(args), sys.argv[1:])}
        results["parts"] = best_runs(results["runs"])
    text = report(args, results)
    write_results(out, results, text, args.device)
    print(text)


if __name__ == "__main__":
    main()
