"""One registry of LoRA initialization methods behind one signature."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from lora_da import LoraDAConfig, LoraDAStatistics, collect_statistics
from lora_da.cache import cached_statistics
from lora_da.config import check_ranks
from lora_da.layers import layer_shape, match_target_modules, model_device
from lora_da.methods import data_aware, peft_inits, svd_inits
from lora_da.methods.base import InitInfo, add_labels, prepare_batches


@dataclass(frozen=True)
class MethodSpec:
    """A registry entry: how to initialize, its data needs, whether it rewrites W, and its options type.

    `options_type` is the class of the method's own options object (None: the method takes none);
    `default_options` builds the options used when the caller passes none.
    """

    name: str
    description: str
    init: Callable
    needs_calibration: bool = False
    modifies_base: bool = False
    options_type: type | None = None
    default_options: Callable[[], Any] | None = None


def _lora_one_defaults() -> LoraDAConfig:
    """LoRA-One (and the gradient-sensitivity ranks) read only the mean gradient: no population size is needed."""
    return LoraDAConfig(variance_weight=0.0)


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in [
        MethodSpec("lora", "PEFT default: Kaiming-uniform A, zero B", peft_inits.init_plain(True)),
        MethodSpec("gaussian", "PEFT gaussian: A ~ N(0,1/r), B = 0", peft_inits.init_plain("gaussian")),
        MethodSpec("pissa", "PEFT PiSSA: r principal singular components of W, residual frozen",
                   peft_inits.init_plain("pissa"), modifies_base=True),
        MethodSpec("milora", "MiLoRA: r minor singular components of W, residual frozen", svd_inits.init_milora,
                   modifies_base=True),
        MethodSpec("olora", "PEFT OLoRA: QR of W, residual frozen", peft_inits.init_plain("olora"),
                   modifies_base=True),
        MethodSpec("eva", "PEFT EVA: SVD of calibration layer inputs, ranks redistributed", peft_inits.init_eva,
                   needs_calibration=True),
        MethodSpec("corda", "PEFT CorDA (IPM): covariance-aware SVD of W, residual frozen", peft_inits.init_corda,
                   needs_calibration=True, modifies_base=True),
        MethodSpec("lora_ga", "PEFT LoRA-GA: SVD of mean gradient, residual frozen", peft_inits.init_lora_ga,
                   needs_calibration=True, modifies_base=True),
        MethodSpec("lora_one", "LoRA-One: SVD of -mean gradient, base unchanged", svd_inits.init_lora_one,
                   needs_calibration=True, options_type=LoraDAConfig, default_options=_lora_one_defaults),
        MethodSpec("lora_da", "LoRA-DA: Fisher-aware bias/variance-optimal subspace, base unchanged",
                   data_aware.init_lora_da, needs_calibration=True, options_type=LoraDAConfig,
                   default_options=LoraDAConfig),
        MethodSpec("adalora", "PEFT AdaLoRA: SVD-form adapter from 1.5x the rank, pruned to the rank in training",
                   peft_inits.init_adalora),
        MethodSpec("lora_gradient_ranks", "PEFT default init at ranks spread by gradient sensitivity |W * G| "
                   "(GoRA-style), same trainable parameters", data_aware.init_lora_gradient_ranks,
                   needs_calibration=True, options_type=LoraDAConfig, default_options=_lora_one_defaults),
        MethodSpec("full", "full fine-tuning reference, no adapter", data_aware.init_full, modifies_base=True),
    ]
}


def normalize_method(method: str) -> str:
    """Canonical registry key ('LoRA-DA' -> 'lora_da'); ValueError listing the choices when unknown."""
    key = str(method).strip().lower().replace("-", "_")
    if key not in METHODS:
        raise ValueError(f"unknown init method {method!r}; choose one of: {', '.join(METHODS)}")
    return key


def _method_options(spec: MethodSpec, options: Any) -> Any:
    """The options object a method runs with: the caller's (type-checked) or the method's defaults."""
    if spec.options_type is None:
        if options is not None:
            raise ValueError(f"init method '{spec.name}' takes no options; pass options=None")
        return None
    if options is None:
        return spec.default_options()
    if not isinstance(options, spec.options_type):
        raise ValueError(f"init method '{spec.name}' takes options={spec.options_type.__name__}(...), "
                         f"got {type(options).__name__}")
    return options


@dataclass
class _InitContext:
    """Everything an init function may read."""

    base_model: nn.Module
    rank: int
    lora_alpha: float
    use_rslora: bool
    targets: list[str]
    batches: list[dict[str, torch.Tensor]]
    options: Any
    statistics_cache: str | os.PathLike | None = None
    cache_report: dict = field(default_factory=dict)  # what the statistics cache did

    def statistics(self, config: LoraDAConfig) -> LoraDAStatistics:
        """LoRA-DA statistics of the target layers over the calibration batches (of the bare base model), read
        from or saved to `statistics_cache` when one is given (`lora_da.cache.cached_statistics`)."""
        if self.statistics_cache is None:
            return collect_statistics(self.base_model, self.batches, self.targets, config)
        stats, gathered_seconds = cached_statistics(self.base_model, self.batches, self.targets, config,
                                                    self.statistics_cache)
        self.cache_report = {"reused": gathered_seconds is not None, "gathered_seconds": gathered_seconds}
        return stats


def check_adapter_fits(base_model: nn.Module, method: str, rank: int,
                       target_modules: str | list[str] = "all-linear") -> list[str]:
    """The target layers of `method` on `base_model`; raises when there is none or `rank` exceeds one's size."""
    if normalize_method(method) == "full":
        return []
    targets = match_target_modules(base_model, target_modules)
    check_ranks({name: layer_shape(base_model.get_submodule(name)) for name in targets}, rank)
    return targets


