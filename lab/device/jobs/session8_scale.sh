#!/usr/bin/env bash
# Session 8's scale lane (lab/device/device_batch.sh session8-scale), in order of what issue 15 needs most:
# DartQuant's capture while the GPU is still quiet (the SpinQuant lane starts ~2 min later, once the
# 1.5B is carried), then the whole job at the Llama-2-7B shape (the <= 10 min / 16 GB / 24 GiB target;
# the SpinQuant lane shares the GPU from then on: times are upper bounds, memory peaks are the
# process's own), and beside it Mixtral-8x7B at 2 and 4 layers (issue 18) then Llama-2-70B at 4 and 8
# layers; QuaRot and RTN at 7B last. Disk: <= 13.5 + 3.8 (7B) + 14.7 + 4.5 (70B L8) GB at once.
set -u
RES=${RES:-/tmp/res}
python3 benchmarks/capture_speed.py --model smollm2-135m --device cuda --samples 128 --modes batch1 fast \
  --out "$RES/capture_speed_quiet_h200.json" > "$RES/capture.md" 2> "$RES/capture.log"
touch "$RES/DONE-capture"
B="python3 benchmarks/whole_job.py --device cuda --stream true"
# two sub-lanes at once (a slow 7B job must not starve the others of the lease): the 7B jobs, and
# Mixtral-8x7B then Llama-2-70B (different --dir: each lane cleans only its own folders)
(# issue 15's target job: Llama-2-7B shape, DartQuant + GPTQ, 128 x 2048 calibration, full held-out wiki and c4
 $B --dir /tmp/wj --out "$RES/whole_job_h200.json" --shapes llama2-7b --methods dartquant > "$RES/wj_7b.md" 2> "$RES/wj_7b.log"
 touch "$RES/DONE-wj7b"
 $B --dir /tmp/wj --out "$RES/whole_job_h200_b.json" --shapes llama2-7b --methods quarot rtn --clean \
   > "$RES/wj_7b_b.md" 2> "$RES/wj_7b_b.log"
 touch "$RES/DONE-wj7b-b") &
$B --dir /tmp/wj_moe --out "$RES/whole_job_moe_h200.json" --shapes mixtral-8x7b --layers 2 4 --methods dartquant \
  --eval-max-windows 40 --clean > "$RES/wj_moe.md" 2> "$RES/wj_moe.log"
touch "$RES/DONE-wjmoe"
$B --dir /tmp/wj70 --out "$RES/whole_job_70b_h200.json" --shapes llama2-70b --layers 4 8 --methods dartquant \
  --eval-max-windows 40 --clean > "$RES/wj_70b.md" 2> "$RES/wj_70b.log"
touch "$RES/DONE-wj70b"
wait
