#!/usr/bin/env bash
# Session 49 (issue 16), second call: the 7B `dartquant bench` with 8-token tiles at <= 8 tokens, then (in what time
# is left before END seconds) more K slices / warps a program at decode (session49_depth.py --slices; the profile put
# 4 warps on an SM at the 7B o).
#   RES=$OUT [END=360] bash lab/device/jobs/session49b.sh        # carry [".kb_data"]
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"; END=${END:-360}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
RES=$RES SHAPE=llama2-7b timeout 300 bash lab/device/jobs/session44_e2e.sh
echo "[$SECONDS s] e2e done"
[ "$SECONDS" -lt $((END - 40)) ] && PYTHONPATH=src:benchmarks timeout $((END - SECONDS)) python3 \
  lab/device/jobs/session49_depth.py "$RES/slices_$GPU.json" --slices 2>&1 | grep -v '^wrote' | tail -n 8
echo "[$SECONDS s] slices done"
