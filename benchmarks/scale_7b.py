"""LoRA-DA on 7B-shaped Llama blocks (hidden 4096, intermediate 11008, 32 heads, random weights, small
vocabulary), the stand-in for big models on a CPU: the floor (one forward+backward forming every target
weight's gradient), our init (statistics / solve) and peak memory, each in a fresh process, with the memory the
init is planned to add and a profile of its statistics pass; optionally the authors' released implementation
side by side (its `lora_da.py` given by path, never committed). From the measured per-block costs, a projection
to 7B, 13B and 70B on 1 and 8 GPUs.

    python benchmarks/scale_7b.py [--blocks 1] [--released PATH/lora_da.py] [--device cuda]
writes benchmarks/results/scale_7b/{results.json,report.md} (or --out DIR). On CUDA the block is in bfloat16.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
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
    commit,
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

from lora_da import LoraDAConfig, adapter, schedule
from lora_da.collect import probe_batch
from lora_da.schedule import (
    FILL_SHARE,
    PassPlan,
    pass_budget,
    pass_extra_bytes,
    plan_inputs_apart,
)
from lora_da.solver import solve_working_bytes
from lora_da.statistics import statistics_bytes

POPULATION = 100_000
GPU_BYTES = 80 * 2**30
#: One calibration batch of the projection (examples, tokens each), and the vocabulary of its output head.
PROJECTED_BATCH = (8, 512)
PROJECTED_VOCABULARY = 32000
FORWARD_SHARE = 1 / 3  # a forward's share of a forward+backward (the backward does twice its products)


MEASURED = Shape("7B-shaped block", 1, 4096, 11008, 4096)
LLAMA_7B, LLAMA_13B = Shape("Llama-2-7B", 32, 4096, 11008, 4096), Shape("Llama-2-13B", 40, 5120, 13824, 5120)
LLAMA_70B = Shape("Llama-2-70B", 80, 8192, 28672, 1024)


@dataclass(frozen=True)
class Setup:
    """A projected machine: GPUs of `gpu_gib` each, the weights at `weight_bits` a parameter, statistics sharded
    over the GPUs or all-reduced."""

    shape: Shape
    gpus: int
    sharded: bool = False
    gpu_gib: int = 80
    weight_bits: float = 16  # bf16; bitsandbytes NF4 with double quantization: about 4.13


PROJECTED = [Setup(shape, gpus, sharded) for shape in (LLAMA_7B, LLAMA_13B, LLAMA_70B)
             for gpus, sharded in ((1, False), (8, False), (8, True))]
PROJECTED.insert(1, Setup(LLAMA_7B, 1, gpu_gib=24, weight_bits=4.13))


def build(args):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                         num_hidden_layers=args.blocks, vocab_size=512, max_position_embeddings=args.tokens)
    model = LlamaForCausalLM(config).eval().to(args.device, dtype(args))
    ids = torch.randint(0, 512, (args.examples, args.tokens), generator=torch.Generator().manual_seed(0))
    chunks = ids.to(args.device).split(args.batch_size)
    batches = [{"input_ids": c, "attention_mask": torch.ones_like(c), "labels": c} for c in chunks]
    lora = LoraConfig(r=args.rank, lora_alpha=16, use_rslora=True, target_modules="all-linear", lora_dropout=0.0)
    return model, batches, lora, get_peft_model


def dtype(args) -> torch.dtype:
    """The block's weights: bfloat16 on a GPU (as a 7B model is run there), float32 on a CPU."""
    return torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32


