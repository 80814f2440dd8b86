#!/usr/bin/env bash
# Issue 16, session 27: the 7B-shape model end to end (in memory, random weights, CUDA graphs on both sides)
# on the int8s GEMM with the word-op nibble split, which now runs from 3 tokens on both operands (int8s and
# scaled_mm's decode batches) and at prefill on the int8s operand. Direct call (~4 min):
#   RES=$OUT bash lab/device/jobs/session27_e2e.sh
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
PYTHONPATH=src python3 benchmarks/kernels_e2e.py --prefill-operands int8s scaled_mm --decode-operands int8s scaled_mm \
  --out "$RES/kernels_e2e_int8s_asm_h200_session27.json" > "$RES/e2e27.md" 2> "$RES/e2e27.log"
tail -n 40 "$RES/e2e27.md"; tail -n 5 "$RES/e2e27.log"
