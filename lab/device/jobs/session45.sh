#!/usr/bin/env bash
# Session 45 (issue 16): the 4-bit K/V store launch by config (prefill and decode sizes, session45_kv4_store.py),
# then `dartquant bench RUN --kv kernels` end to end with its new prompt config (Llama-2-7B shape, then Llama-3-8B,
# which also owes session 44's words-loop step choice end to end), then session 44's owed checks if time is left.
# One call of at most ~570 s, carry [".kb_data"]:
#   RES=$OUT bash lab/device/jobs/session45.sh
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
PYTHONPATH=src:benchmarks timeout 150 python3 lab/device/jobs/session45_kv4_store.py "$RES/kv4_store_$GPU.json" 2>&1 \
  | grep -v '^\s*$' | tail -n 40
echo "[$SECONDS s] store sweep done"
RES=$RES SHAPE=llama2-7b timeout 240 bash lab/device/jobs/session44_e2e.sh
echo "[$SECONDS s] llama2-7b done"
if [ "$SECONDS" -lt 330 ]; then RES=$RES SHAPE=llama3-8b timeout $((560 - SECONDS)) bash lab/device/jobs/session44_e2e.sh; fi
echo "[$SECONDS s] llama3-8b done or skipped"
if [ "$SECONDS" -lt 540 ]; then
  PYTHONPATH=src:benchmarks timeout $((585 - SECONDS)) python3 benchmarks/kernel_bench.py --kv4 --out "$RES/kv4_check_$GPU.json" 2>&1 \
    | grep -v '^\s*$' | grep -E 'error| no \||wrote' | tail -n 20
fi
echo "[$SECONDS s] end"
