#!/usr/bin/env bash
# The GPU batch behind docs/RESULTS.md (run on the lent H200 after scripts/device_stage.py
# staging; `source scripts/device_env.sh` first). Writes JSON + logs to $RES (default /tmp/res).
# Usage: device_batch.sh cost | quality
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
TASKS="arc_easy arc_challenge piqa winogrande hellaswag lambada"
case "${1:-quality}" in
cost)
  python3 benchmarks/dartquant_cost.py --shapes llama2-7b llama3-8b --device cuda \
    --out "$RES/cost.json" > "$RES/cost.md" 2> "$RES/cost.log" ;;
quality)
  python3 benchmarks/quality.py --model smollm2-135m --device cuda --seeds 0 1 2 \
    --configs quarot:gptq dartquant:gptq rtn:rtn quarot:rtn \
    --dq-lr-grid 1e-3 1e-2 1e-1 --tasks $TASKS --limit 100 \
    --out "$RES/smollm2_quality.json" > "$RES/smollm2_quality.md" 2> "$RES/smollm2_quality.log" ;;
esac
touch "$RES/DONE-${1:-quality}"
