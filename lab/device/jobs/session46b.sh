#!/usr/bin/env bash
# Session 46 (issue 16), the second call: the int8s GEMM with split-K 2 / 4 on 16 / 32-row tiles at the 7B / 8B decode
# shapes (`session27_swap_decode.py --split4`, after the decode floor read those weights fastest that way), then
# `dartquant bench RUN --kv kernels` at the Llama-3-8B shape with the compact store grid (the default under GQA now).
# One call, carry [".kb_data"]:
#   RES=$OUT [END=500] bash lab/device/jobs/session46b.sh
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"; END=${END:-500}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
PYTHONPATH=src:benchmarks timeout $((END / 2)) python3 lab/device/jobs/session27_swap_decode.py \
  "$RES/split4_decode_$GPU.json" --split4 2>&1 | grep -v '^\s*$' | grep -v '^| L[^|]*([0-9]*x[0-9]*) |' | tail -n 30
echo "[$SECONDS s] split-K sweep done"
RES=$RES SHAPE=llama3-8b timeout $((END - SECONDS)) bash lab/device/jobs/session44_e2e.sh
echo "[$SECONDS s] end"
