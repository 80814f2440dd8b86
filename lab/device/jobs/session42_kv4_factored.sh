#!/usr/bin/env bash
# Session 42 (issue 16; docs/KERNELS.md 4g): the 4-bit decode attention's factored slots loop (`exact_k`, the
# default since), first alone against the loops before it (session42_kv4_bits.py --compare exact_k), then end to
# end: `dartquant bench --kv kernels` on a quantized Llama-2-7B-shape run folder as it is (both sides), and with the
# loop before forced (`exact_k=False`, the w4a4 side) on the same folder.
#   RES=$OUT bash lab/device/jobs/session42_kv4_factored.sh        # carry [".kb_data"]
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
PYTHONPATH=src:benchmarks timeout 240 python3 lab/device/jobs/session42_kv4_bits.py "$RES/kv4_factored_$GPU.json" --compare exact_k \
  2>&1 | grep "^|\|wrote\|Error"
[ "${ALONE_ONLY:-0}" = 1 ] && exit 0
RES=$RES STEP=prepare bash lab/device/jobs/session42_h200_e2e.sh || exit 1
export PYTHONPATH=src DARTQUANT_CACHE=/tmp/kbdata DARTQUANT_NO_INSTALL=1
for side in default none; do
  sides="bf16 w4a4"; [ $side = none ] && sides=w4a4
  SIDE=$side OUTJ="$RES/bench_kv4_${side}_$GPU.json" SIDES="$sides" python3 - <<'PY' 2>&1 | grep -v '^\s*$' | tail -n 12
import functools
import os
import runpy
import sys

from dartquant.kernels import kv_cache

if os.environ["SIDE"] == "none":
    kv_cache.kv4_decode_attention = functools.partial(kv_cache.kv4_decode_attention, exact_k=False)
sys.argv = ["dartquant", "bench", "/tmp/kb/run-llama2-7b-quarot-rtn", "--kv", "kernels", "--device", "cuda",
            "--json", os.environ["OUTJ"], "--sides", *os.environ["SIDES"].split()]
runpy.run_module("dartquant.cli", run_name="__main__")
PY
done
