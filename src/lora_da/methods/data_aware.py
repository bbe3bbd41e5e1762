"""LoRA-DA through the core API, and the full fine-tuning reference."""

from __future__ import annotations

import torch
from peft import get_peft_model

from lora_da import initialize_lora_da
from lora_da.methods.peft_inits import build_lora_config


def init_lora_da(ctx):
    """LoRA-DA: core statistics + closed-form solve written into a default-initialized PEFT LoRA."""
    # with a cache, the statistics of every layer in one pass (no memory plan): read before PEFT wraps the model
    statistics = None if ctx.statistics_cache is None else ctx.statistics(ctx.options)
    model = get_peft_model(ctx.base_model, build_lora_config(ctx, True))
    batches = ctx.batches if statistics is None else None
    report = initialize_lora_da(model, batches, ctx.options, adapter_name="default", statistics=statistics)
    return model, report.to_dict()


def init_full(ctx):
    """Full fine-tuning reference: every base parameter trainable, no adapter."""
    model = ctx.base_model
    for param in model.parameters():
        param.requires_grad_(True)
    with torch.no_grad():
        n_params = sum(p.numel() for p in model.parameters())
    return model, {"trainable_parameters": int(n_params)}
