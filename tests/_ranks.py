"""Forked gloo ranks for the multi-process tests: each rank runs a worker that saves its results (or its
traceback) into a shared folder."""

import multiprocessing
import socket
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist


@contextmanager
def recording_failure(out: str, rank: int) -> Iterator[None]:
    """Write the traceback of an error in a rank's worker where `run_ranks` reports it."""
    try:
        yield
    except BaseException:
        Path(out, f"rank{rank}.error").write_text(traceback.format_exc())
        raise


def save_results_and_finish(out: str, rank: int, results: dict) -> None:
    """Save this rank's results, then leave the process group together with the other ranks (a rank that tears
    gloo down while another still works can abort at exit)."""
    torch.save(results, Path(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    """A TCP port of this machine that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(worker: Callable[[int, int, str], None], out: Path, world: int, timeout: float) -> list[dict]:
    """Run `worker(rank, port, out)` on `world` forked processes (no re-import of torch: a fast start); the
    results each saved with `save_results_and_finish`, rank 0 first. A rank's error fails the calling test with its
    traceback."""
    port = free_port()
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=worker, args=(rank, port, str(out))) for rank in range(world)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=timeout)
    for process in processes:
        if process.is_alive():
            process.kill()
    errors = [(out / f"rank{r}.error").read_text() for r in range(world) if (out / f"rank{r}.error").exists()]
    assert not errors, errors[0]
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
