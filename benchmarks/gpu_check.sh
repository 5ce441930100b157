#!/usr/bin/env bash
# Replaced by benchmarks/gpu_measure.sh (one prepared GPU script: at most 7 minutes, at most 8 result files,
# each step under its own timeout); kept so that older notes that name this script still work.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [options of gpu_measure.sh]
exec bash "$(dirname "$0")/gpu_measure.sh" "$@"
