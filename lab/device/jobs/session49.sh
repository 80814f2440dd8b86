#!/usr/bin/env bash
# Session 49 (issue 16): the decode GEMM's profile first (what limits it), its pipeline depth (session49_depth.py),
# then session 48's prepared measurements.
#   git show 807bbb5:src/dartquant/kernels/w4a4_gemm.py > lab/device/jobs/session48_w4a4_gemm_before.py
#   RES=$OUT bash lab/device/jobs/session49.sh        # carry [".kb_data"]
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader
timeout 200 bash lab/device/jobs/session48_gemm_ncu.sh
echo "[$SECONDS s] ncu done"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
PYTHONPATH=src:benchmarks timeout 170 python3 lab/device/jobs/session49_depth.py "$RES/depth_$GPU.json" 2>&1 | grep -v '^wrote' | tail -n 12
echo "[$SECONDS s] depth done"
RES=$RES END=$((575 - SECONDS)) bash lab/device/jobs/session48_next.sh