def run_part(args) -> dict:
    device = torch.device(args.device)
    part = args.part.split("#")[0]
    if part == "activations":  # models of its own
        return activation_part(device)
    model, batches, lora, get_peft_model = build(args)
    floor_pass(model, batches[:1])  # warm-up in every process: kernels and thread pools, not the measured work
    if part in ("floor", "floor-rows"):
        return measured(device, lambda: floor_pass(model, batches, head_rows=part == "floor-rows"))
    if part == "released":
        return measured(device, lambda: released_init(args.released, model, batches, args.rank, POPULATION))
    if part == "memory-trace":
        return traced_memory(model, batches, lambda: ours_init(get_peft_model(model, lora), batches, POPULATION))
    peft_model = get_peft_model(model, lora)
    if part == "profile":
        return {"table": profile_statistics(peft_model, batches)}
    if part in ("lora-da-apart", "lora-da-micro"):  # statistics that fit beside a whole batch's activations only
        free, activations = apart_memory(args)  # without Z: the plan cuts the batches or gathers Z in a forward
        schedule.free_memory_bytes = lambda device: free
        probe = adapter.probe_batch
        adapter.probe_batch = lambda *a, **k: dataclasses.replace(probe(*a, **k), activation_bytes=activations)
        if part == "lora-da-apart":
            adapter.can_cut = lambda batch: False
        return {**measured(device, lambda: ours_init(peft_model, batches, POPULATION)), "free_bytes": free}
    return measured(device, lambda: ours_init(peft_model, batches, POPULATION))


