"""Statistics cache: gather once, save with a manifest, solve later for any rank / beta / gamma.

The manifest (JSON in the safetensors metadata) names the model (config hash, and shape, norm and a hash of
sampled elements of every parameter and buffer), the data hash, token mask, counts, and the layers with their
shapes. Loading it for another model, other layers or another token mask raises `LoraDAError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from .collect import PerExampleLoss, collect_statistics
from .config import LoraDAConfig, LoraDAError
from .distributed import barrier, get_world_size, is_main_process
from .hooks import UNROUTED_KEY
from .layers import (
    base_model_of,
    canonical_layer_name,
    model_device,
    target_layer_names,
    target_shapes,
    unwrap_model,
)
from .statistics import LoraDAStatistics

MANIFEST_KEY = "lora_da_manifest"
# Wall seconds of the pass that gathered a cached file (see `cached_statistics`).
GATHERED_SECONDS_KEY = "lora_da_gathered_seconds"
# Config entries that do not change the function the model computes.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "torch_dtype", "dtype", "use_cache", "architectures"}
# Version of the weight identity below; manifests without it (older files) recorded only part of the weights.
IDENTITY_VERSION = 2
_SAMPLES_PER_TENSOR = 1024  # evenly spaced elements hashed per tensor
# A float32 tensor and its bfloat16 copy must match: their norms differ by at most bfloat16's relative
# rounding (2^-9 per element), so norms are compared to 2^-8.
_NORM_TOLERANCE = 2.0**-8
# PEFT's own tensors (adapters, trainable copies) are not the base model's; its wrappers add name parts.
_ADAPTER_NAME_PARTS = ("lora_", ".modules_to_save.")
_WRAPPER_NAME_PARTS = (".base_layer", ".original_module")


def _base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the base model (bare or under PEFT), by its name in the bare model."""
    base = base_model_of(model)
    tensors = {}
    for name, tensor in [*base.named_parameters(), *base.named_buffers()]:
        if any(part in name for part in _ADAPTER_NAME_PARTS):
            continue
        for part in _WRAPPER_NAME_PARTS:
            name = name.replace(part, "")
        tensors[canonical_layer_name(name)] = tensor
    return tensors


def sample_indices(numel: int, count: int = _SAMPLES_PER_TENSOR) -> torch.Tensor:
    """`min(count, numel)` evenly spaced indices into `numel` elements, first and last included (integer
    arithmetic: float positions round past the end for tensors of more than 2^24 elements)."""
    if numel <= count:
        return torch.arange(numel)
    return torch.arange(count, dtype=torch.int64) * (numel - 1) // (count - 1)


def _samples(tensor: torch.Tensor) -> torch.Tensor:
    """Up to `_SAMPLES_PER_TENSOR` evenly spaced elements of `tensor`, on the CPU."""
    flat = tensor.detach().reshape(-1)
    return flat[sample_indices(flat.numel()).to(flat.device)].cpu()


def _tensor_identity(tensor: torch.Tensor) -> list:
    """[shape, norm or None, hash of sampled elements]: floats rounded to bfloat16 for the hash, so a float32
    model and its bfloat16 copy agree; the norm covers the elements between the samples."""
    samples = _samples(tensor)
    norm = None
    if tensor.is_floating_point():
        samples = samples.to(torch.bfloat16).float()
        norm = float(torch.linalg.vector_norm(tensor.detach(), dtype=torch.float32))
    digest = hashlib.sha256(_bytes(samples)).hexdigest()[:16]
    return [list(tensor.shape), norm, digest]


