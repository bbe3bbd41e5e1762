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
from contextlib import nullcontext

import torch
from torch import nn

from .collect import PerExampleLoss, collect_statistics
from .config import LoraDAConfig, LoraDAError
from .distributed import barrier, is_main_process
from .layers import base_model_of, canonical_layer_name, layer_shape, target_layer_names, unwrap_model
from .statistics import LoraDAStatistics

MANIFEST_KEY = "lora_da_manifest"
# Config entries that do not change the function the model computes.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "torch_dtype", "dtype", "use_cache", "architectures"}
_FINGERPRINT_ELEMENTS = 64


def model_identity(model: nn.Module, layer_names: Sequence[str]) -> dict:
    """Name, config hash and weight fingerprint of a model (bare or PEFT) at the given canonical layers."""
    base = base_model_of(model)
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
    base = base_model_of(model)
    with _adapters_disabled(model):
        stats = collect_statistics(base, batches, names, config, loss_fn=loss_fn, shard=shard)
    stats = stats.select({canonical_layer_name(name): name for name in stats.layer_names})
    stats.metadata[MANIFEST_KEY] = json.dumps(build_manifest(model, stats, model_name))
    if is_main_process():
        stats.save(path)
    barrier()
    return stats


def _adapters_disabled(model: nn.Module):
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
        base = base_model_of(model)
        names = target_layer_names(model, target_modules, adapter_name)
        shapes = {name: layer_shape(base.get_submodule(name)) for name in names}
        check_statistics(stats, model, shapes, config, source=f"The statistics in {os.fspath(path)!r}")
    return stats
