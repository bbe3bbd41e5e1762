#!/usr/bin/env bash
# The GPU check in one go, about 7 minutes on an H200: gpu_check.py, diagnostics/solve_parts_gpu.py --wide,
# diagnostics/host_profile.py, scale_gpu.py (a 7B-shaped model within 80 GiB) and scale_7b.py (one 7B-shaped
# block in bfloat16: floors, init, memory account, statistics profile). Run from the repository root on
# a machine with one CUDA GPU:
#   BENCH_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh
# No network is needed: lora-da is used from src/ as is; wheels in .whl/ (e.g. `pip download --no-deps
# --only-binary=:all: --python-version 3.12 -d .whl peft==0.21.2`, ignored by git) are installed first; the
# authors' lora_da.py is run side by side when it was copied (never committed) to .released/lora_da.py.
# BENCH_COMMIT names the commit in the results where the tree is a copy without git. Writes 10 files,
# <benchmark>/{results.json,report.md}, under $OUT (default: benchmarks/results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/benchmarks/results}"
if compgen -G ".whl/*.whl" > /dev/null; then
  site="$(mktemp -d)"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
released=()
[ -f .released/lora_da.py ] && released=(--released .released/lora_da.py)
timeout 180 python3 benchmarks/gpu_check.py --out "$OUT/gpu_check" "${released[@]}" 2>&1
timeout 120 python3 benchmarks/diagnostics/solve_parts_gpu.py --wide --out "$OUT/solve_parts_gpu" > /dev/null 2>&1
timeout 90 python3 benchmarks/diagnostics/host_profile.py --out "$OUT/host_profile" > /dev/null 2>&1
timeout 280 python3 benchmarks/scale_gpu.py --gpu-gib 80 --eigensolvers auto,lobpcg --out "$OUT/scale_gpu" 2>&1 \
  | grep -v "it/s\]\|batch/s\]\|layer/s\]"
timeout 150 python3 benchmarks/scale_7b.py --device cuda --examples 64 --tokens 512 --repeats 1 \
  --out "$OUT/scale_7b_gpu" 2>&1 | grep -v "it/s\]\|batch/s\]\|layer/s\]"
