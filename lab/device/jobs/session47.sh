#!/usr/bin/env bash
# Session 47 (issue 16). First the checks that need any GPU: every 4-bit cache decode path on a left-padded batch
# (`kernel_bench.py --kv4`: STARTS compiled on a GPU for the first time), then the int8s split-K sweep again with
# the fix-up's partial sums relaxed (`session27_swap_decode.py --split4`, each split config exact over 32 calls).
# On an H200 (owed since session 40) `dartquant bench RUN --kv kernels` at the Llama-2-7B shape comes first.
# One call, carry [".kb_data"]:
#   RES=$OUT [END=560] bash lab/device/jobs/session47.sh      # END: the seconds the call may take
set -u
END=${END:-560}
RES=${RES:-/tmp/res}; mkdir -p "$RES"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
if [ "$GPU" = h200 ]; then
  RES=$RES SHAPE=llama2-7b timeout 270 bash lab/device/jobs/session44_e2e.sh
  echo "[$SECONDS s] llama2-7b done"
fi
PYTHONPATH=src:benchmarks timeout 150 python3 benchmarks/kernel_bench.py --kv4 --out "$RES/kv4_padded_$GPU.json" \
  2>&1 | grep -v '^\s*$' | grep -v '| yes |$' | tail -n 20
echo "[$SECONDS s] kv4 checks done (rows not within their bound printed above)"
PYTHONPATH=src:benchmarks timeout $((END - SECONDS)) python3 lab/device/jobs/session27_swap_decode.py \
  "$RES/split4_relaxed_$GPU.json" --split4 2>&1 | grep -v '^\s*$' | grep -v '^| L[^|]*([0-9]*x[0-9]*) |' | tail -n 30
echo "[$SECONDS s] end"
