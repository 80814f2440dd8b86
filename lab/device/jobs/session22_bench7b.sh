#!/usr/bin/env bash
# Issue 16, sessions 21-22: the 4-bit K/V cache kernels alone (KV4_JOB, default session22_kv4.py: the
# decode attention against run 33's and SDPA; session21_bench7b.sh runs session21_kv4.py), then
# `dartquant bench --kv kernels` on a quantized Llama-2-7B-shape run folder (random weights; quarot /
# rtn, streamed): default operands, then the w4a4 side again with --prefill-operand scaled_mm.
# KV4_ONLY=1: the kernel table alone. Direct call, carry [".kb_data"]:
#   RES=$OUT bash lab/device/jobs/session22_bench7b.sh
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
export PYTHONUNBUFFERED=1
KV4_JOB=${KV4_JOB:-session22_kv4}
PYTHONPATH=src:benchmarks timeout 200 python3 "lab/device/jobs/$KV4_JOB.py" "$RES/${KV4_JOB}_h200.json" \
  > "$RES/kv4.txt" 2>&1; tail -n 14 "$RES/kv4.txt"
[ "${KV4_ONLY:-0}" = 1 ] && exit 0
rm -rf /tmp/kbdata && cp -r .kb_data /tmp/kbdata
export DARTQUANT_CACHE=/tmp/kbdata DARTQUANT_NO_INSTALL=1
python3 benchmarks/kernels_e2e.py --run-shape llama2-7b --dir /tmp/kb --out "$RES/kernels_bench_kv4_h200.json" \
  -- --kv kernels > "$RES/bench_kv4.md" 2> "$RES/bench_kv4.log"
tail -n 14 "$RES/bench_kv4.md"; tail -n 3 "$RES/bench_kv4.log"
PYTHONPATH=src python3 -m dartquant.cli bench /tmp/kb/run-llama2-7b-quarot-rtn --kv kernels --prefill-operand scaled_mm \
  --json "$RES/kernels_bench_kv4_scaled_mm_h200.json" > "$RES/bench_kv4_smm.md" 2> "$RES/bench_kv4_smm.log"
tail -n 14 "$RES/bench_kv4_smm.md"; tail -n 3 "$RES/bench_kv4_smm.log"
