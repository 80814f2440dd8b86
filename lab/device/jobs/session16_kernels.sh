#!/usr/bin/env bash
# Issue 16, kernel run 9: the scaled_mm prefill backend (both operands as 1-byte e4m3 codes on cuBLAS's
# FP8 GEMM; w4a4_gemm.scaled_mm_exact probes each shape). Needs no staged pack (random weights, no
# corpora): ONE device call, no carry, e.g.
#   RES=$OUT bash lab/device/jobs/session16_kernels.sh
# 1. per linear (7B / 8B / 70B shapes, M = 8 / 16 / 64 / 512 / 2048 / 8192): exactness, then bf16 vs int8s vs scaled_mm;
# 2. the Llama-2-7B-shape model in memory: prefill 2048 with the int8s and scaled_mm operands (logits
#    compared), and the scaled_mm side decoding too (batches 8 and 64 on cuBLAS FP8); then where the
#    time goes (--profile: GPU kernel time by category, bf16 and both operands).
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python3 benchmarks/kernel_bench.py --scaled-mm --out "$RES/kernels_h200_run9.json" > "$RES/run9.md" 2> "$RES/run9.log"
tail -n 40 "$RES/run9.md"
python3 benchmarks/kernels_e2e.py --prefill-operands int8s scaled_mm --decode-operands scaled_mm --profile --out "$RES/kernels_e2e_scaled_mm_h200.json" \
  > "$RES/e2e9.md" 2> "$RES/e2e9.log"
tail -n 25 "$RES/e2e9.md"
