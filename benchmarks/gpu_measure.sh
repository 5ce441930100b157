#!/usr/bin/env bash
# One prepared GPU measurement (H100 / H200): at most 7 minutes, at most 8 result files, most valuable first.
#
#   bash benchmarks/gpu_measure.sh [OUT_DIR] [--budget SECONDS] [--cpu-smoke] [--plan]
#
#   OUT_DIR      default $OUT, else benchmarks/results/gpu
#   --budget     the whole run's wall-clock cap, set-up included (default 420 s = 7 minutes)
#   --cpu-smoke  every step at tiny sizes on the CPU, nothing installed (tests/test_gpu_measure.py runs it)
#   --plan       print the set-up reserve and the steps' budgets (they sum to 420 s), run nothing
#   GPU_MEASURE_SKIP="step ..."  steps to leave out (e.g. "rl_iteration")
#   GPU_MEASURE_BUDGETS="step=seconds ..."  other step budgets (a rerun of the steps that failed or ran out)
#   PYTHON       the interpreter (default python3)
#
# Runs from the repo root on a machine with PyTorch, Triton, transformers and peft and no network: diffusers (and
# pytest with its dependencies, for the kernel tests, when the machine lacks them) come as wheels in .whl/ (how to
# build them: benchmarks/GPU.md). benchmarks/gpu_setup.sh installs them into /tmp/site (scope "measure": deepspeed
# and what only it needs are left for benchmarks/gpu_scaleout_check.sh, a device call of its own) and runs a copy
# of the package from /tmp/oars. Each step runs in its own process under its own timeout, clipped to what is left
# of the budget, so a slow step cannot eat the next one; a step that cannot get its minimum is skipped and said so.
# Every benchmark checks its outputs against a reference before it times anything.
#
# Set-up reserve 15 s, then the steps (budget s / minimum s), in order:
#   info          15 / 5    versions, card                                              -> gpu.txt
#   ceilings      40 / 20   copy GB/s, bf16 GEMM 8192^3, F.linear 16384x3072x3072 (+bias),
#                           SDPA at the RL update shape (each checked vs fp32 first)     -> ceilings.csv
#   kernel_tests  95 / 30   LoRA on a tensor over 2^31 elements first (its own 45 s), then the NFT, COMPASS
#                           and group-advantage kernel tests, then the LoRA tests of tests/test_kernels.py and
#                           tests/test_lora.py (bf16/fp16/fp32 vs float64, peft agreement) if 15 s remain; without
#                           pytest: gpu_steps lora-check (the same comparisons, int64 included)  -> kernels_tests.log
#   lora_linear   70 / 30   benchmarks.bench_lora_linear: M = 16384, 49152; base (cuBLAS alone) / ours / addmm /
#                           peft (fp32 adapters under autocast) / u alone; fwd and fwd+bwd -> lora_linear.csv
#   nft           50 / 15   NFT loss bf16 vs float64 (sanity row first), then ours / eager / compile
#                           at 24x16x128x128                                             -> nft.csv
#   profile       50 / 30   2-layer full-width transformer + LoRA fwd+bwd: triton vs peft agreement, TFLOP/s
#                           vs benchmarks.rl_cost, torch.profiler top 15 kernels        -> transformer_profile.txt
#   rl_iteration  85 / 45   benchmarks.rl_iteration (2 layers, K 8, 2 inputs, synthetic demo patches):
#                           ours, ours + rl.fp8_nograd=rollout_ref, diffusers + peft     -> rl_iteration.csv
# Everything a step prints goes to measure.log; gpu.txt ends with each step's status and seconds.
set -uo pipefail
SMOKE=0
PLAN=0
BUDGET=420
OUT_ARG=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=1 ;;
    --plan) PLAN=1 ;;
    --budget) BUDGET=$2; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "gpu_measure.sh: unknown option $1" >&2; exit 2 ;;
    *) OUT_ARG=$1 ;;
  esac
  shift
