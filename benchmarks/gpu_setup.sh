# Sourced by the GPU scripts (gpu_measure.sh, gpu_scaleout_check.sh) from the repo root with OUT_DIR set:
# resolves OUT_DIR; installs the carried wheels of .whl/ into $OARS_SITE (default /tmp/site, put first on
# PYTHONPATH) with `python -m benchmarks.gpu_steps install` (no index, no dependencies; one pip call, else one
# wheel at a time, else unzipped when there is no pip): diffusers and deepspeed always, every other wheel only when
# the machine lacks that package or has an older one, never one built for another Python; scope $OARS_WHEELS
# (measure: without deepspeed and what only it needs; all: everything). A wheel that fails is logged, not fatal:
# the steps that do not need it still run (gpu_steps info says whether diffusers imports). Copies the package to
# $OARS_COPY (default /tmp/oars) with kernels/ placed as oars_fast/kernels too (no pip install there), cds into it.
# Sourced a second time in the same shell (a script calling another), it does nothing but resolve OUT_DIR. See
# benchmarks/GPU.md for building .whl/.
#   PYTHON            the interpreter (default python3)
#   OARS_WHEELS       measure | all (default all)
#   OARS_SKIP_WHEELS  1: install nothing (the interpreter already has everything: the CPU smoke run)
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
if [ "${OARS_SETUP_DONE:-}" != "1" ]; then
  export OARS_GIT_SHA=${OARS_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
  OARS_SITE=${OARS_SITE:-/tmp/site}
  OARS_COPY=${OARS_COPY:-/tmp/oars}
  if [ "${OARS_SKIP_WHEELS:-}" != "1" ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m benchmarks.gpu_steps install .whl --target "$OARS_SITE" --scope "${OARS_WHEELS:-all}" \
      || echo "gpu_setup: the diffusers wheel did not install (see above)"
    export PYTHONPATH=$OARS_SITE${PYTHONPATH:+:$PYTHONPATH}
  elif [ "${OARS_SKIP_WHEELS:-}" != "1" ]; then
    echo "gpu_setup: no .whl/ here (carry it: benchmarks/GPU.md); using what the machine has"
  fi
  rm -rf "$OARS_COPY" && mkdir -p "$OARS_COPY"
  # kernels/ also stays at the top, as in the repo (tests/test_kernels.py imports it from there on purpose)
  cp -r oars_fast tests benchmarks configs kernels "$OARS_COPY"/ && cp -r kernels "$OARS_COPY"/oars_fast/kernels
  [ -f pyproject.toml ] && cp pyproject.toml "$OARS_COPY"/
  cd "$OARS_COPY" || exit 1
  export PYTHONPATH=$OARS_COPY${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OARS_SETUP_DONE=1
fi
