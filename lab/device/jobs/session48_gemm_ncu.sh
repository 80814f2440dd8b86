#!/usr/bin/env bash
# Session 48 (issue 16; docs/KERNELS.md 4m): Nsight Compute on the int8s decode GEMM's default at the 7B o, the 8B
# q+k+v and the 7B down (session48_gemm_ncu.py): occupancy, memory throughput and the warps' stall reasons.
#   RES=$OUT bash lab/device/jobs/session48_gemm_ncu.sh
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n1)
[ -n "$NCU" ] || { echo "no ncu on this machine"; exit 1; }
PYTHONPATH=src:benchmarks:lab/device/jobs timeout 300 "$NCU" --set full -k regex:"_w4a4_swap|_read_kernel" -o "$RES/gemm_decode_prof_${GPU}" \
  python3 lab/device/jobs/session48_gemm_ncu.py 2>&1 | tail -n 6
"$NCU" --import "$RES/gemm_decode_prof_${GPU}.ncu-rep" --page details > "$RES/gemm_decode_prof_${GPU}_details.txt" 2>&1
grep -E "^  _w4a4|^  _read|Duration|Achieved Occupancy|Theoretical Occupancy|DRAM Throughput|L2 Cache Throughput|Memory Throughput|Registers Per|Block Limit|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Stall|stall" \
  "$RES/gemm_decode_prof_${GPU}_details.txt" | head -n 120
# the stall reasons (cycles a warp waits per issued instruction, by reason), from the raw metrics
"$NCU" --import "$RES/gemm_decode_prof_${GPU}.ncu-rep" --page raw --csv > "$RES/gemm_decode_prof_${GPU}_raw.csv" 2>&1
python3 - "$RES/gemm_decode_prof_${GPU}_raw.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
head = next(r for r in rows if "Kernel Name" in r)
data = [r for r in rows[rows.index(head) + 1:] if len(r) == len(head) and r[head.index("Kernel Name")].startswith(("_w4a4", "_read"))]
cols = [i for i, h in enumerate(head) if "issue_stalled" in h and h.endswith("per_issue_active.ratio")]
for r in data:
    stalls = sorted(((float(r[i] or 0), head[i].split("issue_stalled_")[1].split("_per_issue")[0]) for i in cols),
                    reverse=True)
    print(r[head.index("Kernel Name")][:40], " ".join(f"{name} {v:.2f}" for v, name in stalls[:8]))
PY
