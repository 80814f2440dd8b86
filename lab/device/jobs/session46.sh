#!/usr/bin/env bash
# Session 46 (issue 16). On an H200 (never given in sessions 40-45): `dartquant bench RUN --kv kernels` end to end at
# the Llama-2-7B shape first (the owed H200 numbers), then the decode floor (session46_decode_floor.py), then the
# Llama-3-8B shape if time is left. On an H100: the decode floor, a prompt into an empty 4-bit cache before / now
# (session46_prompt_cache.py), then the K / V store sweep with the compact grid (session45_kv4_store.py; the compact
# grid was built but never timed). One call, carry [".kb_data"]:
#   RES=$OUT [END=580] bash lab/device/jobs/session46.sh      # END: the seconds the call may take
set -u
END=${END:-580}
RES=${RES:-/tmp/res}; mkdir -p "$RES"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
floor() {
  PYTHONPATH=src:benchmarks timeout "$1" python3 lab/device/jobs/session46_decode_floor.py "$RES/decode_floor_$GPU.json" \
    2>&1 | grep -v '^\s*$' | tail -n 20
  echo "[$SECONDS s] decode floor done"
}
if [ "$GPU" = h200 ]; then
  RES=$RES SHAPE=llama2-7b timeout 260 bash lab/device/jobs/session44_e2e.sh
  echo "[$SECONDS s] llama2-7b done"
  floor 180
  if [ "$SECONDS" -lt 330 ]; then RES=$RES SHAPE=llama3-8b timeout $((585 - SECONDS)) bash lab/device/jobs/session44_e2e.sh; fi
else
  floor $((END * 45 / 100))
  PYTHONPATH=src:benchmarks timeout 90 python3 lab/device/jobs/session46_prompt_cache.py "$RES/prompt_cache_$GPU.json" \
    2>&1 | grep -v '^\s*$' | tail -n 6
  echo "[$SECONDS s] prompt into the cache done"
  PYTHONPATH=src:benchmarks timeout $((END - SECONDS)) python3 lab/device/jobs/session45_kv4_store.py \
    "$RES/kv4_store_compact_$GPU.json" 2>&1 | grep -v '^\s*$' | tail -n 40
fi
echo "[$SECONDS s] end"
