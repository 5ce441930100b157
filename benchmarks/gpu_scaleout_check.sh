#!/usr/bin/env bash
# GPU check of the scale-out path on one GPU (H100/H200): DeepSpeed engine in one process with NCCL,
# bf16 and ZeRO-2/3 for SFT and ZeRO-2 for RL, against the plain path; then the loader benchmark.
#
#   bash benchmarks/gpu_scaleout_check.sh [OUT_DIR]     (default: $OUT, else benchmarks/results)
#
# Same set-up as gpu_check.sh (wheels from .whl/, a copy of the package in /tmp/oars). Sized for one
# device call: 240 + 60 s at most. DALI is not on those machines: the loader benchmark times the torch
# loader alone there unless a DALI wheel is installed.
set -uo pipefail
OUT_DIR=${1:-${OUT:-benchmarks/results}}
source benchmarks/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu_scaleout.txt"
rc=0
timeout 240 python3 -m pytest -q -x tests/test_gpu_deepspeed.py 2>&1 | tee "$OUT_DIR/gpu_scaleout_tests.log" || rc=1
timeout 60 python3 -m benchmarks.loaders --out "$OUT_DIR" --work /tmp/bench_loaders 2>&1 | tee -a "$OUT_DIR/gpu_scaleout_tests.log" || rc=1
exit $rc
