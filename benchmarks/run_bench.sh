#!/usr/bin/env bash
# Reproduce the committed CPU benchmark: SmolLM2-135M (embedded GGUF) on a built-in task.
#   benchmarks/run_bench.sh [TASK] [OUTPUT_DIR]     TASK: arith (default) or any data spec / JSONL path
# Resumable: rerun the same command to continue; finished runs are skipped.
# Budget knobs (environment): METHODS, RANKS, SEEDS, SWEEP_SEEDS, LRS, STEPS, BATCH, MAXLEN;
# RETRY_FAILED=1 reruns runs recorded as failed.
set -euo pipefail
TASK="${1:-arith}"
OUT="${2:-benchmarks/results/smollm2-135m-${TASK//[^A-Za-z0-9_-]/_}}"
PY="${PYTHON:-python}"
export METHODS="${METHODS:-lora lora_da pissa lora_one milora lora_ga eva}"
export RANKS="${RANKS:-8}" SEEDS="${SEEDS:-0}" SWEEP_SEEDS="${SWEEP_SEEDS:-1}" LRS="${LRS:-2e-4 1e-3}"
export STEPS="${STEPS:-24}" BATCH="${BATCH:-4}" MAXLEN="${MAXLEN:-128}" RETRY_FAILED="${RETRY_FAILED:-0}" TASK OUT
exec "$PY" - <<'PYEOF'
import os

from lora_da.bench import run_bench

env = os.environ
run_bench(
    env["OUT"],
    retry_failed=env["RETRY_FAILED"] == "1",
    model="smollm2-135m",
    data=env["TASK"],
    methods=env["METHODS"].split(),
    ranks=[int(r) for r in env["RANKS"].split()],
    seeds=[int(s) for s in env["SEEDS"].split()],
    sweep_seeds=int(env["SWEEP_SEEDS"]),
    learning_rates=[float(lr) for lr in env["LRS"].split()],
    steps=int(env["STEPS"]),
    batch_size=int(env["BATCH"]),
    max_length=int(env["MAXLEN"]),
    num_train=int(env["STEPS"]) * int(env["BATCH"]),  # one epoch: N_pop = examples actually fine-tuned on
    num_val=8,
    num_test=16,
    num_accuracy=16,
    max_new_tokens=48,
    eval_every=8,
    eval_batch_size=8,
    calibration_examples=16,
    calibration_batch_size=4,
)
PYEOF
