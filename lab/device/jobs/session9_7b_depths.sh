#!/usr/bin/env bash
# Session 9's second machine (the first was lost with the 7B job running, a gap between polls):
# the Llama-2-7B whole job at 8 and 16 layers (memory flat in depth, time extrapolated to 32 as
# whole_job.py's full_depth does), streamed DartQuant + GPTQ, 128 x 2048, full held-out wiki.
set -u
RES=${RES:-/tmp/res}
python3 benchmarks/whole_job.py --device cuda --stream true --dir /tmp/wj --out "$RES/whole_job_7b_depths_h200.json" \
  --shapes llama2-7b --layers 8 16 --methods dartquant --clean > "$RES/wj_7b_depths.md" 2> "$RES/wj_7b_depths.log"
touch "$RES/DONE-wj7b-depths"
