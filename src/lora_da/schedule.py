"""Scheduling of the LoRA-DA work: which layers share a pass over the data, in what micro-batches, and which rank
solves which layer."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from .config import LoraDAConfig, LoraDAError, check_ranks
from .distributed import (
    all_gather_objects,
    broadcast_tensors,
    communication_device,
    get_rank,
    get_world_size,
    is_distributed,
    on_every_rank,
)
from .solver import LayerSolution, solve_all
from .statistics import LoraDAStatistics


def plan_passes(
    sizes: Mapping[str, int], layers_per_pass: int | None = None, memory_budget: int | None = None
) -> list[list[str]]:
    """Split layers (in order, with their statistics bytes) into passes of at most `layers_per_pass` layers
    and `memory_budget` bytes; one pass when neither is given. A layer larger than the budget gets a pass
    of its own."""
    if layers_per_pass is not None and (int(layers_per_pass) != layers_per_pass or layers_per_pass < 1):
        raise LoraDAError(f"`layers_per_pass` must be a positive integer, got {layers_per_pass!r}.")
    if memory_budget is not None and not memory_budget > 0:
        raise LoraDAError(f"`memory_budget` must be a positive number of bytes, got {memory_budget!r}.")
    passes: list[list[str]] = []
    used = 0
    for name, size in sizes.items():
        full = passes and (
            (layers_per_pass is not None and len(passes[-1]) >= layers_per_pass)
            or (memory_budget is not None and used + size > memory_budget)
        )
        if not passes or full:
            passes.append([])
            used = 0
        passes[-1].append(name)
        used += size
    return passes


# Share of the free memory the automatic plan gives the statistics of one pass while the activations of a batch
# are not known: the rest is left to them.
STATISTICS_SHARE = 0.5
# Micro-batches keep at least this many positions (or one whole example): a GPU runs GEMMs of fewer rows well
# below its peak.
MIN_MICRO_BATCH_POSITIONS = 512
# Share of the free memory that what the plan counts may fill: a pass's statistics with the measured activations
# of its largest batch, and after the pass with the largest solve. The rest is slack for the allocator.
FILL_SHARE = 0.85


@dataclass
class PassPlan:
    """The layers of each pass over the calibration data, and why they were split so."""

    passes: list[list[str]]
    pass_bytes: list[int]  # upper bound of each pass's statistics
    solve_bytes: int  # working set of the largest layer's solve
    free_bytes: int | None  # memory free on the device when planned (automatic plan only)
    rule: str  # "one pass", "memory_budget", "layers_per_pass", "automatic" or "inputs apart"
    shards: int = 1  # ranks that the statistics are sharded over (each holds about 1/shards of a pass)
    activation_bytes: int | None = None  # what a pass keeps for a (micro-)batch's backward, where measured
    input_chunks: bool = True  # whether Z is summed in float32 chunks (see `hooks.Collector`)
    micro_batch_examples: int | None = None  # each batch is passed in slices of at most this many examples

    @property
    def inputs_apart(self) -> bool:
        """Whether every layer's G and y come from one forward+backward and their Z from a forward of its own."""
        return self.rule == "inputs apart"

    @property
    def data_passes(self) -> int:
        """Passes over the calibration data."""
        return len(self.passes) + self.inputs_apart

    def describe(self) -> str:
        """One line for the log: passes, bytes per pass, and what the plan was based on."""
        mib = 2**20
        if self.inputs_apart:
            text = ("LoRA-DA plan: G and y of every layer in one forward+backward, then their Z in a forward "
                    f"without gradients (2 passes over the data), statistics <= "
                    f"{max(self.pass_bytes) / mib:.0f} MiB + {self.solve_bytes / mib:.0f} MiB to solve a layer (all "
                    "layers' statistics did not fit beside one pass's activations")
        else:
            text = (f"LoRA-DA plan: {len(self.passes)} pass(es) over the data ({len(self.passes) - 1} extra) for "
                    f"{sum(map(len, self.passes))} layers, statistics <= {max(self.pass_bytes) / mib:.0f} MiB per "
                    f"pass + {self.solve_bytes / mib:.0f} MiB to solve a layer ({self.rule}")
            if not self.input_chunks:
                text += "; Z summed straight into float64, without float32 chunks"
        if self.micro_batch_examples is not None:
            text += f"; batches passed in micro-batches of at most {self.micro_batch_examples} examples"
        if self.shards > 1:
            text += f"; per rank, statistics sharded over {self.shards} ranks"
        if self.activation_bytes is not None:
            text += f"; {self.activation_bytes / mib:.0f} MiB of activations measured"
        if self.free_bytes is not None:
            text += f"; {self.free_bytes / mib:.0f} MiB free"
        return text + ")"


