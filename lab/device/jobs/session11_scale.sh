#!/usr/bin/env bash
# Issue 15's GPU targets alone on the GPU, after session 10 (RESULTS §12): the staging-ring overlap and
# kernel run 7 are measured; the 7B job at 32 layers ran past 609 s before the lease ended, and GPTQ's
# column loop (a dozen launches per column) was found to be the largest cost. Stage the 2-part SmolLM2
# pack (its tokenizer cuts the random models'), then
#   cp .parts/a.tar.001 /tmp/dqstage/ && bash lab/device/device_launch.sh jobs-scale
# Disk: 7B 13.5 + 3.8 GB, then 70B L4 / L8 7.9 / 14.7 + 4.5 GB (one folder at a time, --clean).
set -u
RES=${RES:-/tmp/res}
# ~1-2 min: GPTQ's column loop, torch against the Triton kernel, per 7B linear (same bits checked)
python3 benchmarks/gptq_speed.py --shape llama2-7b --device cuda --out "$RES/gptq_speed_h200.json" \
  > "$RES/gptq_speed.md" 2> "$RES/gptq_speed.log"
touch "$RES/DONE-gptq"
B="python3 benchmarks/whole_job.py --device cuda --stream true"
# the target's job: DartQuant + GPTQ, 128 x 2048 calibration, every held-out wiki window, no FP evaluation
W="--skip-fp-eval -- --eval-corpora wiki"
$B --dir /tmp/wj --out "$RES/whole_job_h200.json" --shapes llama2-7b --methods dartquant $W \
  > "$RES/wj_7b.md" 2> "$RES/wj_7b.log"
touch "$RES/DONE-wj7b"
$B --dir /tmp/wj70 --out "$RES/whole_job_70b_h200.json" --shapes llama2-70b --layers 4 8 --methods dartquant \
  --eval-max-windows 40 --clean $W > "$RES/wj_70b.md" 2> "$RES/wj_70b.log"
touch "$RES/DONE-wj70b"
# the same job computing in the model's own dtype (float16: what GPTQ / QuaRot's reference code runs;
# the blocks' fp32 compute alone is ~323 s at 32 layers, RESULTS §12); its own JSON (rows are keyed
# by shape, depth, method and stream, so the fp32 row would be replaced)
$B --dir /tmp/wj --out "$RES/whole_job_h200_fp16.json" --shapes llama2-7b --methods dartquant $W --dtype float16 \
  > "$RES/wj_7b_fp16.md" 2> "$RES/wj_7b_fp16.log"
touch "$RES/DONE-wj7b-fp16"
$B --dir /tmp/wj --out "$RES/whole_job_h200.json" --shapes llama2-7b --methods quarot rtn --clean $W \
  > "$RES/wj_7b_b.md" 2> "$RES/wj_7b_b.log"
touch "$RES/DONE-wj7b-b"
$B --dir /tmp/wj8 --out "$RES/whole_job_h200.json" --shapes llama3-8b --methods dartquant --clean $W \
  > "$RES/wj_8b.md" 2> "$RES/wj_8b.log"
touch "$RES/DONE-wj8b"
