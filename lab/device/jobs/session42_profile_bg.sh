#!/usr/bin/env bash
# Session 42: build the 7B-shape run folder, then profile its decode steps in the background from a private copy
# (the device's working tree is re-laid on every call), so staging calls can follow. Carry [".kb_data"].
#   RES=$OUT bash lab/device/jobs/session42_profile_bg.sh;  results: /tmp/res/profile_kv4.{json,log}
set -eu
RES=${RES:-/tmp/res} STEP=prepare bash lab/device/jobs/session42_h200_e2e.sh
mkdir -p /tmp/kwork /tmp/res && cp -r src benchmarks lab /tmp/kwork/
cd /tmp/kwork
DARTQUANT_CACHE=/tmp/kbdata DARTQUANT_NO_INSTALL=1 PYTHONUNBUFFERED=1 PYTHONPATH=src:benchmarks setsid nohup \
  python3 lab/device/jobs/session42_profile_kv4.py /tmp/kb/run-llama2-7b-quarot-rtn /tmp/res/profile_kv4.json \
  > /tmp/res/profile_kv4.log 2>&1 < /dev/null &
echo "profile started (pid $!)"
