"""One registry of LoRA initialization methods behind one signature."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from lora_da.layers import model_device
from lora_da.methods import data_aware, peft_inits, svd_inits
from lora_da.methods.base import InitInfo, check_rank, prepare_batches, resolve_target_modules


@dataclass(frozen=True)
class MethodSpec:
    """A registry entry: how to initialize, whether it needs calibration data, whether it rewrites W."""

    name: str
    description: str
    init: Callable
    needs_calibration: bool
    modifies_base: bool
    builtin_peft: bool


def _spec(name, init, description, calibration=False, modifies_base=False, peft=False) -> MethodSpec:
    """Shorthand for a registry entry."""
    return MethodSpec(name, description, init, calibration, modifies_base, peft)


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in [
        _spec("lora", peft_inits.init_plain(True), "PEFT default: Kaiming-uniform A, zero B", peft=True),
        _spec("gaussian", peft_inits.init_plain("gaussian"), "PEFT gaussian: A ~ N(0,1/r), B = 0", peft=True),
        _spec("pissa", peft_inits.init_plain("pissa"), "PEFT PiSSA: r principal singular components of W, "
              "residual frozen", modifies_base=True, peft=True),
        _spec("milora", svd_inits.init_milora, "MiLoRA: r minor singular components of W, residual frozen",
              modifies_base=True),
        _spec("olora", peft_inits.init_plain("olora"), "PEFT OLoRA: QR of W, residual frozen",
              modifies_base=True, peft=True),
        _spec("eva", peft_inits.init_eva, "PEFT EVA: SVD of calibration layer inputs, ranks redistributed",
              calibration=True, peft=True),
        _spec("corda", peft_inits.init_corda, "PEFT CorDA (IPM): covariance-aware SVD of W, "
              "residual frozen", calibration=True, modifies_base=True, peft=True),
        _spec("lora_ga", peft_inits.init_lora_ga, "PEFT LoRA-GA: SVD of mean gradient, residual frozen",
              calibration=True, modifies_base=True, peft=True),
        _spec("lora_one", svd_inits.init_lora_one, "LoRA-One: SVD of -mean gradient, base unchanged",
              calibration=True),
        _spec("lora_da", data_aware.init_lora_da, "LoRA-DA: Fisher-aware bias/variance-optimal subspace, "
              "base unchanged", calibration=True),
        _spec("full", data_aware.init_full, "full fine-tuning reference, no adapter",
              modifies_base=True),
    ]
}


def normalize_method(method: str) -> str:
    """Canonical registry key ('LoRA-DA' -> 'lora_da'); ValueError listing the choices when unknown."""
    key = str(method).strip().lower().replace("-", "_")
    if key not in METHODS:
        raise ValueError(f"unknown init method {method!r}; choose one of: {', '.join(METHODS)}")
    return key


@dataclass
class _InitContext:
    """Everything an init function may read."""

    base_model: nn.Module
    rank: int
    lora_alpha: float
    use_rslora: bool
    targets: list[str]
    batches: list[dict[str, torch.Tensor]]
    population_size: int | None
    lora_da_config: Any
    seed: int
    tokenizer: Any


def _add_labels(batches: list[dict[str, torch.Tensor]]) -> None:
    """Give label-less batches causal-LM labels (every attended token, padding ignored)."""
    for batch in batches:
        if "labels" not in batch:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def create_adapted_model(
    base_model: nn.Module,
    method: str,
    *,
    rank: int,
    lora_alpha: float = 16,
    use_rslora: bool = True,
    target_modules: str | list[str] = "all-linear",
    calibration_batches: Iterable[dict[str, Any]] | None = None,
    population_size: int | None = None,
    lora_da_config: Any = None,
    seed: int = 0,
    tokenizer: Any = None,
) -> tuple[nn.Module, InitInfo]:
    """Wrap `base_model` (in place) with an adapter initialized by `method`; returns (model, InitInfo).

    Calibration batches are dicts with input_ids/attention_mask/labels [batch, seq]; they are required by
    eva, corda, lora_ga, lora_one and lora_da. `tokenizer` is accepted so that callers can pass it uniformly.
    """
    key = normalize_method(method)
    spec = METHODS[key]
    if key != "full":
        targets = resolve_target_modules(base_model, target_modules)
        check_rank(base_model, targets, rank)
    else:
        targets = []
    batches = prepare_batches(calibration_batches, model_device(base_model))
    if spec.needs_calibration and not batches:
        raise ValueError(f"init method '{key}' needs calibration data: pass calibration_batches (non-empty)")
    _add_labels(batches)
    ctx = _InitContext(
        base_model,
        rank,
        lora_alpha,
        use_rslora,
        targets,
        batches,
        population_size,
        lora_da_config,
        seed,
        tokenizer,
    )
    torch.manual_seed(seed)
    start = time.perf_counter()
    model, report = spec.init(ctx)
    seconds = time.perf_counter() - start
    initial = None
    if spec.modifies_base and isinstance(model, PeftModel):
        initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return model, InitInfo(key, seconds, spec.modifies_base, report, initial)


def save_adapter(model: nn.Module, info: InitInfo, output_dir: str | os.PathLike) -> None:
    """Save an adapter folder that stock `PeftModel.from_pretrained` loads on the UNMODIFIED base model.

    Base-modifying methods (pissa, milora, olora, corda, lora_ga) are converted with PEFT's
    `path_initial_model_for_weight_conversion`: the saved adapter has rank 2r and equals
    `s*B@A - s*B0@A0`. `full` is not an adapter: the whole model is saved with `save_pretrained`.
    """
    output_dir = os.fspath(output_dir)
    if info.method == "full":
        model.save_pretrained(output_dir)
        return
    if not isinstance(model, PeftModel):
        raise ValueError(
            f"save_adapter expects the PeftModel returned by create_adapted_model, got {type(model)}"
        )
    if not info.modifies_base:
        model.save_pretrained(output_dir)
        return
    if info.initial_adapter is None:
        raise ValueError(
            f"cannot convert the '{info.method}' adapter for the unmodified base: the initial snapshot "
            "is missing (use the InitInfo returned by create_adapted_model)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        initial_dir = os.path.join(tmp, "initial")
        os.makedirs(initial_dir)
        save_file(
            {k: v.contiguous() for k, v in info.initial_adapter.items()},
            os.path.join(initial_dir, "adapter_model.safetensors"),
        )
        model.save_pretrained(output_dir, path_initial_model_for_weight_conversion=initial_dir)
