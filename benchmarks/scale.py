"""LoRA-DA scale-out on the embedded SmolLM2-135M: init seconds and peak RSS vs layers per pass and processes.

For each process count (1, then 2 gloo ranks started torchrun-style with RANK / WORLD_SIZE / MASTER_ADDR in
the environment) and each `layers_per_pass` (all, 5, 1), fresh workers load the model and run
`initialize_lora_da`; a sampling thread records the peak resident memory of the init. The factors of every run are
compared with the single-process all-at-once run.

    python benchmarks/scale.py            # writes benchmarks/results/scale/{results.json,report.md}
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _harness import command_line, hardware, results_dir, write_results

from lora_da.bench import PeakRSS


def parse_passes(value: str) -> list[int | None]:
    return [None if v == "all" else int(v) for v in value.split(",")]


def worker(args) -> None:
    """One rank: load once, then init with each layers_per_pass; rank 0 prints the results as JSON."""
    from peft import LoraConfig, get_peft_model

    from lora_da import LoraDAConfig, initialize_lora_da
    from lora_da.data import calibration_batches, encode_examples, load_examples
    from lora_da.distributed import all_gather_objects, barrier, get_rank, init_distributed_from_env
    from lora_da.models import load_model_and_tokenizer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    init_distributed_from_env()
    rank = get_rank()
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(args.model)
    examples = load_examples("arith", num_examples=args.examples, seed=0)
    features = encode_examples(examples, tokenizer, max_length=args.max_length)
    batches = calibration_batches(features, args.examples, args.batch_size, tokenizer.pad_token_id)
    targets = args.target_modules
    if targets.startswith("re:"):
        targets = targets[3:]  # a regex that PEFT full-matches against module names
    elif targets != "all-linear":
        targets = targets.split(",")
    lora = LoraConfig(r=args.rank, lora_alpha=16, use_rslora=True, target_modules=targets, lora_dropout=0.0)
    model = get_peft_model(model, lora)
    config = LoraDAConfig(population_size=100_000, show_progress=False)
    runs = []
    for layers_per_pass in parse_passes(args.layers_per_pass):
        barrier()
        with PeakRSS(interval=0.005) as rss:
            start = time.perf_counter()
            report = initialize_lora_da(model, batches, config, layers_per_pass=layers_per_pass, shard=True)
            seconds = time.perf_counter() - start
        barrier()
        run = {"layers_per_pass": layers_per_pass or "all", "passes": report.passes, "seconds": seconds,
               "statistics_seconds": report.statistics_seconds, "solve_seconds": report.solve_seconds,
               "peak_rss_mib": rss.peak_mb, "rss_before_mib": rss.start_mb,
               "statistics_mib": report.statistics_bytes / 2**20,
               "statistics_estimate_mib": report.statistics_bytes_estimate / 2**20,
               "layers": len(report.layers), "num_examples": report.num_examples}
        gathered = all_gather_objects(run) if world > 1 else [run]
        if rank == 0:
            state = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
            name = f"factors-{world}-{layers_per_pass or 'all'}.pt"
            torch.save(state, Path(args.factors_dir) / name)
            run = {**run, "seconds": max(r["seconds"] for r in gathered),
                   "peak_rss_mib_per_rank": [r["peak_rss_mib"] for r in gathered], "factors": name}
            runs.append(run)
            print(f"[rank 0] {world} process(es), layers_per_pass={run['layers_per_pass']}: {run['seconds']:.1f} s",
                  file=sys.stderr, flush=True)
    if rank == 0:
        print(json.dumps({"world_size": world, "tokens": int(sum(b["attention_mask"].sum() for b in batches)),
                          "runs": runs}))
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def launch(args, nproc: int, factors_dir: str, layers_per_pass: str) -> dict:
    """Start `nproc` fresh workers torchrun-style for one `layers_per_pass`; rank 0's results."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, __file__, *sys.argv[1:], "--worker", "--factors-dir", factors_dir,
               "--layers-per-pass", layers_per_pass]
    processes = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True))
    outputs = [p.communicate()[0] for p in processes]
    if any(p.returncode for p in processes):
        raise RuntimeError(f"a worker failed: exit codes {[p.returncode for p in processes]}")
    return json.loads(outputs[0].strip().splitlines()[-1])


