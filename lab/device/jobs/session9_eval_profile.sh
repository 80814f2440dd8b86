#!/usr/bin/env bash
# Where the streamed evaluation spends its time (session 9: 84 s for the held-out wiki at 7B L8):
# cProfile of an RTN run on the 7B L16 folder, 20 windows, no FP eval. Stops the depth batch first.
RES=${RES:-/tmp/res}
for p in $(pgrep -f "whole_job.py|session9_7b_depths|dartquant.cli"); do [ "$p" != "$$" ] && kill "$p"; done
sleep 3
cd /tmp/work && export PYTHONPATH=/tmp/work/src:/tmp/site DARTQUANT_CACHE=/tmp/dqcache DARTQUANT_NO_INSTALL=1 HF_HUB_OFFLINE=1
setsid nohup python3 -m cProfile -o "$RES/eval_prof.out" -m dartquant.cli quantize --model /tmp/wj/llama2-7b-L16 \
  --method quarot --w-quantizer rtn --calib-samples 8 --eval-max-windows 20 --skip-fp-eval --device cuda --stream true \
  --fail-on-collapse false --out /tmp/prof_run --overwrite --json > "$RES/eval_prof.log" 2>&1 < /dev/null &
echo launched
