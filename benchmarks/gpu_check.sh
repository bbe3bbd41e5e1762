#!/usr/bin/env bash
# The one prepared GPU check (device tool), about 6 minutes on an H200: run from the repository root there, e.g.
#   run(command="bash benchmarks/gpu_check.sh", carry=[".released", ".whl"], timeout_s=590)
# The machine has torch, transformers and accelerate but no network: lora-da is used from src/ as is; wheels in
# .whl/ (e.g. `pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl peft==0.21.2`, ignored by
# git) are installed first; the authors' lora_da.py is used when it was copied (never committed) to
# .released/lora_da.py. Writes 7 files to $OUT (the device tool brings back at most 8): gpu_check.{json,md},
# solve_parts_gpu.{json,md}, host_profile.md and scale_gpu.{json,md}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD}"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
released=()
[ -f .released/lora_da.py ] && released=(--released .released/lora_da.py)
timeout 180 python3 benchmarks/gpu_check.py --out "$OUT" "${released[@]}" 2>&1
timeout 120 python3 benchmarks/solve_parts_gpu.py --wide --out "$OUT" > /dev/null 2>&1
timeout 90 python3 benchmarks/host_profile.py --out "$OUT" > /dev/null 2>&1
timeout 280 python3 benchmarks/scale_gpu.py --gpu-gib 80 --eigensolvers auto,lobpcg --out "$OUT" 2>&1 | grep -v "it/s\]\|batch/s\]\|layer/s\]"
