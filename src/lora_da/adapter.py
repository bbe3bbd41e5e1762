"""PEFT-native entry point: initialize the LoRA factors of an existing `PeftModel` with LoRA-DA."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, PeftModel
from peft.utils.integrations import dequantize_module_weight
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .allocation import RankAllocation
from .cache import check_statistics
from .collect import (
    EXPERTS_NOT_SHARDED,
    PerExampleLoss,
    collect_in_two_passes,
    collect_statistics,
    probe_batch,
)
from .config import LoraDAConfig, LoraDAError, check_ranks
from .distributed import (
    all_gather_objects,
    get_world_size,
    is_distributed,
    is_main_process,
    local_config,
    on_every_rank,
    shard_batches,
)
from .gram import packed_size
from .layers import (
    ParameterTarget,
    canonical_layer_name,
    check_supported_sharding,
    find_adapted_weights,
    is_expert,
    layer_shape,
    lora_module,
    model_device,
    set_master_copy,
    unwrap_model,
    writable_parameters,
)
from .model_tasks import ModelTask
from .ranks import (
    allocate_from_solutions,
    check_rank_allocation,
    gradient_sensitivities,
    largest_ranks,
    resize_lora_layers,
)
from .schedule import (
    FILL_SHARE,
    ActivationEstimate,
    MicroBatches,
    PassPlan,
    can_cut,
    plan_inputs_apart,
    plan_memory,
    plan_micro_batches,
    solve_layers,
)
from .solver import solve_working_bytes, truncate_solution
from .statistics import INPUT_DTYPE, LoraDAStatistics, statistics_bytes

logger = logging.getLogger("lora_da")


@dataclass
class LoraDAReport:
    """What `initialize_lora_da` did, per layer and in total."""

    layers: dict[str, dict] = field(default_factory=dict)  # every weight that got LoRA-DA factors
    skipped: list[str] = field(default_factory=list)  # LoRA layers of kinds LoRA-DA cannot initialize
    default_init: list[str] = field(default_factory=list)  # experts' weights that no calibration token reached
    adapted_weights: int = 0  # weights the adapter adapts: layers, each expert of a stack, skipped layers
    num_examples: int = 0
    num_tokens: int = 0
    statistics_seconds: float = 0.0
    solve_seconds: float = 0.0
    config: dict = field(default_factory=dict)
    passes: int = 1
    statistics_bytes_estimate: int = 0  # upper bound of the largest pass's accumulators, before gathering
    statistics_bytes: int = 0  # the largest pass's accumulators, as gathered
    activation_bytes: int | None = None  # what a pass keeps for a (micro-)batch's backward, where the plan measured
    micro_batch_examples: int | None = None  # the batches were passed in micro-batches of at most this many examples
    world_size: int = 1
    statistics_sharded: bool = False  # each rank held only the statistics of the layers it solved
    data_hash: str | None = None
    rank_allocation: RankAllocation | None = None  # the ranks chosen when `config.rank_allocation` is not "uniform"

    @property
    def total_seconds(self) -> float:
        return self.statistics_seconds + self.solve_seconds

    @property
    def initialized_weights(self) -> int:
        """Adapted weights that got LoRA-DA factors."""
        return len(self.layers)

    def coverage(self) -> str:
        """One line: how many adapted weights got LoRA-DA factors, and which were left at PEFT's default."""
        return coverage_line(self.initialized_weights, self.adapted_weights, self.skipped, self.default_init)

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {
            "initialized_weights": self.initialized_weights,
            "adapted_weights": self.adapted_weights,
            "coverage": self.coverage(),
            "default_init": self.default_init,
            "num_examples": self.num_examples,
            "num_tokens": self.num_tokens,
            "statistics_seconds": self.statistics_seconds,
            "solve_seconds": self.solve_seconds,
            "total_seconds": self.total_seconds,
            "skipped": self.skipped,
            "passes": self.passes,
            "statistics_bytes_estimate": self.statistics_bytes_estimate,
            "statistics_bytes": self.statistics_bytes,
            "activation_bytes": self.activation_bytes,
            "micro_batch_examples": self.micro_batch_examples,
            "world_size": self.world_size,
            "statistics_sharded": self.statistics_sharded,
            "data_hash": self.data_hash,
            "rank_allocation": self.rank_allocation.to_dict() if self.rank_allocation else None,
            "config": self.config,
            "layers": self.layers,
        }


