"""LoRA-DA through the core API, PEFT's LoRA at ranks spread by gradient sensitivity, and the full fine-tuning
reference."""

from __future__ import annotations

import dataclasses

import torch
from peft import get_peft_model

from lora_da import initialize_lora_da
from lora_da.allocation import allocate_ranks
from lora_da.layers import layer_shape
from lora_da.methods.peft_inits import build_lora_config
from lora_da.ranks import gradient_sensitivities, rank_pattern, sensitivity_gains


def init_lora_da(ctx):
    """LoRA-DA: core statistics + closed-form solve written into a default-initialized PEFT LoRA."""
    # with a cache, the statistics of every layer in one pass (no memory plan): read before PEFT wraps the model
    statistics = None if ctx.statistics_cache is None else ctx.statistics(ctx.options)
    model = get_peft_model(ctx.base_model, build_lora_config(ctx, True))
    batches = ctx.batches if statistics is None else None
    report = initialize_lora_da(model, batches, ctx.options, adapter_name="default", statistics=statistics)
    return model, report.to_dict()


def init_lora_gradient_ranks(ctx):
    """PEFT's default LoRA at ranks spread by gradient sensitivity (the mean of |W * G| per weight, as GoRA
    allocates them) within the trainable parameters of the uniform rank; the base unchanged."""
    options = ctx.options
    stats = ctx.statistics(dataclasses.replace(options, variance_weight=0.0))  # only G is read
    layers = {name: ctx.base_model.get_submodule(name) for name in ctx.targets}
    shapes = {name: layer_shape(module) for name, module in layers.items()}
    ranks = dict.fromkeys(shapes, ctx.rank)
    gains = sensitivity_gains(gradient_sensitivities(stats, layers), shapes, ranks, options)
    allocation = allocate_ranks(gains, shapes, ranks, min_rank=options.min_rank, max_rank=options.max_rank)
    config = build_lora_config(ctx, True, rank_pattern=rank_pattern(allocation.ranks))
    return get_peft_model(ctx.base_model, config), {"rank_allocation": allocation.to_dict()}


def init_full(ctx):
    """Full fine-tuning reference: every base parameter trainable, no adapter."""
    model = ctx.base_model
    for param in model.parameters():
        param.requires_grad_(True)
    with torch.no_grad():
        n_params = sum(p.numel() for p in model.parameters())
    return model, {"trainable_parameters": int(n_params)}
