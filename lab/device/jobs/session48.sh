#!/usr/bin/env bash
# Session 48 (issue 16): the int8s GEMM's weight nibbles unpacked as 16 w (_nibbles_times16) against session 47's
# sign extension, on one machine: `dartquant bench RUN --kv kernels` at the Llama-2-7B shape and the decode linears
# (session46_decode_floor.py, session47_sliced.py --unsigned: "default" is the new unpack, the sliced configs the
# old one), then the same bench and linears with session 47's w4a4_gemm.py copied over the product's (it is
# lab/device/jobs/session48_w4a4_gemm_before.py, untracked: `git show 807bbb5:src/dartquant/kernels/w4a4_gemm.py`).
# One call, carry [".kb_data"]:   RES=$OUT bash lab/device/jobs/session48.sh
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
RES=$RES SHAPE=llama2-7b timeout 330 bash lab/device/jobs/session44_e2e.sh
echo "[$SECONDS s] e2e (times16) done"
export PYTHONPATH=src:benchmarks
python3 lab/device/jobs/session47_sliced.py "$RES/sliced_times16_$GPU.json" --unsigned 2>&1 | grep '^|' | tail -n 14
python3 lab/device/jobs/session46_decode_floor.py "$RES/decode_floor_times16_$GPU.json" 2>&1 | grep '^|'
echo "[$SECONDS s] linears (times16) done"
cp lab/device/jobs/session48_w4a4_gemm_before.py src/dartquant/kernels/w4a4_gemm.py
python3 lab/device/jobs/session46_decode_floor.py "$RES/decode_floor_before_$GPU.json" 2>&1 | grep '^|'
echo "[$SECONDS s] linears (before) done"
DARTQUANT_CACHE=/tmp/kbdata DARTQUANT_NO_INSTALL=1 PYTHONPATH=src timeout 240 python3 -m dartquant.cli bench \
  /tmp/kb/run-llama2-7b-quarot-rtn --device cuda --kv kernels --json "$RES/bench_kv4_llama2-7b_before_$GPU.json" \
  2>&1 | grep -v '^\s*$' | tail -n 14
echo "[$SECONDS s] e2e (before) done"