def coverage_line(initialized: int, adapted: int, skipped: list[str], default_init: list[str]) -> str:
    """"LoRA-DA factors for 46 of 48 adapted weights; ..." with what was left at PEFT's default init."""
    text = f"LoRA-DA factors for {initialized} of {adapted} adapted weights"
    parts = []
    if skipped:
        parts.append(f"{len(skipped)} in layers LoRA-DA cannot initialize (e.g. {skipped[0]})")
    if default_init:
        parts.append(f"{len(default_init)} experts' weights no calibration token reached (e.g. {default_init[0]})")
    return text + ("; at PEFT's default init: " + ", ".join(parts) if parts else "")


def check_peft_model(model: nn.Module, adapter_name: str) -> None:
    """Raise unless `model` is a PeftModel with a LoRA adapter called `adapter_name`."""
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


# init_lora_weights values that change the base weights (they subtract their start from W or replace W), so that
# the model would not start at W + s * B @ A once LoRA-DA's factors are written.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Options that are no variant of the forward but change how the adapter's input enters lora_A.
_INPUT_CHANGING_OPTIONS = ("use_qalora",)


def check_lora_options(config: LoraConfig, adapter_name: str) -> None:
    """Refuse a LoRA config whose model would not start at `W + s * B @ A` with LoRA-DA's factors: a LoRA
    variant other than DoRA (aLoRA, VeLoRA, MonteCLoRA, BD-LoRA, Arrow, KaSA, MiCA, ...: each changes how
    `B @ A` enters the forward or is trained), QA-LoRA's pooled input, or an init that changes the base weights."""
    refused = None
    init = config.init_lora_weights
    for option in dataclasses.fields(config):
        value = getattr(config, option.name)
        if option.name == "init_lora_weights":
            if isinstance(init, str) and (init in option.metadata.get("lora_variants", ()) or
                                          init.lower().startswith(_BASE_CHANGING_INITS)):
                refused = (option.name, init)
        elif (option.metadata.get("is_lora_variant") and option.name != "use_dora" and value) or (
                option.name in _INPUT_CHANGING_OPTIONS and value):
            refused = (option.name, value)
        if refused is not None:
            raise LoraDAError(
                f"Adapter {adapter_name!r} has LoraConfig({refused[0]}={refused[1]!r}), with which the model would "
                "not start at W + s * B @ A from LoRA-DA's factors; LoRA-DA supports plain LoRA, rsLoRA, DoRA, "
                "rank/alpha patterns and target_parameters: remove that option."
            )


