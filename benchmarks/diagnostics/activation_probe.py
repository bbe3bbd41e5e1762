"""What the memory plan reads against what a statistics pass holds: on SmolLM2-135M (all linear layers), the bytes
`lora_da.collect.probe_batch` counts for one batch's backward (tensors autograd saves, layer inputs the hooks
hold), against the most bytes a statistics pass's forward+backward of that batch adds to the tensors alive
before it, with every layer's statistics already there (the batch's second pass through a collector). Tensor
bytes are traced by torch.profiler (`profile_memory`), allocation by allocation. Each batch size in a fresh
process:

    python benchmarks/diagnostics/activation_probe.py [--batch-sizes 1 2 8]
    # writes benchmarks/results/activation_probe/{results.json,report.md}

Memory, not time: the numbers do not depend on other load on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _harness
from _harness import command_line, hardware, results_dir, run_parts, write_results  # noqa: E402

from lora_da import LoraDAConfig  # noqa: E402
from lora_da.bench.memory import peak_tensor_bytes  # noqa: E402
from lora_da.collect import _run_pass, probe_batch  # noqa: E402
from lora_da.data import calibration_batches, encode_examples, load_examples  # noqa: E402
from lora_da.hooks import Collector  # noqa: E402
from lora_da.layers import resolve_layers, target_layer_names  # noqa: E402
from lora_da.models import load_model_and_tokenizer  # noqa: E402

CONFIG = LoraDAConfig(population_size=100_000, show_progress=False)


def measure(batch_size: int, examples: int) -> dict:
    """The first batch of `batch_size` examples: the probe's bytes and a statistics pass's memory over it."""
    model, tokenizer = load_model_and_tokenizer("smollm2-135m", dtype="float32")
    features = encode_examples(load_examples("arith", num_examples=examples, seed=0), tokenizer, 512)
    batch = calibration_batches(features, examples, batch_size, tokenizer.pad_token_id)[0]
    names = target_layer_names(model)
    probed = probe_batch(model, batch, names, CONFIG).activation_bytes
    collector = Collector(resolve_layers(model, names), CONFIG)
    _run_pass(model, [batch], collector, CONFIG, None)  # every layer's statistics allocated
    added = peak_tensor_bytes(lambda: _run_pass(model, [batch], collector, CONFIG, None))
    return {"positions": batch["input_ids"].numel(), "shape": list(batch["input_ids"].shape),
            "probe_mib": probed / 2**20, "pass_mib": added / 2**20}


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
             f"{args.examples} `arith` examples; each batch size in a fresh process. The pass: the most tensor "
             "bytes its forward+backward of the batch adds beside every layer's statistics (activations kept for "
             "the backward, and the backward's passing tensors).", "",
             "| batch | positions | probe (MiB) | pass (MiB) | probe / pass |", "| ---: | ---: | ---: | ---: | ---: |"]
    for size, run in runs.items():
        if "error" in run:
            lines.append(f"| {size} | failed: {run['error']} | | | |")
            continue
        lines.append(f"| {size} | {run['positions']} | {run['probe_mib']:.0f} | {run['pass_mib']:.0f} | "
                     f"{run['probe_mib'] / run['pass_mib']:.2f} |")
    write_results(args.out, results, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
