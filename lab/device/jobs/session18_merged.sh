#!/usr/bin/env bash
# Issue 16, session 18, second run: the Llama-2-7B-shape model in memory with both fusions of
# kernels/fusions.py (RMSNorm + quantize; q / k / v and gate / up merged into one GEMM each):
#   SCALE_SCRIPT=session18_merged.sh bash lab/device/device_launch.sh jobs-scale && bash lab/device/device_poll.sh 60
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
python3 benchmarks/kernels_e2e.py --compare-unfused --bf16-fused-norms --prefill-operands scaled_mm --decode-operands scaled_mm \
  --profile --out "$RES/kernels_e2e_fusions_h200.json" > "$RES/e2e12.md" 2> "$RES/e2e12.log"
tail -n 40 "$RES/e2e12.md"