def initialize_lora_da(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]] | None,
    config: LoraDAConfig,
    adapter_name: str = "default",
    *,
    statistics: LoraDAStatistics | str | os.PathLike | None = None,
    loss_fn: PerExampleLoss | None = None,
    layers_per_pass: int | None = None,
    memory_budget: int | None = None,
    shard: bool = False,
    shard_statistics: bool | None = None,
) -> LoraDAReport:
    """Set `lora_A`/`lora_B` of `adapter_name` in place from one pass over calibration `batches`.

    Every weight the adapter adapts gets LoRA-DA factors and the model starts at `W + s * B @ A`: LoRA layers over
    linear maps, and the weights of `LoraConfig(target_parameters=...)` (each expert of a mixture-of-experts stack
    from the tokens routed to it, a router's weight); DoRA's magnitude is recomputed for the new factors. Layers of
    other kinds (embeddings, convolutions) keep PEFT's init, with a warning; experts that no calibration token
    reaches too (`report.default_init`); `report.coverage()` says how many adapted weights got factors. A config
    with which the model would not start at that formula is refused (see `check_lora_options`).

    Base weights are not changed; on any error no weight is changed. Pass precomputed `statistics`
    (from `collect_statistics`, or a file written by `LoraDAStatistics.save` / `compute_and_save_statistics`)
    to skip the model pass; a file is refused if it was gathered on another model or for other layers.

    Under `torch.distributed` (e.g. `torchrun`), each rank passes over its batches (`shard=True` keeps batch
    i on rank i % world_size; leave it False with a `DistributedSampler`), the statistics are all-reduced,
    the solves are split across ranks and every rank ends with the same factors. A DDP-wrapped model is
    unwrapped.

    Memory: the layers are split into groups that are gathered, solved and freed in turn (one pass over `batches`
    per group, so several passes need re-iterable `batches`); the factors are the same as in one pass. By
    default the groups follow the memory free on the model's device (see `schedule.plan_memory`; the plan is
    logged, and printed when `config.show_progress`); `layers_per_pass` (a number of layers) and/or
    `memory_budget` (bytes of statistics) set them instead. When that takes several passes, the statistics pass's
    forward of a batch (its graph dropped) finds the layers that read one input, so that each shared `Z` is
    counted once, and, for the automatic plan, measures on the batch with the longest examples the memory its
    backward needs, so that the statistics get what that leaves free; `Z` is then summed without float32
    chunks, and the batches passed in micro-batches (the statistics are the same sums), where that saves passes.

    `shard_statistics` (under `torch.distributed`): each rank keeps only the statistics of the layers it solves,
    reduced to it batch by batch (see `collect_statistics`), which divides the memory per pass by about the
    number of ranks; every rank needs a batch. None (default): sharded when the statistics of all layers do not
    fit the automatic plan's one pass and every rank has a batch.
    """
    wrapped, model = model, unwrap_model(model)
    check_supported_sharding(model)
    check_peft_model(model, adapter_name)
    check_lora_options(model.peft_config[adapter_name], adapter_name)
    layers, unsupported = find_adapted_weights(model, adapter_name)
    if not layers:
        raise LoraDAError(
            f"Adapter {adapter_name!r} has no LoRA layer over a linear map and no weight of `target_parameters` "
            f"(only {', '.join(unsupported) or 'nothing'}); check `target_modules` and `target_parameters`."
        )
    experts = any(is_expert(target) for target in layers.values())
    if experts and shard_statistics and get_world_size() > 1:
        raise LoraDAError(EXPERTS_NOT_SHARDED)
    if experts:
        shard_statistics = False
    check_dora_writable(layers, adapter_name)
    if unsupported and is_main_process():
        warnings.warn(
            f"LoRA-DA leaves {len(unsupported)} layer(s) of types it cannot handle at PEFT's default init: "
            + ", ".join(unsupported),
            stacklevel=2,
        )
    ranks = {name: int(lora_module(target).r[adapter_name]) for name, target in layers.items()}
    shapes = {name: layer_shape(target) for name, target in layers.items()}
    check_ranks(shapes, ranks)
    allocating = config.rank_allocation != "uniform"
    if allocating:
        check_rank_allocation(wrapped, layers)

    report = LoraDAReport(skipped=unsupported, config=config.to_dict(), world_size=get_world_size(),
                          adapted_weights=len(layers) + len(unsupported))
    local = local_config(config)
    # Under a rank allocation every weight is solved at its largest allowed rank and cut to the rank it gets.
    solve_ranks = largest_ranks(shapes, ranks, config) if allocating else ranks
    solve_config = dataclasses.replace(local, factor_balance="released") if allocating else local
    sensitivities = {} if config.rank_allocation == "gradient" else None
    if statistics is not None:
        start = time.perf_counter()
        statistics = _statistics_for(statistics, model, layers, config)
        report.statistics_seconds = time.perf_counter() - start
        report.num_examples, report.num_tokens = statistics.num_examples, statistics.num_tokens
        report.data_hash = statistics.metadata.get("data_hash")
        if sensitivities is not None:
            sensitivities.update(gradient_sensitivities(statistics, layers))
        start = time.perf_counter()
        solutions = solve_layers(statistics, solve_ranks, solve_config, statistics.layer_names, shapes)
        report.solve_seconds = time.perf_counter() - start
    else:
        if batches is None:
            raise LoraDAError("Pass calibration `batches`, or precomputed `statistics`.")
        solutions = _gather_and_solve(model, batches, layers, solve_ranks, solve_config, report, loss_fn=loss_fn,
                                      layers_per_pass=layers_per_pass, memory_budget=memory_budget, shard=shard,
                                      shard_statistics=shard_statistics, sensitivities=sensitivities)
    if allocating:
        report.rank_allocation = allocate_from_solutions(solutions, shapes, ranks, config, sensitivities)
        solutions = {name: truncate_solution(solution, report.rank_allocation.ranks[name], local)
                     for name, solution in solutions.items()}

    report.default_init = [name for name in layers if name not in solutions]
    # Every factor is solved before any is written: an error above leaves the model untouched.
    if allocating:
        resize_lora_layers(model, layers, report.rank_allocation.ranks, adapter_name)
    write_factors(layers, solutions, adapter_name)
    for name, target in layers.items():
        if name in solutions:
            report.layers[name] = {**solutions[name].info, "scaling": float(lora_module(target).scaling[adapter_name])}
    if is_main_process():
        _announce(report.coverage(), config)
    return report