def activation_part(device: torch.device) -> dict:
    """What the statistics pass keeps for a batch's backward (`probe_batch`) on 1 and 2 bf16 7B-shaped blocks
    (2 examples of PROJECTED_BATCH's length), per position: a block's share and the rest's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    examples, tokens = 2, PROJECTED_BATCH[1]
    ids = torch.randint(0, 512, (examples, tokens), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device),
             "labels": ids.to(device)}
    kept = []
    for blocks in (1, 2):
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                             num_hidden_layers=blocks, vocab_size=512, max_position_embeddings=tokens)
        model = LlamaForCausalLM(config).eval().to(device, torch.bfloat16)
        names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
                 and name != "lm_head"]
        kept.append(probe_batch(model, batch, names, LoraDAConfig(population_size=POPULATION)).activation_bytes)
        del model
    positions = examples * tokens
    return {"per_block_position_bytes": (kept[1] - kept[0]) / positions,
            "rest_position_bytes": (2 * kept[0] - kept[1]) / positions, "dtype": "bfloat16",
            "positions": positions, "commit": commit()}


def projected_activations(shape: Shape, measured: dict, examples: int = PROJECTED_BATCH[0]) -> int:
    """A pass's activations for `examples` examples of PROJECTED_BATCH's length on `shape`: the measured bytes per
    position of a 7B-shaped block, in proportion to the block's widths (hidden + intermediate), over its blocks, with
    the rest measured outside them, and the output head's float32 logits and log-probabilities with the two
    gradients of their size passing through the backward (counted beside the measured model's passing gradients:
    an upper bound)."""
    widths = (shape.hidden + shape.intermediate) / (MEASURED.hidden + MEASURED.intermediate)
    per_position = (measured["per_block_position_bytes"] * widths * shape.blocks + measured["rest_position_bytes"]
                    + 4 * 4 * PROJECTED_VOCABULARY)
    return int(per_position * examples * PROJECTED_BATCH[1])


def apart_memory(args) -> tuple[int, int]:
    """Free memory and a batch's activations under which one pass of whole batches does not fit: all statistics
    and the largest solve just within the plan's FILL_SHARE, and activations larger than the solve. The plan then
    passes the batches in micro-batches, or for batches that cannot be cut gathers G and y in one
    forward+backward and Z in a forward."""
    eigensolver = LoraDAConfig(population_size=POPULATION).eigensolver_on(torch.device(args.device).type)
    solve = max(solve_working_bytes(m, n, eigensolver) for m, n in MEASURED.layers())
    inputs = MEASURED.block_input_bytes() * args.blocks
    statistics = MEASURED.block_gradient_bytes() * args.blocks + inputs
    return int((statistics + solve) / FILL_SHARE) + 1, solve + inputs // 2


def passes_cost(passes: int, blocks_per_pass: int, blocks: int) -> float:
    """Forward+backward passes over the data, in floors, where pass k gathers blocks from k * blocks_per_pass on:
    each runs the whole forward, but its backward stops at its earliest layer."""
    return sum(FORWARD_SHARE + (1 - FORWARD_SHARE) * (1 - k * blocks_per_pass / blocks) for k in range(passes))


def passes_within(budget: float, per_block: float, blocks: int) -> float:
    """Passes over `blocks` blocks of `per_block` bytes each with `budget` bytes a pass (inf: not one block)."""
    return -(-blocks // int(budget // per_block)) if budget >= per_block else float("inf")


def projected_plan(shape: Shape, measured: dict, free: int, solve: int, largest: int, shards: int) -> dict:
    """As `schedule.plan_memory` and `plan_micro_batches` plan it: per GPU and block the statistics (Z without
    its float32 chunks where that takes fewer passes), the passes, and the examples of a micro-batch (None: whole
    batches) with their activations."""
    chunked = shape.block_statistics_bytes() / shards
    unchunked = chunked if shards > 1 else shape.block_gradient_bytes() + shape.block_input_bytes()

    def plan(examples: int | None) -> dict:
        activations = projected_activations(shape, measured, examples or PROJECTED_BATCH[0])
        budget = pass_budget(free, solve, largest, shards, activation_bytes=activations)
        held = min(chunked, unchunked, key=lambda size: (passes_within(budget, size, shape.blocks), -size))
        return {"examples": examples, "activations": activations, "held": held, "chunks": held == chunked,
                "passes": passes_within(budget, held, shape.blocks), "blocks_per_pass": max(0, budget // held)}

    best = plan(None)
    smallest = -(-schedule.MIN_MICRO_BATCH_POSITIONS // PROJECTED_BATCH[1])
    for examples in range(PROJECTED_BATCH[0] - 1, smallest - 1, -1):
        candidate = plan(examples)
        if candidate["passes"] < best["passes"]:
            best = candidate
    return best


def projection(floor_seconds: float, statistics_seconds: float, solve_seconds: float, blocks: int,
               measured_activations: dict) -> list[str]:
    """Rows of the projected table: memory per GPU, passes and init time in units of one forward+backward."""
    statistics_ratio = statistics_seconds / floor_seconds  # per pass, size-independent to first order
    solve_cost = sum(n**3 + n * n * m for m, n in MEASURED.layers()) * blocks
    rows = []
    for setup in PROJECTED:
        shape, gpus, sharded = setup.shape, setup.gpus, setup.sharded
        shards = gpus if sharded else 1
        largest = max(statistics_bytes(m, n) for m, n in shape.layers())
        solve = max(solve_working_bytes(m, n, "chebyshev") for m, n in shape.layers())  # the default on CUDA
        weights = setup.weight_bits / 8 * shape.block_parameters() * shape.blocks
        # Solve seconds scale with the layers' n^3 + n^2 m; the floor with the parameters (same tokens).
        scale_solve = sum(n**3 + n * n * m for m, n in shape.layers()) * shape.blocks / solve_cost
        scale_floor = shape.block_parameters() * shape.blocks / (MEASURED.block_parameters() * blocks)
        solving = solve_seconds * scale_solve / (floor_seconds * scale_floor) / gpus
        free = setup.gpu_gib * 2**30 - weights / gpus  # when the pass starts
        model = shape.name if setup.weight_bits == 16 else f"{shape.name}, 4-bit NF4"
        statistics = "sharded" if sharded else "all-reduced" if gpus > 1 else "-"
        label = f"| {model} | {gpus} x {setup.gpu_gib} GiB | {statistics} |"
        if free <= 0:
            rows.append(f"{label} | {weights / gpus / 2**30:.0f} GiB weights alone | does not fit | | |")
            continue
        plan = projected_plan(shape, measured_activations, free, solve, largest, shards)
        activations, held, passes = plan["activations"], plan["held"], plan["passes"]
        label += f" {activations / 2**30:.0f} GiB |"
        if passes == float("inf"):
            rows.append(f"{label} one block's statistics and solve exceed the plan's share | does not fit | | |")
            continue
        during, after = pass_extra_bytes(solve, largest, shards)
        peak = weights / gpus + min(plan["blocks_per_pass"], shape.blocks) * held + max(during + activations, after)
        relative = passes_cost(passes, plan["blocks_per_pass"], shape.blocks) + statistics_ratio - 1 + solving
        shown = str(passes) + ("" if plan["chunks"] else ", Z without chunks")
        if not sharded and passes > 1:  # G and y of all layers in one pass, then Z in a forward
            apart = PassPlan([], [], solve, free, "automatic", activation_bytes=activations)
            gradients = shape.block_gradient_bytes() * shape.blocks
            inputs = shape.block_input_bytes() * shape.blocks
            if plan_inputs_apart(apart, {"all": gradients}, {"all": inputs}).inputs_apart:
                peak = weights / gpus + max(gradients + activations, gradients + inputs + solve)
                relative, shown = statistics_ratio + FORWARD_SHARE + solving, "1 + a forward"
        if plan["examples"] is not None:
            shown += f", micro-batches of {plan['examples']}"
        rows.append(f"{label} {peak / 2**30:.0f} GiB | {shown} | {held / 2**30:.1f} GiB/block | {relative:.1f}x |")
    return rows


def report(args, results: dict) -> str:
    parts = results["parts"]
    floor, ours = parts["floor"], parts["lora-da"]
    weights = str(dtype(args)).removeprefix("torch.")
    lines = [
        "# LoRA-DA on 7B-shaped blocks",
        "",
        f"`{' '.join(['python benchmarks/scale_7b.py', results['command']]).strip()}` on {results['machine']}: "
        f"{args.blocks} Llama "
        f"block(s) of hidden 4096, intermediate 11008, 32 heads (random {weights} weights, vocabulary 512), all 7 "
        f"projections at rank {args.rank}; {args.examples} examples x {args.tokens} tokens in batches of "
        f"{args.batch_size}. Each row is a fresh process"
        + (f", the fastest of {len(parts['floor']['repeat_seconds'])} alternating runs for the floor and our init "
           "(every run in the JSON file)" if "repeat_seconds" in parts["floor"] else "")
        + f"; {MEMORY_NOTE}.",
        "",
        "| step | seconds | x floor | memory grown (MiB) |",
        "| --- | ---: | ---: | ---: |",
    ]
    rows = [("floor: forward+backward with target-weight gradients", floor)]
    if "floor-rows" in parts:
        rows.append(("floor, only supervised positions projected (as our statistics pass)", parts["floor-rows"]))
    rows.append(("LoRA-DA init (ours), total", ours))
    if "lora-da-micro" in parts:
        micro = parts["lora-da-micro"]
        rows.append((f"LoRA-DA init, batches passed in micro-batches of {micro.get('micro_batch_examples')} examples "
                     f"({micro.get('passes')} pass; the plan under {micro.get('free_bytes', 0) / 2**30:.1f} GiB free)",
                     micro))
    if "lora-da-apart" in parts:
        apart = parts["lora-da-apart"]
        rows.append((f"LoRA-DA init, G and y in a forward+backward, then Z in a forward (the plan under the same "
                     f"memory for batches that cannot be cut: {apart.get('passes')} passes)", apart))
    if "released" in parts:
        rows.append(("released implementation, total", parts["released"]))
    for label, row in rows:
        lines += step_rows("", label, row, floor)
    tight = parts.get("floor-rows", {})
    if "seconds" in tight and "statistics_seconds" in ours:
        lines += ["", f"The statistics pass against the floor that projects only supervised positions: "
                      f"{ours['statistics_seconds'] / tight['seconds']:.2f}x."]
    if "error" not in ours and "error" not in floor:
        lines += ["", "## Memory", "",
                  "The init holds the floor's activations with its statistics in place of the weight gradients, "
                  "then solves the layers of one input at a time, each group's statistics released as it is solved "
                  "(`lora_da.solver.solve_working_bytes` bounds a solve's working set).", "",
                  *memory_account(MEASURED, args.blocks, floor, ours, dtype(args).itemsize,
                                 args.batch_size * args.tokens, traced=parts.get("memory-trace"))]
        if "init_mib" in parts.get("memory-trace", {}):
            lines += ["", TRACED_NOTE]
    if "profile" in parts:
        profile = parts["profile"]
        lines += ["", f"Our statistics pass under torch.profiler (top ops by self time, batch {args.batch_size}):", "",
                  "```", profile.get("table", profile.get("error", "")).rstrip(), "```"]
    activations = parts.get("activations", {})
    if "error" not in ours and "error" not in floor and "per_block_position_bytes" in activations:
        lines += [
            "",
            "## Projection (not a measurement)",
            "",
            "From the per-block costs above: the statistics pass's work beyond a forward+backward keeps its ratio "
            "to the floor, whatever the passes; a pass that gathers the blocks from k on runs the whole forward and "
            "the backward down to block k; solve time scales "
            "with each layer's n^3 + n^2 m and the floor with the parameter count; the ratio of the two is taken "
            "from this device. bf16 weights (FSDP-sharded over the GPUs; the 4-bit row: bitsandbytes NF4 with double "
            f"quantization, its computation counted as bf16's); one batch of {PROJECTED_BATCH[0]} examples of "
            f"{PROJECTED_BATCH[1]} tokens per GPU, its activations as the plan measures them (`probe_batch` on 1 "
            f"and 2 bf16 7B-shaped blocks at commit {activations.get('commit')}: "
            f"{activations['per_block_position_bytes'] / 1024:.0f} KiB per position and block, in proportion to "
            "hidden + intermediate for the other shapes, with the float32 logits and log-probabilities of a "
            f"{PROJECTED_VOCABULARY}-token head and the two gradients of their size passing through the "
            "backward); one pass's statistics with them, and with the largest solve after "
            f"it (chebyshev's, the default on CUDA), within {FILL_SHARE:.0%} of the memory free when the pass starts "
            "(the default automatic plan), Z summed without its float32 chunks where that takes fewer passes, and "
            "the batch passed in micro-batches of at least 512 positions where that takes fewer passes (at the same "
            "cost: smaller GEMMs are not modelled); solves are split across GPUs. Statistics "
            "all-reduced: every GPU holds a "
            "whole pass; sharded (`shard_statistics`, the default when one pass does not fit): each GPU holds the "
            "layers it solves, reduced to it batch by batch (the reductions' time is not in the projection). "
            "Statistics not sharded that would take several passes are gathered as G and y of every layer in one "
            "forward+backward and their Z in a forward without gradients where that fits (`1 + a forward`, the "
            "forward counted as a third of a forward+backward).",
            "",
            "| model | GPUs | statistics | activations of a (micro-)batch | peak per GPU | passes | statistics per GPU "
            "| init / one fwd+bwd |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
            *projection(floor["seconds"], ours["statistics_seconds"], ours["solve_seconds"], args.blocks,
                        parts["activations"]),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="runs of the floor and of our init (fastest kept)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (the block in bfloat16)")
    add_common_arguments(parser)
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite report.md (and its projection) from the measurements in results.json")
    parser.add_argument("--add-parts", nargs="+", metavar="PART",
                        help="run only these parts (e.g. activations) and add them to the results in --out")
    parser.add_argument("--out", type=Path, default=results_dir("scale_7b"))
    args = parser.parse_args()
    if args.part:
        print(json.dumps(run_part(args)))
        return
    if args.report_only or args.add_parts:
        results = json.loads((args.out / "results.json").read_text())
        for key in ("blocks", "examples", "tokens", "batch_size", "rank"):
            setattr(args, key, results[key])
        args.device = results.get("device", "cpu")
        if args.add_parts:  # each such part records its own commit
            add_parts(__file__, results, args.add_parts, ["--device", args.device])
    else:
        parts = repeated(["floor", "floor-rows", "lora-da", "lora-da-micro", "lora-da-apart"], args.repeats)
        parts += ["profile", "activations"] + (["memory-trace"] if args.device == "cpu" else [])
        parts += ["released"] if args.released else []
        results = {"blocks": args.blocks, "examples": args.examples, "tokens": args.tokens, "device": args.device,
                   "batch_size": args.batch_size, "rank": args.rank, "command": command_line(sys.argv[1:]),
                   "machine": hardware(args.device), "runs": run_parts(__file__, parts, sys.argv[1:])}
        results["parts"] = best_runs(results["runs"])
    text = report(args, results)
    write_results(args.out, results, text, args.device)
    print(text)


if __name__ == "__main__":
    main()
