"""What the memory plan reads against what a statistics pass holds: on SmolLM2-135M (all linear layers), the bytes
`lora_da.collect.probe_batch` counts for one batch's backward (tensors autograd saves, layer inputs the hooks
hold), against a statistics pass over that batch, whose memory grown (resident memory, sampled every 50 ms)
less its statistics is what its activations and passing tensors took. Each batch size in a fresh process:

    python benchmarks/diagnostics/activation_probe.py [--batch-sizes 1 8]
    # writes benchmarks/results/activation_probe/{results.json,report.md}

Memory, not time: the numbers do not depend on other load on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _harness
from _harness import command_line, hardware, measured, results_dir, run_parts, write_results  # noqa: E402

from lora_da import LoraDAConfig, collect_statistics  # noqa: E402
from lora_da.collect import probe_batch  # noqa: E402
from lora_da.data import calibration_batches, encode_examples, load_examples  # noqa: E402
from lora_da.hooks import FOLD_TOKENS  # noqa: E402
from lora_da.layers import target_layer_names  # noqa: E402
from lora_da.models import load_model_and_tokenizer  # noqa: E402
from lora_da.statistics import INPUT_CHUNK_DTYPE  # noqa: E402

CONFIG = LoraDAConfig(population_size=100_000, show_progress=False)


def measure(batch_size: int, examples: int) -> dict:
    """One batch of `batch_size` examples: the probe's bytes and a statistics pass's memory over it."""
    torch.set_num_threads(1)
    model, tokenizer = load_model_and_tokenizer("smollm2-135m", dtype="float32")
    features = encode_examples(load_examples("arith", num_examples=examples, seed=0), tokenizer, 512)
    batch = calibration_batches(features, examples, batch_size, tokenizer.pad_token_id)[0]
    names = target_layer_names(model)
    collect_statistics(model, [batch], names[:1], CONFIG)  # warm-up: thread pools, allocator
    probed = probe_batch(model, batch, names, CONFIG).activation_bytes
    gathered = {}
    run = measured(torch.device("cpu"), lambda: gathered.update(stats=collect_statistics(model, [batch], names,
                                                                                          CONFIG)))
    stats = gathered["stats"]
    # a batch of fewer rows than FOLD_TOKENS sums each Z in a float32 chunk too, freed before the pass returns
    rows = int(batch["attention_mask"].sum())
    chunks = sum(INPUT_CHUNK_DTYPE.itemsize * z.numel() for z in stats.input_sums.values()) if rows < FOLD_TOKENS else 0
    return {"positions": batch["input_ids"].numel(), "shape": list(batch["input_ids"].shape), "rows": rows,
            "probe_mib": probed / 2**20, "grown_mib": run["grown_mib"], "statistics_mib": stats.nbytes() / 2**20,
            "chunks_mib": chunks / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--examples", type=int, default=32, help="arith examples the batches are cut from")
    parser.add_argument("--part", help="internal: measure one batch size")
    parser.add_argument("--out", type=Path, default=results_dir("activation_probe"))
    args = parser.parse_args()
    if args.part:
        print(json.dumps(measure(int(args.part), args.examples)))
        return
    argv = sys.argv[1:]
    runs = run_parts(__file__, [str(size) for size in args.batch_sizes], argv)
    results = {"command": command_line(argv), "machine": hardware("cpu"), "runs": runs}
    lines = ["# The memory plan's activations against a statistics pass", "",
             f"`{' '.join(['python benchmarks/diagnostics/activation_probe.py', results['command']]).strip()}`"
             f" on {results['machine']}: SmolLM2-135M in float32, all 210 linear layers, the first batch of "
             f"{args.examples} `arith` examples; each batch size in a fresh process. The pass's own activations "
             "and passing tensors: its memory grown less its statistics and, for a batch of fewer than "
             f"{FOLD_TOKENS} rows, the float32 chunks of Z.", "",
             "| batch | positions | probe (MiB) | pass grown | statistics | chunks of Z | pass's activations | "
             "probe / pass |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for size, run in runs.items():
        if "error" in run:
            lines.append(f"| {size} | failed: {run['error']} | | | | | | |")
            continue
        rest = run["grown_mib"] - run["statistics_mib"] - run["chunks_mib"]
        lines.append(f"| {size} | {run['positions']} | {run['probe_mib']:.0f} | {run['grown_mib']:.0f} | "
                     f"{run['statistics_mib']:.0f} | {run['chunks_mib']:.0f} | {rest:.0f} | "
                     f"{run['probe_mib'] / rest:.2f} |")
    write_results(args.out, results, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