done
SETUP_RESERVE=15  # wheels (one pip call), the package copy, the first log lines
STEPS=(
  "info 15 5"
  "ceilings 40 20"
  "kernel_tests 95 30"
  "lora_linear 70 30"
  "nft 50 15"
  "profile 50 30"
  "rl_iteration 85 45"
)
KILL_GRACE=5  # seconds a step gets after SIGTERM (INT for pytest) before SIGKILL
if [ "$PLAN" = 1 ]; then
  sum=$SETUP_RESERVE
  for spec in "${STEPS[@]}"; do read -r _ b _ <<< "$spec"; sum=$((sum + b)); done
  echo "budget ${BUDGET}s in all: set-up ${SETUP_RESERVE}s + steps = ${sum}s planned; step budget/minimum in seconds:"
  printf '  %s\n' "${STEPS[@]}"
  exit 0
fi
START=$(date +%s)
DEADLINE=$((START + BUDGET))
OUT_DIR=${OUT_ARG:-${OUT:-benchmarks/results/gpu}}
export PYTHON=${PYTHON:-python3}
export OARS_WHEELS=measure  # gpu_setup.sh: diffusers (+ pytest and its dependencies where missing), no deepspeed
if [ "$SMOKE" = 1 ]; then
  export OARS_SKIP_WHEELS=1 TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  OARS_COPY=$(mktemp -d)/oars
  export OARS_COPY
fi
SCRATCH=$(mktemp -d)
mkdir -p "$OUT_DIR"
# a rerun replaces the files of the steps it runs (and measure.log), nothing else: GPU_MEASURE_SKIP keeps the others
declare -A STEP_FILE=([info]=gpu.txt [ceilings]=ceilings.csv [kernel_tests]=kernels_tests.log
                      [lora_linear]=lora_linear.csv [nft]=nft.csv [profile]=transformer_profile.txt
                      [rl_iteration]=rl_iteration.csv)
for spec in "${STEPS[@]}"; do
  read -r name _ _ <<< "$spec"
  [[ " ${GPU_MEASURE_SKIP:-} " == *" $name "* ]] || rm -f "$OUT_DIR/${STEP_FILE[$name]}"
done
rm -f "$OUT_DIR/measure.log"
for kv in ${GPU_MEASURE_BUDGETS:-}; do
  [[ "$kv" =~ ^[a-z_]+=[0-9]+$ && -n "${STEP_FILE[${kv%%=*}]:-}" ]] || {
    echo "gpu_measure.sh: GPU_MEASURE_BUDGETS entry '$kv' is not step=seconds with a step of: ${!STEP_FILE[*]}" >&2
    exit 2; }
done
LOG_EARLY=$SCRATCH/setup.log
# shellcheck source=benchmarks/gpu_setup.sh
source benchmarks/gpu_setup.sh > "$LOG_EARLY" 2>&1 || { cat "$LOG_EARLY"; echo "gpu_measure: set-up failed"; exit 1; }
LOG=$OUT_DIR/measure.log
{ echo "gpu_measure $(date -u +%FT%TZ) budget ${BUDGET}s smoke=$SMOKE sha=$OARS_GIT_SHA"; cat "$LOG_EARLY"; \
  echo "set-up took $(($(date +%s) - START))s"; } > "$LOG"
SMOKE_FLAG=""
[ "$SMOKE" = 1 ] && SMOKE_FLAG="--smoke"
export OUT_DIR SCRATCH SMOKE SMOKE_FLAG LOG

