#!/usr/bin/env bash
# Issue 16, session 19, run 19: `dartquant bench` on a quantized Llama-2-7B-shape run folder (random
# weights): write the float16 folder, quantize it (quarot / rtn, streamed), bench it twice (the default
# int8s prefill operand, then scaled_mm). The corpora the quantize step evaluates on travel as .kb_data
# (`kernels_e2e.py --write-data-cache .kb_data`, git-ignored, carried):
#   cp -r .kb_data /tmp/kbdata && SCALE_SCRIPT=session19_bench7b.sh bash lab/device/device_launch.sh jobs-scale
#   bash lab/device/device_poll.sh 240
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
export DARTQUANT_CACHE=/tmp/kbdata DARTQUANT_NO_INSTALL=1 PYTHONUNBUFFERED=1
python3 benchmarks/kernels_e2e.py --run-shape llama2-7b --dir /tmp/kb --out "$RES/kernels_bench_run_h200.json" \
  > "$RES/bench19.md" 2> "$RES/bench19.log"
touch "$RES/DONE-bench-int8s"
python3 -m dartquant.cli bench /tmp/kb/run-llama2-7b-quarot-rtn --prefill-operand scaled_mm \
  --json "$RES/kernels_bench_run_scaled_mm_h200.json" > "$RES/bench19_sm.md" 2> "$RES/bench19_sm.log"
touch "$RES/DONE-bench-scaled_mm"