def free_memory_bytes(device: torch.device) -> int:
    """Memory that new tensors on `device` can use: free GPU memory plus torch's cached blocks, or the
    available RAM of the machine for a CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan_memory(
    sizes: Mapping[str, int],
    solve_sizes: Mapping[str, int],
    device: torch.device,
    *,
    layers_per_pass: int | None = None,
    memory_budget: int | None = None,
    shards: int = 1,
    chunk_sizes: Mapping[str, int] | None = None,
    activation_bytes: int | None = None,
    free_bytes: int | None = None,
) -> PassPlan:
    """Plan the passes: by `layers_per_pass` / `memory_budget` when given, else by `pass_budget` of the memory
    free on `device` (the smallest of all ranks; `free_bytes` if an earlier plan measured it), with
    `activation_bytes` where measured. With statistics sharded over `shards` ranks, bytes are per rank: 1/shards
    of each layer's bytes. `sizes` count Z's float32 chunks; given each unit's `chunk_sizes`, the plan sums Z
    without them where that takes fewer passes."""
    solve_bytes = max(solve_sizes.values(), default=0)
    largest = max(sizes.values(), default=0)
    if shards > 1:
        sizes = {name: -(-size // shards) for name, size in sizes.items()}
    free = None
    if layers_per_pass is not None or memory_budget is not None:
        rule = "layers_per_pass" if memory_budget is None else "memory_budget"
    else:
        free = free_bytes
        if free is None:
            free = free_memory_bytes(device)
            if is_distributed():
                free = min(all_gather_objects(free))
        budget = pass_budget(free, solve_bytes, largest, shards, activation_bytes)
        if sum(sizes.values()) <= budget:
            rule = "one pass"
        else:
            rule = "automatic"
            memory_budget = max(budget, 1)
    passes = plan_passes(sizes, layers_per_pass, memory_budget)
    plan = PassPlan(passes, [sum(sizes[name] for name in group) for group in passes], solve_bytes, free, rule,
                    shards, activation_bytes)
    if chunk_sizes is not None and len(passes) > 1 and shards == 1:  # sharded passes fold each step's chunk at once
        unchunked = {name: size - chunk_sizes[name] for name, size in sizes.items()}
        fewer = plan_passes(unchunked, layers_per_pass, memory_budget)
        if len(fewer) < len(passes):
            rule = "one pass" if free is not None and len(fewer) == 1 else rule
            plan = PassPlan(fewer, [sum(unchunked[name] for name in group) for group in fewer], solve_bytes, free,
                            rule, shards, activation_bytes, input_chunks=False)
    return plan


@dataclass(frozen=True)
class ActivationEstimate:
    """What a batch's backward needs, from the batch with the longest examples measured (see
    `collect.probe_batch`), per example: an upper bound for any batch of as many examples, however the batches
    are shuffled."""

    bytes_per_example: float
    longest_example: int  # positions of an example of that batch
    most_examples: int  # examples of the batch with the most
    cuttable: bool = True  # whether every batch can be cut into micro-batches (see `can_cut`)

    def bytes(self, examples: int | None = None) -> int:
        """For the batch with the most examples, or for micro-batches of at most `examples` examples."""
        return int(self.bytes_per_example * min(examples or self.most_examples, self.most_examples))

    def smallest_micro_batch(self) -> int:
        """Examples a micro-batch needs to keep MIN_MICRO_BATCH_POSITIONS positions."""
        return max(1, -(-MIN_MICRO_BATCH_POSITIONS // max(1, self.longest_example)))


def plan_micro_batches(plan: Callable[[int], PassPlan], estimate: ActivationEstimate, passes: int) -> PassPlan | None:
    """The plan, from `plan(activation_bytes)`, with each batch cut into micro-batches of at least
    MIN_MICRO_BATCH_POSITIONS positions that takes the fewest passes, if fewer than the whole batches' `passes`:
    of those, the one with the most examples. Splitting a batch changes no statistic: each is a sum over examples
    or tokens."""
    if not estimate.cuttable:
        return None
    best = None
    for examples in range(estimate.most_examples - 1, estimate.smallest_micro_batch() - 1, -1):
        candidate = plan(estimate.bytes(examples))
        if len(candidate.passes) < (len(best.passes) if best else passes):
            best = dataclasses.replace(candidate, micro_batch_examples=examples)
        if len(candidate.passes) == 1:
            break
    return best


class MicroBatches:
    """`batches` with each batch cut into consecutive micro-batches of at most `examples` examples: every tensor
    whose first dimension is the batch's (that of `input_ids`) is sliced, other values are passed on as they are
    (see `can_cut`). Iterable as often as `batches` is."""

    def __init__(self, batches: Iterable[Mapping[str, torch.Tensor]], examples: int):
        self.batches = batches
        self.examples = examples

    def __iter__(self) -> Iterator[dict]:
        for batch in self.batches:
            size = batch["input_ids"].shape[0]
            for start in range(0, size, self.examples):
                yield {key: value[start : start + self.examples]
                       if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == size else value
                       for key, value in batch.items()}


def can_cut(batch: Mapping) -> bool:
    """Whether `MicroBatches` can cut `batch`: every tensor's first dimension is the batch's (0-d tensors and
    scalars apart); a list, or a tensor over other items (e.g. image patches), would not follow its examples."""
    examples = batch["input_ids"].shape[0]
    return all(value.dim() == 0 or value.shape[0] == examples if isinstance(value, torch.Tensor)
               else value is None or isinstance(value, (bool, int, float, str)) for value in batch.values())


def plan_inputs_apart(plan: PassPlan, gradient_sizes: Mapping[str, int], input_sizes: Mapping[str, int]) -> PassPlan:
    """`plan`, or where it takes several passes for want of memory (the automatic rule), one forward+backward for
    every layer's G and y and a forward without gradients for their Z (`collect.collect_in_two_passes`), when
    that fits: G and y beside the activations (see `pass_budget`), and then Z too with the largest solve (the
    second pass keeps no activations for a backward) within FILL_SHARE. Per unit of the plan: `gradient_sizes`
    the bytes of G and y, `input_sizes` those of Z's float64 total."""
    if plan.rule != "automatic" or plan.free_bytes is None or plan.shards > 1:
        return plan
    gradients, total = sum(gradient_sizes.values()), sum(gradient_sizes.values()) + sum(input_sizes.values())
    if gradients > pass_budget(plan.free_bytes, 0, activation_bytes=plan.activation_bytes) or \
            total + plan.solve_bytes > FILL_SHARE * plan.free_bytes:
        return plan
    return PassPlan([list(gradient_sizes)], [total], plan.solve_bytes, plan.free_bytes, "inputs apart",
                    activation_bytes=plan.activation_bytes, micro_batch_examples=plan.micro_batch_examples)


