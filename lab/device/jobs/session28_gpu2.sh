#!/usr/bin/env bash
# Issue 16, session 28, direct device call (~5 min): the narrow row tiles on the 70B down projection (run 46,
# the one shape of the new int8s decode rule not yet measured), then the 7B shape end to end with the rule (run 47).
#   RES=$OUT bash lab/device/jobs/session28_gpu2.sh
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
export PYTHONPATH=src:benchmarks
timeout 150 python3 lab/device/jobs/session27_swap_decode.py "$RES/small_tiles_70b_down_h200_session28_run46.json" \
  --small-tiles --shapes "L2-70B down" 2>&1 | grep "^|"
timeout 280 python3 benchmarks/kernels_e2e.py --prefill-operands int8s scaled_mm --decode-operands int8s scaled_mm \
  --out "$RES/kernels_e2e_h200_session28_run47.json" > "$RES/e2e47.md" 2> "$RES/e2e47.log"
tail -n 30 "$RES/e2e47.md"; tail -n 5 "$RES/e2e47.log"
