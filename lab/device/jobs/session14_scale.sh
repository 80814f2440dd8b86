#!/usr/bin/env bash
# Issue 15's whole-job table, the rows still missing after session 13 (RESULTS §15): one lane alone on
# the GPU, most important first. Stage the 2-part SmolLM2 pack (its tokenizer cuts the random models'), then
#   cp .parts/a.tar.001 /tmp/dqstage/ && SCALE_SCRIPT=session14_scale.sh bash lab/device/device_launch.sh jobs-scale
# and poll back to back. Disk: SmolLM2 0.3 + 0.2 GB, 8B 16 + 5.6 GB, 7B 13.5 + 3.8 GB, 70B L8 14.7 + 4.5 GB,
# one folder at a time (--clean).
set -u
RES=${RES:-/tmp/res}
B="python3 benchmarks/whole_job.py --device cuda"
W="--skip-fp-eval -- --eval-corpora wiki"
# Llama-3-8B shape: the DartQuant + GPTQ whole job, streamed (128 x 2048 calibration, full held-out wiki)
$B --dir /tmp/wj8 --out "$RES/whole_job_8b_h200.json" --shapes llama3-8b --methods dartquant --stream true $W \
  > "$RES/wj_8b.md" 2> "$RES/wj_8b.log"
touch "$RES/DONE-wj8b"
# Llama-2-7B shape: SpinQuant's whole job (in memory: it trains through the whole model) at 20 of its 100
# steps; its calibration stage scales with the steps (RESULTS §6b: 100 steps 704 s)
$B --dir /tmp/wj7 --out "$RES/whole_job_7b_spin_h200.json" --shapes llama2-7b --methods spinquant --stream false \
  --clean --skip-fp-eval -- --eval-corpora wiki --e2e-steps 20 > "$RES/wj_7b_spin.md" 2> "$RES/wj_7b_spin.log"
touch "$RES/DONE-wj7b-spin"
# Llama-3-8B: QuaRot and RTN (the folder written above is reused), then removed
$B --dir /tmp/wj8 --out "$RES/whole_job_8b_h200.json" --shapes llama3-8b --methods quarot rtn --stream true $W \
  > "$RES/wj_8b_b.md" 2> "$RES/wj_8b_b.log"
rm -rf /tmp/wj8
touch "$RES/DONE-wj8b-b"
# Llama-2-70B at 8 layers with the one-copy factorization (2 and 4 layers in session 13)
$B --dir /tmp/wj70 --out "$RES/whole_job_70b_h200.json" --shapes llama2-70b --layers 8 --stream true --methods dartquant \
  --eval-max-windows 40 --clean $W > "$RES/wj_70b.md" 2> "$RES/wj_70b.log"
touch "$RES/DONE-wj70b"
# (measured in session 14, RESULTS §16: last)
# SmolLM2 shape: every method, the full held-out wiki (SpinQuant in memory at its default 100 steps)
$B --dir /tmp/wjs --out "$RES/whole_job_smollm2_h200.json" --shapes smollm2-135m \
  --methods rtn quarot dartquant spinquant --stream true false --clean $W > "$RES/wj_smol.md" 2> "$RES/wj_smol.log"
touch "$RES/DONE-wj-smol"
