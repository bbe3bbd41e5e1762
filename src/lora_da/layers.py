"""Model plumbing used everywhere: unwrapping, device, target layers, shapes, canonical names, rank checks."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import ParamWrapper
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.nn.parallel import DataParallel, DistributedDataParallel

from .config import LoraDAError

#: The prefix PEFT puts before the bare model's module names.
PEFT_PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"
# The name of an adapted weight inside a parameter: "<module>.<parameter>" or, one expert of a 3-D stack,
# "<module>.<parameter>[<expert>]".
_PARAMETER_TARGET = re.compile(r"^(?:(?P<module>.+)\.)?(?P<parameter>[^.\[\]]+)(?:\[(?P<expert>\d+)\])?$")
_WRAPPER_PART = ".base_layer"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a `DistributedDataParallel`, `DataParallel` or DeepSpeed engine, else `model` itself."""
    while isinstance(model, (DistributedDataParallel, DataParallel)) or type(model).__name__ == "DeepSpeedEngine":
        model = model.module
    return model


def check_supported_sharding(model: nn.Module) -> None:
    """Refuse FSDP1, whose flat parameters an in-place write would miss. FSDP2 (`fully_shard`, DTensor
    parameters) and DeepSpeed (ZeRO-3 partitioned parameters, optimizer master copies) are written through
    `writable_parameters`."""
    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        raise LoraDAError(
            "The model is wrapped in FSDP1 (FullyShardedDataParallel), whose flat parameters LoRA-DA cannot write: "
            "shard it with FSDP2 (torch.distributed.fsdp.fully_shard), or initialize before wrapping."
        )


def _deepspeed():
    """The deepspeed module, which a model with DeepSpeed parameters has already imported."""
    return sys.modules["deepspeed"]


@contextmanager
def writable_parameters(parameters: Sequence[torch.Tensor]) -> Iterator[None]:
    """Within it, `parameters` hold their full tensors on every rank: ZeRO-3 partitioned ones are gathered, and
    re-partitioned on exit from rank 0's values (a collective: every rank must enter it)."""
    partitioned = [p for p in parameters if hasattr(p, "ds_id")]
    gathered = _deepspeed().zero.GatheredParameters(partitioned, modifier_rank=0) if partitioned else nullcontext()
    with gathered:
        yield


def set_master_copy(parameter: torch.Tensor, value: torch.Tensor) -> None:
    """Write the full `value` into the float32 master copy that a DeepSpeed optimizer keeps of `parameter`, if it
    keeps one (else its next step would start from the old weights)."""
    if hasattr(parameter, "_z3_optimizer") or hasattr(parameter, "_hp_mapping"):
        _deepspeed().utils.safe_set_full_fp32_param(parameter, value.float())


def base_model_of(model: nn.Module) -> nn.Module:
    """The bare transformers model under any DDP and PEFT wrappers."""
    model = unwrap_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless module)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def canonical_layer_name(name: str) -> str:
    """A layer's name in the bare transformers model (PEFT's `base_model.model.` prefix removed)."""
    return name.removeprefix(PEFT_PREFIX)


