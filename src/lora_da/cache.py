"""Statistics cache: gather once, save with a manifest, solve later for any rank / beta / gamma.

The manifest (JSON in the safetensors metadata) names the model (config hash and a fingerprint of the target
layers' weights), the data hash, token mask, counts, and the layers with their shapes. Loading it for another
model, other layers or another token mask raises `LoraDAError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from .config import LoraDAConfig, LoraDAError
from .distributed import barrier, is_main_process, unwrap_model
from .statistics import LoraDAStatistics, PerExampleLoss, collect_statistics, layer_shape

MANIFEST_KEY = "lora_da_manifest"
PEFT_PREFIX = "base_model.model."
# Config entries that do not change the function the model computes.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "torch_dtype", "dtype", "use_cache", "architectures"}
_FINGERPRINT_ELEMENTS = 64


def canonical_layer_name(name: str) -> str:
    """A layer's name in the bare transformers model (PEFT's `base_model.model.` prefix removed)."""
    return name.removeprefix(PEFT_PREFIX)


def _base_model(model: nn.Module) -> nn.Module:
    model = unwrap_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def target_layer_names(
    model: nn.Module, target_modules: str | Sequence[str] = "all-linear", adapter_name: str = "default"
) -> list[str]:
    """Canonical names of the layers to gather statistics for.

    A `PeftModel` gives its LoRA layers of `adapter_name`. A bare model takes PEFT's matching rules:
    "all-linear" is every linear layer but the output head; names match a module exactly or as its suffix
    after a dot (e.g. "q_proj").
    """
    from peft import PeftModel

    model = unwrap_model(model)
    if isinstance(model, PeftModel):
        from .adapter import find_lora_layers

        return [canonical_layer_name(name) for name in find_lora_layers(model, adapter_name)[0]]
    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D") or module is head:
            continue
        if target_modules == "all-linear" or any(name == t or name.endswith(f".{t}") for t in target_modules):
            names.append(name)
    if not names:
        raise LoraDAError(f"No linear layer of the model matches target modules {target_modules!r}.")
    return names


def model_identity(model: nn.Module, layer_names: Sequence[str]) -> dict:
    """Name, config hash and weight fingerprint of a model (bare or PEFT) at the given canonical layers."""
    base = _base_model(model)
    config = getattr(base, "config", None)
    settings = {}
    if config is not None:
        settings = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in
                    _VOLATILE_CONFIG_KEYS}
    config_hash = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:32]
    weights = {}
    for name in layer_names:
        module = base.get_submodule(name)
        module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            weights[name] = _fingerprint(weight)
    return {
        "model_name": str(getattr(config, "_name_or_path", "") or type(base).__name__),
        "config_hash": config_hash,
        "weights": weights,
    }


def _fingerprint(weight: torch.Tensor) -> str:
    """Hash of a weight's first elements, rounded to bfloat16 so float32 and bfloat16 copies agree."""
    head = weight.detach().reshape(-1)[:_FINGERPRINT_ELEMENTS]
    if head.is_floating_point():
        head = head.to(torch.bfloat16).float()
    return hashlib.sha256(head.cpu().numpy().tobytes()).hexdigest()[:16]


def build_manifest(model: nn.Module, stats: LoraDAStatistics, model_name: str | None = None) -> dict:
    """The manifest of statistics gathered on `model` (layers as stored in `stats`)."""
    names = [canonical_layer_name(name) for name in stats.layer_names]
    identity = model_identity(model, names)
    if model_name:
        identity["model_name"] = model_name
    return {
        **identity,
        "data_hash": stats.metadata.get("data_hash"),
        "token_mask": stats.metadata.get("token_mask"),
        "output_scaling": stats.metadata.get("output_scaling"),
        "num_examples": stats.num_examples,
        "num_tokens": stats.num_tokens,
        "layers": {name: list(stats.gradient_sums[name].shape) for name in stats.layer_names},
    }


def manifest_of(stats: LoraDAStatistics) -> dict | None:
    """The manifest stored with `stats`, or None (statistics saved without one)."""
    text = stats.metadata.get(MANIFEST_KEY)
    return None if text is None else json.loads(text)


