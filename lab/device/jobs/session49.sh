#!/usr/bin/env bash
# Session 49 (issue 16): session 48's prepared measurements, the profile first (it says what limits the decode GEMM).
#   git show 807bbb5:src/dartquant/kernels/w4a4_gemm.py > lab/device/jobs/session48_w4a4_gemm_before.py
#   RES=$OUT bash lab/device/jobs/session49.sh        # carry [".kb_data"]
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader
timeout 200 bash lab/device/jobs/session48_gemm_ncu.sh
echo "[$SECONDS s] ncu done"
RES=$RES END=$((575 - SECONDS)) bash lab/device/jobs/session48_next.sh
