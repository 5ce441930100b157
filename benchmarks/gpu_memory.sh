#!/usr/bin/env bash
# The second prepared GPU call (after gpu_measure.sh): the NR-RL memory plan and COMPASS at the 8B architecture.
# About 4 minutes, 4 result files. Run from the repo root with .whl/ carried (benchmarks/GPU.md).
#
#   bash benchmarks/gpu_memory.sh [OUT_DIR] [--cpu-smoke]
#
# Steps (each under its own timeout; a failed step is logged and the next one runs):
#   memory_plan     90 s  benchmarks.memory_plan --layers 2 4: the policy transformer's weights, rollout and update
#                         micro-batch peaks at full width, fitted per block and extrapolated to 60 blocks
#                                                                                        -> memory_plan.csv
#   compass       2x45 s  benchmarks.compass_scoring --arch qwen3vl-8b at 4 and 8 text layers, K = 24, 512x512 SR,
#                         bf16: prefix reuse vs per pair (outputs compared first), weights, peak above them
#                                                                                        -> compass_scoring.csv
#   cuda_tests      60 s  the tests that only run on CUDA: the text-encoder offload, fp8 GEMMs  -> cuda_tests.log
# Everything printed goes to memory.log. GPU_MEMORY_SKIP="memory_plan compass ..." leaves steps out (a rerun of the
# ones that failed: a step's files are rewritten only when it runs).
set -uo pipefail
SMOKE=0
OUT_ARG=""
for a in "$@"; do
  case "$a" in
    --cpu-smoke) SMOKE=1 ;;
    -*) echo "gpu_memory.sh: unknown option $a" >&2; exit 2 ;;
    *) OUT_ARG=$a ;;
  esac
done
OUT_DIR=${OUT_ARG:-${OUT:-benchmarks/results/gpu}}
export PYTHON=${PYTHON:-python3}
export OARS_WHEELS=measure
if [ "$SMOKE" = 1 ]; then
  export OARS_SKIP_WHEELS=1 CUDA_VISIBLE_DEVICES=""
  OARS_COPY=$(mktemp -d)/oars
  export OARS_COPY
fi
mkdir -p "$OUT_DIR"
# a rerun replaces the files of the steps it runs (and memory.log): GPU_MEMORY_SKIP keeps the others
for step_file in memory_plan:memory_plan.csv compass:compass_scoring.csv cuda_tests:cuda_tests.log; do
  [[ " ${GPU_MEMORY_SKIP:-} " == *" ${step_file%%:*} "* ]] || rm -f "$OUT_DIR/${step_file#*:}"
done
rm -f "$OUT_DIR/memory.log"
# shellcheck source=benchmarks/gpu_setup.sh
source benchmarks/gpu_setup.sh > "$OUT_DIR/memory.log" 2>&1 || { cat "$OUT_DIR/memory.log"; exit 1; }
LOG=$OUT_DIR/memory.log
status=0
run_step() {  # name, seconds, command... (its output to memory.log; CUDA_TESTS_LOG=file: also there)
  local name=$1 t=$2 s0=$SECONDS rc
  shift 2
  if [[ " ${GPU_MEMORY_SKIP:-} " == *" ${name%_*} "* || " ${GPU_MEMORY_SKIP:-} " == *" $name "* ]]; then
    echo "== $name: skipped (GPU_MEMORY_SKIP)" | tee -a "$LOG"
    return
  fi
  echo "== $name (${t}s)" | tee -a "$LOG"
  timeout -k 5 "$t" "$@" 2>&1 | tee -a "$LOG" ${CUDA_TESTS_LOG:+"$CUDA_TESTS_LOG"} > /dev/null
  rc=${PIPESTATUS[0]}
  echo "== $name: rc $rc, $((SECONDS - s0))s" | tee -a "$LOG"
  [ "$rc" = 0 ] || status=1
}
if [ "$SMOKE" = 1 ]; then
  run_step memory_plan 120 "$PYTHON" -m benchmarks.memory_plan --smoke --out "$OUT_DIR"
  run_step compass 120 "$PYTHON" -m benchmarks.compass_scoring --smoke --out "$OUT_DIR"
  CUDA_TESTS_LOG=$OUT_DIR/cuda_tests.log run_step cuda_tests 120 "$PYTHON" -m pytest -q -rs -p no:cacheprovider \
    tests/test_backbone.py -k offload_frees
else
  run_step memory_plan 90 "$PYTHON" -m benchmarks.memory_plan --layers 2 4 --out "$OUT_DIR"
  for layers in 4 8; do
    run_step "compass_${layers}" 45 "$PYTHON" -m benchmarks.compass_scoring --arch qwen3vl-8b --layers "$layers" \
      --groups 2 --k 24 --batch-size 24 --out "$OUT_DIR"
  done
  CUDA_TESTS_LOG=$OUT_DIR/cuda_tests.log run_step cuda_tests 60 "$PYTHON" -m pytest -q -rs -p no:cacheprovider \
    tests/test_backbone.py tests/test_fp8.py -k "offload or fp8 or scaled"
fi
echo "gpu_memory: done (status $status); files in $OUT_DIR"
exit $status
