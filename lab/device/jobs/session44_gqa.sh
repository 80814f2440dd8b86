#!/usr/bin/env bash
# Session 44 (issue 16): the GQA decode attention on words (tensor-core dots on bf16 numbers made by a mask),
# alone against the dots with K as held, then end to end on the Llama-3-8B shape (both sides; the bf16 side's
# GQA decode packed on the KV heads). Direct call, carry [".kb_data"]:
#   RES=$OUT bash lab/device/jobs/session44_gqa.sh
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
PYTHONPATH=src:benchmarks python3 lab/device/jobs/session42_kv4_bits.py "$RES/kv4_gqa_$GPU.json" --compare gqa 2>&1 \
  | grep -v '^\s*$' | tail -n 70
[ "${ALONE:-0}" = 1 ] && exit 0
RES=$RES SHAPE=llama3-8b bash lab/device/jobs/session44_e2e.sh