def relative_error(first: dict, second: dict) -> float:
    return max(float((first[k].double() - second[k].double()).norm() / second[k].double().norm()) for k in first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--target-modules", default=r"re:model\.layers\.[01]\.(self_attn|mlp)\.\w+_proj",
                        help="'all-linear', comma-separated names, or 're:REGEX' (default: the 14 linear layers of "
                        "the first two blocks, so that 1 layer per pass stays affordable on 2 shared cores)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process; 0 = cores / processes (default: 1, fair on a shared machine)")
    parser.add_argument("--layers-per-pass", default="all,5,1", help="comma-separated; 'all' = one pass")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--worker", action="store_true", help="internal: run as one rank")
    parser.add_argument("--factors-dir", default=None, help="internal")
    parser.add_argument("--out", type=Path, default=results_dir("scale"))
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = {"model": args.model, "examples": args.examples, "max_length": args.max_length,
               "batch_size": args.batch_size, "rank": args.rank, "target_modules": args.target_modules,
               "threads_per_process": args.threads or "cores / processes",
               "machine": hardware(), "command": command_line(sys.argv[1:]),
               "load_average_at_start": os.getloadavg()[0], "by_processes": {}}
    with tempfile.TemporaryDirectory() as factors_dir:
        for nproc in (int(p) for p in args.processes.split(",")):
            entry = None
            for layers_per_pass in args.layers_per_pass.split(","):  # a fresh process each: its own peak RSS
                result = launch(args, nproc, factors_dir, layers_per_pass)
                entry = result if entry is None else {**entry, "runs": entry["runs"] + result["runs"]}
                print(json.dumps(result), flush=True)
            results["by_processes"][str(nproc)] = entry
        first = results["by_processes"][args.processes.split(",")[0]]["runs"][0]
        reference = torch.load(Path(factors_dir) / first["factors"])
        for entry in results["by_processes"].values():
            for run in entry["runs"]:
                run["max_rel_error_vs_reference"] = relative_error(torch.load(Path(factors_dir) / run["factors"]),
                                                                   reference)
    results["load_average_at_end"] = os.getloadavg()[0]
    write_results(args.out, results, render(results))
    print(render(results))


def render(results: dict) -> str:
    one = results["by_processes"][next(iter(results["by_processes"]))]
    lines = [
        "# LoRA-DA scale-out: layers per pass and processes",
        "",
        f"`{' '.join(['python benchmarks/scale.py', results.get('command', '')]).strip()}` on {results['machine']} "
        f"(load average {results['load_average_at_start']:.1f} at start, {results['load_average_at_end']:.1f} at "
        "the end: with a load above the cores, other jobs shared the machine and seconds are noisy). "
        f"{results['model']}, {results['examples']} `arith` examples "
        f"({one['tokens']} tokens, max length {results['max_length']}, batch {results['batch_size']}), rank "
        f"{results['rank']}, target modules `{results['target_modules']}` ({one['runs'][0]['layers']} layers), "
        f"{results['threads_per_process']} torch thread(s) per process. "
        "With 2 processes (gloo) each rank takes every other batch. Every row runs in fresh processes; peak RSS "
        "is sampled during the init (after the model is loaded), per rank; `RSS before init` is rank 0's RSS "
        "with the model loaded.",
        "",
        "| processes | layers per pass | passes | init seconds | statistics s | solve s | peak RSS per rank (MiB) "
        "| RSS before init (MiB) | statistics held (MiB, est. upper bound) | max rel. error of factors |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for nproc, entry in results["by_processes"].items():
        for run in entry["runs"]:
            peaks = " / ".join(f"{p:.0f}" for p in run["peak_rss_mib_per_rank"])
            lines.append(
                f"| {nproc} | {run['layers_per_pass']} | {run['passes']} | {run['seconds']:.1f} | "
                f"{run['statistics_seconds']:.1f} | {run['solve_seconds']:.1f} | {peaks} | {run['rss_before_mib']:.0f} "
                f"| {run['statistics_mib']:.1f} ({run['statistics_estimate_mib']:.1f}) | "
                f"{run['max_rel_error_vs_reference']:.1e} |"
            )
    lines += [
        "",
        "Factors are compared with the first row (1 process, all layers in one pass). Statistics are float64 "
        "running sums, so batching, sharding and passes change them only at rounding level.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