def _announce(line: str, config: LoraDAConfig) -> None:
    """A line for the user: on the terminal with the progress bars, else to the `lora_da` logger (not both)."""
    if config.show_progress:
        print(line, file=sys.stderr, flush=True)
    else:
        logger.info(line)


def _adapter_parameters(module: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The parameters of one LoRA layer that LoRA-DA writes: lora_A, lora_B (with its bias) and DoRA's
    magnitude."""
    parameters = {"A": module.lora_A[adapter_name].weight, "B": module.lora_B[adapter_name].weight}
    if module.lora_B[adapter_name].bias is not None:
        parameters["B bias"] = module.lora_B[adapter_name].bias
    if adapter_name in getattr(module, "lora_magnitude_vector", {}):
        parameters["magnitude"] = module.lora_magnitude_vector[adapter_name].weight
    return parameters


def check_dora_writable(layers: Mapping[str, nn.Module | ParameterTarget], adapter_name: str) -> None:
    """Refuse DoRA on a ZeRO-3 model: its magnitude is recomputed from the full base weight, which ZeRO-3
    partitions (FSDP2's DTensor weights are gathered for it)."""
    for name, target in layers.items():
        module = lora_module(target)
        if adapter_name not in getattr(module, "lora_magnitude_vector", {}):
            continue
        parameters = {**_adapter_parameters(module, adapter_name), "base weight": module.get_base_layer().weight}
        partitioned = next((key for key, parameter in parameters.items() if hasattr(parameter, "ds_id")), None)
        if partitioned is not None:
            raise LoraDAError(
                f"Layer {name!r} uses DoRA, whose magnitude LoRA-DA recomputes from the full base weight, but its "
                f"{partitioned} is partitioned by DeepSpeed ZeRO-3: initialize before wrapping the model in DeepSpeed."
            )


def write_factors(layers: Mapping[str, nn.Module | ParameterTarget], solutions: Mapping, adapter_name: str) -> None:
    """Write each solved weight's factors into its LoRA layer, so that the model starts at `W + s * B @ A`.

    A `ParamWrapper` keeps the rank-r factors of its E experts in one `lora_A` [E * r, in] (expert e's rows
    e * r ... (e + 1) * r - 1) and one `lora_B` [out, E * r] (expert e's columns e, e + E, ...: PEFT reads it as
    [out, r, E]); experts without a solution keep their factors. `lora_B`'s bias is zeroed and DoRA's magnitude
    is set to the norms of `W + s * B @ A`, as PEFT sets it when it creates a DoRA layer."""
    by_module: dict[int, tuple[nn.Module, list[tuple[str, nn.Module | ParameterTarget]]]] = {}
    for name, target in layers.items():
        if name in solutions:
            module = lora_module(target)
            by_module.setdefault(id(module), (module, []))[1].append((name, target))
    written = [p for module, _ in by_module.values() for p in _adapter_parameters(module, adapter_name).values()]
    with torch.no_grad(), writable_parameters(written):
        for module, members in by_module.values():
            parameters = _adapter_parameters(module, adapter_name)
            if len(members) == 1 and not isinstance(members[0][1], ParameterTarget):
                solution = solutions[members[0][0]]
                A, B = solution.A, solution.B
            else:
                A, B = _stacked_factors(module, parameters, [(t, solutions[name]) for name, t in members],
                                        int(module.r[adapter_name]))
            write_parameter(parameters["A"], A)
            write_parameter(parameters["B"], B)
            if "B bias" in parameters:
                write_parameter(parameters["B bias"], torch.zeros(parameters["B bias"].shape))
            if "magnitude" in parameters:
                write_parameter(parameters["magnitude"], _dora_magnitude(module, adapter_name, A, B))


def _full_value(parameter: torch.Tensor) -> torch.Tensor:
    """A copy of the full value of a (possibly FSDP2-sharded) parameter."""
    value = parameter.full_tensor() if isinstance(parameter, DTensor) else parameter.detach()
    return value.clone()


def _stacked_factors(module: nn.Module, parameters: Mapping[str, torch.Tensor], solved: list, rank: int):
    """The full `lora_A`, `lora_B` of a `ParamWrapper` with the solved experts' factors in PEFT's layout."""
    A, B = _full_value(parameters["A"]), _full_value(parameters["B"])
    experts = A.shape[0] // rank
    B_by_expert = B.view(B.shape[0], rank, experts)
    for target, solution in solved:
        expert = target.expert or 0
        A[expert * rank : (expert + 1) * rank] = solution.A.to(device=A.device, dtype=A.dtype)
        B_by_expert[:, :, expert] = solution.B.to(device=B.device, dtype=B.dtype)
    return A, B


def _dora_magnitude(module: nn.Module, adapter_name: str, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """DoRA's magnitude for the factors `A`, `B` now in `module`: the per-output norms of `W + s * B @ A`,
    computed with PEFT's own DoRA layer as its forward computes them (so that the forward starts at exactly that
    weight); on an FSDP2-sharded layer from the full values, which every rank holds."""
    dora = module.lora_magnitude_vector[adapter_name]
    base = module.get_base_layer()
    if isinstance(base.weight, DTensor):
        dtype = module.lora_A[adapter_name].weight.dtype
        lora_weight = B.to(dtype) @ A.to(dtype)
        weight = base.weight.full_tensor()
    else:
        lora_weight = dora.get_lora_weight(lora_A=module.lora_A[adapter_name], lora_B=module.lora_B[adapter_name])
        weight = dequantize_module_weight(base)
    weight = weight.to(device=lora_weight.device, dtype=lora_weight.dtype)
    return dora.get_weight_norm(weight=weight, lora_weight=lora_weight, scaling=module.scaling[adapter_name])


def write_parameter(parameter: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the full `value` into `parameter` in its dtype and device; a sharded (FSDP2 DTensor) parameter
    keeps this rank's shard of it (every rank holds the same full `value`, so no communication is needed); a
    DeepSpeed one (inside `writable_parameters`) also gets its optimizer's master copy set."""
    set_master_copy(parameter, value)
    value = value.to(device=parameter.device, dtype=parameter.dtype)
    if isinstance(parameter, DTensor):
        value = distribute_tensor(value, parameter.device_mesh, parameter.placements, src_data_rank=None)
    parameter.copy_(value)


def _gather_and_solve(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    layers: Mapping[str, nn.Module],
    ranks: Mapping[str, int],
    config: LoraDAConfig,
    report: LoraDAReport,
    *,
    loss_fn: PerExampleLoss | None,
    layers_per_pass: int | None,
    memory_budget: int | None,
    shard: bool,
    shard_statistics: bool | None,
    sensitivities: dict[str, float] | None = None,
) -> dict:
    """Gather statistics of the base model for each planned group of layers, solve and free them; with
    `sensitivities`, also fill in each weight's gradient sensitivity (see `gradient_sensitivities`)."""
    shapes = {name: layer_shape(module) for name, module in layers.items()}
    sizes = {name: statistics_bytes(*shape) for name, shape in shapes.items()}
    device = model_device(model)
    eigensolver = config.eigensolver_on(device.type)
    solve_sizes = {name: solve_working_bytes(*shape, eigensolver) for name, shape in shapes.items()}
    units = {name: [name] for name in shapes}  # what the plan keeps together: a layer, or layers sharing an input
    plan = plan_memory(sizes, solve_sizes, device, layers_per_pass=layers_per_pass, memory_budget=memory_budget)
    several = len(plan.passes) > 1 and layers_per_pass is None
    probe = _probe_batches(model, batches, list(layers), config, loss_fn, memory_budget is None) if several else None
    groups, estimate = probe if probe else (None, None)
    activations = estimate.bytes() if estimate else None  # for whole batches
    world_size = get_world_size()
    if groups:  # before any forward each layer was counted with a Z of its own: once per group is the truth
        units = {}
        for name in shapes:
            units.setdefault(groups[name], []).append(name)
        sizes = {unit: statistics_bytes(sum(shapes[name][0] for name in members), shapes[unit][1])
                 for unit, members in units.items()}
        solve_sizes = {unit: max(solve_sizes[name] for name in members) for unit, members in units.items()}
    chunks = {unit: statistics_bytes(0, shapes[unit][1]) - statistics_bytes(0, shapes[unit][1], input_chunk=False)
              for unit in units}  # the float32 chunk of each unit's Z
    if groups:
        plan = plan_memory(sizes, solve_sizes, device, memory_budget=memory_budget, chunk_sizes=chunks,
                           activation_bytes=activations)
    if world_size > 1 and shard_statistics is not False:
        if shard:  # sharded here, so that each rank can see whether it has a batch
            batches, shard = shard_batches(batches), False
        if shard_statistics is None:
            has_batch, batches = _peek(batches)
            shard_statistics = plan.rule == "automatic" and all(all_gather_objects(has_batch))
        if shard_statistics:
            plan = plan_memory(sizes, solve_sizes, device, layers_per_pass=layers_per_pass,
                               memory_budget=memory_budget, shards=world_size, activation_bytes=activations)
    shard_statistics = bool(shard_statistics) and world_size > 1
    if estimate is not None and plan.rule == "automatic":  # fewer passes in micro-batches, where that fits
        shards, free = world_size if shard_statistics else 1, plan.free_bytes

        def plan_for(activation_bytes: int) -> PassPlan:  # each candidate against the same free memory
            return plan_memory(sizes, solve_sizes, device, shards=shards, chunk_sizes=chunks,
                               activation_bytes=activation_bytes, free_bytes=free)

        micro = plan_micro_batches(plan_for, estimate, len(plan.passes))
        if micro is not None:
            plan, batches = micro, MicroBatches(batches, micro.micro_batch_examples)
    if groups and not shard_statistics and not any(isinstance(layer, ParameterTarget) for layer in layers.values()):
        gradients = {unit: size - statistics_bytes(0, shapes[unit][1]) for unit, size in sizes.items()}
        plan = plan_inputs_apart(plan, gradients, {unit: INPUT_DTYPE.itemsize * packed_size(shapes[unit][1])
                                                   for unit in units})
    report.statistics_sharded = shard_statistics
    passes = [[name for unit in group for name in units[unit]] for group in plan.passes]
    report.passes = plan.data_passes
    report.statistics_bytes_estimate = max(plan.pass_bytes)
    report.activation_bytes, report.micro_batch_examples = plan.activation_bytes, plan.micro_batch_examples
    if is_main_process():
        _announce(plan.describe(), config)
        crowded = plan.activation_bytes is not None and plan.free_bytes is not None and \
            plan.activation_bytes >= FILL_SHARE * plan.free_bytes
        if crowded:
            warnings.warn(
                f"A batch's activations ({plan.activation_bytes / 2**20:.0f} MiB, measured on the batch with the "
                f"longest examples) take the {FILL_SHARE:.0%} of the {plan.free_bytes / 2**20:.0f} MiB free that a "
                "pass may use, even in micro-batches: the pass will likely run out of memory. Pass smaller batches "
                "(fewer examples or tokens).",
                stacklevel=3,
            )
        too_big = [name for name in sizes if memory_budget is not None and sizes[name] > memory_budget]
        if too_big:
            warnings.warn(
                f"{len(too_big)} layer(s), or groups of layers reading one input, exceed memory_budget="
                f"{memory_budget} bytes alone (e.g. {too_big[0]!r}, {sizes[too_big[0]]} bytes); each gets a pass of "
                "its own.",
                stacklevel=3,
            )
    if plan.data_passes > 1 and iter(batches) is batches:
        raise LoraDAError(
            f"{plan.data_passes} passes over the data are planned ({plan.rule}: {plan.describe()}), but `batches` is a "
            "one-shot iterator: pass a list or a DataLoader, or a larger `memory_budget`."
        )
    solutions = {}
    for number, group in enumerate(passes, start=1):
        start = time.perf_counter()
        # one process: a second pass that yields nothing is a spent iterator (under torch.distributed a rank
        # may legitimately hold no batch; the data-hash check below, on all-reduced hashes, still holds)
        again = number > 1 and get_world_size() == 1
        pass_batches = _iterate_again(batches, number, len(passes)) if again else batches
        with model.disable_adapter():  # statistics of the base model, whatever the adapters hold now
            if plan.inputs_apart:
                stats = collect_in_two_passes(model, pass_batches, group, config, loss_fn=loss_fn, shard=shard)
            else:
                stats = collect_statistics(model, pass_batches, group, config, loss_fn=loss_fn, shard=shard,
                                           shard_statistics=shard_statistics, input_chunks=plan.input_chunks)
        report.statistics_seconds += time.perf_counter() - start
        report.statistics_bytes = max(report.statistics_bytes, stats.nbytes())
        report.num_examples, report.num_tokens = stats.num_examples, stats.num_tokens
        data_hash = stats.metadata.get("data_hash")
        if number > 1 and data_hash != report.data_hash:  # each group's factors must come from the same data
            raise LoraDAError(
                f"Pass {number} of {len(passes)} over `batches` saw other examples than pass 1 (data hash "
                f"{data_hash} vs {report.data_hash}): `batches` must give the same examples each time it is "
                "iterated (a list or a DataLoader; shuffling is fine)."
            )
        report.data_hash = data_hash
        if sensitivities is not None:
            sensitivities.update(gradient_sensitivities(stats, layers))
        start = time.perf_counter()
        solved = [name for name in group if name in stats.output_token_counts]  # not the experts no token reached
        solutions.update(solve_layers(stats, ranks, config, solved, shapes, release=True))
        report.solve_seconds += time.perf_counter() - start
        del stats  # freed before the next group is gathered
    return solutions


def _probe_batches(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    names: list[str],
    config: LoraDAConfig,
    loss_fn: PerExampleLoss | None,
    measure: bool,
) -> tuple[dict[str, str], ActivationEstimate | None] | None:
    """The layers' input groups and (`measure`) the memory a batch's backward needs, from the statistics pass's
    forward of a batch: with `measure`, the batch with the longest examples (of one length, the most supervised),
    found by looking at every batch; else the first. On every rank, or on none (a sharded model's forward is
    collective); None where the batches cannot be looked at twice or a rank has none."""
    iterator = iter(batches)
    first = None if iterator is batches else next(iterator, None)
    distributed = is_distributed()
    if not (all(all_gather_objects(first is not None)) if distributed else first is not None):
        return None

    seq2seq = ModelTask.of(model).kind == "seq2seq"

    def probe() -> tuple[dict[str, str], ActivationEstimate | None]:
        longest, longest_key, most, cuttable = first, None, 1, True
        for batch in batches if measure else ():
            examples, length = _examples_and_length(batch, seq2seq)
            key = (length, _supervised_share(batch))
            if longest_key is None or key > longest_key:
                longest, longest_key = batch, key
            most, cuttable = max(most, examples), cuttable and can_cut(batch)
        with model.disable_adapter():
            found = probe_batch(model, longest, names, config, loss_fn)
        examples, length = _examples_and_length(longest, seq2seq)
        estimate = ActivationEstimate(found.activation_bytes / examples, length, most, cuttable) if measure else None
        return found.input_groups, estimate

    groups, estimate = on_every_rank(probe)
    if distributed:  # the largest of every rank's, cut only where every rank's batches can be
        everywhere = all_gather_objects((groups, estimate))
        groups = everywhere[0][0]
        if estimate is not None:
            estimates = [e for _, e in everywhere]
            estimate = ActivationEstimate(max(e.bytes_per_example for e in estimates),
                                          max(e.longest_example for e in estimates),
                                          max(e.most_examples for e in estimates), all(e.cuttable for e in estimates))
    return groups, estimate


def _examples_and_length(batch: Mapping[str, torch.Tensor], seq2seq: bool = False) -> tuple[int, int]:
    """Examples in a batch and positions per example: those of its `input_ids`, and for an encoder-decoder model
    also the decoder's (`decoder_input_ids`, else `labels`)."""
    ids = batch["input_ids"]
    decoder = batch.get("decoder_input_ids", batch.get("labels")) if seq2seq else None
    positions = ids.numel() + (decoder.numel() if decoder is not None else 0)
    return ids.shape[0], positions // max(1, ids.shape[0])


def _supervised_share(batch: Mapping[str, torch.Tensor]) -> float:
    """Share of a batch's label positions that are supervised: of batches of one length, the pass keeps the most
    for the one with the most, whose logits it projects onto the vocabulary."""
    labels = batch.get("labels")
    if labels is None:
        mask = batch.get("attention_mask")
        return float(mask.float().mean()) if mask is not None else 1.0
    return float((labels != -100).float().mean()) if labels.numel() else 0.0


def _peek(batches: Iterable) -> tuple[bool, Iterable]:
    """Whether `batches` yields anything, and batches that still yield everything (a one-shot iterator is
    chained back together)."""
    iterator = iter(batches)
    first = next(iterator, None)
    if iterator is not batches:
        return first is not None, batches
    return first is not None, itertools.chain([first], iterator) if first is not None else iter(())


def _iterate_again(batches: Iterable, number: int, total: int) -> Iterable:
    """`batches` for pass `number` > 1, refused at once when iterating it again yields nothing (an iterable
    that hands out the same, spent iterator) instead of failing later for want of supervised tokens."""
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise LoraDAError(
            f"Pass {number} of {total}: iterating `batches` again yielded nothing; it must give the same batches "
            "each time it is iterated (a list or a DataLoader), not hand out one spent iterator."
        )
    return itertools.chain([first], iterator)


def _statistics_for(
    statistics: LoraDAStatistics | str | os.PathLike,
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    config: LoraDAConfig,
) -> LoraDAStatistics:
    """Load (if a path) and check statistics; returned keyed by the model's LoRA layer names."""
    source = "The statistics"
    if isinstance(statistics, (str, os.PathLike)):
        source = f"The statistics in {os.fspath(statistics)!r}"
        statistics = LoraDAStatistics.load(statistics, device=model_device(model))
    shapes = {canonical_layer_name(name): layer_shape(module) for name, module in layers.items()}
    check_statistics(statistics, model, shapes, config, source=source)
    stored = set(statistics.layer_names)
    present = {name: name if name in stored else canonical_layer_name(name) for name in layers}
    return statistics.select({name: key for name, key in present.items() if key in stored})
