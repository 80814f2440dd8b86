#!/usr/bin/env bash
# Issue 16, session 18, run 14: (1) one flipped activation code's effect on the 7B-shape logits
# (session18_flip.py); (2) the product configuration end to end: fused norms, siblings merged up to
# 64 tokens (linear.MERGED_MAX_TOKENS), bf16 and the stricter one-kernel-norm bf16 baseline.
#   SCALE_SCRIPT=session18_final.sh bash lab/device/device_launch.sh jobs-scale && bash lab/device/device_poll.sh 200
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
python3 lab/device/jobs/session18_flip.py "$RES/session18_flip_h200.json" > "$RES/flip14.md" 2> "$RES/flip14.log"
cat "$RES/flip14.md"
python3 benchmarks/kernels_e2e.py --compare-unfused --bf16-fused-norms --prefill-operands scaled_mm \
  --decode-operands scaled_mm --out "$RES/kernels_e2e_final_h200.json" > "$RES/e2e14.md" 2> "$RES/e2e14.log"
tail -n 20 "$RES/e2e14.md"
