#!/usr/bin/env bash
# Issue 15 / 16 GPU rows after session 11 (RESULTS §13): the 7B target job is met (514 s, 13.4 GB,
# 12.4 GiB); 70B at 4 / 8 layers was flat in memory but peaked at 48 GiB in GPTQ's float64
# factorization, since replaced on CUDA by the lean one (two Hessian copies). Stage the 2-part
# SmolLM2 pack (its tokenizer cuts the random models'), then
#   cp .parts/a.tar.001 /tmp/dqstage/ && bash lab/device/device_launch.sh session12
# (lane 1; lane 2 is session12_rows.sh, and session12-quality runs after the Qwen pack)
# Disk: 70B L4 / L8 7.9 / 14.7 + 4.5 GB (one folder at a time, --clean), 7B 13.5 + 3.8 GB.
set -u
RES=${RES:-/tmp/res}
B="python3 benchmarks/whole_job.py --device cuda --stream true"
W="--skip-fp-eval -- --eval-corpora wiki"
# kernel run 8 (~3-5 min): decode GEMMs at 1 and 4 tokens, the dp4a GEMV against run 3's gemv / int8 (issue 16)
python3 benchmarks/kernel_bench.py --decode-only --decode-m 1 4 --skip act --out "$RES/kernels_h200_run8.json" \
  > "$RES/kern_run8.md" 2> "$RES/kern_run8.log"
touch "$RES/DONE-kern-run8"
# ~1-2 min: the two factorizations per 70B input width: seconds, added GPU memory, codes agreeing
python3 benchmarks/gptq_speed.py --shape llama2-70b --device cuda --factorizations reference lean \
  --out "$RES/gptq_memory_h200.json" > "$RES/gptq_memory.md" 2> "$RES/gptq_memory.log"
touch "$RES/DONE-gptq-memory"
# the 70B target (GPU <= 24 GiB, host <= 32 GB, both flat in depth); rows now carry every stage's peak rise
$B --dir /tmp/wj70 --out "$RES/whole_job_70b_h200.json" --shapes llama2-70b --layers 4 8 --methods dartquant \
  --eval-max-windows 40 --clean $W > "$RES/wj_70b.md" 2> "$RES/wj_70b.log"
touch "$RES/DONE-wj70b"
# the 7B-shape model end to end on run 7's defaults (int8s from 9 tokens: prefill, decode at 1 / 8 / 64), and prefill on int8 (issue 16; ~3 min)
python3 benchmarks/kernels_e2e.py --out "$RES/kernels_e2e_int8s_h200.json" \
  --prefill-operands int8 int8s > "$RES/kern_e2e_int8s.md" 2> "$RES/kern_e2e_int8s.log"
touch "$RES/DONE-kern-e2e-int8s"
# the 7B job computing in the model's own dtype (float16; session 11 reached layer 11 at 4.6 s / layer)
$B --dir /tmp/wjf --out "$RES/whole_job_h200_fp16.json" --shapes llama2-7b --methods dartquant $W --dtype float16 \
  > "$RES/wj_7b_fp16.md" 2> "$RES/wj_7b_fp16.log"
touch "$RES/DONE-wj7b-fp16"
