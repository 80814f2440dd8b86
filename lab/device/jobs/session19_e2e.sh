#!/usr/bin/env bash
# Issue 16, session 19, run 16: the product configuration end to end with the per-lane dp4a GEMV
# (default up to 8 tokens, session 19's sweep run 15: lab/device/jobs/session19_gemv.py), fused norms,
# merged siblings; bf16 and the one-kernel-norm bf16 beside; a kernel-time profile of each. Direct call:
#   bash lab/device/jobs/session19_e2e.sh   (RES=$OUT on the device; ~4 min)
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
PYTHONPATH=src python3 benchmarks/kernels_e2e.py --compare-unfused --bf16-fused-norms --prefill-operands scaled_mm \
  --decode-operands scaled_mm --profile --out "$RES/kernels_e2e_lanes_h200.json" > "$RES/e2e16.md" 2> "$RES/e2e16.log"
tail -n 60 "$RES/e2e16.md"; tail -n 5 "$RES/e2e16.log"
