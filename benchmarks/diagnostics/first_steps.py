"""How far each initialization's adapter moves in its first AdamW steps: why LoRA-DA's released factors learn slowly.

AdamW's step is about `lr` per parameter whatever the gradient's scale, so the change of a layer's update
`s * B @ A` in the first steps, `s * (dB @ A + B @ dA)`, grows with the norms of the factors themselves.
LoRA-DA's released split gives both factors a tiny norm (rows of A: 1/sqrt(gamma)), so its layers move
slowly even though its start is better; `factor_balance="kaiming"` keeps the same `B @ A` with A at the norm
of PEFT's default A. This measures it on the grid's protocol (SmolLM2-135M, `arith`, rank 8, rsLoRA alpha 16,
all linear layers, 256 calibration examples, one statistics pass shared by the LoRA-DA splits):

    python benchmarks/diagnostics/first_steps.py [--model FOLDER]
    # writes benchmarks/results/first_steps/{results.json,report.md}
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _harness, grid
from _harness import results_dir, write_results  # noqa: E402
from grid import PROTOCOL, bench_config  # noqa: E402

#: name -> LoraDAConfig overrides (None: PEFT's default init). The same statistics serve every LoRA-DA variant.
VARIANTS = {
    "lora": None,
    "lora_da (released)": {},
    "lora_da@factor_balance=kaiming": {"factor_balance": "kaiming"},
    "lora_da@factor_balance=svd": {"factor_balance": "svd"},
    "lora_da@factor_balance=kaiming,gamma=256": {"factor_balance": "kaiming", "gamma": 256},
    "lora_da@factor_balance=kaiming,gamma=64": {"factor_balance": "kaiming", "gamma": 64},
}


def adapter_state(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Per LoRA layer: (A, B, scaling), copied."""
    from lora_da import find_lora_layers

    layers, _ = find_lora_layers(model)
    return {name: (layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone(),
                   float(layer.scaling["default"])) for name, layer in layers.items()}


def fresh_lora(base):
    """A copy of `base` with the grid's LoRA adapter at PEFT's default init (rank 8, seed 0)."""
    from lora_da.methods.registry import create_adapted_model

    config = bench_config("arith", ["lora"], [8])
    model, _ = create_adapted_model(copy.deepcopy(base), "lora", rank=8, lora_alpha=config.lora_alpha,
                                    use_rslora=config.use_rslora, target_modules=config.target_modules, seed=0)
    return model


def gradient_norms(model, features, pad_id: int) -> tuple[float, float]:
    """Total gradient norm of all A's and of all B's on one training batch (no step taken)."""
    from lora_da.data import collate
    from lora_da.evaluate import supervised_logits, supervised_loss_sum

    model.zero_grad(set_to_none=True)
    total, count = supervised_loss_sum(*supervised_logits(model, collate(features, pad_id)))
    (total / count).backward()
    sums = {"lora_A": 0.0, "lora_B": 0.0}
    for name, param in model.named_parameters():
        for key in sums:
            if key in name and param.grad is not None:
                sums[key] += float(param.grad.norm()) ** 2
    model.zero_grad(set_to_none=True)
    return sums["lora_A"] ** 0.5, sums["lora_B"] ** 0.5


def measure(base, tokenizer, task, stats_path: str, overrides: dict | None, steps: int, lr: float) -> dict:
    """Init one variant, then `steps` AdamW steps at constant `lr`; norms and losses before and after."""
    from lora_da import LoraDAConfig, initialize_lora_da
    from lora_da.evaluate import evaluate_loss
    from lora_da.train import TrainConfig, train

    pad_id = tokenizer.pad_token_id
    model = fresh_lora(base)
    if overrides is not None:
        config = LoraDAConfig(population_size=len(task.train), show_progress=False, **overrides)
        initialize_lora_da(model, None, config, statistics=stats_path)
    before = adapter_state(model)
    grad_a, grad_b = gradient_norms(model, task.train[:PROTOCOL["batch_size"]], pad_id)
    val0 = evaluate_loss(model, task.val, pad_id, PROTOCOL["eval_batch_size"], show_progress=False)["loss"]
    history = train(model, task.train, TrainConfig(steps=steps, lr=lr, batch_size=PROTOCOL["batch_size"],
                                                   schedule="constant", warmup_ratio=0.0, show_progress=False),
                    pad_id)
    after = adapter_state(model)
    moved = [float((sa * ba @ aa - s * b @ a).norm()) for (a, b, s), (aa, ba, sa) in
             zip(before.values(), after.values(), strict=True)]
    mean = statistics.fmean
    return {
        "A_row_norm": mean([float(a.norm(dim=1).mean()) for a, _, _ in before.values()]),
        "B_norm": mean([float(b.norm()) for _, b, _ in before.values()]),
        "update_norm_init": mean(float((s * b @ a).norm()) for a, b, s in before.values()),
        "grad_norm_A": grad_a,
        "grad_norm_B": grad_b,
        "moved_norm": mean(moved),
        "val_loss_init": val0,
        "val_loss_after": evaluate_loss(model, task.val, pad_id, PROTOCOL["eval_batch_size"],
                                        show_progress=False)["loss"],
        "train_losses": [h["loss"] for h in history],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model alias, .gguf file or folder")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(results_dir("first_steps")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lora_da import LoraDAConfig, compute_and_save_statistics
    from lora_da.bench import load_bench_task
    from lora_da.data import calibration_batches
    from lora_da.models import load_model_and_tokenizer

    base, tokenizer = load_model_and_tokenizer(args.model, dtype="float32")
    base.eval()
    task = load_bench_task(bench_config("arith", ["lora"], [8]), tokenizer)
    batches = calibration_batches(task.train, PROTOCOL["calibration_examples"], PROTOCOL["calibration_batch_size"],
                                  tokenizer.pad_token_id, seed=0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = str(Path(tmp) / "stats.safetensors")
        compute_and_save_statistics(fresh_lora(base), batches, stats_path,
                                    LoraDAConfig(population_size=len(task.train), show_progress=False))
        for name, overrides in VARIANTS.items():
            results[name] = measure(base, tokenizer, task, stats_path, overrides, args.steps, args.lr)
            print(name, {k: v for k, v in results[name].items() if k != "train_losses"}, flush=True)
    payload = {"steps": args.steps, "lr": args.lr, "variants": results}
    rows = ["| init | mean row norm of A | mean norm of B | mean norm of s·BA at init | grad norm A / B (step 0) | "
            f"mean norm of the change of s·BA after {args.steps} steps | val loss: init -> after |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        rows.append(f"| `{name}` | {r['A_row_norm']:.4f} | {r['B_norm']:.4f} | {r['update_norm_init']:.4f} | "
                    f"{r['grad_norm_A']:.3f} / {r['grad_norm_B']:.3f} | {r['moved_norm']:.4f} | "
                    f"{r['val_loss_init']:.4f} -> {r['val_loss_after']:.4f} |")
    write_results(args.out, payload, (
        "# The first AdamW steps of each initialization\n\n"
        "`python benchmarks/diagnostics/first_steps.py`: "
        f"SmolLM2-135M, `arith`, rank 8, rsLoRA alpha 16, all linear layers (210), {args.steps} AdamW steps at "
        f"constant lr {args.lr:g} on batches of {PROTOCOL['batch_size']}; LoRA-DA from one statistics pass over "
        f"{PROTOCOL['calibration_examples']} examples (seed 0) for every LoRA-DA variant (gamma 1024 unless named). "
        "Norms are means "
        "over the 210 layers; validation loss on the grid's 64 validation examples.\n\n" + "\n".join(rows) + "\n"
    ))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