def with_canonical_names(stats: LoraDAStatistics) -> LoraDAStatistics:
    """The same statistics keyed by canonical layer names (tensors shared, not copied)."""
    rename = canonical_layer_name
    return LoraDAStatistics(
        {rename(k): v for k, v in stats.gradient_sums.items()},
        {rename(k): v for k, v in stats.output_sq_sums.items()},
        {rename(k): v for k, v in stats.output_token_counts.items()},
        {rename(k): rename(v) for k, v in stats.input_groups.items()},
        {rename(k): v for k, v in stats.input_sums.items()},
        {rename(k): v for k, v in stats.input_token_counts.items()},
        stats.num_examples,
        dict(stats.metadata),
    )


def compute_and_save_statistics(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    path: str | os.PathLike,
    config: LoraDAConfig,
    *,
    target_modules: str | Sequence[str] = "all-linear",
    adapter_name: str = "default",
    model_name: str | None = None,
    loss_fn: PerExampleLoss | None = None,
    shard: bool = False,
) -> LoraDAStatistics:
    """Gather statistics of the base model (adapters disabled) and write them with a manifest to `path`.

    Under `torch.distributed` every rank gathers its shard, the sums are all-reduced and rank 0 writes the
    file (atomically); every rank returns the statistics.
    """
    model = unwrap_model(model)
    names = target_layer_names(model, target_modules, adapter_name)
    base = _base_model(model)
    with _adapters_disabled(model):
        stats = collect_statistics(base, batches, names, config, loss_fn=loss_fn, shard=shard)
    stats = with_canonical_names(stats)
    stats.metadata[MANIFEST_KEY] = json.dumps(build_manifest(model, stats, model_name))
    if is_main_process():
        stats.save(path)
    barrier()
    return stats


def _adapters_disabled(model: nn.Module):
    from contextlib import nullcontext

    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


def check_statistics(
    stats: LoraDAStatistics,
    model: nn.Module,
    layer_shapes: Mapping[str, tuple[int, int]],
    config: LoraDAConfig | None = None,
    source: str = "The statistics",
) -> None:
    """Refuse statistics from another model, for other layers or shapes, or with another token mask.

    `layer_shapes` maps canonical layer names to (out, in).
    """
    names = {canonical_layer_name(k) for k in stats.layer_names}
    missing = [name for name in layer_shapes if name not in names]
    if missing:
        raise LoraDAError(
            f"{source} do not cover layer {missing[0]!r} ({len(missing)} layer(s) missing): they were gathered "
            "on another model or with other target modules; recompute them with the same --target-modules."
        )
    shapes = {canonical_layer_name(k): tuple(v.shape) for k, v in stats.gradient_sums.items()}
    for name, shape in layer_shapes.items():
        if shapes[name] != tuple(shape):
            raise LoraDAError(
                f"Layer {name!r}: {source.lower()} have shape {shapes[name]}, the model's layer {tuple(shape)}: "
                "they come from another model."
            )
    manifest = manifest_of(stats)
    if manifest is not None:
        identity = model_identity(model, list(layer_shapes))
        if manifest.get("config_hash") != identity["config_hash"]:
            raise LoraDAError(
                f"{source} come from another model ({manifest.get('model_name')!r}: its configuration differs "
                f"from that of {identity['model_name']!r}); recompute them on this model."
            )
        stored = manifest.get("weights", {})
        changed = [name for name, value in identity["weights"].items() if stored.get(name, value) != value]
        if changed:
            raise LoraDAError(
                f"{source} come from another model ({manifest.get('model_name')!r}: the weights of layer "
                f"{changed[0]!r} differ from those of {identity['model_name']!r}); recompute them on this model."
            )
    if config is not None:
        for key in ("token_mask", "output_scaling"):
            stored = stats.metadata.get(key)
            if stored is not None and stored != getattr(config, key):
                raise LoraDAError(
                    f"{source} were gathered with {key}={stored!r} but the config asks for "
                    f"{key}={getattr(config, key)!r}; use the same setting or recompute them."
                )


def load_statistics(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    config: LoraDAConfig | None = None,
    target_modules: str | Sequence[str] = "all-linear",
    adapter_name: str = "default",
    device: str | torch.device = "cpu",
) -> LoraDAStatistics:
    """Load cached statistics; with `model`, refuse them unless they match its target layers (see
    `check_statistics`)."""
    stats = LoraDAStatistics.load(path, device=device)
    if model is not None:
        base = _base_model(model)
        names = target_layer_names(model, target_modules, adapter_name)
        shapes = {name: layer_shape(base.get_submodule(name)) for name in names}
        check_statistics(stats, model, shapes, config, source=f"The statistics in {os.fspath(path)!r}")
    return stats
