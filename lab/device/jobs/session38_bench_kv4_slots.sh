#!/usr/bin/env bash
# Issue 16, session 38 (queued): the 4-bit K/V cache end to end with the decode attention's slots (the choice without
# GQA since session 38, docs/KERNELS.md 4f) against the path chosen before (dots; CUDA cores at batch 1), on a
# quantized Llama-2-7B-shape run folder (random weights, quarot / rtn, streamed), `dartquant bench --kv kernels`.
# The run folder is built once (skipped when /tmp/kb has it); a call of 10 minutes may not hold both steps:
#   python benchmarks/kernels_e2e.py --write-data-cache .kb_data          # here, once (2.5 MB, git-ignored)
#   RES=$OUT PREPARE_ONLY=1 bash lab/device/jobs/session38_bench_kv4_slots.sh   # device, carry [".kb_data"]
#   RES=$OUT bash lab/device/jobs/session38_bench_kv4_slots.sh                  # device, the same machine
# Logic check on the CPU: SHAPE=tiny DEVICE=cpu BENCH="--prefill 16 --batch 4 --context 8" TRITON_INTERPRET=1 ...
set -eu
RES=${RES:-/tmp/res}; mkdir -p "$RES"
SHAPE=${SHAPE:-llama2-7b}; DEVICE=${DEVICE:-cuda}; KB=${KB:-/tmp/kb}
RUN=$KB/run-$SHAPE-quarot-rtn
export PYTHONUNBUFFERED=1 PYTHONPATH=src DARTQUANT_NO_INSTALL=1
[ -d /tmp/kbdata ] || cp -r .kb_data /tmp/kbdata
export DARTQUANT_CACHE=/tmp/kbdata
[ -d "$RUN" ] || python3 benchmarks/kernels_e2e.py --run-shape "$SHAPE" --dir "$KB" --device "$DEVICE" --prepare-only \
  > "$RES/prepare_$SHAPE.log" 2>&1 || { tail -n 20 "$RES/prepare_$SHAPE.log"; exit 1; }
[ "${PREPARE_ONLY:-0}" = 1 ] && { echo "prepared $RUN"; exit 0; }
for side in slots dots; do
  # the bf16 side once (with the slots); the dots side times the w4a4 model only
  extra=""; [ "$side" = dots ] && extra="--sides w4a4"
  SIDE=$side RUN=$RUN OUTJ="$RES/bench_kv4_${side}_$SHAPE.json" DEVICE=$DEVICE BENCH="${BENCH:-} $extra" python3 - <<'PY'
import os
import runpy
import sys

from dartquant.kernels import kv_cache

import atexit

chosen, seen = kv_cache.decode_path, set()


def decode_path(programs, group, slots, cuda_cores, block_s):
    if os.environ["SIDE"] == "dots" and slots is None:  # the path chosen before session 38: no slots unless asked
        slots = False
    path = chosen(programs, group, slots, cuda_cores, block_s)
    seen.add((programs, group) + path)
    return path


kv_cache.decode_path = decode_path
atexit.register(lambda: print(os.environ["SIDE"], "side: (programs, group, slots, cuda_cores, block_s) taken:",
                              sorted(seen)))
sys.argv = ["dartquant", "bench", os.environ["RUN"], "--kv", "kernels", "--device", os.environ["DEVICE"],
            "--json", os.environ["OUTJ"], *os.environ["BENCH"].split()]
runpy.run_module("dartquant.cli", run_name="__main__")
PY
done
