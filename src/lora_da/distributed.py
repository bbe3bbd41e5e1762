"""Data-parallel LoRA-DA on `torch.distributed`: shard batches, all-reduce statistics, split the solves.

Statistics are sums with counts, so ranks combine them by one summing all-reduce; the per-layer solves are
independent, so ranks split them (layers that read one input stay together to share its Cholesky factor)
and broadcast the factors, leaving identical adapters on every rank. Gloo on CPUs, NCCL on GPUs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .config import LoraDAConfig, LoraDAError

logger = logging.getLogger("lora_da")

# Tensors are packed into flat buffers of at most this many elements per all-reduce (512 MiB in float64).
BUCKET_ELEMENTS = 1 << 26


def is_distributed() -> bool:
    """True inside an initialized process group of more than one rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 outside a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of ranks (1 outside a process group)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and outside a process group): the one that logs, shows progress and writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    import torch.distributed as dist

    if is_distributed():
        dist.barrier()


def init_distributed_from_env() -> bool:
    """Join the process group that `torchrun` / `accelerate launch` describe in the environment.

    Uses NCCL when CUDA is available (each rank on GPU `LOCAL_RANK`), else gloo. Returns True when running
    with more than one rank; a no-op (False) for a plain single-process run.
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_world_size() > 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a `DistributedDataParallel` (or `DataParallel`) wrapper, else `model` itself."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def shard_batches(
    batches: Iterable[Mapping[str, torch.Tensor]], rank: int | None = None, world_size: int | None = None
) -> Iterable[Mapping[str, torch.Tensor]]:
    """This rank's share of `batches`: batch i goes to rank i % world_size (re-iterable if `batches` is)."""
    return _Shard(batches, get_rank() if rank is None else rank, get_world_size() if world_size is None else world_size)


class _Shard:
    """Lazy, re-iterable view of every `world_size`-th batch starting at `rank`."""

    def __init__(self, batches: Iterable, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise LoraDAError(f"rank {rank} must be in [0, world_size={world_size}).")
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self) -> Iterator:
        for index, batch in enumerate(self.batches):
            if index % self.world_size == self.rank:
                yield batch


def local_config(config: LoraDAConfig) -> LoraDAConfig:
    """`config` with progress bars off on every rank but rank 0."""
    import dataclasses

    if config.show_progress and not is_main_process():
        return dataclasses.replace(config, show_progress=False)
    return config


def communication_device(fallback: torch.device) -> torch.device:
    """Where collective buffers must live: the current GPU for NCCL, the CPU for gloo."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if fallback.type != "cpu" else fallback


def all_gather_objects(value) -> list:
    """`value` of every rank, in rank order (small picklable objects only)."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def raise_if_any_rank_failed(error: BaseException | None) -> None:
    """Collective: re-raise a failure of any rank on every rank, so no rank waits forever in a collective."""
    messages = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
    if failed:
        rank, message = failed[0]
        raise LoraDAError(f"Rank {rank} failed while gathering LoRA-DA statistics: {message}")


def all_reduce_sum(tensors: Sequence[torch.Tensor], device: torch.device) -> None:
    """Sum float tensors (of one dtype) over ranks in place, packed into a few large flat all-reduces."""
    import torch.distributed as dist

    bucket: list[torch.Tensor] = []
    size = 0
    for tensor in [*tensors, None]:
        if tensor is not None and (not bucket or size + tensor.numel() <= BUCKET_ELEMENTS):
            bucket.append(tensor)
            size += tensor.numel()
            continue
        if bucket:
            flat = torch.cat([t.reshape(-1).to(device=device, dtype=bucket[0].dtype) for t in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
            del flat
        bucket, size = ([tensor], tensor.numel()) if tensor is not None else ([], 0)


def all_reduce_counts(counts: Sequence[int], device: torch.device) -> list[int]:
    """Integer sums over ranks."""
    import torch.distributed as dist

    if not counts:
        return []
    tensor = torch.tensor(list(counts), dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [int(v) for v in tensor.tolist()]


def assign_groups(costs: Mapping[str, float], world_size: int) -> dict[str, int]:
    """Deterministic longest-first assignment of work items (input groups) to the least-loaded rank."""
    loads = [0.0] * world_size
    owner = {}
    for key in sorted(costs, key=lambda k: (-costs[k], k)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owner[key] = rank
        loads[rank] += costs[key]
    return owner


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int, device: torch.device) -> None:
    """Overwrite `tensors` (same shapes on every rank) with rank `src`'s values, as one flat broadcast."""
    import torch.distributed as dist

    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(device=device, dtype=torch.float32) for t in tensors])
    dist.broadcast(flat, src=src)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def solve_layers(stats, ranks: Mapping[str, int], config: LoraDAConfig, layers: Sequence[str]) -> dict:
    """`solve_all` over `layers`, split across ranks under `torch.distributed`; every rank returns every
    layer's `LayerSolution` (factors broadcast from the rank that solved them)."""
    from .solver import LayerSolution, solve_all

    layers = list(layers)
    if not is_distributed():
        return solve_all(stats, dict(ranks), config, layers=layers)
    for name in layers:  # checked on every rank first: a failure on one rank alone would hang the others
        m, n = stats.gradient_sums[name].shape
        if not 1 <= ranks[name] <= min(m, n):
            raise LoraDAError(f"Layer {name!r}: rank {ranks[name]} must be between 1 and min(in, out) = {min(m, n)}.")
    by_group: dict[str, list[str]] = {}
    for name in layers:
        by_group.setdefault(stats.input_group(name), []).append(name)
    costs = {}
    for group, names in by_group.items():  # eigh and Cholesky are O(n^3); the step is O(m n^2)
        n = stats.gradient_sums[names[0]].shape[1]
        costs[group] = float(n) ** 3 * (1 + len(names)) + sum(
            float(stats.gradient_sums[name].shape[0]) * n * n for name in names
        )
    owner = assign_groups(costs, get_world_size())
    per_rank = [[name for group, names in by_group.items() if owner[group] == r for name in names]
                for r in range(get_world_size())]
    mine = per_rank[get_rank()]
    error, solutions = None, {}
    try:
        solutions = solve_all(stats, dict(ranks), config, layers=mine) if mine else {}
    except Exception as exc:
        error = exc
    raise_if_any_rank_failed(error)
    device = next(iter(stats.gradient_sums.values())).device
    comm = communication_device(device)
    for src, names in enumerate(per_rank):
        if src != get_rank():
            for name in names:
                m, n = stats.gradient_sums[name].shape
                solutions[name] = LayerSolution(
                    A=torch.empty(ranks[name], n, device=device), B=torch.empty(m, ranks[name], device=device)
                )
        broadcast_tensors([t for name in names for t in (solutions[name].A, solutions[name].B)], src, comm)
    for infos in all_gather_objects({name: solutions[name].info for name in mine}):
        for name, info in infos.items():
            solutions[name].info = info
    return {name: solutions[name] for name in layers}
