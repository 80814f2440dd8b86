#!/usr/bin/env bash
# Issue 16, session 20, run 26: `dartquant bench` on a quantized Llama-2-7B-shape run folder (random
# weights) with the split activation kernel at decode: write the float16 folder, quantize it
# (quarot / rtn, streamed), bench it (default operands). Direct call, carry [".kb_data"] (the corpora the
# quantize step evaluates on: `kernels_e2e.py --write-data-cache .kb_data`, git-ignored):
#   RES=$OUT bash lab/device/jobs/session20_bench7b.sh
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
rm -rf /tmp/kbdata && cp -r .kb_data /tmp/kbdata
export DARTQUANT_CACHE=/tmp/kbdata DARTQUANT_NO_INSTALL=1 PYTHONUNBUFFERED=1
python3 benchmarks/kernels_e2e.py --run-shape llama2-7b --dir /tmp/kb --out "$RES/kernels_bench_run_h200.json" \
  > "$RES/bench26.md" 2> "$RES/bench26.log"
tail -n 30 "$RES/bench26.md"; tail -n 5 "$RES/bench26.log"