def pass_budget(free: int, solve_bytes: int, largest_statistics: int = 0, shards: int = 1,
                activation_bytes: int | None = None) -> int:
    """Statistics bytes (per rank) that one pass may hold with `free` bytes free: during the pass, with what else
    it holds (`pass_extra_bytes`), within STATISTICS_SHARE of them, or with the measured `activation_bytes`
    within FILL_SHARE; after it within FILL_SHARE."""
    during, after = pass_extra_bytes(solve_bytes, largest_statistics, shards)
    if activation_bytes is None:
        during_limit = STATISTICS_SHARE * free
    else:
        during_limit = FILL_SHARE * free - activation_bytes
    return int(min(during_limit - during, FILL_SHARE * free - after))


def pass_extra_bytes(solve_bytes: int, largest_statistics: int, shards: int) -> tuple[int, int]:
    """What a rank holds beside a pass's statistics (during the pass, after it): after it the largest solve;
    sharded over `shards` ranks also one layer's statistics more (owners balance solve time, not bytes) and,
    during the pass, one layer's contribution in flight (at most its statistics' bytes)."""
    if shards > 1:
        return 2 * largest_statistics, largest_statistics + solve_bytes
    return 0, solve_bytes


def assign_groups(costs: Mapping[str, float], world_size: int) -> dict[str, int]:
    """Deterministic longest-first assignment of work items (input groups) to the least-loaded rank."""
    loads = [0.0] * world_size
    owner = {}
    for key in sorted(costs, key=lambda k: (-costs[k], k)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owner[key] = rank
        loads[rank] += costs[key]
    return owner


def group_owners(shapes: Mapping[str, tuple[int, int]], groups: Mapping[str, str], world_size: int) -> dict[str, int]:
    """The rank that solves (and, with sharded statistics, gathers) each layer: its input group goes to the
    least-loaded rank, costliest group first; the same on every rank."""
    by_group: dict[str, list[str]] = {}
    for name, group in groups.items():
        by_group.setdefault(group, []).append(name)
    costs = {}
    for group, names in by_group.items():  # eigh and Cholesky are O(n^3); the step is O(m n^2)
        n = shapes[names[0]][1]
        costs[group] = float(n) ** 3 * (1 + len(names)) + sum(float(shapes[name][0]) * n * n for name in names)
    owner = assign_groups(costs, world_size)
    return {name: owner[group] for name, group in groups.items()}


def solve_layers(
    stats: LoraDAStatistics,
    ranks: Mapping[str, int],
    config: LoraDAConfig,
    layers: Sequence[str],
    shapes: Mapping[str, tuple[int, int]],
    *,
    release: bool = False,
) -> dict[str, LayerSolution]:
    """`solve_all` over `layers` (`shapes`: their (out, in)), split across ranks under `torch.distributed`
    (by `stats.owners` when the statistics are sharded); every rank returns every layer's `LayerSolution`
    (factors broadcast from the rank that solved them). `release`: `stats` is emptied on the way (see
    `solve_all`); a rank drops the layers others solve at once."""
    layers = list(layers)
    # where factors solved elsewhere are received: by the statistics (on the model's device), before any is dropped
    device = next((t.device for t in stats.gradient_sums.values()), torch.device("cpu"))
    if not is_distributed():
        return solve_all(stats, dict(ranks), config, layers=layers, release=release)
    # checked on every rank first: a failure on one rank alone would hang the others
    check_ranks({name: shapes[name] for name in layers}, ranks)
    owners = stats.owners or group_owners(shapes, {name: stats.input_group(name) for name in layers},
                                          get_world_size())
    per_rank = [[name for name in layers if owners[name] == r] for r in range(get_world_size())]
    mine = per_rank[get_rank()]
    if release and not stats.owners:
        others = [name for name in layers if owners[name] != get_rank()]
        groups = {stats.input_group(name) for name in others} - {stats.input_group(name) for name in mine}
        for name in others:
            del stats.gradient_sums[name], stats.output_sq_sums[name]
        for group in groups:
            del stats.input_sums[group]
    def solve_mine() -> dict[str, LayerSolution]:
        return solve_all(stats, dict(ranks), config, layers=mine, release=release) if mine else {}

    solutions = on_every_rank(solve_mine)  # a rank without layers joins too: another's failure reaches it
    comm = communication_device(device)
    for src, names in enumerate(per_rank):
        if src != get_rank():
            for name in names:
                m, n = shapes[name]
                solutions[name] = LayerSolution(
                    A=torch.empty(ranks[name], n, device=device), B=torch.empty(m, ranks[name], device=device)
                )
        broadcast_tensors([t for name in names for t in (solutions[name].A, solutions[name].B)], src, comm)
    for infos in all_gather_objects({name: solutions[name].info for name in mine}):
        for name, info in infos.items():
            solutions[name].info = info
    return {name: solutions[name] for name in layers}
