"""PEFT-native entry point: initialize the LoRA factors of an existing `PeftModel` with LoRA-DA."""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .cache import check_statistics
from .collect import PerExampleLoss, collect_statistics, discover_input_groups
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
from .layers import (
    canonical_layer_name,
    check_supported_sharding,
    find_lora_layers,
    layer_shape,
    model_device,
    set_master_copy,
    unwrap_model,
    writable_parameters,
)
from .schedule import plan_memory, solve_layers
from .solver import solve_working_bytes
from .statistics import LoraDAStatistics, statistics_bytes

logger = logging.getLogger("lora_da")


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
    passes: int = 1
    statistics_bytes_estimate: int = 0  # upper bound of the largest pass's accumulators, before gathering
    statistics_bytes: int = 0  # the largest pass's accumulators, as gathered
    world_size: int = 1
    statistics_sharded: bool = False  # each rank held only the statistics of the layers it solved
    data_hash: str | None = None

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
            "passes": self.passes,
            "statistics_bytes_estimate": self.statistics_bytes_estimate,
            "statistics_bytes": self.statistics_bytes,
            "world_size": self.world_size,
            "statistics_sharded": self.statistics_sharded,
            "data_hash": self.data_hash,
            "config": self.config,
            "layers": self.layers,
        }


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
    `memory_budget` (bytes of statistics) set them instead. When that takes several passes, a forward of the first
    batch without gradients finds the layers that read one input: each shared `Z` is counted once, in one pass.

    `shard_statistics` (under `torch.distributed`): each rank keeps only the statistics of the layers it solves,
    reduced to it batch by batch (see `collect_statistics`), which divides the memory per pass by about the
    number of ranks; every rank needs a batch. None (default): sharded when the statistics of all layers do not
    fit the automatic plan's one pass and every rank has a batch.
    """
    model = unwrap_model(model)
    check_supported_sharding(model)
    check_peft_model(model, adapter_name)
    layers, unsupported = find_lora_layers(model, adapter_name)
    if not layers:
        raise LoraDAError(
            f"Adapter {adapter_name!r} has no LoRA layer over a linear map; check `target_modules`."
        )
    if unsupported and is_main_process():
        warnings.warn(
            f"LoRA-DA leaves {len(unsupported)} layer(s) of types it cannot handle at PEFT's default init: "
            + ", ".join(unsupported),
            stacklevel=2,
        )
    ranks = {name: int(module.r[adapter_name]) for name, module in layers.items()}
    check_ranks({name: layer_shape(module) for name, module in layers.items()}, ranks)

    report = LoraDAReport(skipped=unsupported, config=config.to_dict(), world_size=get_world_size())
    local = local_config(config)
    if statistics is not None:
        start = time.perf_counter()
        statistics = _statistics_for(statistics, model, layers, config)
        report.statistics_seconds = time.perf_counter() - start
        report.num_examples, report.num_tokens = statistics.num_examples, statistics.num_tokens
        report.data_hash = statistics.metadata.get("data_hash")
        start = time.perf_counter()
        shapes = {name: layer_shape(module) for name, module in layers.items()}
        solutions = solve_layers(statistics, ranks, local, list(layers), shapes)
        report.solve_seconds = time.perf_counter() - start
    else:
        if batches is None:
            raise LoraDAError("Pass calibration `batches`, or precomputed `statistics`.")
        solutions = _gather_and_solve(model, batches, layers, ranks, local, report, loss_fn=loss_fn,
                                      layers_per_pass=layers_per_pass, memory_budget=memory_budget, shard=shard,
                                      shard_statistics=shard_statistics)

    # Every factor is solved before any is written: an error above leaves the model untouched.
    written = [module.lora_A[adapter_name].weight for module in layers.values()]
    written += [module.lora_B[adapter_name].weight for module in layers.values()]
    with torch.no_grad(), writable_parameters(written):
        for name, module in layers.items():
            solution = solutions[name]
            write_parameter(module.lora_A[adapter_name].weight, solution.A)
            write_parameter(module.lora_B[adapter_name].weight, solution.B)
            report.layers[name] = {**solution.info, "scaling": float(module.scaling[adapter_name])}
    return report


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
) -> dict:
    """Gather statistics of the base model for each planned group of layers, solve and free them."""
    shapes = {name: layer_shape(module) for name, module in layers.items()}
    sizes = {name: statistics_bytes(*shape) for name, shape in shapes.items()}
    device = model_device(model)
    eigensolver = config.eigensolver_on(device.type)
    solve_sizes = {name: solve_working_bytes(*shape, eigensolver) for name, shape in shapes.items()}
    units = {name: [name] for name in shapes}  # what the plan keeps together: a layer, or layers sharing an input
    plan = plan_memory(sizes, solve_sizes, device, layers_per_pass=layers_per_pass, memory_budget=memory_budget)
    several = len(plan.passes) > 1 and layers_per_pass is None
    groups = _input_groups(model, batches, list(layers), config, loss_fn) if several else None
    if groups:  # before any forward each layer was counted with a Z of its own: once per group is the truth
        units = {}
        for name in shapes:
            units.setdefault(groups[name], []).append(name)
        sizes = {unit: statistics_bytes(sum(shapes[name][0] for name in members), shapes[unit][1])
                 for unit, members in units.items()}
        solve_sizes = {unit: max(solve_sizes[name] for name in members) for unit, members in units.items()}
        plan = plan_memory(sizes, solve_sizes, device, memory_budget=memory_budget)
    world_size = get_world_size()
    if world_size > 1 and shard_statistics is not False:
        if shard:  # sharded here, so that each rank can see whether it has a batch
            batches, shard = shard_batches(batches), False
        if shard_statistics is None:
            has_batch, batches = _peek(batches)
            shard_statistics = plan.rule == "automatic" and all(all_gather_objects(has_batch))
        if shard_statistics:
            plan = plan_memory(sizes, solve_sizes, device, layers_per_pass=layers_per_pass,
                               memory_budget=memory_budget, shards=world_size)
    shard_statistics = bool(shard_statistics) and world_size > 1
    report.statistics_sharded = shard_statistics
    passes = [[name for unit in group for name in units[unit]] for group in plan.passes]
    report.passes = len(passes)
    report.statistics_bytes_estimate = max(plan.pass_bytes)
    if is_main_process():
        logger.info(plan.describe())
        if config.show_progress:
            print(plan.describe(), file=sys.stderr, flush=True)
        too_big = [name for name in sizes if memory_budget is not None and sizes[name] > memory_budget]
        if too_big:
            warnings.warn(
                f"{len(too_big)} layer(s), or groups of layers reading one input, exceed memory_budget="
                f"{memory_budget} bytes alone (e.g. {too_big[0]!r}, {sizes[too_big[0]]} bytes); each gets a pass of "
                "its own.",
                stacklevel=3,
            )
    if len(passes) > 1 and iter(batches) is batches:
        raise LoraDAError(
            f"{len(passes)} passes over the data are planned ({plan.rule}: {plan.describe()}), but `batches` is a "
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
            stats = collect_statistics(model, pass_batches, group, config, loss_fn=loss_fn, shard=shard,
                                       shard_statistics=shard_statistics)
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
        start = time.perf_counter()
        solutions.update(solve_layers(stats, ranks, config, group, shapes, release=True))
        report.solve_seconds += time.perf_counter() - start
        del stats  # freed before the next group is gathered
    return solutions


def _input_groups(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    names: list[str],
    config: LoraDAConfig,
    loss_fn: PerExampleLoss | None,
) -> dict[str, str] | None:
    """The layers' input groups from a forward of the first batch (on every rank, or on none: a sharded model's
    forward is collective), or None where the batches cannot be looked at twice or a rank has none."""
    iterator = iter(batches)
    first = None if iterator is batches else next(iterator, None)
    distributed = is_distributed()
    if not (all(all_gather_objects(first is not None)) if distributed else first is not None):
        return None

    def discover() -> dict[str, str]:
        with model.disable_adapter():
            return discover_input_groups(model, first, names, config, loss_fn)

    groups = on_every_rank(discover)
    return all_gather_objects(groups)[0] if distributed else groups


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
    return statistics.select({name: name if name in stored else canonical_layer_name(name) for name in layers})
