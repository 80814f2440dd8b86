#!/usr/bin/env bash
# CPU probe of recipe variants (issue 17): the DuQuant recipe (recipes/duquant-clip-search.yaml) with extra
# flags, README's quickstart calibration (16 x 512), each run scored on EVAL_WINDOWS held-out windows per
# corpus; PAR runs at a time, one torch thread each. One variant per line of VARIANTS: "NAME SEED FLAGS...".
#   OUT=/tmp/s31 MODEL=smollm2-135m VARIANTS=$'sm_gaq_0 0 --gptq-act-quant true\nsm_gaq_1 1 --gptq-act-quant true' \
#     bash lab/recipe_variants_cpu_batch.sh
set -eu
OUT=${OUT:-/tmp/recipe_variants}; mkdir -p "$OUT"
DQ=${DQ:-.venv/bin/dartquant}
MODEL=${MODEL:-smollm2-135m}
common="--calib-samples 16 --calib-seqlen 512 --eval-max-windows ${EVAL_WINDOWS:-8} --skip-fp-eval --overwrite"
run() {  # NAME SEED FLAGS...
  name=$1; seed=$2; shift 2
  [ -f "$OUT/$name/metrics.json" ] || OMP_NUM_THREADS=1 $DQ quantize --model $MODEL --recipe recipes/duquant-clip-search.yaml \
    --seed $seed $common "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1
}
i=0
while read -r line; do
  [ -n "$line" ] || continue
  run $line &
  i=$((i+1)); if [ $((i % ${PAR:-2})) -eq 0 ]; then wait; fi
done <<< "$VARIANTS"
wait
grep -H "W4A4KV4 " "$OUT"/*.log || true
