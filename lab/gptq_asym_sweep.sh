#!/usr/bin/env bash
# Issue 17: asymmetric GPTQ (`--gptq-asymmetric true`) against the default GPTQ, paired by seed, on the
# CPU: README quickstart calibration (16 x 512), the first EVAL_WINDOWS (16) held-out windows of 2048 per
# corpus, as lab/clip_search_sweep.sh (whose search-false runs are the default-GPTQ twins).
#   bash lab/gptq_asym_sweep.sh runs/asym15 "quarot" "0 1 2"      (MODEL=qwen2.5-coder-0.5b EVAL_WINDOWS=8 ...)
set -eu
OUT=${1:-runs/asym15}
METHODS=${2:-quarot}
SEEDS=${3:-"0 1 2"}
MODEL=${MODEL:-smollm2-135m}
mkdir -p "$OUT"
for m in $METHODS; do
  for s in $SEEDS; do
    for asym in ${VARIANTS:-true}; do
      run="$OUT/$MODEL-$m-s$s-asym-$asym"
      [ -f "$run/metrics.json" ] && continue
      .venv/bin/dartquant quantize --model "$MODEL" --method "$m" --seed "$s" --calib-samples 16 --calib-seqlen 512 \
        --eval-max-windows "${EVAL_WINDOWS:-16}" --skip-fp-eval --gptq-asymmetric "$asym" --out "$run" > "$run.log" 2>&1
    done
  done
done
