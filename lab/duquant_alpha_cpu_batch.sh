#!/usr/bin/env bash
# Session 30 (CPU, no GPU lent): how much DuQuant's smoothing strength alpha matters to the recipe
# (recipes/duquant-clip-search.yaml), SmolLM2, README's quickstart calibration (16 x 512); each run
# evaluated on 8 windows per corpus. Two runs at a time, one torch thread each.
#   OUT=/tmp/s30 ALPHAS="0.4 0.5 0.7 0.8" SEEDS="0 1" bash lab/duquant_alpha_cpu_batch.sh
set -eu
OUT=${OUT:-/tmp/s30}; mkdir -p "$OUT"
DQ=${DQ:-.venv/bin/dartquant}
MODEL=${MODEL:-smollm2-135m}; TAG=${TAG:-sm}
common="--calib-samples 16 --calib-seqlen 512 --eval-max-windows 8 --skip-fp-eval --overwrite"
run() {  # NAME SEED ARGS...
  name=$1; seed=$2; shift 2
  [ -f "$OUT/$name/metrics.json" ] || OMP_NUM_THREADS=1 $DQ quantize --model $MODEL --recipe recipes/duquant-clip-search.yaml \
    --seed $seed $common "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1
}
jobs=()
for s in ${SEEDS:-0 1}; do for a in ${ALPHAS:-0.4 0.5 0.7 0.8}; do jobs+=("${TAG}_a${a}_$s $s --duq-alpha $a"); done; done
i=0
for j in "${jobs[@]}"; do
  run $j &
  i=$((i+1)); if [ $((i % ${PAR:-2})) -eq 0 ]; then wait; fi
done
wait
echo DONE > "$OUT/DONE"