def is_plain_linear(module: nn.Module) -> bool:
    """`nn.Linear` or GPT-2 `Conv1D`: what PEFT's "all-linear" selects."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def is_linear_layer(module: nn.Module) -> bool:
    """A plain linear layer, or a (quantized) layer that maps the last dim in -> out."""
    if is_plain_linear(module):
        return True
    return hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "weight")


@dataclass(frozen=True, eq=False)
class ParameterTarget:
    """One weight that PEFT adapts through `LoraConfig(target_parameters=...)` (its `ParamWrapper`): one expert's
    slice `parameter[expert]` of a 3-D stack of experts' weights, or a whole 2-D weight (`expert` None) such as an
    MoE router's. The model applies it as a linear map (`F.linear(x, w)`, or `x @ w` for a stack stored
    [experts, in, out]); `shape` is (out, in) of that map."""

    owner: nn.Module  # the module that holds the parameter (PEFT's wrappers removed)
    parameter_name: str
    expert: int | None
    shape: tuple[int, int]
    wrapper: nn.Module | None = None  # PEFT's ParamWrapper of the adapter, None on a bare model

    @property
    def parameter(self) -> torch.Tensor:
        return getattr(self.owner, self.parameter_name)


def parameter_target_name(module_name: str, parameter_name: str, expert: int | None) -> str:
    """The name of an adapted weight inside a parameter (see `ParameterTarget`)."""
    name = f"{module_name}.{parameter_name}" if module_name else parameter_name
    return name if expert is None else f"{name}[{expert}]"


def innermost_base_layer(module: nn.Module) -> nn.Module:
    """The module under every PEFT wrapper of `module`."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _parameter_layout(owner: nn.Module, parameter: torch.Tensor) -> tuple[int | None, tuple[int, int]]:
    """(number of experts, None for a 2-D weight; (out, in)) of a 2-D weight or a 3-D stack of experts' weights,
    read as PEFT reads them: a stack is [experts, out, in] unless its module says `is_transposed`."""
    shape = tuple(getattr(parameter, "ds_shape", parameter.shape))  # ZeRO-3 partitions keep the full shape here
    if len(shape) == 2:
        return None, (int(shape[0]), int(shape[1]))
    if len(shape) == 3:
        experts, first, second = (int(d) for d in shape)
        return experts, ((second, first) if getattr(owner, "is_transposed", False) else (first, second))
    raise LoraDAError(f"A {len(shape)}-D parameter of {type(owner).__name__} is not a weight that LoRA-DA can adapt.")


def _parameter_targets(wrapper: nn.Module, module_name: str) -> dict[str, ParameterTarget]:
    """The adapted weights of one PEFT `ParamWrapper` named `module_name`: one per expert of a 3-D stack."""
    owner = innermost_base_layer(wrapper)
    owner_name = module_name.replace(_WRAPPER_PART, "")
    parameter = getattr(owner, wrapper.parameter_name)
    experts, shape = _parameter_layout(owner, parameter)
    indices = [None] if experts is None else list(range(experts))
    return {parameter_target_name(owner_name, wrapper.parameter_name, e):
            ParameterTarget(owner, wrapper.parameter_name, e, shape, wrapper) for e in indices}


def is_expert(target: object) -> bool:
    """Whether `target` is one expert's slice of a 3-D stack of weights (its tokens depend on the routing)."""
    return isinstance(target, ParameterTarget) and target.expert is not None


def lora_module(target: nn.Module | ParameterTarget) -> nn.Module:
    """The PEFT LoRA layer that holds a target's factors."""
    return target.wrapper if isinstance(target, ParameterTarget) else target


def layer_shape(module: nn.Module | ParameterTarget) -> tuple[int, int]:
    """(out, in) of a linear-like layer (a PEFT LoRA layer is read through its base layer) or adapted parameter."""
    if isinstance(module, ParameterTarget):
        return module.shape
    if hasattr(module, "get_base_layer"):
        module = module.get_base_layer()
    if type(module).__name__ == "Conv1D":  # GPT-2 stores the weight as [in, out]
        n, m = module.weight.shape
        return int(m), int(n)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.out_features), int(module.in_features)
    raise LoraDAError(f"Cannot tell the shape of a {type(module).__name__}: LoRA-DA needs a linear layer.")


def find_lora_layers(model: nn.Module, adapter_name: str = "default") -> tuple[dict[str, nn.Module], list[str]]:
    """LoRA layers of `adapter_name` that LoRA-DA can initialize (over linear maps), and those it cannot."""
    supported, unsupported = {}, []
    for name, module in unwrap_model(model).named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter_name in getattr(module, "lora_embedding_A", {}):
            unsupported.append(name)
            continue
        if adapter_name not in module.lora_A:
            continue
        if isinstance(module.lora_A[adapter_name], nn.Linear) and is_linear_layer(module.get_base_layer()):
            supported[name] = module
        else:
            unsupported.append(name)
    return supported, unsupported


def find_adapted_weights(
    model: nn.Module, adapter_name: str = "default"
) -> tuple[dict[str, nn.Module | ParameterTarget], list[str]]:
    """Every weight that adapter `adapter_name` adapts, as LoRA-DA initializes it: LoRA layers over linear maps
    (by module name) and the weights adapted through `target_parameters` (`ParameterTarget`s, one per expert of a
    3-D stack); and the names of the LoRA layers it cannot initialize (embeddings, convolutions, ...)."""
    targets: dict[str, nn.Module | ParameterTarget] = {}
    skipped = []
    linear, unsupported = find_lora_layers(model, adapter_name)
    for name, module in unwrap_model(model).named_modules():
        if name in linear:
            targets[name] = module
        elif isinstance(module, ParamWrapper) and adapter_name in module.lora_A:
            targets.update(_parameter_targets(module, name))
        elif name in unsupported:
            skipped.append(name)
    return targets, skipped


