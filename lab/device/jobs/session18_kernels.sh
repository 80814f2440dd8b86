#!/usr/bin/env bash
# Issue 16, kernel run 11: each block RMSNorm fused with its readers' 4-bit quantization
# (act_quant.rmsnorm_quantize_pack, kernels/fused_norms.py). GPU alone, no pack:
#   SCALE_SCRIPT=session18_kernels.sh bash lab/device/device_launch.sh jobs-scale && bash lab/device/device_poll.sh 40
# 1. the fused kernel vs the torch norm + the quant-only kernel (hidden widths, 1-16384 tokens);
# 2. the Llama-2-7B-shape model in memory: w4a4 with the norms apart and fused, int8s and scaled_mm,
#    prefill 2048 and decode 1 / 8 / 64, then a kernel-time profile of each.
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
python3 benchmarks/kernel_bench.py --norm-quant --out "$RES/kernels_h200_run11_normquant.json" \
  > "$RES/run11.md" 2> "$RES/run11.log"
tail -n 24 "$RES/run11.md"
touch "$RES/DONE-normquant"
python3 benchmarks/kernels_e2e.py --compare-unfused --prefill-operands scaled_mm --decode-operands scaled_mm \
  --profile --out "$RES/kernels_e2e_fusednorm_h200.json" > "$RES/e2e11.md" 2> "$RES/e2e11.log"
tail -n 40 "$RES/e2e11.md"
