"""PEFT-native entry point: initialize the LoRA factors of an existing `PeftModel` with LoRA-DA."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import LoraDAConfig, LoraDAError
from .solver import solve_all
from .statistics import LoraDAStatistics, PerExampleLoss, collect_statistics


@dataclass
class LoraDAReport:
    """What `initialize_lora_da` did, per layer and in total."""

    layers: dict[str, dict] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    num_examples: int = 0
    num_tokens: int = 0
    statistics_seconds: float = 0.0
    solve_seconds: float = 0.0
    config: dict = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return self.statistics_seconds + self.solve_seconds

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {
            "num_examples": self.num_examples,
            "num_tokens": self.num_tokens,
            "statistics_seconds": self.statistics_seconds,
            "solve_seconds": self.solve_seconds,
            "total_seconds": self.total_seconds,
            "skipped": self.skipped,
            "config": self.config,
            "layers": self.layers,
        }


def find_lora_layers(model: nn.Module, adapter_name: str = "default") -> tuple[dict[str, nn.Module], list[str]]:
    """LoRA layers of `adapter_name` that LoRA-DA can initialize (over linear maps), and those it cannot."""
    from peft.tuners.lora import LoraLayer

    supported, unsupported = {}, []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter_name in getattr(module, "lora_embedding_A", {}):
            unsupported.append(name)
            continue
        if adapter_name not in module.lora_A:
            continue
        if isinstance(module.lora_A[adapter_name], nn.Linear) and _is_linear_like(module.get_base_layer()):
            supported[name] = module
        else:
            unsupported.append(name)
    return supported, unsupported


def _is_linear_like(layer: nn.Module) -> bool:
    """`nn.Linear`, GPT-2 `Conv1D`, or a (quantized) layer that maps the last dim in -> out."""
    if isinstance(layer, nn.Linear) or type(layer).__name__ == "Conv1D":
        return True
    return hasattr(layer, "in_features") and hasattr(layer, "out_features")


def check_peft_model(model: nn.Module, adapter_name: str) -> None:
    """Raise unless `model` is a PeftModel with a LoRA adapter called `adapter_name`."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise LoraDAError(
            f"Expected a peft.PeftModel, got {type(model).__name__}; wrap it first with "
            "peft.get_peft_model(model, LoraConfig(...))."
        )
    config = model.peft_config.get(adapter_name)
    if config is None:
        raise LoraDAError(
            f"The model has no adapter named {adapter_name!r}; it has {sorted(model.peft_config)}."
        )
    if str(getattr(config, "peft_type", "")).split(".")[-1] != "LORA":
        raise LoraDAError(f"Adapter {adapter_name!r} is a {config.peft_type} adapter, not LoRA.")


def initialize_lora_da(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    config: LoraDAConfig,
    adapter_name: str = "default",
    *,
    statistics: LoraDAStatistics | None = None,
    loss_fn: PerExampleLoss | None = None,
) -> LoraDAReport:
    """Set `lora_A`/`lora_B` of `adapter_name` in place from one pass over calibration `batches`.

    Base weights are not changed; on any error no weight is changed. Pass precomputed `statistics`
    (from `collect_statistics` or `LoraDAStatistics.load`) to skip the model pass.
    """
    check_peft_model(model, adapter_name)
    layers, unsupported = find_lora_layers(model, adapter_name)
    if not layers:
        raise LoraDAError(
            f"Adapter {adapter_name!r} has no LoRA layer over a linear map; check `target_modules`."
        )
    if unsupported:
        warnings.warn(
            f"LoRA-DA leaves {len(unsupported)} layer(s) of types it cannot handle at PEFT's default init: "
            + ", ".join(unsupported),
            stacklevel=2,
        )
    ranks = {name: int(module.r[adapter_name]) for name, module in layers.items()}
    for name, module in layers.items():
        out_features = module.lora_B[adapter_name].out_features
        in_features = module.lora_A[adapter_name].in_features
        if ranks[name] > min(in_features, out_features):
            raise LoraDAError(
                f"Layer {name!r}: rank {ranks[name]} is larger than min(in, out) = "
                f"{min(in_features, out_features)}; choose a smaller rank."
            )

    report = LoraDAReport(skipped=unsupported, config=config.to_dict())
    start = time.perf_counter()
    if statistics is None:
        with model.disable_adapter():  # statistics of the base model, whatever the adapters hold now
            statistics = collect_statistics(model, batches, list(layers), config, loss_fn=loss_fn)
    else:
        _check_statistics_match(statistics, layers, adapter_name)
    report.statistics_seconds = time.perf_counter() - start
    report.num_examples, report.num_tokens = statistics.num_examples, statistics.num_tokens

    start = time.perf_counter()
    solutions = solve_all(statistics, ranks, config, layers=list(layers))
    report.solve_seconds = time.perf_counter() - start

    # Every factor is solved before any is written: an error above leaves the model untouched.
    with torch.no_grad():
        for name, module in layers.items():
            solution = solutions[name]
            lora_a, lora_b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
            lora_a.copy_(solution.A.to(device=lora_a.device, dtype=lora_a.dtype))
            lora_b.copy_(solution.B.to(device=lora_b.device, dtype=lora_b.dtype))
            report.layers[name] = {**solution.info, "scaling": float(module.scaling[adapter_name])}
    return report


def _check_statistics_match(stats: LoraDAStatistics, layers: Mapping[str, nn.Module], adapter_name: str) -> None:
    """Refuse statistics gathered for other layers or shapes."""
    missing = [name for name in layers if name not in stats.gradient_sums]
    if missing:
        raise LoraDAError(
            f"The statistics do not cover layer {missing[0]!r} ({len(missing)} layer(s) missing): they were "
            "gathered on another model or with other target modules."
        )
    for name, module in layers.items():
        shape = (module.lora_B[adapter_name].out_features, module.lora_A[adapter_name].in_features)
        if tuple(stats.gradient_sums[name].shape) != shape:
            raise LoraDAError(
                f"Layer {name!r}: the statistics have shape {tuple(stats.gradient_sums[name].shape)}, "
                f"the model's layer {shape}: they come from another model."
            )
