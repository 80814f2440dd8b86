#!/usr/bin/env bash
# Issue 16, session 18, run 13: lab/device/jobs/session18_check.py (fused-norm codes on real residual
# streams; the model's sensitivity to one ulp; merged siblings on / off).
#   SCALE_SCRIPT=session18_check.sh bash lab/device/device_launch.sh jobs-scale && bash lab/device/device_poll.sh 120
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
python3 lab/device/jobs/session18_check.py "$RES/session18_check_h200.json" > "$RES/check13.md" 2> "$RES/check13.log"
tail -n 20 "$RES/check13.md"
