#!/usr/bin/env bash
# Issue 17, queued in session 30 (RESULTS §31c): the DuQuant recipe with its online block rotations tuned
# block by block on the block's quantized output error (lab/duquant_block_tune.py), against the recipe
# on the same rotations untuned, full protocol (32 x 2048 calibration, full held-out wiki / c4), both
# models, seeds 0-2. Needs the packs and .whl staged (docs/DEVELOPERS.md §1), device_env.sh sourced:
#   RES=/tmp/res bash lab/device/jobs/session30_block_tune.sh &
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
common="--calib-samples 32 --calib-seqlen 2048 --skip-fp-eval --device cuda --overwrite"
one() {  # MODEL TAG SEED
  m=$1 t=$2 s=$3 base=/tmp/bt/$2_recipe_$3
  python3 -m dartquant.cli quantize --model $m --recipe recipes/duquant-clip-search.yaml --seed $s $common \
    --out $base > "$RES/bt_${t}_recipe_$s.log" 2>&1
  python3 lab/duquant_block_tune.py --model $m --rotations $base/rotations.safetensors --seed $s \
    --calib-samples 32 --calib-seqlen 2048 --device cuda --out /tmp/bt/${t}_tuned_$s.safetensors \
    --json "$RES/bt_${t}_tune_$s.json" > "$RES/bt_${t}_tune_$s.log" 2>&1
  python3 -m dartquant.cli quantize --model $m --recipe recipes/duquant-clip-search.yaml --seed $s $common \
    --rotations /tmp/bt/${t}_tuned_$s.safetensors --out /tmp/bt/${t}_tuned_run_$s > "$RES/bt_${t}_tuned_$s.log" 2>&1
  cp $base/metrics.json "$RES/bt_${t}_recipe_$s.metrics.json"
  cp /tmp/bt/${t}_tuned_run_$s/metrics.json "$RES/bt_${t}_tuned_$s.metrics.json"
}
mkdir -p /tmp/bt
for s in 0 1 2; do one smollm2-135m sm $s & one qwen2.5-coder-0.5b qw $s & done
wait
grep -h "W4A4KV4 " "$RES"/bt_*_{recipe,tuned}_?.log
