#!/usr/bin/env bash
# Issue 15's whole-job rows at 8B / 7B beside session12_scale.sh (lane 2 of `device_batch.sh session12`):
# they start once kernel run 8 has had the GPU alone, and share it with the 70B job and the small
# quality jobs, so their times are upper bounds (the 7B DartQuant job alone: RESULTS §13).
set -u
RES=${RES:-/tmp/res}
B="python3 benchmarks/whole_job.py --device cuda --stream true"
W="--skip-fp-eval -- --eval-corpora wiki"
for _ in $(seq 72); do [ -f "$RES/DONE-kern-run8" ] && break; sleep 5; done
$B --dir /tmp/wj8 --out "$RES/whole_job_h200.json" --shapes llama3-8b --methods dartquant --clean $W \
  > "$RES/wj_8b.md" 2> "$RES/wj_8b.log"
touch "$RES/DONE-wj8b"
$B --dir /tmp/wj --out "$RES/whole_job_h200.json" --shapes llama2-7b --methods quarot rtn --clean $W \
  > "$RES/wj_7b_b.md" 2> "$RES/wj_7b_b.log"
touch "$RES/DONE-wj7b-b"
