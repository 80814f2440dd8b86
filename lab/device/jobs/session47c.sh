#!/usr/bin/env bash
# Session 47 (issue 16), the third call: K slices in one program at the 70B decode shapes (session47_sliced.py
# --70b: does the default's N <= 6144 line move up?) and with unsigned weight nibbles (--unsigned), then
# `dartquant bench RUN --kv kernels` with the sliced int8s default at the Llama-2-7B shape, then Llama-3-8B if time
# is left. On an H200 the 7B / 8B sweep (--round2) first. One call, carry [".kb_data"]:
#   RES=$OUT [END=560] bash lab/device/jobs/session47c.sh
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"; END=${END:-560}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
if [ "$GPU" = h200 ]; then  # the 7B / 8B sweep too: does the H100's rule hold on the H200?
  PYTHONPATH=src:benchmarks timeout 120 python3 lab/device/jobs/session47_sliced.py "$RES/sliced_round2_$GPU.json" \
    --round2 2>&1 | grep -v '^wrote' | tail -n 14
fi
PYTHONPATH=src:benchmarks timeout 120 python3 lab/device/jobs/session47_sliced.py "$RES/sliced_70b_$GPU.json" --70b \
  2>&1 | grep -v '^wrote' | tail -n 8
echo "[$SECONDS s] 70B shapes done"
PYTHONPATH=src:benchmarks timeout 120 python3 lab/device/jobs/session47_sliced.py "$RES/sliced_unsigned_$GPU.json" \
  --unsigned 2>&1 | grep -v '^wrote' | tail -n 14
echo "[$SECONDS s] unsigned nibbles done"
RES=$RES SHAPE=llama2-7b timeout 240 bash lab/device/jobs/session44_e2e.sh
echo "[$SECONDS s] llama2-7b done"
if [ "$SECONDS" -lt $((END - 200)) ]; then
  RES=$RES SHAPE=llama3-8b timeout $((END - SECONDS)) bash lab/device/jobs/session44_e2e.sh
fi
echo "[$SECONDS s] end"
