#!/usr/bin/env bash
# Session 44 (issue 16): `dartquant bench RUN --kv kernels`, both sides on one machine, today's defaults, for a
# quantized run folder of SHAPE (llama2-7b: the bf16 side owed beside session 43's 8-a-step attention; llama3-8b:
# the GQA decode path). Direct call, carry [".kb_data"]:
#   RES=$OUT SHAPE=llama2-7b bash lab/device/jobs/session44_e2e.sh
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"; SHAPE=${SHAPE:-llama2-7b}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
RES=$RES SHAPE=$SHAPE STEP=prepare bash lab/device/jobs/session42_h200_e2e.sh || exit 1
export PYTHONPATH=src DARTQUANT_CACHE=/tmp/kbdata DARTQUANT_NO_INSTALL=1
python3 -m dartquant.cli bench "/tmp/kb/run-$SHAPE-quarot-rtn" --device cuda --kv kernels \
  --json "$RES/bench_kv4_${SHAPE}_$GPU.json" 2>&1 | grep -v '^\s*$' | tail -n 14
