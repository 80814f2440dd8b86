#!/usr/bin/env bash
# Issue 18's MoE cost: Mixtral-8x7B shape (random fp16 weights, per-expert files), streamed, at 2 and 4
# layers (memory flat in depth, time extrapolated to 32: the JSON's full_depth), quarot then dartquant,
# calibration 128 x 2048, evaluation cut to 40 windows per corpus. Shares the GPU with other lanes:
# times are upper bounds, memory peaks are the process's own. Disk: one folder at a time (--clean):
# L2 6.3 GB, then L4 12.1 GB, plus one run folder (<= 3.4 GB): 16 GB at most.
set -u
RES=${RES:-/tmp/res}
python3 benchmarks/whole_job.py --device cuda --dir /tmp/wj_moe --out "$RES/whole_job_moe_h200.json" \
  --shapes mixtral-8x7b --layers 2 4 --methods dartquant quarot --stream true --eval-max-windows 40 --clean \
  > "$RES/wj_moe.md" 2> "$RES/wj_moe.log"
touch "$RES/DONE-wjmoe"
