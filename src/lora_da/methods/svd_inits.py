"""Initializations PEFT lacks: MiLoRA (minor singular components of W) and LoRA-One (SVD of the gradient)."""

from __future__ import annotations

import dataclasses
import math

import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from tqdm.auto import tqdm

from lora_da.config import LoraDAError
from lora_da.layers import canonical_layer_name, find_lora_layers
from lora_da.methods.peft_inits import build_lora_config


def lora_layers(model) -> list[tuple[str, LoraLayer]]:
    """(base-model module name, LoRA layer) for every adapted linear layer of a PeftModel."""
    return [(canonical_layer_name(name), layer) for name, layer in find_lora_layers(model)[0].items()]


def _base_weight(layer: LoraLayer) -> torch.Tensor:
    """The base weight as float32 [out, in] (undoing Conv1D's [in, out] storage)."""
    weight = layer.get_base_layer().weight.detach().float()
    return weight.T if layer.fan_in_fan_out else weight


def _set_factors(layer: LoraLayer, A: torch.Tensor, B: torch.Tensor, adapter: str = "default") -> None:
    """Write A [r, in] and B [out, r] into a LoRA layer in its own dtype."""
    a_weight = layer.lora_A[adapter].weight
    b_weight = layer.lora_B[adapter].weight
    a_weight.data = A.to(a_weight.dtype).contiguous()
    b_weight.data = B.to(b_weight.dtype).contiguous()


def milora_factors(weight: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MiLoRA factors from the r smallest singular triplets of W [m, n]: A [r, n], B [m, r]."""
    U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = torch.sqrt(S[-rank:] / scaling)
    A = root[:, None] * Vh[-rank:]
    B = U[:, -rank:] * root[None, :]
    return A, B


def init_milora(ctx):
    """MiLoRA: adapter = r minor singular components of W (over the scaling), residual frozen in W."""
    model = get_peft_model(ctx.base_model, build_lora_config(ctx, True))
    with torch.no_grad():
        for _name, layer in tqdm(lora_layers(model), desc="milora svd", leave=False):
            scaling = layer.scaling["default"]
            weight = _base_weight(layer)
            A, B = milora_factors(weight, layer.r["default"], scaling)
            _set_factors(layer, A, B)
            # residual from the factors as stored, so W_res + s*B@A == W in the forward pass
            a = layer.lora_A["default"].weight.float()
            b = layer.lora_B["default"].weight.float()
            residual = weight - scaling * (b @ a)
            base = layer.get_base_layer()
            base.weight.data = (
                (residual.T if layer.fan_in_fan_out else residual).to(base.weight.dtype).contiguous()
            )
    return model, None


def lora_one_factors(
    gradient: torch.Tensor, rank: int, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LoRA-One from G [m, n]: -G = U S V^T, B = U_r S_r^1/2 / sqrt(s1 g), A = S_r^1/2 V_r^T / sqrt(s1 g); and s1.

    The top r singular triplets come from `eigh` of the smaller Gram matrix in float64 (exact to far below
    float32 for the leading ones), far cheaper than a full `torch.linalg.svd` of every layer."""
    g = -gradient.double()
    left = g.shape[0] <= g.shape[1]  # the [m, m] Gram is the smaller one
    values, vectors = torch.linalg.eigh(g @ g.T if left else g.T @ g)
    singular = values.flip(0)[:rank].clamp(min=0).sqrt()
    vectors = vectors.flip(1)[:, :rank]
    inverse = torch.where(singular > 0, 1.0 / singular, torch.zeros_like(singular))  # 0 for a rank-deficient G
    U, V = (vectors, (g.T @ vectors) * inverse) if left else ((g @ vectors) * inverse, vectors)
    denom = math.sqrt(float(singular[0]) * gamma)
    root = singular.sqrt()
    B = U * root[None, :] / denom
    A = root[:, None] * V.T / denom
    return A.float(), B.float(), float(singular[0])


def init_lora_one(ctx):
    """LoRA-One: factors from the SVD of the negative averaged gradient (core statistics); base unchanged."""
    if ctx.options.rank_allocation != "uniform":
        raise LoraDAError("lora_one takes the adapter's ranks as they are: rank_allocation is a lora_da option.")
    # Only G is used; variance_weight=0 keeps the config valid without a population size.
    stats_config = dataclasses.replace(ctx.options, variance_weight=0.0)
    gamma = float(stats_config.gamma)
    stats = ctx.statistics(stats_config)
    model = get_peft_model(ctx.base_model, build_lora_config(ctx, True))
    layers, zero = {}, []
    with torch.no_grad():
        for name, layer in tqdm(lora_layers(model), desc="lora-one svd", leave=False):
            gradient = stats.gradient(name)
            if not torch.any(gradient != 0):
                zero.append(name)  # keep PEFT's default (B = 0) where the data gives no gradient
                continue
            A, B, top = lora_one_factors(gradient, layer.r["default"], gamma)
            _set_factors(layer, A, B)
            layers[name] = {"top_singular_value": top}
    return model, {"gamma": gamma, "layers": layers, "zero_gradient_layers": zero}
