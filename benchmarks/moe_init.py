"""LoRA-DA init of a random mixture-of-experts model (a Mixtral with PEFT LoRA on "all-linear": attention, router
and the fused experts, which PEFT adapts as parameters) against the floor: one forward+backward over the same
batches with the weights frozen, with the model's own experts implementation and with the eager loop over the
experts that LoRA-DA's statistics pass runs. Best of `--repeats` runs of each, in one process.

    python benchmarks/moe_init.py [--hidden 256] [--experts 8] [--layers 2] [--examples 32] [--repeats 3]

writes benchmarks/results/moe_init/{results.json,report.md}.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _harness import command_line, init_summary, measured, results_dir, write_results
from peft import LoraConfig, get_peft_model

POPULATION = 100_000


def build(args) -> torch.nn.Module:
    """The random Mixtral, the same for every run."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.MixtralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                              num_local_experts=args.experts, num_experts_per_tok=2, num_hidden_layers=args.layers,
                              num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4 * args.length)
    return tf.MixtralForCausalLM(config).eval()


def calibration(args) -> list[dict]:
    """Random token batches whose second half is supervised."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.examples // args.batch_size):
        ids = torch.randint(1, args.vocab, (args.batch_size, args.length), generator=generator)
        labels = ids.clone()
        labels[:, : args.length // 2] = -100
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


def lora_config(args) -> LoraConfig:
    return LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", lora_dropout=0.0)


def floor(model: torch.nn.Module, batches: list[dict], implementation: str) -> None:
    """Forward+backward of the model's loss over `batches` with the weights frozen (as in LoRA training: the
    gradient flows through every layer, no weight gradient is formed)."""
    model.set_experts_implementation(implementation)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    embeddings = model.get_input_embeddings()
    for batch in batches:
        inputs = embeddings(batch["input_ids"]).requires_grad_(True)
        model(inputs_embeds=inputs, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()


def ours(args, batches: list[dict]) -> dict:
    from lora_da import LoraDAConfig, initialize_lora_da

    model = get_peft_model(build(args), lora_config(args))
    report = initialize_lora_da(model, batches, LoraDAConfig(population_size=POPULATION, show_progress=False))
    summary = init_summary(report.to_dict())
    return {**summary, "initialized_weights": report.initialized_weights, "adapted_weights": report.adapted_weights,
            "coverage": report.coverage(), "statistics_bytes": report.statistics_bytes}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(results_dir("moe_init")))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = calibration(args)
    device = torch.device("cpu")
    base = build(args)
    default_implementation = base.get_experts_implementation()[""]
    # warm-up of each step (the first pass of each experts implementation pays a one-off start-up of seconds)
    floor(base, batches[:1], default_implementation)
    floor(base, batches[:1], "eager")
    ours(args, batches[:1])
    runs: dict[str, list[dict]] = {"floor_default": [], "floor_eager": [], "lora_da": []}
    for _ in range(args.repeats):
        runs["floor_default"].append(measured(device, lambda: floor(base, batches, default_implementation)))
        runs["floor_eager"].append(measured(device, lambda: floor(base, batches, "eager")))
        runs["lora_da"].append(measured(device, lambda: ours(args, batches)))
    best = {part: min(rows, key=lambda row: row.get("seconds", float("inf"))) for part, rows in runs.items()}
    for part, rows in runs.items():
        best[part]["repeat_seconds"] = [row.get("seconds") for row in rows]
    parameters = sum(p.numel() for p in base.parameters())
    experts = sum(p.numel() for name, p in base.named_parameters() if ".experts." in name)
    setup = {"model": f"random Mixtral: hidden {args.hidden}, {args.experts} experts (top 2), {args.layers} layers, "
                      f"vocab {args.vocab}", "parameters": parameters, "expert_parameters": experts,
             "examples": args.examples, "batch_size": args.batch_size, "length": args.length, "rank": args.rank,
             "default_experts_implementation": default_implementation, "torch_threads": args.threads}
    command = "python " + command_line([sys.argv[0], *argv])
    results = {"setup": setup, "best": best, "runs": runs, "command": command}
    write_results(args.out, results, report(setup, best, command))
    print(report(setup, best, command))
    return 0


def report(setup: dict, best: dict, command: str) -> str:
    ours_row, default, eager = best["lora_da"], best["floor_default"], best["floor_eager"]
    lines = [
        "# LoRA-DA init of a mixture-of-experts model",
        "",
        f"{setup['model']}; {setup['parameters'] / 1e6:.1f} M parameters, {setup['expert_parameters'] / 1e6:.1f} M "
        f"in the experts. {setup['examples']} calibration examples of {setup['length']} tokens, batch "
        f"{setup['batch_size']}, rank {setup['rank']}, `target_modules=\"all-linear\"` (attention, router and "
        f"experts); {setup['torch_threads']} torch threads. Best of {len(ours_row['repeat_seconds'])} runs.",
        "",
        "| step | seconds | x floor (default experts) | x floor (eager experts) | memory grown (MiB) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    rows = (("floor: forward+backward, experts " + setup["default_experts_implementation"], default),
            ("floor: forward+backward, experts eager", eager), ("LoRA-DA init (statistics + solve)", ours_row))
    for label, row in rows:
        lines.append(f"| {label} | {row['seconds']:.2f} | {row['seconds'] / default['seconds']:.1f} | "
                     f"{row['seconds'] / eager['seconds']:.1f} | {row['grown_mib']:.0f} |")
    lines += [
        "",
        f"LoRA-DA: statistics {ours_row['statistics_seconds']:.2f} s, solve {ours_row['solve_seconds']:.2f} s; "
        f"{ours_row['coverage']}. Its statistics pass runs the experts one at a time (transformers' eager loop), "
        "which it observes expert by expert; the floor with the eager loop is the like-for-like comparison.",
        "",
        f"Command: `{command}`",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
