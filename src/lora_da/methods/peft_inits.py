"""Initializations that PEFT implements itself: we only build the config and feed PEFT the data it needs."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from peft import AdaLoraConfig, EvaConfig, LoraConfig, LoraGAConfig, get_peft_model, initialize_lora_eva_weights
from peft.tuners.lora.config import CordaConfig
from torch import nn
from tqdm.auto import tqdm

from lora_da.methods.base import single_examples


def build_lora_config(ctx, init_lora_weights, **extra) -> LoraConfig:
    """A LoraConfig with the shared knobs of every method (rank, alpha, rsLoRA, targets, no dropout)."""
    task_type = "CAUSAL_LM" if hasattr(ctx.base_model, "generate") else None
    return LoraConfig(
        r=ctx.rank,
        lora_alpha=ctx.lora_alpha,
        use_rslora=ctx.use_rslora,
        target_modules=list(ctx.targets),
        lora_dropout=0.0,
        init_lora_weights=init_lora_weights,
        task_type=task_type,
        **extra,
    )


def _forward_all(model: nn.Module, batches, desc: str, backward: bool = False) -> None:
    """Run the model over calibration batches (optionally backpropagating each batch's loss)."""
    for batch in tqdm(batches, desc=desc, leave=False):
        out = model(**batch)
        if backward:
            out.loss.backward()


def init_plain(init_lora_weights) -> Callable:
    """Factory for data-free PEFT initializations (default LoRA, gaussian, PiSSA, OLoRA)."""

    def init(ctx):
        model = get_peft_model(ctx.base_model, build_lora_config(ctx, init_lora_weights))
        return model, None

    return init


def init_eva(ctx):
    """EVA: PEFT's incremental SVD of layer inputs over the calibration batches, with rank redistribution."""
    config = build_lora_config(ctx, "eva", eva_config=EvaConfig())
    model = get_peft_model(ctx.base_model, config)
    initialize_lora_eva_weights(model, dataloader=ctx.batches, show_progress_bar=True)
    ranks = {name: int(r) for name, r in model.peft_config["default"].rank_pattern.items()}
    return model, {"rank_pattern": ranks} if ranks else None


def init_corda(ctx):
    """CorDA in instruction-previewed mode (IPM): PEFT's covariance-weighted SVD of W; base weights change."""
    from peft.tuners.lora.corda import preprocess_corda

    config = build_lora_config(ctx, "corda", corda_config=CordaConfig(corda_method="ipm"))
    examples = single_examples(ctx.batches)  # PEFT's covariance hook assumes batch size 1

    def run_model():
        _forward_all(ctx.base_model, examples, "corda covariance")

    preprocess_corda(ctx.base_model, config, run_model=run_model)
    return get_peft_model(ctx.base_model, config), None


def init_lora_ga(ctx):
    """LoRA-GA: PEFT's SVD of the averaged full gradient (ArB2r, stable scale); base weights change."""
    from peft import preprocess_loraga

    config = build_lora_config(ctx, "lora_ga", lora_ga_config=LoraGAConfig())

    def train_step():
        _forward_all(ctx.base_model, ctx.batches, "lora-ga gradients", backward=True)

    was_training = ctx.base_model.training
    preprocess_loraga(ctx.base_model, config, train_step)
    ctx.base_model.train(was_training)
    with torch.no_grad():
        model = get_peft_model(ctx.base_model, config)
    return model, None


def init_adalora(ctx):
    """PEFT's AdaLoRA: an SVD-form adapter (P diag(E) Q) that starts at 1.5x the rank and prunes its singular values
    to an average of the rank during training, where its sensitivities say (`lora_da.train` runs its schedule).
    Its final budget is the uniform rank's (plus one singular value per kept direction)."""
    task_type = "CAUSAL_LM" if hasattr(ctx.base_model, "generate") else None
    config = AdaLoraConfig(r=ctx.rank, init_r=math.ceil(1.5 * ctx.rank), target_r=ctx.rank, lora_alpha=ctx.lora_alpha,
                           target_modules=list(ctx.targets), lora_dropout=0.0, task_type=task_type,
                           total_step=1)  # the training loop sets the schedule of the run it trains
    return get_peft_model(ctx.base_model, config), {"init_r": config.init_r, "target_r": config.target_r}
