# Sourced by the GPU check scripts, from the repo root, with OUT_DIR set: resolves OUT_DIR, installs
# the carried wheels (.whl/: diffusers, deepspeed, kornia) into /tmp/site, copies the package to
# /tmp/oars with kernels/ placed as oars_fast/kernels (no pip install there), and cds into it.
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export OARS_GIT_SHA=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
rm -rf /tmp/oars && mkdir -p /tmp/oars
cp -r oars_fast tests benchmarks configs /tmp/oars/ && cp -r kernels /tmp/oars/oars_fast/kernels
cd /tmp/oars
export PYTHONPATH=/tmp/oars${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
