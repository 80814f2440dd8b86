#!/usr/bin/env bash
# Queued in session 37 (issue 16, GPU alone, ~5 minutes on an H100, ~9 on an H200). Direct call, no packs needed:
#   RES=$OUT bash lab/device/jobs/session37_kernels_next.sh
# (1) on an H200 only: session 35's butterfly lane (never run on an H200; sessions 35-36 ran it on H100s);
# (2) the 4-bit K/V decode attention's slots path against today's paths (docs/KERNELS.md 4f);
# (3) Nsight Compute, one launch each: the blocks activation kernel at 4096 / 11008 / 14336 / 28672 and the
#     quantize-only kernel (docs/KERNELS.md 1h asks what bounds them), the 4-bit decode attention at batch 8 / 64.
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
export PYTHONUNBUFFERED=1 PYTHONPATH=src:benchmarks
[ "$GPU" = h200 ] && RES=$RES bash lab/device/jobs/session35_kernels_next.sh
timeout 200 python3 lab/device/jobs/session37_kv4_slots.py "$RES/kv4_slots_${GPU}.json" 2>&1 | grep "^|\|wrote\|Error"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n1)
if [ -n "$NCU" ]; then
  PYTHONPATH=src timeout 240 "$NCU" --set full -k regex:"hadamard_quant|kv4_decode" -o "$RES/act_prof_${GPU}" \
    python3 lab/device/jobs/session37_act_profile.py 2>&1 | tail -n 4
  "$NCU" --import "$RES/act_prof_${GPU}.ncu-rep" --page details > "$RES/act_prof_${GPU}_details.txt" 2>&1
else
  echo "no ncu on this machine"
fi
