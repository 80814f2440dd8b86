#!/usr/bin/env bash
# Session 7's scale lane (lab/device/device_batch.sh session7), one job after the other, while the
# quality lanes share the GPU: times are upper bounds, memory peaks are each process's own.
# Disk: one model folder at a time (--clean), 7B 13.5 + 3.8 GB, 70B 4 + 8 layers 27 GB.
set -u
RES=${RES:-/tmp/res}
B="python3 benchmarks/whole_job.py --device cuda --dir /tmp/wj --out $RES/whole_job_h200.json"
$B --shapes llama2-7b --methods dartquant quarot --stream true --clean > "$RES/wj_7b.md" 2> "$RES/wj_7b.log"
touch "$RES/DONE-wj7b"
$B --shapes llama2-70b --layers 4 8 --methods dartquant --stream true --clean > "$RES/wj_70b.md" 2> "$RES/wj_70b.log"
touch "$RES/DONE-wj70b"
