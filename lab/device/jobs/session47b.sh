#!/usr/bin/env bash
# Session 47 (issue 16), the second call: the int8s split-K sweep with 1 / 2 pipeline stages
# (`session27_swap_decode.py --stages`), after the relaxed fix-up made split 2 win on the down projections only.
# One call, carry [".kb_data"]:
#   RES=$OUT [END=400] bash lab/device/jobs/session47b.sh
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"; END=${END:-400}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
PYTHONPATH=src:benchmarks timeout "$END" python3 lab/device/jobs/session27_swap_decode.py \
  "$RES/split_stages_$GPU.json" --stages 2>&1 | grep -v '^\s*$' | grep -v '^| L[^|]*([0-9]*x[0-9]*) |' | grep -v '^wrote' | tail -n 30
echo "[$SECONDS s] end"
