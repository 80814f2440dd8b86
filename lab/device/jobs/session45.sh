#!/usr/bin/env bash
# Session 45 (issue 16): the 4-bit K/V store launch by config (prefill and decode sizes, session45_kv4_store.py),
# then `dartquant bench RUN --kv kernels` end to end with today's defaults (a prompt's store config, the RoPE in
# the K / V launch), Llama-2-7B shape; the w4a4 side again without the RoPE fusion (--no-fuse-rope); then the
# Llama-3-8B shape (session 44's words-loop step choice end to end too) and session 44's `--kv4` check if time is
# left. One call of at most ~590 s, carry [".kb_data"]:
#   RES=$OUT bash lab/device/jobs/session45.sh
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
PYTHONPATH=src:benchmarks timeout 120 python3 lab/device/jobs/session45_kv4_store.py "$RES/kv4_store_$GPU.json" 2>&1 \
  | grep -v '^\s*$' | tail -n 40
echo "[$SECONDS s] store sweep done"
RES=$RES SHAPE=llama2-7b timeout 240 bash lab/device/jobs/session44_e2e.sh
echo "[$SECONDS s] llama2-7b done"
export PYTHONPATH=src DARTQUANT_CACHE=/tmp/kbdata DARTQUANT_NO_INSTALL=1
timeout $((580 - SECONDS)) python3 -m dartquant.cli bench /tmp/kb/run-llama2-7b-quarot-rtn --device cuda --kv kernels \
  --sides w4a4 --no-fuse-rope --json "$RES/bench_kv4_llama2-7b_norope_w4a4_$GPU.json" 2>&1 | grep -v '^\s*$' | tail -n 12
echo "[$SECONDS s] llama2-7b without the RoPE fusion done"
if [ "$SECONDS" -lt 360 ]; then RES=$RES SHAPE=llama3-8b timeout $((585 - SECONDS)) bash lab/device/jobs/session44_e2e.sh; fi
echo "[$SECONDS s] end"
