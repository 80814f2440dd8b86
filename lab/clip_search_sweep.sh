#!/usr/bin/env bash
# Issue 17: `--a-clip-search` against the fixed clip 0.9, paired (same method, seed and GPTQ
# weights: the search runs after each block's weights and changes no GPTQ input), on the CPU.
# SmolLM2-135M (MODEL=...), README quickstart calibration (16 x 512), the first 16 (EVAL_WINDOWS) held-out windows of 2048
# per corpus. Summarize with lab/clip_search_summary.py. About 6-7 minutes a run on 2 cores (16 + 16 windows).
#   bash lab/clip_search_sweep.sh runs/clip13 "quarot duquant" "0 1 2"
set -eu
OUT=${1:-runs/clip13}
METHODS=${2:-"quarot duquant"}
SEEDS=${3:-"0 1 2"}
MODEL=${MODEL:-smollm2-135m}
mkdir -p "$OUT"
for m in $METHODS; do
  for s in $SEEDS; do
    for search in false true; do
      run="$OUT/$MODEL-$m-s$s-search-$search"
      [ -f "$run/metrics.json" ] && continue
      .venv/bin/dartquant quantize --model "$MODEL" --method "$m" --seed "$s" --calib-samples 16 --calib-seqlen 512 \
        --eval-max-windows "${EVAL_WINDOWS:-16}" --skip-fp-eval --a-clip-search "$search" --out "$run" > "$run.log" 2>&1
    done
  done
done
