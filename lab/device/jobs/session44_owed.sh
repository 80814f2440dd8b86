#!/usr/bin/env bash
# What session 44 left owed on the GPU (issue 16), in one call of about 400 s (carry [".kb_data"]); on an H200 these
# are the issue's own numbers, on an H100 they re-measure RESULTS §59:
#   RES=$OUT bash lab/device/jobs/session44_owed.sh
#   1. every 4-bit attention path against fp32 SDPA (`kernel_bench.py --kv4`), 2. the GQA words loop alone against
#   the dots on bytes, 3. Llama-3-8B end to end with the words loop's final step choice, 4. Llama-2-7B end to end.
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
PYTHONPATH=src:benchmarks timeout 120 python3 benchmarks/kernel_bench.py --kv4 --out "$RES/kv4_check_$GPU.json" 2>&1 \
  | grep -v '^\s*$' | grep -E 'error| no \||wrote' | tail -n 20
RES=$RES bash lab/device/jobs/session44_gqa.sh 2>&1 | grep -E 'default|wrote|speed|memory|timed as|attention' | tail -n 40
RES=$RES SHAPE=llama2-7b bash lab/device/jobs/session44_e2e.sh
