"""Session 38 (GPU, one-off): the blocks activation kernel with its registers capped (`hadamard_quantize_pack(...,
max_registers=K)`, ptxas' maxnreg) and its left factor's blocks loaded where used (`late_left=True`: less shared
memory a program, offline 11008 / 14336 / 28672: 66 / 41 / 98 KB instead of 107 / 57 / 164). Nsight Compute (docs/KERNELS.md 1i) found it latency-bound at 12.5 % occupancy
from 11008 wide, limited by registers (177-255 a thread) and shared memory; the offline sm_90 compile
(`MAXNREG=128 lab/sass_stats.py`) caps 11008 / 14336 / 28672 at 128 registers with no spill. Per width: auto's
config, the same with the cap and / or the late left factor, other tiles with both, auto again
(drift); codes / scales / zero points against the torch reference; 32768 tokens (session37_wide_right.time_configs).
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session38_maxnreg.py OUT.json
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import write_result  # noqa: E402
from session37_wide_right import time_configs  # noqa: E402
from dartquant.kernels.act_quant import _auto_variant  # noqa: E402

# width: [(warps, tokens a tile, tiles a program, register cap)] beside auto with caps 128 / 168
OTHERS = {11008: [(4, 1, 1, None), (4, 1, 1, 128), (4, 1, 1, 96)], 8960: [(4, 1, 1, 128)],
          28672: [(8, 1, 1, 96)], 16384: [(4, 1, 1, 128)], 14336: [(4, 1, 1, 96), (8, 1, 1, 64)]}
WIDTHS = [4096, 8192, 8960, 11008, 14336, 16384, 28672]


def main(out_path):
    t0 = time.time()
    rows = []
    print("| N | config | ms | of copy | codes / scales / zeros != ref |")
    print("|---|---|---|---|---|")
    for n in WIDTHS:
        auto = _auto_variant(n, True)
        base = dict(variant="blocks", butterfly=True, num_warps=auto["num_warps"],
                    rows_per_program=auto["rows_per_program"], groups=auto.get("groups", 1))
        cfgs = [("auto", base)] + [(f"auto cap {k}", dict(base, max_registers=k)) for k in (128, 168)]
        cfgs += [("auto late", dict(base, late_left=True))]
        cfgs += [(f"auto late cap {k}", dict(base, late_left=True, max_registers=k)) for k in (128, 168)]
        cfgs += [(f"w{w} t{t} g{g} late cap {k}", dict(variant="blocks", butterfly=True, num_warps=w,
                                                       rows_per_program=t, groups=g, max_registers=k, late_left=True))
                 for w, t, g, k in OTHERS.get(n, [])]
        cfgs.append(("auto again", base))
        time_configs(n, cfgs, rows)
    write_result({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, out_path, t0)


if __name__ == "__main__":
    main(sys.argv[1])
