"""A small fine-tuning loop: AdamW, warmup + linear/cosine schedule, grad accumulation, periodic eval."""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import PeftModel
from peft.optimizers import create_lorafa_optimizer, create_loraplus_optimizer
from torch import nn
from tqdm.auto import tqdm

from .data import collate
from .evaluate import autocast_context, evaluate_loss, supervised_logits, supervised_loss_sum
from .layers import model_device
from .models import resolve_dtype

SCHEDULES = ("cosine", "linear", "constant")
#: How the adapter is trained: AdamW on every trainable parameter; LoRA-FA (every lora_A frozen, B trained by
#: PEFT's LoRA-FA optimizer); LoRA+ (PEFT's LoRA+ AdamW: B at LORAPLUS_LR_RATIO times A's learning rate).
REGIMES = ("standard", "lora_fa", "lora_plus")
#: PEFT's create_loraplus_optimizer has no default ratio; 16 (2^4) is the one its documentation's example and
#: the LoRA+ authors recommend.
LORAPLUS_LR_RATIO = 16.0


class TrainingDiverged(ValueError):
    """The loss, the gradient norm or a trained parameter became NaN or infinite: the run is not usable."""


@dataclass
class TrainConfig:
    """Fine-tuning hyperparameters; `steps` counts optimizer steps of batch_size * grad_accum examples."""

    steps: int = 100
    lr: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1
    schedule: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    dtype: str = "float32"
    eval_every: int = 0  # 0: evaluate only after the last step (when eval data is given)
    eval_batch_size: int = 8
    seed: int = 0
    regime: str = "standard"  # one of REGIMES
    log_path: str | None = None  # per-step JSONL log
    show_progress: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.regime not in REGIMES:
            raise ValueError(f"unknown regime {self.regime!r}; choose one of: {', '.join(REGIMES)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):  # written so NaN fails too
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a finite number > 0 or None, got {self.max_grad_norm}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        resolve_dtype(self.dtype)

    @property
    def warmup_steps(self) -> int:
        """Number of warmup steps (rounded from warmup_ratio * steps)."""
        return int(round(self.warmup_ratio * self.steps))

    def to_dict(self) -> dict:
        """JSON-able copy of the config."""
        return asdict(self)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the peak learning rate at 0-based optimizer step `step`."""
    warmup = config.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, config.steps - warmup)
    if config.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _example_order(num_examples: int, num_needed: int, seed: int) -> list[int]:
    """Indices of the examples to visit: seeded reshuffles of the data, epoch after epoch."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < num_needed:
        order.extend(torch.randperm(num_examples, generator=generator).tolist())
    return order[:num_needed]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer of `config.regime`; lora_fa and lora_plus need a PEFT LoRA model (lora_fa freezes lora_A)."""
    if config.regime == "standard":
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    adapter = model.peft_config.get(model.active_adapter) if isinstance(model, PeftModel) else None
    if adapter is None or str(getattr(adapter, "peft_type", "")).split(".")[-1] != "LORA":
        raise ValueError(f"regime {config.regime!r} trains a LoRA adapter; this model has none (e.g. method 'full')")
    if config.regime == "lora_fa":
        # PEFT from 0.22 reads each layer's scaling from the model (passing r and lora_alpha is deprecated there);
        # earlier versions need the adapter's r and lora_alpha.
        legacy = "r" in inspect.signature(create_lorafa_optimizer).parameters
        sizes = {"r": adapter.r, "lora_alpha": adapter.lora_alpha} if legacy else {}
        return create_lorafa_optimizer(model, lr=config.lr, weight_decay=config.weight_decay, **sizes)
    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=config.lr, loraplus_lr_ratio=LORAPLUS_LR_RATIO,
                                     loraplus_weight_decay=config.weight_decay)


def adalora_model(model: nn.Module) -> nn.Module | None:
    """PEFT's AdaLoRA model inside `model` (the one that re-allocates ranks during training), else None."""
    base = getattr(model, "base_model", None) if isinstance(model, PeftModel) else None
    return base if hasattr(base, "update_and_allocate") else None


def set_adalora_schedule(adalora: nn.Module, steps: int) -> None:
    """AdaLoRA's budget schedule for a run of `steps` optimizer steps: its ranks start at `init_r`, shrink (cubic)
    from 10% of the run to 80%, every 5% of it, and stay at `target_r` for the last 20%."""
    config = adalora.peft_config[adalora.trainable_adapter_name]
    config.total_step, config.tinit, config.tfinal = steps, steps // 10, steps // 5
    config.deltaT = max(1, steps // 20)


def adalora_penalty(adalora: nn.Module) -> torch.Tensor:
    """AdaLoRA's orthogonality penalty on its singular vectors, which its forward adds to a loss it computes itself:
    `orth_reg_weight` times the mean over the adapter's `lora_A` [r, n] and `lora_B` [m, r] of
    ||P P^T - I||_F (P the rows of A, or the columns of B)."""
    name = adalora.trainable_adapter_name
    norms = []
    for module in adalora.model.modules():
        if isinstance(getattr(module, "lora_E", None), nn.ParameterDict) and name in module.lora_E:
            for rows in (module.lora_A[name], module.lora_B[name].T):
                gram = rows @ rows.T
                eye = torch.eye(len(gram), device=gram.device, dtype=gram.dtype)
                norms.append(torch.linalg.matrix_norm(gram - eye))
    weight = adalora.peft_config[name].orth_reg_weight
    return weight * torch.stack(norms).mean() if norms else torch.zeros(())


def _first_non_finite(params: Sequence[tuple[str, torch.Tensor]]) -> str | None:
    """Name of the first parameter holding a NaN or an infinity, else None (one reduction per tensor)."""
    for name, param in params:
        if not bool(param.detach().sum(dtype=torch.float64).isfinite()):  # a NaN or inf survives the sum
            return name
    return None


def _diverged(step: int, what: str, value: float | str) -> TrainingDiverged:
    return TrainingDiverged(
        f"training diverged at step {step}: {what} is {value} (try a lower lr)"
    )


def train(
    model: nn.Module,
    train_features: Sequence[dict],
    config: TrainConfig,
    pad_token_id: int,
    eval_features: Sequence[dict] | None = None,
) -> list[dict]:
    """Fine-tune the parameters with requires_grad; return the history [{step, loss, lr[, eval_loss]}].

    Raises `TrainingDiverged` as soon as the loss, the gradient norm, the eval loss or (after the last step) a
    trained parameter is NaN or infinite, so a diverged run never looks like a finished one.
    Features are dicts with 'input_ids' and 'labels' lists (see `lora_da.data.encode_examples`).
    """
    if not train_features:
        raise ValueError("cannot train on an empty set of examples")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters (requires_grad=False everywhere)")
    torch.manual_seed(config.seed)
    device = model_device(model)
    optimizer = build_optimizer(model, config)
    named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # lora_fa froze lora_A
    params = [p for _, p in named_params]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    adalora = adalora_model(model)
    if adalora is not None:
        set_adalora_schedule(adalora, config.steps)
    per_step = config.batch_size * config.grad_accum
    order = _example_order(len(train_features), config.steps * per_step, config.seed)
    log = None
    if config.log_path:
        Path(config.log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(config.log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in finally
    history: list[dict] = []
    model.train()
    bar = tqdm(range(config.steps), desc="train", disable=not config.show_progress)
    try:
        for step in bar:
            lr = optimizer.param_groups[0]["lr"]
            losses = []
            for micro in range(config.grad_accum):
                start = step * per_step + micro * config.batch_size
                chunk = [train_features[i] for i in order[start:start + config.batch_size]]
                batch = {k: v.to(device) for k, v in collate(chunk, pad_token_id).items()}
                with autocast_context(device, config.dtype):
                    logits, targets = supervised_logits(model, batch)
                total, count = supervised_loss_sum(logits, targets)
                loss = total / max(count, 1)
                objective = loss if adalora is None else loss + adalora_penalty(adalora).to(loss)
                (objective / config.grad_accum).backward()
                losses.append(float(loss.detach()))
                if not math.isfinite(losses[-1]):
                    raise _diverged(step + 1, "the training loss", losses[-1])
            if config.max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
                if not math.isfinite(grad_norm):
                    raise _diverged(step + 1, "the gradient norm", grad_norm)
            optimizer.step()
            scheduler.step()
            if adalora is not None:  # reads the gradients: between the step and zero_grad
                adalora.update_and_allocate(step)
            optimizer.zero_grad(set_to_none=True)
            record = {"step": step + 1, "loss": sum(losses) / len(losses), "lr": lr}
            last = step + 1 == config.steps
            if eval_features and ((config.eval_every and (step + 1) % config.eval_every == 0) or last):
                record["eval_loss"] = evaluate_loss(
                    model, eval_features, pad_token_id, config.eval_batch_size, config.dtype, show_progress=False
                )["loss"]
                if not math.isfinite(record["eval_loss"]):
                    raise _diverged(step + 1, "the eval loss", record["eval_loss"])
                model.train()
            if last:  # a last update to inf/NaN would not show in any loss above
                bad = _first_non_finite(named_params)
                if bad is not None:
                    raise _diverged(step + 1, f"parameter {bad!r}", "not finite")
            history.append(record)
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{record['loss']:.4f}")
    finally:
        if log is not None:
            log.close()
        model.eval()
    return history
