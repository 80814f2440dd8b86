#!/usr/bin/env bash
# Session 7's scale lane (lab/device/device_batch.sh session7), one job after the other, while the
# quality lanes share the GPU: times are upper bounds, memory peaks are each process's own.
# Disk: one model folder at a time (--clean): 7B 13.5 + 3.8 GB, 70B 4 / 8 layers 7.9 / 14.7 GB,
# Mixtral-8x7B 2 / 4 layers 6.3 / 12.1 GB (+ one run folder each).
set -u
RES=${RES:-/tmp/res}
# DartQuant's capture alone on SmolLM2 (issue 15 target: <= 10 s on the H200), legacy vs batched
python3 benchmarks/capture_speed.py --model smollm2-135m --device cuda --samples 128 \
  --out "$RES/capture_speed_h200.json" > "$RES/capture.md" 2> "$RES/capture.log"
B="python3 benchmarks/whole_job.py --device cuda --stream true"
# issue 15's target job: Llama-2-7B shape, DartQuant + GPTQ, 128 x 2048 calibration, full held-out wiki
$B --dir /tmp/wj --out "$RES/whole_job_h200.json" --shapes llama2-7b --methods dartquant --clean \
  > "$RES/wj_7b.md" 2> "$RES/wj_7b.log"
touch "$RES/DONE-wj7b"
# Llama-2-70B shape at 4 and 8 layers: memory flat in depth, time extrapolated to 80
$B --dir /tmp/wj --out "$RES/whole_job_h200.json" --shapes llama2-70b --layers 4 8 --methods dartquant \
  --eval-max-windows 40 --clean > "$RES/wj_70b.md" 2> "$RES/wj_70b.log"
touch "$RES/DONE-wj70b"
# issue 18: Mixtral-8x7B shape, streamed, 2 and 4 layers (lab/device/jobs/session7_moe.sh)
bash lab/device/jobs/session7_moe.sh
