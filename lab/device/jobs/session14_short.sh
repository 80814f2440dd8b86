#!/usr/bin/env bash
# Session 14's second lease (~12 min): SpinQuant's whole job at the SmolLM2 shape (20 of its 100 steps),
# then the Llama-3-8B DartQuant job with 40 evaluation windows.
set -u
RES=${RES:-/tmp/res}
B="python3 benchmarks/whole_job.py --device cuda"
$B --dir /tmp/wjs --out "$RES/whole_job_smollm2_spin_h200.json" --shapes smollm2-135m --methods spinquant --stream false \
  --clean --skip-fp-eval -- --eval-corpora wiki --e2e-steps 20 > "$RES/wj_smol_spin.md" 2> "$RES/wj_smol_spin.log"
touch "$RES/DONE-smol-spin"
$B --dir /tmp/wj8 --out "$RES/whole_job_8b_h200.json" --shapes llama3-8b --methods dartquant --stream true \
  --eval-max-windows 40 --clean --skip-fp-eval -- --eval-corpora wiki > "$RES/wj_8b.md" 2> "$RES/wj_8b.log"
touch "$RES/DONE-wj8b"
