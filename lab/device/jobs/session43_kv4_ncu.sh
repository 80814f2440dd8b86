#!/usr/bin/env bash
# Session 43 (issue 16; docs/KERNELS.md 4h): Nsight Compute on the words decode attention at batch 8 and 64.
#   RES=$OUT bash lab/device/jobs/session43_kv4_ncu.sh
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n1)
[ -n "$NCU" ] || { echo "no ncu on this machine"; exit 1; }
PYTHONPATH=src timeout 240 "$NCU" --set full -k regex:"kv4_decode" -o "$RES/kv4_words_prof_${GPU}" \
  python3 lab/device/jobs/session43_kv4_ncu.py 2>&1 | tail -n 4
"$NCU" --import "$RES/kv4_words_prof_${GPU}.ncu-rep" --page details > "$RES/kv4_words_prof_${GPU}_details.txt" 2>&1
grep -E "^  _kv4|Duration|Achieved Occupancy|Theoretical Occupancy|DRAM Throughput|Memory Throughput|Registers Per|Block Limit|Issue Slots Busy|No Eligible|Compute \(SM\) Throughput|Warp Cycles Per Issued" \
  "$RES/kv4_words_prof_${GPU}_details.txt" | head -n 60
