#!/usr/bin/env bash
# Session 48's open measurements (issue 16), most important first, one call of up to END seconds, carry [".kb_data"]:
#   git show 807bbb5:src/dartquant/kernels/w4a4_gemm.py > lab/device/jobs/session48_w4a4_gemm_before.py   # optional
#   RES=$OUT [END=570] bash lab/device/jobs/session48_next.sh
# 1. the 16 w unpack (int8s GEMM and per-lane GEMV) per decode linear and (after step 2) end to end at the Llama-2-7B shape (on an H200: against session
#    48's H200 run, docs/results/bench_kv4_llama2-7b_h200_session48.json) and per decode linear;
# 2. where session48_w4a4_gemm_before.py exists (untracked, made as above): session 47's GEMM / GEMV copied over the
#    product's on the same machine, the decode linears (1 token: the GEMV) and the 7B bench's w4a4 side, then put back;
# 3. 8-token tiles at 4 / 8 tokens (session48_tokens8.py); 4. the K-sliced GEMM on TMA (session48_tma.py);
# 5. the activation sweep with the product's own choice (auto) in its own column (kernel_bench.py --skip gemm);
# 6. the activation kernel's "misaligned address" at 14336 wide (session48_act_probe.py).
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"; END=${END:-570}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
export PYTHONPATH=src:benchmarks
timeout 60 python3 lab/device/jobs/session46_decode_floor.py "$RES/decode_floor_times16_$GPU.json" 2>&1 | grep '^|'
BEFORE=lab/device/jobs/session48_w4a4_gemm_before.py
GEMM=src/dartquant/kernels/w4a4_gemm.py
if [ -f "$BEFORE" ] && [ "$SECONDS" -lt $((END - 120)) ]; then
  RES=$RES SHAPE=llama2-7b STEP=prepare bash lab/device/jobs/session42_h200_e2e.sh
  cp "$GEMM" /tmp/w4a4_gemm_now.py && cp "$BEFORE" "$GEMM"
  timeout 60 python3 lab/device/jobs/session46_decode_floor.py "$RES/decode_floor_before_$GPU.json" 2>&1 | grep '^|'
  DARTQUANT_CACHE=/tmp/kbdata DARTQUANT_NO_INSTALL=1 PYTHONPATH=src timeout 120 python3 -m dartquant.cli \
    bench /tmp/kb/run-llama2-7b-quarot-rtn --device cuda --kv kernels --sides w4a4 \
    --json "$RES/bench_kv4_llama2-7b_w4a4_before_$GPU.json" 2>&1 | grep -v '^\s*$' | tail -n 8
  cp /tmp/w4a4_gemm_now.py "$GEMM"
  echo "[$SECONDS s] before done"
fi
[ "$SECONDS" -lt $((END - 150)) ] && RES=$RES SHAPE=llama2-7b timeout $((END - 40 - SECONDS)) bash lab/device/jobs/session44_e2e.sh
echo "[$SECONDS s] e2e done"
for job in tokens8 tma; do
  [ "$SECONDS" -lt $((END - 40)) ] || break
  timeout $((END - SECONDS)) python3 "lab/device/jobs/session48_$job.py" "$RES/${job}_$GPU.json" 2>&1 \
    | grep -v '^wrote' | tail -n 24
  echo "[$SECONDS s] $job done"
done
[ "$SECONDS" -lt $((END - 60)) ] && timeout $((END - SECONDS)) python3 benchmarks/kernel_bench.py --skip gemm \
  --out "$RES/act_$GPU.json" 2>&1 | grep '^|' | tail -n 14 && echo "[$SECONDS s] act sweep done"
[ "$SECONDS" -lt $((END - 40)) ] && timeout $((END - SECONDS)) python3 lab/device/jobs/session48_act_probe.py \
  "$RES/act_probe_$GPU.json" 2>&1 | tail -n 20 && echo "[$SECONDS s] act probe done"
true
