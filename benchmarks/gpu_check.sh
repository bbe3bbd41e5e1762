#!/usr/bin/env bash
# The one prepared GPU check (device tool): run from the repository root on the GPU machine, e.g.
#   run(command="bash benchmarks/gpu_check.sh", carry=[".released"], timeout_s=540)
# The machine has torch, transformers, peft and accelerate but no network: lora-da is used from src/ as is,
# and the authors' lora_da.py is used when it was copied (never committed) to .released/lora_da.py.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
released=()
[ -f .released/lora_da.py ] && released=(--released .released/lora_da.py)
timeout 480 python3 benchmarks/gpu_check.py --out "$OUT" "${released[@]}" 2>&1 | tee "$OUT/gpu_check.log"
