#!/usr/bin/env bash
# Session 29 (CPU, no GPU lent): kv_sink_tokens / a_sink_tokens paired on the same run folders, 3 seeds,
# both bundled models, QuaRot + GPTQ at README's quickstart calibration (16 x 512), and the DuQuant recipe
# on SmolLM2; FP on the same windows. Results: $OUT/*.json (lab/prefix_tokens_probe.py --sinks).
# A run folder that has its metrics.json already is kept (a batch started again resumes).
#   OUT=/tmp/s29 bash lab/kv_sink_cpu_batch.sh
set -eu
OUT=${OUT:-/tmp/s29}; mkdir -p "$OUT"
export PYTHONPATH="$PWD/src"
PY=${PY:-.venv/bin/python}
DQ=${DQ:-.venv/bin/dartquant}
common="--calib-samples 16 --calib-seqlen 512 --eval-max-windows 1 --skip-fp-eval --overwrite"
run() {  # NAME ARGS...: one quantize run into $OUT/NAME unless it finished before
  name=$1; shift
  [ -f "$OUT/$name/metrics.json" ] || $DQ quantize "$@" --seed "${name##*_}" $common --out "$OUT/$name" > "$OUT/$name.log" 2>&1
}
for s in 0 1 2; do run sm_quarot_$s --model smollm2-135m --method quarot; done
for s in 0 1 2; do run sm_recipe_$s --model smollm2-135m --recipe recipes/duquant-clip-search.yaml; done
probe() {  # JSON RUNS... ARGS: the paired sink evaluations, unless JSON holds them already
  json=$1; shift
  [ -f "$OUT/$json.done" ] || { $PY lab/prefix_tokens_probe.py "$@" --sinks --prefix 1 --json "$OUT/$json" && touch "$OUT/$json.done"; }
}
probe sink_sm_quarot.json "$OUT"/sm_quarot_{0,1,2} --windows 8
probe sink_sm_recipe.json "$OUT"/sm_recipe_{0,1,2} --windows 8
$DQ eval smollm2-135m --max-windows 8 --json > "$OUT/fp_sm_8.json" 2> "$OUT/fp_sm_8.log"
[ -f "$OUT/qw_quarot_0/metrics.json" ] || { [ -d "$OUT/qw_quarot" ] && mv "$OUT/qw_quarot" "$OUT/qw_quarot_0"; }
for s in 0 1 2; do run qw_quarot_$s --model qwen2.5-coder-0.5b --method quarot; done
probe sink_qw_quarot.json "$OUT"/qw_quarot_{0,1,2} --windows 4
$DQ eval qwen2.5-coder-0.5b --max-windows 4 --json > "$OUT/fp_qw_4.json" 2> "$OUT/fp_qw_4.log"
echo DONE > "$OUT/DONE"
