#!/usr/bin/env bash
# Issue 17 (sessions 30-31): the block-tune job, made to fit one lease. Per model and seed, two
# lanes at once:
#   base:  the recipe at the full protocol (32 x 2048 calibration, full held-out wiki / c4);
#   tuned: a 16-bit run of the same recipe, only for its rotations (identical to the recipe's: checked
#          on the CPU, and again here by hash), lab/duquant_block_tune.py on them, then the recipe on
#          the tuned rotations.
# MODELS picks the models ("qwen2.5-coder-0.5b:qw smollm2-135m:sm"), SEEDS the seeds. With device_env.sh
# sourced and the packs staged: SCALE_SCRIPT=session31_block_tune.sh MODELS=... bash lab/device/device_launch.sh jobs-scale
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES" /tmp/bt
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=2
MODELS=${MODELS:-"qwen2.5-coder-0.5b:qw smollm2-135m:sm"}
SEEDS=${SEEDS:-"0 1 2"}
STEPS=${STEPS:-200}  # Adam steps per block (the H200 took ~117 s a Qwen layer at 200 with three fits sharing it)
BASE=${BASE:-1}      # 0: only the tuned lanes (the base runs are done)
common="--calib-samples 32 --calib-seqlen 2048 --skip-fp-eval --device cuda --overwrite"
recipe="--recipe recipes/duquant-clip-search.yaml"
base() {  # MODEL TAG SEED
  python3 -m dartquant.cli quantize --model $1 $recipe --seed $3 $common --out /tmp/bt/$2_recipe_$3 \
    > "$RES/bt_$2_recipe_$3.log" 2>&1
  cp /tmp/bt/$2_recipe_$3/metrics.json "$RES/bt_$2_recipe_$3.metrics.json"
}
tuned() {  # MODEL TAG SEED
  m=$1 t=$2 s=$3
  [ -f /tmp/bt/${t}_rot_$s/rotations.safetensors ] || python3 -m dartquant.cli quantize --model $m $recipe --seed $s $common \
    --w-bits 16 --a-bits 16 --kv-bits 16 --w-quantizer rtn --a-clip-search false --eval-max-windows 1 \
    --out /tmp/bt/${t}_rot_$s > "$RES/bt_${t}_rot_$s.log" 2>&1
  t0=$(date +%s)
  python3 lab/duquant_block_tune.py --model $m --rotations /tmp/bt/${t}_rot_$s/rotations.safetensors --seed $s \
    --calib-samples 32 --calib-seqlen 2048 --device cuda --steps $STEPS --out /tmp/bt/${t}_tuned_$s.safetensors \
    --json "$RES/bt_${t}_tune_$s.json" > "$RES/bt_${t}_tune_$s.log" 2>&1
  echo "tune wall s: $(( $(date +%s) - t0 ))" >> "$RES/bt_${t}_tune_$s.log"
  python3 -m dartquant.cli quantize --model $m $recipe --seed $s $common --rotations /tmp/bt/${t}_tuned_$s.safetensors \
    --out /tmp/bt/${t}_tuned_run_$s > "$RES/bt_${t}_tuned_$s.log" 2>&1
  cp /tmp/bt/${t}_tuned_run_$s/metrics.json "$RES/bt_${t}_tuned_$s.metrics.json"
}
for s in $SEEDS; do
  for mt in $MODELS; do
    m=${mt%%:*} t=${mt##*:}
    tuned $m $t $s &
    [ "$BASE" = 0 ] || base $m $t $s &
  done
done
wait
sha256sum /tmp/bt/*_{rot,recipe}_?/rotations.safetensors > "$RES/bt_rot_hashes_$(echo $MODELS | tr -c 'a-z0-9\n' _).log"  # .log: device_poll.sh brings it back
grep -h "W4A4KV4 " "$RES"/bt_*_{recipe,tuned}_?.log
touch "$RES/DONE-bt-$(echo $MODELS | cut -c1-4)"
