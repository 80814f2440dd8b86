#!/usr/bin/env bash
# Issue 16, session 20, runs 23 and 25: the product configuration end to end with the split activation kernel
# at decode (auto up to 8 tokens above 4096 wide: a token over several SMs, run 22; run 25 with 16 warps for
# the unrotated one-program kernels at decode, run 24), the per-lane GEMV,
# fused norms, merged siblings; bf16 beside; a kernel-time profile of each. Direct call (~4 min):
#   RES=$OUT bash lab/device/jobs/session20_e2e.sh
set -u
RES=${RES:-/tmp/res}; RUN=${RUN:-25}; mkdir -p "$RES"
PYTHONPATH=src python3 benchmarks/kernels_e2e.py --prefill-operands scaled_mm --decode-operands scaled_mm --profile \
  --out "$RES/kernels_e2e_split_h200_run$RUN.json" > "$RES/e2e$RUN.md" 2> "$RES/e2e$RUN.log"
tail -n 60 "$RES/e2e$RUN.md"; tail -n 5 "$RES/e2e$RUN.log"