def _bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a CPU tensor of any dtype (numpy has no bfloat16)."""
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def model_identity(model: nn.Module) -> dict:
    """Name, config hash and, per parameter and buffer of the base model, shape, norm and a hash of sampled
    elements: everything that shapes the forward pass, read once."""
    base = base_model_of(model)
    config = getattr(base, "config", None)
    settings = {}
    if config is not None:
        settings = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in
                    _VOLATILE_CONFIG_KEYS}
    config_hash = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return {
        "model_name": str(getattr(config, "_name_or_path", "") or type(base).__name__),
        "config_hash": config_hash,
        "identity_version": IDENTITY_VERSION,
        "tensors": {name: _tensor_identity(tensor) for name, tensor in _base_tensors(model).items()},
    }


def model_fingerprint(model: nn.Module) -> str:
    """A short exact hash of the base model's tensors (names, shapes, dtypes, sampled elements as stored):
    the same model loaded the same way gives the same value on any device."""
    digest = hashlib.sha256()
    for name, tensor in sorted(_base_tensors(model).items()):
        digest.update(f"{name}|{list(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(_bytes(_samples(tensor)))
    return digest.hexdigest()[:16]


def _differing_tensor(stored: Mapping[str, list], current: Mapping[str, list]) -> str | None:
    """What first differs between two weight identities, in words, or None."""
    for name in sorted(set(stored) | set(current)):
        if name not in current:
            return f"this model has no tensor {name!r}"
        if name not in stored:
            return f"tensor {name!r} is new"
        (shape, norm, digest), (now_shape, now_norm, now_digest) = stored[name], current[name]
        if shape != now_shape:
            return f"tensor {name!r} has shape {now_shape}, not {shape}"
        if digest != now_digest or (norm is None) != (now_norm is None) or (
                norm is not None and abs(norm - now_norm) > _NORM_TOLERANCE * max(abs(norm), abs(now_norm))):
            return f"the weights of {name!r} differ"
    return None


def build_manifest(model: nn.Module, stats: LoraDAStatistics, model_name: str | None = None) -> dict:
    """The manifest of statistics gathered on `model` (layers as stored in `stats`)."""
    identity = model_identity(model)
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

    The layers are those of `target_modules` on a bare model; on a `PeftModel`, every weight that adapter
    `adapter_name` adapts (its `target_modules` and `target_parameters`), and `target_modules` is not read.

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
    unrouted = {canonical_layer_name(k) for k in json.loads(stats.metadata.get(UNROUTED_KEY, "[]"))}
    missing = [name for name in layer_shapes if name not in names and name not in unrouted]
    if missing:
        raise LoraDAError(
            f"{source} do not cover layer {missing[0]!r} ({len(missing)} layer(s) missing): they were gathered "
            "on another model or with other target modules; recompute them with the same --target-modules."
        )
    shapes = {canonical_layer_name(k): tuple(v.shape) for k, v in stats.gradient_sums.items()}
    for name, shape in layer_shapes.items():
        if name in shapes and shapes[name] != tuple(shape):
            raise LoraDAError(
                f"Layer {name!r}: {source.lower()} have shape {shapes[name]}, the model's layer {tuple(shape)}: "
                "they come from another model."
            )
    manifest = manifest_of(stats)
    if manifest is not None:
        identity = model_identity(model)
        if manifest.get("config_hash") != identity["config_hash"]:
            raise LoraDAError(
                f"{source} come from another model ({manifest.get('model_name')!r}: its configuration differs "
                f"from that of {identity['model_name']!r}); recompute them on this model."
            )
        if manifest.get("identity_version") != IDENTITY_VERSION:
            raise LoraDAError(
                f"{source} were saved by an older lora-da, whose record of the model covers only part of its "
                "weights, so they cannot be checked against this model; recompute them."
            )
        difference = _differing_tensor(manifest["tensors"], identity["tensors"])
        if difference is not None:
            raise LoraDAError(
                f"{source} come from another model ({manifest.get('model_name')!r}: {difference} in "
                f"{identity['model_name']!r}); recompute them on this model."
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
        shapes = target_shapes(base, target_layer_names(model, target_modules, adapter_name))
        check_statistics(stats, model, shapes, config, source=f"The statistics in {os.fspath(path)!r}")
    return stats


def batches_fingerprint(batches: Iterable[Mapping[str, torch.Tensor]]) -> str:
    """Hash of calibration batches exactly as given: each tensor's key, dtype, shape and values, in order."""
    digest = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            value = batch[key]
            if isinstance(value, torch.Tensor):
                digest.update(f"{key}|{value.dtype}|{list(value.shape)}|".encode())
                digest.update(_bytes(value.detach().cpu()))
        digest.update(b"/")
    return digest.hexdigest()[:32]


def cached_statistics(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    layer_names: Sequence[str],
    config: LoraDAConfig,
    cache_dir: str | os.PathLike,
) -> tuple[LoraDAStatistics, float | None]:
    """Statistics of `layer_names` of `model` over `batches`, read from `cache_dir` when a call with the same
    model weights, batches, layers, token mask and output scaling saved them there, else gathered (all layers in
    one pass) and saved. Returns them and, when read from the cache, the seconds of the pass that gathered them.
    One process only: ranks of a process group hold different batches, so they would look up different files.
    """
    if get_world_size() > 1:
        raise LoraDAError("A statistics cache works in one process; under torch.distributed save the statistics "
                          "with `compute_and_save_statistics` and pass that file as `statistics=`.")
    settings = {"model": model_fingerprint(model), "batches": batches_fingerprint(batches),
                "layers": sorted(layer_names), "token_mask": config.token_mask,
                "output_scaling": config.output_scaling}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"statistics-{key}.safetensors"
    if path.is_file():
        stats = LoraDAStatistics.load(path, device=model_device(model))
        shapes = {canonical_layer_name(name): shape for name, shape in target_shapes(model, layer_names).items()}
        check_statistics(stats, model, shapes, config, source=f"The cached statistics in {str(path)!r}")
        return stats, float(stats.metadata.get(GATHERED_SECONDS_KEY, 0.0))
    start = time.perf_counter()
    stats = collect_statistics(model, batches, list(layer_names), config)
    stats.metadata[GATHERED_SECONDS_KEY] = repr(time.perf_counter() - start)
    stats.metadata[MANIFEST_KEY] = json.dumps(build_manifest(model, stats))
    stats.save(path)
    return stats, None
