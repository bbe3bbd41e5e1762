"""Where the host's time goes in one LoRA-DA init on a GPU (where the init is host-bound): cProfile of the
init as gpu_check.py times it, and every host-device synchronization counted by the line that caused it
(`torch.cuda.set_sync_debug_mode`). The init runs once on one batch first (kernels, handles, workspaces).

    python benchmarks/diagnostics/host_profile.py [--out DIR]
    # writes benchmarks/results/host_profile/{results.json,report.md} (or DIR/...)
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import os
import pstats
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _harness, gpu_check
from _harness import measured, results_dir, write_results  # noqa: E402
from gpu_check import load, registry_init  # noqa: E402


def synchronizations(work) -> Counter:
    """Host-device synchronizations during `work()`, by the innermost lora_da source line (and the line that
    synchronized, where that is elsewhere)."""
    counts: Counter = Counter()

    def count(*_args, **_kwargs) -> None:
        frames = traceback.extract_stack()[:-2]
        ours = [f for f in frames if f"{os.sep}lora_da{os.sep}" in f.filename]
        where = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in (ours[-1:] + frames[-1:])]
        counts[" <- ".join(dict.fromkeys(reversed(where)))] += 1

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = count
            work()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=results_dir("host_profile"))
    parser.add_argument("--eigensolver", default="auto")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--device", default="cuda", help="cpu only to smoke-test this script")
    args = parser.parse_args()
    device = torch.device(args.device)
    model, batches, source = load(device, args.examples, 8)
    init = lambda part: registry_init(copy.deepcopy(model), part, "lora_da", args.eigensolver)  # noqa: E731
    init(batches[:1])
    timed = measured(device, lambda: init(batches))
    profiler = cProfile.Profile()
    profiler.enable()
    init(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(60)
    syncs = synchronizations(lambda: init(batches)) if device.type == "cuda" else Counter()
    lines = [f"# Host profile of one LoRA-DA init ({source}, eigensolver={args.eigensolver})", "",
             f"`python benchmarks/diagnostics/host_profile.py --eigensolver {args.eigensolver}`", "",
             f"Timed: {timed}", "", f"Synchronizations: {sum(syncs.values())}, by line:", "",
             *(f"- {where}: {count}" for where, count in syncs.most_common(60)), "", "```", text.getvalue(), "```"]
    results = {"model": source, "eigensolver": args.eigensolver, "examples": args.examples, "timed": timed,
               "synchronizations": sum(syncs.values()), "synchronizations_by_line": dict(syncs.most_common())}
    write_results(args.out, results, "\n".join(lines) + "\n", device)
    print("\n".join(lines[:80]))


if __name__ == "__main__":
    main()
