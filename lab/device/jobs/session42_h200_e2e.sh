#!/usr/bin/env bash
# Issue 16, session 42: today's kernels end to end on an H200 (none since run 50, session 28; session 40 measured
# an H100, RESULTS §52). A quantized Llama-2-7B-shape run folder (random weights, QuaRot + RTN, streamed), then
# `dartquant bench` with the 4-bit K/V cache on kernels (both sides), the scaled_mm prefill operand, and the bf16
# cache on the w4a4 side. Direct calls on one warm machine:
#   python benchmarks/kernels_e2e.py --write-data-cache .kb_data              # here, once (2.5 MB, git-ignored)
#   RES=$OUT STEP=prepare bash lab/device/jobs/session42_h200_e2e.sh          # device, carry [".kb_data"]
#   RES=$OUT STEP=bench bash lab/device/jobs/session42_h200_e2e.sh            # device, the same machine
set -eu
RES=${RES:-/tmp/res}; mkdir -p "$RES"
SHAPE=${SHAPE:-llama2-7b}; DEVICE=${DEVICE:-cuda}; KB=${KB:-/tmp/kb}
RUN=$KB/run-$SHAPE-quarot-rtn
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
export PYTHONUNBUFFERED=1 PYTHONPATH=src DARTQUANT_NO_INSTALL=1
[ -d /tmp/kbdata ] || cp -r .kb_data /tmp/kbdata
export DARTQUANT_CACHE=/tmp/kbdata
if [ "${STEP:-prepare}" = prepare ]; then
  [ -d "$RUN" ] || python3 benchmarks/kernels_e2e.py --run-shape "$SHAPE" --dir "$KB" --device "$DEVICE" --prepare-only \
    > "$RES/prepare_$SHAPE.log" 2>&1 || { tail -n 20 "$RES/prepare_$SHAPE.log"; exit 1; }
  echo "prepared $RUN"; exit 0
fi
bench() { python3 -m dartquant.cli bench "$RUN" --device "$DEVICE" "$@" 2>&1 | grep -v '^\s*$' | tail -n 14; }
bench --kv kernels --json "$RES/bench_kv4_${GPU}.json"
bench --kv kernels --sides w4a4 --prefill-operand scaled_mm --json "$RES/bench_kv4_scaled_mm_w4a4_${GPU}.json"
bench --kv plain --sides w4a4 --json "$RES/bench_plain_w4a4_${GPU}.json"
