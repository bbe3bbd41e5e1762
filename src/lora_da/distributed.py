"""Communication for data-parallel LoRA-DA on `torch.distributed`: ranks, sharding, all-reduce, broadcast.

Gloo on CPUs, NCCL on GPUs; every helper is a no-op (or the identity) outside a process group.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

from .config import LoraDAConfig, LoraDAError

# Tensors are packed into flat buffers of at most this many elements per all-reduce (512 MiB in float64).
BUCKET_ELEMENTS = 1 << 26


def is_distributed() -> bool:
    """True inside an initialized process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of ranks (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and outside a process group): the one that logs, shows progress and writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if is_distributed():
        dist.barrier()


def init_distributed_from_env() -> bool:
    """Join the process group that `torchrun` / `accelerate launch` describe in the environment.

    Uses NCCL when CUDA is available (each rank on GPU `LOCAL_RANK`), else gloo. Returns True when running
    with more than one rank; a no-op (False) for a plain single-process run.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_world_size() > 1


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
    if config.show_progress and not is_main_process():
        return dataclasses.replace(config, show_progress=False)
    return config


def communication_device(fallback: torch.device) -> torch.device:
    """Where collective buffers must live: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if fallback.type != "cpu" else fallback


def all_gather_objects(value) -> list:
    """`value` of every rank, in rank order (small picklable objects only)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


T = TypeVar("T")


def on_every_rank(work: Callable[[], T]) -> T:
    """`work()`; under torch.distributed a failure on any rank is raised on every rank (collective), where the
    others would otherwise wait forever in their next collective."""
    if not is_distributed():
        return work()
    result, error = None, None
    try:
        result = work()
    except Exception as exc:
        error = exc
    raise_if_any_rank_failed(error)
    return result


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


def reduce_sum_to(tensor: torch.Tensor, dst: int) -> None:
    """Sum `tensor` over ranks into rank `dst`'s `tensor`, in place (the others' copies are scratch after it)."""
    comm = communication_device(tensor.device)
    if tensor.device == comm:
        dist.reduce(tensor, dst=dst, op=dist.ReduceOp.SUM)
        return
    buffer = tensor.to(comm)
    dist.reduce(buffer, dst=dst, op=dist.ReduceOp.SUM)
    if get_rank() == dst:
        tensor.copy_(buffer)


def all_reduce_counts(counts: Sequence[int], device: torch.device) -> list[int]:
    """Integer sums over ranks."""
    if not counts:
        return []
    tensor = torch.tensor(list(counts), dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [int(v) for v in tensor.tolist()]


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int, device: torch.device) -> None:
    """Overwrite `tensors` (same shapes on every rank) with rank `src`'s values, as one flat broadcast."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(device=device, dtype=torch.float32) for t in tensors])
    dist.broadcast(flat, src=src)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
