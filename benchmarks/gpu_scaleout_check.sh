#!/usr/bin/env bash
# GPU check of the scale-out path on one GPU (H100/H200): DeepSpeed engine in one process with NCCL, bf16 and
# ZeRO-2/3 for SFT and ZeRO-2 for RL, against the plain path; then the loader benchmark.
#
#   bash benchmarks/gpu_scaleout_check.sh [OUT_DIR]     (default: $OUT, else benchmarks/results/gpu_scaleout)
#
# A device call of its own, after benchmarks/gpu_measure.sh (which leaves deepspeed out). Same set-up
# (benchmarks/gpu_setup.sh) with every wheel of .whl/: deepspeed built from its source release with DS_BUILD_OPS=0,
# the dependencies the GPU image lacks, pytest (benchmarks/GPU.md); a copy of the package in /tmp/oars. DALI is not
# on those machines: the loader benchmark times the torch loader alone there unless a DALI wheel is installed.
# Writes 3 files: gpu_scaleout.txt (versions), gpu_scaleout_tests.log, loaders.csv.
#   SCALEOUT_BUDGET  seconds for both parts (default 300: tests up to 240, loaders 60)
#   SMOKE=1          collect the tests and run the loader benchmark's smoke size only (a CPU check of the script)
set -uo pipefail
OUT_DIR=${1:-${OUT:-benchmarks/results/gpu_scaleout}}
export OARS_WHEELS=${OARS_WHEELS:-all}
# shellcheck source=benchmarks/gpu_setup.sh
source benchmarks/gpu_setup.sh
PYTHON=${PYTHON:-python3}
BUDGET=${SCALEOUT_BUDGET:-300}
t_tests=$(( BUDGET - 60 < 240 ? BUDGET - 60 : 240 ))
t_tests=$(( t_tests < 30 ? 30 : t_tests ))
{ command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  "$PYTHON" -c "import deepspeed, torch; print('deepspeed', deepspeed.__version__, 'torch', torch.__version__)"; } \
  2>&1 | tee "$OUT_DIR/gpu_scaleout.txt"
rc=0
WORK=$(mktemp -d)
if ! "$PYTHON" -c "import skimage.data, sklearn.datasets" >/dev/null 2>&1; then
  # the demo photos (oars_fast.data.demo) come from scikit-image and scikit-learn
  echo "scikit-image / scikit-learn absent: tests/test_gpu_deepspeed.py builds its demo set from their photos and" \
    "will fail at that; the loader benchmark reads synthetic JPEGs instead" | tee -a "$OUT_DIR/gpu_scaleout.txt"
  "$PYTHON" -m benchmarks.gpu_steps jpegs --out "$WORK" || rc=1
fi
if [ "${SMOKE:-0}" = 1 ]; then
  timeout "$t_tests" "$PYTHON" -m pytest -q --collect-only -p no:cacheprovider tests/test_gpu_deepspeed.py 2>&1 \
    | tail -n 2 | tee "$OUT_DIR/gpu_scaleout_tests.log" || rc=1
  timeout 60 "$PYTHON" -m benchmarks.loaders --smoke --out "$OUT_DIR" --work "$WORK" 2>&1 \
    | tee -a "$OUT_DIR/gpu_scaleout_tests.log" || rc=1
else
  # interrupted at its limit (SIGINT), pytest still prints what passed and failed
  timeout -s INT -k 10 "$t_tests" "$PYTHON" -m pytest -q -rfEs -p no:cacheprovider tests/test_gpu_deepspeed.py 2>&1 \
    | tee "$OUT_DIR/gpu_scaleout_tests.log" || rc=1
  timeout 60 "$PYTHON" -m benchmarks.loaders --out "$OUT_DIR" --work "$WORK" 2>&1 \
    | tee -a "$OUT_DIR/gpu_scaleout_tests.log" || rc=1
fi
rm -rf "$WORK"
exit $rc
