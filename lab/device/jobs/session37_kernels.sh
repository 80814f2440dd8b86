#!/usr/bin/env bash
# Session 37 (issue 16, GPU alone, ~6 minutes): the blocks activation kernel with a wide butterfly right factor
# (docs/KERNELS.md 1h). (1) the config sweep against auto's config today; (2) end to end at the Llama-3-8B shape
# (down_proj's Hadamard 14336 = 28 * 512), kernels_e2e.py with auto patched to the sweep's fastest wide config at
# 14336 ("wide") and as it is ("off"), in one call. Direct call, no packs needed:
#   RES=$OUT bash lab/device/jobs/session37_kernels.sh
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
export PYTHONUNBUFFERED=1 PYTHONPATH=src:benchmarks
timeout 300 python3 lab/device/jobs/session37_wide_right.py "$RES/act_wide_right_${GPU}.json" 2>&1 | grep "^|\|wrote\|Error"
for side in wide off; do
  timeout 240 python3 - "$side" "$RES/act_wide_right_${GPU}.json" "$RES/kernels_e2e_llama3_wide_${side}_${GPU}.json" <<'PY' 2>&1 | tail -n 14
import json, runpy, sys
from dartquant.kernels import act_quant
side, sweep, out = sys.argv[1:4]
if side == "wide":
    rows = [r for r in json.load(open(sweep))["rows"] if r["n"] == 14336 and "ms" in r]
    auto_ms = min(r["ms"] for r in rows if r["name"].startswith("auto"))
    wide = [r for r in rows if r["name"].startswith("right") and r["differ"][0] <= 8]
    best = min(wide, key=lambda r: r["ms"]) if wide else None
    print("14336: auto", auto_ms, "ms; fastest wide", best and (best["name"], best["ms"]))
    if best is not None:
        cfg = {k: v for k, v in best["cfg"].items()}
        auto = act_quant._auto_variant

        def patched(n, rotate, tokens=None):
            if rotate and n == 14336 and (tokens is None or tokens > act_quant.DECODE_TOKENS):
                return dict(cfg)
            return auto(n, rotate, tokens)

        act_quant._auto_variant = patched
sys.argv = ["kernels_e2e.py", "--shape", "llama3-8b", "--out", out]
runpy.run_path("benchmarks/kernels_e2e.py", run_name="__main__")
PY
done