def match_target_modules(model: nn.Module, target_modules: str | Sequence[str] = ALL_LINEAR) -> list[str]:
    """Names of the linear layers of a bare model that `target_modules` selects.

    "all-linear" is every linear layer but the output head; otherwise PEFT's own rule applies: a name matches
    a module exactly or as its suffix after a dot (a comma-separated string is a list of names).
    """
    if isinstance(target_modules, str) and target_modules.strip().lower() != ALL_LINEAR:
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    if not isinstance(target_modules, str) and not target_modules:
        raise LoraDAError("`target_modules` is empty; pass 'all-linear' or names such as ['q_proj', 'v_proj'].")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    selection = SimpleNamespace(target_modules=None if isinstance(target_modules, str) else list(target_modules),
                                target_parameters=None)
    names = []
    for name, module in model.named_modules():
        if not is_plain_linear(module) or module is head:
            continue
        if selection.target_modules is None or check_target_module_exists(selection, name):
            names.append(name)
    if not names:
        raise LoraDAError(
            f"target_modules={target_modules!r} matches no linear layer of the model; "
            "pass 'all-linear' or names such as ['q_proj', 'v_proj']."
        )
    return names


def target_layer_names(
    model: nn.Module, target_modules: str | Sequence[str] = ALL_LINEAR, adapter_name: str = "default"
) -> list[str]:
    """Canonical names of the target layers: a `PeftModel`'s LoRA layers of `adapter_name`, or the layers of
    a bare model that `target_modules` selects."""
    model = unwrap_model(model)
    if hasattr(model, "peft_config"):
        return [canonical_layer_name(name) for name in find_adapted_weights(model, adapter_name)[0]]
    return match_target_modules(model, target_modules)


def resolve_layers(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module | ParameterTarget]:
    """Map each name to the module whose input/output is hooked (the base layer inside a PEFT LoRA layer), or,
    for the name of a weight inside a parameter (`parameter_target_name`), to its `ParameterTarget`."""
    if not names:
        raise LoraDAError("No target layer given: `target_modules` is empty.")
    modules = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            modules[name] = _resolve_parameter_target(model, name)
            continue
        modules[name] = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return modules


def _resolve_parameter_target(model: nn.Module, name: str) -> ParameterTarget:
    """The `ParameterTarget` that `name` ("<module>.<parameter>[<expert>]") denotes in `model`."""
    match = _PARAMETER_TARGET.match(name)
    owner = None
    if match is not None:
        try:
            owner = model.get_submodule(match["module"] or "")
        except AttributeError:
            owner = None
    if owner is None:
        raise LoraDAError(f"No module named {name!r} in the model.")
    wrapper = owner if isinstance(owner, ParamWrapper) else None
    owner = innermost_base_layer(owner)
    parameter = getattr(owner, match["parameter"], None)
    if not isinstance(parameter, torch.Tensor):
        raise LoraDAError(f"No module named {name!r} in the model, nor a parameter of that name.")
    experts, shape = _parameter_layout(owner, parameter)
    expert = None if match["expert"] is None else int(match["expert"])
    if (expert is None) != (experts is None) or (expert is not None and expert >= experts):
        raise LoraDAError(f"{name!r} does not name a weight of the model: a 3-D parameter of {experts} experts is "
                          "named with its expert's index, e.g. 'experts.gate_up_proj[0]', a 2-D one without.")
    while wrapper is not None and getattr(wrapper, "parameter_name", None) != match["parameter"]:
        wrapper = wrapper.base_layer if isinstance(wrapper.base_layer, ParamWrapper) else None
    return ParameterTarget(owner, match["parameter"], expert, shape, wrapper)


def target_shapes(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(out, in) of each named layer or adapted weight of `model`."""
    return {name: layer_shape(target) for name, target in resolve_layers(model, names).items()}
