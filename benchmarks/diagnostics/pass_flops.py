"""Floating-point work of the statistics passes of a plan that splits the layers by depth, counted by
`torch.utils.flop_counter` (matrix products of the forward and the backward; the count does not depend on the
machine). Each pass runs the backward only down to its earliest target layer; for comparison, the same passes
with gradients flowing from the embeddings on (what a backward through every block costs), and the floor (one
forward+backward forming every target weight's gradient). SmolLM2-135M, all linear layers of the 30 blocks.
`--repeats N` also times each pass both ways, alternating, the fastest of N (on a quiet machine):

    python benchmarks/diagnostics/pass_flops.py [--passes 3] [--repeats 0]
    # writes benchmarks/results/pass_flops/{results.json,report.md}
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _harness
from _harness import results_dir, write_results  # noqa: E402

from lora_da import LoraDAConfig, collect_statistics  # noqa: E402
from lora_da.data import calibration_batches, encode_examples, load_examples  # noqa: E402
from lora_da.models import load_model_and_tokenizer  # noqa: E402


def counted(work) -> int:
    """Floating-point operations of `work()`."""
    with FlopCounterMode(display=False) as counter:
        work()
    return counter.get_total_flops()


def fastest(work, repeats: int) -> float | None:
    """The fastest of `repeats` timed runs of `work()` in seconds (None for no run)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times, default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=3, help="groups of consecutive blocks, one pass each")
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=0, help="also time each pass both ways, fastest of N")
    parser.add_argument("--out", type=Path, default=results_dir("pass_flops"))
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer("smollm2-135m", dtype="float32")
    features = encode_examples(load_examples("arith", num_examples=args.examples, seed=0), tokenizer, args.tokens)
    batches = calibration_batches(features, args.examples, args.examples, tokenizer.pad_token_id)
    blocks = model.model.layers
    per_block = [[f"model.layers.{i}.{name}" for name, module in block.named_modules()
                  if isinstance(module, torch.nn.Linear)] for i, block in enumerate(blocks)]
    size = -(-len(blocks) // args.passes)
    groups = [sum(per_block[start : start + size], []) for start in range(0, len(blocks), size)]
    config = LoraDAConfig(population_size=100_000, show_progress=False)

    def floor() -> None:
        model.requires_grad_(False)
        for names in per_block:
            for name in names:
                model.get_submodule(name).weight.requires_grad_(True)
        for batch in batches:
            model(**batch).loss.backward()
        model.requires_grad_(False)
        model.zero_grad(set_to_none=True)

    def from_embeddings(work):
        def run():
            hook = model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
            try:
                return work()
            finally:
                hook.remove()
        return run

    rows = []
    for number, group in enumerate(groups):
        def gather(group=group):
            collect_statistics(model, batches, group, config)

        row = {"blocks": [number * size, min((number + 1) * size, len(blocks)) - 1], "layers": len(group),
               "backward_to_earliest_layer": counted(gather),
               "backward_from_embeddings": counted(from_embeddings(gather))}
        if args.repeats:  # alternating, so that both ways see the same machine
            seconds = [(fastest(gather, 1), fastest(from_embeddings(gather), 1)) for _ in range(args.repeats)]
            row["seconds_to_earliest_layer"] = min(pair[0] for pair in seconds)
            row["seconds_from_embeddings"] = min(pair[1] for pair in seconds)
        rows.append(row)
    results = {"floor": counted(floor), "floor_seconds": fastest(floor, args.repeats), "examples": args.examples,
               "tokens": args.tokens, "passes": rows}
    giga = 1e9
    lines = ["# Statistics passes by depth: floating-point work", "",
             f"`python benchmarks/diagnostics/pass_flops.py --passes {args.passes}"
             f"{f' --repeats {args.repeats}' if args.repeats else ''}`: SmolLM2-135M, all linear layers "
             f"of its {len(blocks)} blocks in {len(groups)} passes of consecutive blocks, {args.examples} `arith` "
             f"examples of up to {args.tokens} tokens in one batch; GFLOP counted by torch.utils.flop_counter.", "",
             "| pass | layers | backward down to its earliest layer | backward from the embeddings | ratio |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        first, last = row["blocks"]
        lines.append(f"| blocks {first}-{last} | {row['layers']} | {row['backward_to_earliest_layer'] / giga:.0f} | "
                     f"{row['backward_from_embeddings'] / giga:.0f} | "
                     f"{row['backward_to_earliest_layer'] / row['backward_from_embeddings']:.2f} |")
    total = sum(row["backward_to_earliest_layer"] for row in rows)
    before = sum(row["backward_from_embeddings"] for row in rows)
    lines += [f"| all {len(groups)} passes | {sum(row['layers'] for row in rows)} | {total / giga:.0f} | "
              f"{before / giga:.0f} | {total / before:.2f} |", "",
              f"The floor (one forward+backward forming every target weight's gradient): {results['floor'] / giga:.0f} "
              f"GFLOP; the {len(groups)} passes: {total / results['floor']:.2f}x it ({before / results['floor']:.2f}x "
              "with every backward from the embeddings).", ""]
    if args.repeats:
        floor_seconds = results["floor_seconds"]
        lines += [f"Seconds, the fastest of {args.repeats} alternating runs (the floor: {floor_seconds:.2f} s):", "",
                  "| pass | backward down to its earliest layer | backward from the embeddings | ratio |",
                  "| --- | ---: | ---: | ---: |"]
        for row in rows:
            first, last = row["blocks"]
            mine, theirs = row["seconds_to_earliest_layer"], row["seconds_from_embeddings"]
            lines.append(f"| blocks {first}-{last} | {mine:.2f} | {theirs:.2f} | {mine / theirs:.2f} |")
        mine = sum(row["seconds_to_earliest_layer"] for row in rows)
        theirs = sum(row["seconds_from_embeddings"] for row in rows)
        lines += [f"| all {len(groups)} passes | {mine:.2f} ({mine / floor_seconds:.2f}x the floor) | {theirs:.2f} "
                  f"({theirs / floor_seconds:.2f}x) | {mine / theirs:.2f} |", ""]
    write_results(args.out, results, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
