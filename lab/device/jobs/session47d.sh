#!/usr/bin/env bash
# Session 47 (issue 16), session47c.sh reordered for less device time: `dartquant bench RUN --kv kernels` with the
# sliced int8s default at the Llama-2-7B shape first, then K slices at the 70B shapes (--70b) and with unsigned
# weight nibbles (--unsigned) while time is left. One call, carry [".kb_data"]:
#   RES=$OUT [END=300] bash lab/device/jobs/session47d.sh
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"; END=${END:-300}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
RES=$RES SHAPE=llama2-7b timeout $((END - 30)) bash lab/device/jobs/session44_e2e.sh
echo "[$SECONDS s] llama2-7b done"
for mode in 70b unsigned; do
  [ "$SECONDS" -lt $((END - 30)) ] || break
  PYTHONPATH=src:benchmarks timeout $((END - SECONDS)) python3 lab/device/jobs/session47_sliced.py \
    "$RES/sliced_${mode}_$GPU.json" --$mode 2>&1 | grep -v '^wrote' | tail -n 14
  echo "[$SECONDS s] $mode done"
done
