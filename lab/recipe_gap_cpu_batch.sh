#!/usr/bin/env bash
# Session 30 (CPU): where the DuQuant recipe's remaining W4A4KV4 gap sits (RESULTS §14c did it for
# QuaRot on the H200). Each part alone on the rotations of a finished recipe run (--rotations: the
# same smoothing and block rotations), README's quickstart calibration (16 x 512):
#   W4 only   GPTQ as the recipe (act-order, true-sequential), activations and K/V 16-bit
#   A4 only   the recipe's activation quantizers (clip search on), weights and K/V 16-bit
#   KV4 only  weights and activations 16-bit
# Usage: OUT=/tmp/s30 MODEL=smollm2-135m TAG=sm WINDOWS=8 SEEDS="0 1 2" RECIPE_RUNS=/tmp/s29/sm_recipe \
#        bash lab/recipe_gap_cpu_batch.sh       (RECIPE_RUNS_$seed/rotations.safetensors must exist)
# QuaRot's parts on the same protocol: METHOD_ARGS="--method quarot" TAG=sm_quarot RECIPE_RUNS=/tmp/s29/sm_quarot
set -eu
OUT=${OUT:-/tmp/s30}; mkdir -p "$OUT"
DQ=${DQ:-.venv/bin/dartquant}
common="--calib-samples 16 --calib-seqlen 512 --eval-max-windows ${WINDOWS:-8} --skip-fp-eval --overwrite"
for s in ${SEEDS:-0}; do
  rot=${RECIPE_RUNS}_$s/rotations.safetensors
  for part in w4 a4 kv4; do
    case $part in
      w4) args="--a-bits 16 --kv-bits 16 --a-clip-search false" ;;
      a4) args="--w-bits 16 --kv-bits 16" ;;
      kv4) args="--w-bits 16 --a-bits 16 --a-clip-search false" ;;
    esac
    name=${TAG}_gap_${part}_$s
    [ -f "$OUT/$name/metrics.json" ] || $DQ quantize --model "$MODEL" ${METHOD_ARGS:---recipe recipes/duquant-clip-search.yaml} \
      --rotations "$rot" --seed $s $common $args --out "$OUT/$name" > "$OUT/$name.log" 2>&1 || echo "FAILED $name"
  done
done
