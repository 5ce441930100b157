#!/usr/bin/env bash
# GPU checks (H100/H200): bfloat16 correctness of the kernels, every benchmark, one SFT step, one RL
# iteration (ours vs the eager reference loop).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]       (default: $OUT, else benchmarks/results)
#
# Runs from the repo root on a machine with PyTorch, Triton, transformers and peft installed and no
# network: diffusers, deepspeed and kornia come as wheels in .whl/ (see README: GPU checks).
# The package is not pip-installed: a copy with kernels/ placed as oars_fast/kernels goes to /tmp.
set -uo pipefail
OUT_DIR=${1:-${OUT:-benchmarks/results}}
source benchmarks/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT_DIR/gpu.txt"
rc=0
# sized to fit one 10-minute device call: 150 + 250 + 60 + 120 s at most
timeout 150 python3 -m pytest -q -x tests/test_kernels.py tests/test_lora.py 2>&1 | tee "$OUT_DIR/gpu_tests.log" || rc=1
timeout 250 python3 -m benchmarks.run_all --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/bench.log" || rc=1
timeout 60 python3 -m benchmarks.sft_step --out "$OUT_DIR" 2>&1 | tee -a "$OUT_DIR/bench.log" || rc=1
timeout 120 python3 -m benchmarks.rl_iteration --out "$OUT_DIR" --work /tmp/bench_rl 2>&1 | tee -a "$OUT_DIR/bench.log" || rc=1
exit $rc
