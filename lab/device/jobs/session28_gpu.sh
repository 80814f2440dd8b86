#!/usr/bin/env bash
# Issue 16, session 28, one direct device call (~7 min; no staging): the activation kernels with the FMA
# division against the IEEE one (run 42), the int8s GEMM's narrow row tiles on the down projections
# (run 43; runs 41's --small-tiles rows for q+k+v / o / gate+up were cut by a time limit before them),
# then the 7B shape end to end with both (run 44).
#   RES=$OUT bash lab/device/jobs/session28_gpu.sh
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
export PYTHONPATH=src:benchmarks
timeout 200 python3 lab/device/jobs/session28_act_fma.py "$RES/act_fma_h200_session28.json" 2>&1 | grep -v Warn | tail -n 62
timeout 120 python3 lab/device/jobs/session27_swap_decode.py "$RES/small_tiles_down_h200_session28.json" --small-tiles \
  --shapes "L2-7B down,L3-8B down" 2>&1 | tail -n 8
timeout 260 python3 benchmarks/kernels_e2e.py --prefill-operands int8s scaled_mm --decode-operands int8s scaled_mm \
  --out "$RES/kernels_e2e_h200_session28.json" > "$RES/e2e28.md" 2> "$RES/e2e28.log"
tail -n 30 "$RES/e2e28.md"; tail -n 5 "$RES/e2e28.log"