def create_adapted_model(
    base_model: nn.Module,
    method: str,
    *,
    rank: int,
    lora_alpha: float = 16,
    use_rslora: bool = True,
    target_modules: str | list[str] = "all-linear",
    calibration_batches: Iterable[dict[str, Any]] | None = None,
    options: Any = None,
    seed: int = 0,
    statistics_cache: str | os.PathLike | None = None,
) -> tuple[nn.Module, InitInfo]:
    """Wrap `base_model` (in place) with an adapter initialized by `method`; returns (model, InitInfo).

    Calibration batches are dicts with input_ids/attention_mask/labels [batch, seq]; they are required by
    eva, corda, lora_ga, lora_one and lora_da. `options` is the method's own options object
    (`LoraDAConfig` for lora_da and lora_one; see `METHODS[name].options_type`). `seed` seeds torch's
    random generator before the method runs (the random parts of every method, e.g. LoRA's A).
    `statistics_cache`: a folder where lora_da and lora_one keep the statistics of their calibration pass, so
    that another call on the same model and batches (e.g. another option of lora_da) skips it; the init then
    counts the seconds of the pass that gathered them, and its report says `statistics_cache.reused`.
    """
    key = normalize_method(method)
    spec = METHODS[key]
    options = _method_options(spec, options)
    targets = check_adapter_fits(base_model, key, rank, target_modules)
    batches = prepare_batches(calibration_batches, model_device(base_model))
    if spec.needs_calibration and not batches:
        raise ValueError(f"init method '{key}' needs calibration data: pass calibration_batches (non-empty)")
    add_labels(batches)
    ctx = _InitContext(base_model, rank, lora_alpha, use_rslora, targets, batches, options, statistics_cache)
    torch.manual_seed(seed)
    start = time.perf_counter()
    model, report = spec.init(ctx)
    seconds = time.perf_counter() - start
    if ctx.cache_report:
        seconds += ctx.cache_report["gathered_seconds"] or 0.0
        report = {**(report or {}), "statistics_cache": ctx.cache_report}
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
