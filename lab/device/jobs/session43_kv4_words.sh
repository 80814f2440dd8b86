#!/usr/bin/env bash
# Session 43 (issue 16; docs/KERNELS.md 4h): the 4-bit decode attention on words (the default since), end to end:
# `dartquant bench --kv kernels` on a quantized Llama-2-7B-shape run folder as it is (both sides), then the w4a4
# side again on the same load with session 42's attention forced (bytes, no FMA contraction, R3 of the query in
# the attention kernel rather than in the store's launch, its slot widths; a merge launch only where it splits).
#   RES=$OUT bash lab/device/jobs/session43_kv4_words.sh        # carry [".kb_data"]
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
RES=$RES STEP=prepare bash lab/device/jobs/session42_h200_e2e.sh || exit 1
export PYTHONPATH=src DARTQUANT_CACHE=/tmp/kbdata DARTQUANT_NO_INSTALL=1
for side in default before; do
  sides="bf16 w4a4"; [ $side = before ] && sides=w4a4
  SIDE=$side OUTJ="$RES/bench_kv4_${side}_$GPU.json" SIDES="$sides" python3 - <<'PY' 2>&1 | grep -v '^\s*$' | tail -n 12
import os
import runpy
import sys

from dartquant.kernels import kv_cache

if os.environ["SIDE"] == "before":  # session 42's decode attention: bytes, no contraction, R3 in the kernel
    def before(module, query, key, value, attention_mask, **kwargs):
        if isinstance(key, kv_cache.PendingKV4) and query.shape[2] == 1:
            clip, rotate = kv_cache._transform_settings(module)
            layer = key.layer
            kv_cache.kv4_store(layer.codes, layer.cumulative_length, key.key_states, key.value_states, clip, rotate)
            scaling = kwargs.get("scaling")
            scaling = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
            programs = query.shape[0] * layer.codes.shape[1]  # session 42's slot widths: 32 from 256 programs
            return kv_cache.kv4_decode_attention(query, layer.codes, layer.cumulative_length, scaling, rotate,
                                                 words=False, fp_fusion=False,
                                                 block_s=32 if programs >= 256 else 64), None
        return today(module, query, key, value, attention_mask, **kwargs)
    today = kv_cache._kv4_attention
    kv_cache._kv4_attention = before
sys.argv = ["dartquant", "bench", "/tmp/kb/run-llama2-7b-quarot-rtn", "--kv", "kernels", "--device", "cuda",
            "--json", os.environ["OUTJ"], "--sides", *os.environ["SIDES"].split()]
runpy.run_module("dartquant.cli", run_name="__main__")
PY
done
