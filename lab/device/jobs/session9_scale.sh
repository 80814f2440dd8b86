#!/usr/bin/env bash
# Issue 16's kernel run 6, then the whole job at scale with nothing else on the GPU (issue 15; session 8 showed that sharing hides
# it, RESULTS §10). Stage only a 2-part SmolLM2 pack (its tokenizer cuts the random models'), then
#   cp .parts/a.tar.001 /tmp/dqstage/ && bash lab/device/device_launch.sh jobs-scale
# In order of what the targets need: the 7B DartQuant job (<= 10 min, 16 GB host, 24 GiB GPU), the
# 70B at 4 and 8 layers (memory flat in depth, time extrapolated), QuaRot and RTN at 7B, Llama-3-8B.
# Disk: 7B 13.5 + 3.8 GB, then 70B L4 / L8 7.9 / 14.7 + 4.5 GB (one folder at a time, --clean).
set -u
RES=${RES:-/tmp/res}
# issue 16 first (short, and the GPU must be quiet for it): run 6 of the kernels (prefill operand
# variants per linear), then the model's prefill with each GEMM activation operand (in memory)
# first, 40 s: the shipped overlapped block pass (staging ring) against synchronous copies at a 7B block
python3 lab/stream_overlap_check.py --shape llama2-7b --windows 24 --out "$RES/stream_overlap_h200.json" \
  > "$RES/overlap.md" 2> "$RES/overlap.log"
touch "$RES/DONE-overlap"
# kernel run 7 (~5 min): run 6's operand variants plus "int8s" (the unpacked weight as the dot's
# register operand) at prefill and decode; KERNELS=0 skips it. (Run 6 and the prefill operands end
# to end were measured in session 9, docs/KERNELS.md 2b; E2E_OPERANDS=1 repeats the latter.)
if [ "${KERNELS:-1}" = 1 ]; then
  python3 benchmarks/kernel_bench.py --variants --out "$RES/kernels_h200_run7.json" > "$RES/kern_run7.md" 2> "$RES/kern_run7.log"
  touch "$RES/DONE-kern7"
fi
# the 7B-shape model end to end with every linear on int8s as well (prefill, decode b1/8/64; ~3 min)
if [ "${E2E_INT8S:-1}" = 1 ]; then
  python3 benchmarks/kernels_e2e.py --out "$RES/kernels_e2e_int8s_h200.json" --gemm-backends int8s \
    > "$RES/kern_e2e_int8s.md" 2> "$RES/kern_e2e_int8s.log"
  touch "$RES/DONE-kern-e2e-int8s"
fi
if [ "${E2E_OPERANDS:-0}" = 1 ]; then
  python3 benchmarks/kernels_e2e.py --out "$RES/kernels_e2e_operands_h200.json" --batch 1 \
    --prefill-operands packed int8 fp8 > "$RES/kern_e2e.md" 2> "$RES/kern_e2e.log"
  touch "$RES/DONE-kern-e2e"
fi
B="python3 benchmarks/whole_job.py --device cuda --stream true"
$B --dir /tmp/wj --out "$RES/whole_job_h200.json" --shapes llama2-7b --methods dartquant \
  > "$RES/wj_7b.md" 2> "$RES/wj_7b.log"
touch "$RES/DONE-wj7b"
$B --dir /tmp/wj70 --out "$RES/whole_job_70b_h200.json" --shapes llama2-70b --layers 4 8 --methods dartquant \
  --eval-max-windows 40 --clean > "$RES/wj_70b.md" 2> "$RES/wj_70b.log"
touch "$RES/DONE-wj70b"
$B --dir /tmp/wj --out "$RES/whole_job_h200.json" --shapes llama2-7b --methods quarot rtn --clean \
  > "$RES/wj_7b_b.md" 2> "$RES/wj_7b_b.log"
touch "$RES/DONE-wj7b-b"
$B --dir /tmp/wj8 --out "$RES/whole_job_h200.json" --shapes llama3-8b --methods dartquant --clean \
  > "$RES/wj_8b.md" 2> "$RES/wj_8b.log"
touch "$RES/DONE-wj8b"
