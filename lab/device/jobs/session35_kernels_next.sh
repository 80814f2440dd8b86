#!/usr/bin/env bash
# Queued in session 35 (issue 16, GPU alone, ~4 minutes): section 1g's butterfly right factor on an H200 and end to
# end. (1) the throughput A/B of session 35 (there on an H100); (2) the decode-size split kernel's A/B; (3) the
# in-memory Llama-2-7B-shape model (kernels_e2e.py, prefill 2048, decode at batch 1 / 8 / 64) with the butterfly
# (auto, today's default) and with it forced off, in one call. Direct call, no packs needed:
#   RES=$OUT bash lab/device/jobs/session35_kernels_next.sh
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
# files named by the card the lease gave (session 36 asked for an H200 and got an H100)
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
export PYTHONUNBUFFERED=1 PYTHONPATH=src:benchmarks
timeout 200 python3 lab/device/jobs/session35_butterfly.py "$RES/act_butterfly_${GPU}.json" 2>&1 | grep "^|"
timeout 120 python3 lab/device/jobs/session35_split_butterfly.py "$RES/act_split_butterfly_${GPU}.json" 2>&1 | grep "^|"
for side in on off; do
  timeout 240 python3 - "$side" "$RES/kernels_e2e_butterfly_${side}_${GPU}.json" <<'PY' 2>&1 | tail -n 14
import runpy, sys
from dartquant.kernels import act_quant
side, out = sys.argv[1], sys.argv[2]
act_quant.RIGHT_BUTTERFLY = None if side == "on" else False  # on: auto's choice (the butterfly at prefill)
sys.argv = ["kernels_e2e.py", "--out", out]
runpy.run_path("benchmarks/kernels_e2e.py", run_name="__main__")
PY
done
