#!/usr/bin/env bash
# Issue 15's whole-job table, the rows still missing after session 14 (RESULTS §16). Stage the 2-part
# SmolLM2 pack (its tokenizer cuts the random models'), then
#   cp .parts/a.tar.001 /tmp/dqstage/ && SCALE_SCRIPT=session15_scale.sh bash lab/device/device_launch.sh jobs-scale
# and poll back to back. The Llama-3-8B DartQuant job runs alone on the GPU (its times are clean); then
# two lanes share it: the 70B at 8 layers (memory is per process and stays exact; its times are shared)
# beside the 8B QuaRot / RTN rows, then SpinQuant's 7B whole job at 20 of 100 steps.
# Disk: 8B 16 + 5.6 GB, 70B L8 14.7 + 4.5 GB, 7B 13.5 + 3.8 GB (the 70B folder is removed first).
set -u
RES=${RES:-/tmp/res}
B="python3 benchmarks/whole_job.py --device cuda"
W="--skip-fp-eval -- --eval-corpora wiki"
$B --dir /tmp/wj8 --out "$RES/whole_job_8b_h200.json" --shapes llama3-8b --methods dartquant --stream true $W \
  > "$RES/wj_8b.md" 2> "$RES/wj_8b.log"
touch "$RES/DONE-wj8b"
( $B --dir /tmp/wj70 --out "$RES/whole_job_70b_h200.json" --shapes llama2-70b --layers 8 --stream true \
    --methods dartquant --eval-max-windows 40 --clean $W > "$RES/wj_70b.md" 2> "$RES/wj_70b.log"
  touch "$RES/DONE-wj70b"
  $B --dir /tmp/wj7 --out "$RES/whole_job_7b_spin_h200.json" --shapes llama2-7b --methods spinquant --stream false \
    --clean --skip-fp-eval -- --eval-corpora wiki --e2e-steps 20 > "$RES/wj_7b_spin.md" 2> "$RES/wj_7b_spin.log"
  touch "$RES/DONE-wj7b-spin" ) &
$B --dir /tmp/wj8 --out "$RES/whole_job_8b_b_h200.json" --shapes llama3-8b --methods quarot rtn --stream true $W \
  > "$RES/wj_8b_b.md" 2> "$RES/wj_8b_b.log"
rm -rf /tmp/wj8
touch "$RES/DONE-wj8b-b"
wait
