"""Data-aware ranks on a PEFT model: which ranks the weights get (from LoRA-DA's solutions or from gradient
sensitivities, see `allocation`), and the adapter resized to them as PEFT's `rank_pattern`."""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Mapping

import torch
from peft.utils.integrations import dequantize_module_weight
from torch import nn
from torch.distributed.tensor import DTensor

from .allocation import RankAllocation, allocate_ranks, gradient_gains, lora_da_gains, uniform_budget
from .config import LoraDAConfig, LoraDAError
from .distributed import all_gather_objects, is_distributed
from .layers import ParameterTarget, canonical_layer_name, innermost_base_layer, unwrap_model
from .solver import LayerSolution
from .statistics import LoraDAStatistics


def check_rank_allocation(model: nn.Module, layers: Mapping[str, nn.Module | ParameterTarget]) -> None:
    """Refuse a rank allocation where the adapter's layers cannot be given ranks of their own: the experts of a
    `target_parameters` stack share one rank, and a model wrapped for training (DDP, FSDP2, DeepSpeed) holds its
    parameters in buffers, shards or an optimizer that a resized factor would not be in."""
    expert = next((name for name, target in layers.items() if isinstance(target, ParameterTarget)), None)
    if expert is not None:
        raise LoraDAError(
            f"A rank allocation gives each weight a rank of its own, but {expert!r} is a weight of "
            "`target_parameters`, whose weights share one rank; use rank_allocation='uniform' for this adapter."
        )
    sharded = any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())
    if unwrap_model(model) is not model or sharded:
        raise LoraDAError(
            "A rank allocation resizes the adapter's factors, which a model wrapped in DDP, FSDP2 or DeepSpeed "
            "cannot follow: allocate the ranks on the PeftModel before wrapping it (every rank gets the same)."
        )
    module = next(iter(layers.values()))
    if "config" not in inspect.signature(module.update_layer).parameters:
        raise LoraDAError("A rank allocation needs peft >= 0.18 (LoraLayer.update_layer with a config): "
                          "upgrade peft, or use rank_allocation='uniform'.")


def largest_ranks(shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int], config: LoraDAConfig
                  ) -> dict[str, int]:
    """The rank each weight is solved at under a rank allocation: its upper bound."""
    bound = config.max_rank or 4 * max(ranks.values())
    return {name: min(bound, m, n) for name, (m, n) in shapes.items()}


def gradient_sensitivities(stats: LoraDAStatistics, layers: Mapping[str, nn.Module]) -> dict[str, float]:
    """Mean of |W * G| per weight whose statistics `stats` holds (W the base weight of the LoRA layer or linear
    layer in `layers`, G the mean gradient)."""
    found = {}
    with torch.no_grad():
        for name in stats.gradient_sums:  # sharded statistics: the weights this rank holds
            gradient = stats.gradient(name)
            base = innermost_base_layer(layers[name])
            weight = dequantize_module_weight(base)
            if type(base).__name__ == "Conv1D":  # GPT-2 stores [in, out]
                weight = weight.T
            found[name] = float((weight.to(gradient) * gradient).abs().mean())
    return found


def allocate_from_solutions(solutions: Mapping[str, LayerSolution], shapes: Mapping[str, tuple[int, int]],
                            ranks: Mapping[str, int], config: LoraDAConfig, sensitivities: dict[str, float] | None
                            ) -> RankAllocation:
    """The ranks of `config.rank_allocation` within the parameters of `ranks`."""
    shapes = {name: shapes[name] for name in solutions}
    ranks = {name: ranks[name] for name in solutions}
    if sensitivities is None:
        gains = {name: lora_da_gains(solution.info, config.normalize) for name, solution in solutions.items()}
    else:
        if is_distributed():  # sharded statistics: each rank scored the weights it held
            for scores in all_gather_objects(sensitivities):
                sensitivities.update(scores)
        gains = sensitivity_gains(sensitivities, shapes, ranks, config)
    return allocate_ranks(gains, shapes, ranks, min_rank=config.min_rank, max_rank=config.max_rank)


def sensitivity_gains(sensitivities: Mapping[str, float], shapes: Mapping[str, tuple[int, int]],
                      ranks: Mapping[str, int], config: LoraDAConfig) -> dict[str, list[float]]:
    """Per weight, the gains (see `allocation.gradient_gains`) of the directions up to its largest allowed rank
    that spread the parameters of `ranks` in proportion to the gradient sensitivities."""
    tops = largest_ranks(shapes, ranks, config)
    gains = gradient_gains({name: sensitivities[name] for name in shapes}, shapes, uniform_budget(shapes, ranks),
                           max(tops.values()))
    return {name: values[: tops[name]] for name, values in gains.items()}


def resize_lora_layers(model: nn.Module, layers: Mapping[str, nn.Module], ranks: Mapping[str, int],
                       adapter_name: str) -> None:
    """Give each LoRA layer of `adapter_name` its rank in `ranks` (PEFT's own `update_layer`: new factors at PEFT's
    default init, the scaling of the new rank) and record the ranks as the adapter's `rank_pattern`, so that the
    saved adapter reloads with them in stock PEFT."""
    config = model.peft_config[adapter_name]
    layer_config = dataclasses.replace(config, init_lora_weights=True)
    for name, module in layers.items():
        if int(module.r[adapter_name]) != ranks[name]:
            module.update_layer(adapter_name, ranks[name], lora_alpha=module.lora_alpha[adapter_name],
                                config=layer_config)
    pattern = rank_pattern({canonical_layer_name(name): rank for name, rank in ranks.items()})
    # exact names first: PEFT takes the first pattern that matches a layer
    config.rank_pattern = {**pattern, **{k: v for k, v in (config.rank_pattern or {}).items() if k not in pattern}}


def rank_pattern(ranks: Mapping[str, int]) -> dict[str, int]:
    """PEFT's `rank_pattern` for ranks by layer name: each key matches that layer's name alone (PEFT reads the
    keys as regular expressions)."""
    return {re.escape(name): int(rank) for name, rank in ranks.items()}
