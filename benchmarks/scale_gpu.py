"""LoRA-DA init on one GPU: seconds and peak GPU memory on a random Llama-2-7B-shaped bf16 model.

The model is built from a config (hidden 4096, 32 blocks, intermediate 11008, vocab 32000), randomly
initialized in bfloat16; calibration data are 256 random sequences of 512 tokens. Each `--layers-per-pass`
value is one `initialize_lora_da` run (all linear layers of the blocks, rank 16), timed with CUDA events and
`torch.cuda.max_memory_allocated`, against the floor (one forward+backward over the same batches forming every
target weight's gradient). Meant to finish in under 5 minutes on an H200:

    python benchmarks/scale_gpu.py --gpu-gib 80   # writes benchmarks/results/scale_gpu/{results.json,report.md}
    python benchmarks/scale_gpu.py --tiny --device cpu   # a seconds-long smoke test of the same code
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _harness import command_line, floor_pass, measured, results_dir, write_results

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=256, max_position_embeddings=512)


def build_model(shape: dict, device: torch.device):
    """A randomly initialized LlamaForCausalLM in bfloat16, built directly on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shape, torch_dtype="bfloat16")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def random_batches(count: int, length: int, batch_size: int, vocab: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (count, length), generator=generator)
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": chunk}
            for chunk in ids.split(batch_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers-per-pass", default="auto",
                        help="comma-separated runs; 'auto' = the automatic memory plan")
    parser.add_argument("--blocks", type=int, default=LLAMA2_7B["num_hidden_layers"])
    parser.add_argument("--eigensolvers", default="auto", help="comma-separated runs, e.g. auto,lobpcg")
    parser.add_argument("--gpu-gib", type=float, default=None,
                        help="hold back all GPU memory beyond this many GiB, e.g. 80 to stand in for an 80 GB GPU")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-block model: smoke test of the script")
    parser.add_argument("--out", type=Path, default=results_dir("scale_gpu"))
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    from lora_da import LoraDAConfig, initialize_lora_da

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shape = TINY if args.tiny else {**LLAMA2_7B, "num_hidden_layers": args.blocks}
    held = 0  # bytes of ballast that make a bigger GPU look like one of --gpu-gib
    if cuda and args.gpu_gib:
        held = max(torch.cuda.get_device_properties(device).total_memory - int(args.gpu_gib * 2**30), 0)
    ballast = torch.empty(held, dtype=torch.uint8, device=device) if held else None
    if args.tiny:
        args.examples, args.length = min(args.examples, 16), min(args.length, 64)
    start = time.perf_counter()
    model = build_model(shape, device)
    batches = random_batches(args.examples, args.length, args.batch_size, shape["vocab_size"])
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in batches]
    floor_pass(model, batches[:1])  # warm-up: kernels, allocator, cuBLAS handles
    floor = measured(device, lambda: floor_pass(model, batches))
    print(json.dumps({"floor": floor}), flush=True)
    lora = LoraConfig(r=args.rank, lora_alpha=32, use_rslora=True, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(model, lora)
    build_seconds = time.perf_counter() - start
    runs = []
    results = {"model": "random Llama-2-7B-shaped" if not args.tiny else "tiny random Llama", "shape": shape,
               "gpu_gib": args.gpu_gib,
               "dtype": "bfloat16", "examples": args.examples, "length": args.length, "batch_size": args.batch_size,
               "rank": args.rank, "device": torch.cuda.get_device_name(device) if cuda else str(device),
               "torch": torch.__version__, "command": command_line(sys.argv[1:]), "build_seconds": build_seconds,
               "floor": floor, "runs": runs}
    plans = [(value, eigensolver) for eigensolver in args.eigensolvers.split(",")
             for value in args.layers_per_pass.split(",")]
    for value, eigensolver in plans:
        layers_per_pass = None if value == "auto" else int(value)
        config = LoraDAConfig(population_size=100_000, show_progress=True, eigensolver=eigensolver)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_memory = torch.cuda.memory_allocated()
        start = time.perf_counter()
        report = initialize_lora_da(model, batches, config, layers_per_pass=layers_per_pass)
        if cuda:
            torch.cuda.synchronize()
        run = {"layers_per_pass": value, "eigensolver": eigensolver, "passes": report.passes,
               "seconds": time.perf_counter() - start,
               "statistics_seconds": report.statistics_seconds, "solve_seconds": report.solve_seconds,
               "statistics_gib": report.statistics_bytes / 2**30,
               "statistics_estimate_gib": report.statistics_bytes_estimate / 2**30, "layers": len(report.layers),
               "activations_gib": (report.activation_bytes or 0) / 2**30,
               "solvers": sorted({v["eigensolver"] for v in report.layers.values()}),
               "max_residual": max(v["residual"] for v in report.layers.values())}
        if cuda:
            run["peak_gpu_gib"] = (torch.cuda.max_memory_allocated() - held) / 2**30
            run["model_gpu_gib"] = (base_memory - held) / 2**30
        else:
            run["peak_gpu_gib"] = run["model_gpu_gib"] = float("nan")
        runs.append(run)
        print(json.dumps(run), flush=True)
        if not args.tiny:  # a smoke test writes nothing; each run is written as soon as it ends
            write(args, results, held, device)
    del ballast  # held back until every run was measured


def write(args, results: dict, held: int, device: torch.device) -> None:
    """results.json and report.md in args.out from the runs so far."""
    floor, runs = results["floor"], results["runs"]
    size = f", all but {args.gpu_gib:g} GiB of its memory held back" if held else ""
    lines = ["# LoRA-DA init on one GPU, random Llama-2-7B-shaped model (bf16)", "",
             f"`{' '.join(['python benchmarks/scale_gpu.py', results['command']]).strip()}` on "
             f"{results['device']}{size}: {args.blocks} blocks, "
             f"{args.examples} random sequences of {args.length} tokens, batch {args.batch_size}, rank {args.rank}, "
             "all linear layers of the blocks.", "",
             f"Floor (forward+backward forming every target weight's gradient): {floor['seconds']:.2f} s, "
             f"peak GPU {(floor['peak_mib'] - held / 2**20) / 1024:.1f} GiB.", "",
             "| layers per pass | eigensolver | passes | init s | x floor | statistics s | solve s "
             "| statistics GiB (est.) | activations GiB (measured) | peak GPU GiB | model GiB | max residual |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in runs:
        lines.append(f"| {run['layers_per_pass']} | {run['eigensolver']} | {run['passes']} | "
                     f"{run['seconds']:.1f} | "
                     f"{run['seconds'] / floor['seconds']:.2f} | "
                     f"{run['statistics_seconds']:.1f} | {run['solve_seconds']:.1f} | {run['statistics_gib']:.1f} "
                     f"({run['statistics_estimate_gib']:.1f}) | "
                     f"{run['activations_gib']:.1f} | {run['peak_gpu_gib']:.1f} | "
                     f"{run['model_gpu_gib']:.1f} | {run['max_residual']:.1e} |")
    write_results(args.out, results, "\n".join(lines) + "\n", device)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
