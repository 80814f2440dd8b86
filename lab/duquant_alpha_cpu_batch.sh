#!/usr/bin/env bash
# Session 30 (CPU, no GPU lent): how much DuQuant's smoothing strength alpha matters to the recipe
# (recipes/duquant-clip-search.yaml), SmolLM2, README's quickstart calibration (16 x 512); each run
# evaluated on 8 windows per corpus. Two runs at a time, one torch thread each (recipe_variants_cpu_batch.sh).
#   OUT=/tmp/s30 ALPHAS="0.4 0.5 0.7 0.8" SEEDS="0 1" bash lab/duquant_alpha_cpu_batch.sh
set -eu
OUT=${OUT:-/tmp/s30}
variants=""
for s in ${SEEDS:-0 1}; do for a in ${ALPHAS:-0.4 0.5 0.7 0.8}; do
  variants+="${TAG:-sm}_a${a}_$s $s --duq-alpha $a"$'\n'
done; done
OUT=$OUT MODEL=${MODEL:-smollm2-135m} EVAL_WINDOWS=8 VARIANTS=$variants bash "$(dirname "$0")/recipe_variants_cpu_batch.sh"
echo DONE > "$OUT/DONE"
