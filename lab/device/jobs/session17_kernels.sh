#!/usr/bin/env bash
# Issue 16, kernel run 10: the blocks activation kernel (act_quant._hadamard_quant_blocks_kernel: the
# left Hadamard factor as one GEMM over T tokens, split into power-of-two blocks). GPU alone, no pack:
#   SCALE_SCRIPT=session17_kernels.sh bash lab/device/device_launch.sh jobs-scale && bash lab/device/device_poll.sh 40
# 1. every activation variant at the widths of the supported models (codes checked against torch, timed);
# 2. the Llama-2-7B-shape model in memory, prefill 2048 on scaled_mm, again with several blocks configs.
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
python3 benchmarks/kernel_bench.py --skip gemm --act-widths 1536,4096,4864,8192,8960,11008,14336,16384,28672 \
  --out "$RES/kernels_h200_run10.json" > "$RES/run10.md" 2> "$RES/run10.log"
tail -n 16 "$RES/run10.md"
touch "$RES/DONE-act"
python3 benchmarks/kernels_e2e.py --batch 1 --prefill-operands scaled_mm \
  --act-configs 1,1,8 2,1,8 2,1,4 4,1,8 1,4,4 2,4,8 --out "$RES/kernels_e2e_act_h200.json" \
  > "$RES/e2e10.md" 2> "$RES/e2e10.log"
tail -n 12 "$RES/e2e10.md"
