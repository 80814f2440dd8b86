#!/usr/bin/env bash
# Session 48's open measurements (issue 16), most important first, one call of about 6 minutes, carry [".kb_data"]:
#   RES=$OUT [END=540] bash lab/device/jobs/session48_next.sh
# 1. the 16 w unpack end to end at the Llama-2-7B shape (on an H200: against session 48's H200 run,
#    docs/results/bench_kv4_llama2-7b_h200_session48.json) and per decode linear;
# 2. 8-token tiles at 4 / 8 tokens (session48_tokens8.py); 3. the K-sliced GEMM on TMA (session48_tma.py);
# 4. the activation kernel's "misaligned address" at 14336 wide (session48_act_probe.py); 5. the activation sweep
#    with the product's own choice (auto, the butterfly right factor) in its own column (kernel_bench.py --skip gemm).
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"; END=${END:-540}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
RES=$RES SHAPE=llama2-7b timeout 300 bash lab/device/jobs/session44_e2e.sh
echo "[$SECONDS s] e2e done"
export PYTHONPATH=src:benchmarks
timeout 60 python3 lab/device/jobs/session46_decode_floor.py "$RES/decode_floor_times16_$GPU.json" 2>&1 | grep '^|'
for job in tokens8 tma act_probe; do
  [ "$SECONDS" -lt $((END - 40)) ] || break
  timeout $((END - SECONDS)) python3 "lab/device/jobs/session48_$job.py" "$RES/${job}_$GPU.json" 2>&1 \
    | grep -v '^wrote' | tail -n 24
  echo "[$SECONDS s] $job done"
done
[ "$SECONDS" -lt $((END - 60)) ] && timeout $((END - SECONDS)) python3 benchmarks/kernel_bench.py --skip gemm \
  --out "$RES/act_$GPU.json" 2>&1 | grep '^|' | tail -n 14
echo "[$SECONDS s] act sweep done"