step_info() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv \
      >> "$OUT_DIR/gpu.txt"
  fi
  "$PYTHON" -m benchmarks.gpu_steps info --out "$OUT_DIR/gpu.txt"
}
step_ceilings() { "$PYTHON" -m benchmarks.gpu_steps ceilings --out "$OUT_DIR/ceilings.csv" $SMOKE_FLAG; }
step_kernel_tests() {
  # pytest under `timeout -s INT`: interrupted, it still prints what passed and failed
  local f=$OUT_DIR/kernels_tests.log t=$1 s0=$SECONDS rc=0 left
  local pt=("$PYTHON" -m pytest -q -rfEs -p no:cacheprovider)
  if [ "$SMOKE" = 1 ]; then
    # what the GPU run selects (int64 first, then the LoRA tests), collected in one call
    "${pt[@]}" --collect-only tests/test_kernels.py tests/test_lora.py -k "lora and not sft_adapter" > "$f.tmp" \
      2>&1 || rc=1
    grep -E "int64|collected|ERROR" "$f.tmp" | tee -a "$f"
    rm -f "$f.tmp"
    "$PYTHON" -m benchmarks.gpu_steps lora-check --smoke 2>&1 | tee -a "$f" || rc=1
  elif "$PYTHON" -c "import pytest" 2>/dev/null; then
    local t64=$(( t - 15 < 45 ? t - 15 : 45 ))  # 45 s, less when the step was clipped to its minimum
    timeout -s INT "$t64" "${pt[@]}" tests/test_kernels.py -k int64 2>&1 | tee -a "$f" || rc=1
    # the NFT, COMPASS and group-advantage kernels next (never run on a GPU before 2026-11-27's H200 run ran
    # out of time for them), then the LoRA tests (stopped at 69% there: they need over 210 s)
    left=$((t - (SECONDS - s0) - KILL_GRACE - 2))
    [ "$left" -ge 5 ] || left=5
    timeout -s INT "$left" "${pt[@]}" tests/test_kernels.py -k "not lora" 2>&1 | tee -a "$f" || rc=1
    left=$((t - (SECONDS - s0) - KILL_GRACE - 2))
    if [ "$left" -ge 15 ]; then
      # (test_lora_sft_adapter_... trains on the demo photos: scikit-image, not on these machines)
      timeout -s INT "$left" "${pt[@]}" tests/test_kernels.py tests/test_lora.py \
        -k "lora and not int64 and not sft_adapter" 2>&1 | tee -a "$f" || rc=1
    else
      echo "the LoRA tests: skipped, ${left}s left" | tee -a "$f"
    fi
  else
    echo "pytest is not installed here (add its wheels to .whl/, benchmarks/GPU.md): lora-check instead" | tee -a "$f"
    "$PYTHON" -m benchmarks.gpu_steps lora-check 2>&1 | tee -a "$f" || rc=1
  fi
  return $rc
}
step_lora_linear() { "$PYTHON" -m benchmarks.bench_lora_linear --out "$SCRATCH/lora" $SMOKE_FLAG; }
step_nft() { "$PYTHON" -m benchmarks.gpu_steps nft --out "$OUT_DIR/nft.csv" $SMOKE_FLAG; }
step_profile() { "$PYTHON" -m benchmarks.gpu_steps profile --out "$OUT_DIR/transformer_profile.txt" $SMOKE_FLAG; }
step_rl_iteration() {
  # the demo data set's photos need scikit-image and scikit-learn: synthetic patches in its cache instead
  local home=$SCRATCH/home
  if [ "$SMOKE" = 1 ] && [ "${GPU_MEASURE_FULL_SMOKE:-0}" != 1 ]; then
    # a dry run (the cache, the command line, the imports): the script's own smoke run takes minutes on a 2-core
    # CPU and tests/test_benchmarks.py runs it; GPU_MEASURE_FULL_SMOKE=1 runs it here too
    "$PYTHON" -m benchmarks.gpu_steps demo-cache --home "$home" --patch 128 \
      && "$PYTHON" -m benchmarks.rl_iteration --help > /dev/null && echo "rl_iteration: dry run ok"
  elif [ "$SMOKE" = 1 ]; then
    "$PYTHON" -m benchmarks.gpu_steps demo-cache --home "$home" --patch 128 \
      && HOME=$home "$PYTHON" -m benchmarks.rl_iteration --smoke --iters 1 --out "$SCRATCH/rl" \
        --work "$SCRATCH/bench_rl"
  else
    "$PYTHON" -m benchmarks.gpu_steps demo-cache --home "$home" --patch 256 \
      && HOME=$home "$PYTHON" -m benchmarks.rl_iteration --layers 2 --k 8 --inputs 2 --iters 2 --fp8 \
        --out "$SCRATCH/rl" --work "$SCRATCH/bench_rl"
  fi
}
export -f step_info step_ceilings step_kernel_tests step_lora_linear step_nft step_profile step_rl_iteration
export KILL_GRACE

