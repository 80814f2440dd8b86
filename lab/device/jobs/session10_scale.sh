#!/usr/bin/env bash
# Session 10: issue 15's GPU targets first, alone on the GPU, then issue 16's int8s kernel.
# Stage the 2-part SmolLM2 pack (its tokenizer cuts the random models'), then
#   cp .parts/a.tar.001 /tmp/dqstage/ && bash lab/device/device_launch.sh jobs-scale
# The 7B job is the target's own: DartQuant + GPTQ, 128 x 2048 calibration, every held-out wiki
# window, no FP evaluation (the FP pass costs about what the quantized one does; RESULTS §11).
# Disk: 7B 13.5 + 3.8 GB, then 70B L4 / L8 7.9 / 14.7 + 4.5 GB (one folder at a time, --clean).
set -u
RES=${RES:-/tmp/res}
# 40 s: the shipped overlapped block pass (staging ring) against synchronous copies at a 7B block
python3 lab/stream_overlap_check.py --shape llama2-7b --windows 24 --out "$RES/stream_overlap_h200.json" \
  > "$RES/overlap.md" 2> "$RES/overlap.log"
touch "$RES/DONE-overlap"
# ~2 min: kernel run 7, only the shipped prefill operand (int8 A8), the planar-weight ceiling
# (int8 A8 W8) and int8s, at prefill and decode; KERNELS=0 skips it
if [ "${KERNELS:-1}" = 1 ]; then
  python3 benchmarks/kernel_bench.py --variants --variant-names "int8 A8" "int8 A8 W8" "int8s A8" \
    --out "$RES/kernels_h200_run7.json" > "$RES/kern_run7.md" 2> "$RES/kern_run7.log"
  touch "$RES/DONE-kern7"
fi
B="python3 benchmarks/whole_job.py --device cuda --stream true"
W="--skip-fp-eval -- --eval-corpora wiki"
$B --dir /tmp/wj --out "$RES/whole_job_h200.json" --shapes llama2-7b --methods dartquant $W \
  > "$RES/wj_7b.md" 2> "$RES/wj_7b.log"
touch "$RES/DONE-wj7b"
$B --dir /tmp/wj70 --out "$RES/whole_job_70b_h200.json" --shapes llama2-70b --layers 4 8 --methods dartquant \
  --eval-max-windows 40 --clean $W > "$RES/wj_70b.md" 2> "$RES/wj_70b.log"
touch "$RES/DONE-wj70b"
# the 7B-shape model end to end with every linear on int8s, only if int8s beat int8 A8 somewhere
if python3 - "$RES/kernels_h200_run7.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
rows = d["variants"]["rows"] + d["decode_variants"]["rows"]
won = [r for r in rows if r.get("int8s A8_ms") and r["int8s A8_ms"] < min(r.get(k, 1e9) for k in ("int8 A8_ms", "int8_ms", "gemv_ms"))]
print(f"int8s faster in {len(won)} of {len(rows)} rows")
sys.exit(0 if won else 1)
PY
then
  python3 benchmarks/kernels_e2e.py --out "$RES/kernels_e2e_int8s_h200.json" --gemm-backends int8s \
    > "$RES/kern_e2e_int8s.md" 2> "$RES/kern_e2e_int8s.log"
  touch "$RES/DONE-kern-e2e-int8s"
fi
$B --dir /tmp/wj --out "$RES/whole_job_h200.json" --shapes llama2-7b --methods quarot rtn --clean $W \
  > "$RES/wj_7b_b.md" 2> "$RES/wj_7b_b.log"
touch "$RES/DONE-wj7b-b"
$B --dir /tmp/wj8 --out "$RES/whole_job_h200.json" --shapes llama3-8b --methods dartquant --clean $W \
  > "$RES/wj_8b.md" 2> "$RES/wj_8b.log"
touch "$RES/DONE-wj8b"
