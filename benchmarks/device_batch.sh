#!/usr/bin/env bash
# The GPU batch behind docs/RESULTS.md (run on the lent H200 after scripts/device_stage.py
# staging; `source scripts/device_env.sh` first). Writes JSON + logs to $RES (default /tmp/res).
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
TASKS="arc_easy arc_challenge piqa winogrande hellaswag lambada"
python3 benchmarks/quality.py --model smollm2-135m --device cuda --seeds 0 1 2 \
  --configs rtn:rtn quarot:rtn quarot:gptq dartquant:rtn dartquant:gptq \
  --dq-lr-grid 1e-3 3e-3 1e-2 3e-2 1e-1 --tasks $TASKS --limit 300 \
  --out "$RES/smollm2_quality.json" > "$RES/smollm2_quality.md" 2> "$RES/smollm2_quality.log"
python3 benchmarks/dartquant_cost.py --shapes llama2-7b llama3-8b --device cuda \
  --out "$RES/cost.json" > "$RES/cost.md" 2> "$RES/cost.log"
python3 benchmarks/quality.py --model smollm2-135m --device cuda --seeds 0 1 2 \
  --configs dartquant:gptq:dq_loss=quant dartquant:gptq:dq_loss=variance dartquant:gptq:dq_loss=kurtosis \
  --dq-lr-grid 1e-3 1e-2 1e-1 \
  --out "$RES/smollm2_losses.json" > "$RES/smollm2_losses.md" 2> "$RES/smollm2_losses.log"
touch "$RES/DONE"