SUMMARY=()
FAILED=0
for spec in "${STEPS[@]}"; do
  read -r name budget minimum <<< "$spec"
  for kv in ${GPU_MEASURE_BUDGETS:-}; do [ "${kv%%=*}" = "$name" ] && budget=${kv#*=}; done
  if [[ " ${GPU_MEASURE_SKIP:-} " == *" $name "* ]]; then
    SUMMARY+=("$(printf '%-13s %-8s %5s' "$name" skipped -) (GPU_MEASURE_SKIP)")
    continue
  fi
  left=$((DEADLINE - $(date +%s) - KILL_GRACE - 2))  # 2: merging the step's rows afterwards
  t=$(( budget < left ? budget : left ))
  if [ "$t" -lt "$minimum" ]; then
    echo "== $name: skipped, ${left}s left (needs ${minimum}s)" | tee -a "$LOG"
    SUMMARY+=("$(printf '%-13s %-8s %5s' "$name" skipped -) (${left}s left, needs ${minimum}s)")
    continue
  fi
  echo "== $name (budget ${budget}s, timeout ${t}s) $(date -u +%T)" | tee -a "$LOG"
  s0=$(date +%s)
  timeout --kill-after="$KILL_GRACE" "$t" bash -c "set -o pipefail; step_$name $t" >> "$LOG" 2>&1
  rc=$?
  secs=$(($(date +%s) - s0))
  case $rc in
    0) status=ok ;;
    124|137) status=timeout; FAILED=1 ;;
    *) status="rc=$rc"; FAILED=1 ;;
  esac
  # a benchmark's rows reach their file even when it was stopped midway
  case $name in
    lora_linear) "$PYTHON" -m benchmarks.gpu_steps merge-csv "$OUT_DIR/lora_linear.csv" "$SCRATCH"/lora/*.csv \
                   >> "$LOG" 2>&1 ;;
    rl_iteration) "$PYTHON" -m benchmarks.gpu_steps merge-csv "$OUT_DIR/rl_iteration.csv" "$SCRATCH"/rl/*.csv \
                    >> "$LOG" 2>&1 ;;
  esac
  echo "== $name: $status in ${secs}s" | tee -a "$LOG"
  SUMMARY+=("$(printf '%-13s %-8s %5ss' "$name" "$status" "$secs")")
done
total=$(($(date +%s) - START))
{
  echo "--- gpu_measure steps (budget ${BUDGET}s, ${total}s used, smoke=$SMOKE, sha=$OARS_GIT_SHA)"
  printf '%s\n' "${SUMMARY[@]}"
} | tee -a "$OUT_DIR/gpu.txt"
n=$(find "$OUT_DIR" -maxdepth 1 -type f | wc -l)
echo "results in $OUT_DIR ($n files):" $(cd "$OUT_DIR" && ls)
[ "$n" -le 8 ] || echo "gpu_measure: warning: $OUT_DIR holds $n files (more than the 8 this script writes)"
rm -rf "$SCRATCH"
[ "$SMOKE" = 1 ] && rm -rf "$(dirname "$OARS_COPY")"
exit $FAILED
