"""Session 39 (GPU, one-off): session 38's register-cap sweep found one gain, 14336 wide with the left factor
loaded where used and 168 registers (0.88x auto's time). Re-timed here with caps 152-224, in two reversed orders.
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session39_cap14336.py OUT.json
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import write_result  # noqa: E402
from session37_wide_right import time_configs  # noqa: E402
from dartquant.kernels.act_quant import _auto_variant  # noqa: E402


def main(out_path):
    t0, rows = time.time(), []
    print("| N | config | ms | of copy | codes / scales / zeros != ref |")
    print("|---|---|---|---|---|")
    for n in (14336, 11008, 28672):
        auto = _auto_variant(n, True)
        base = dict(variant="blocks", butterfly=True, num_warps=auto["num_warps"],
                    rows_per_program=auto["rows_per_program"], groups=auto.get("groups", 1))
        cfgs = [("auto", base)] + [(f"late cap {k}", dict(base, late_left=True, max_registers=k))
                                   for k in (152, 168, 184, 200, 224)] + [("late", dict(base, late_left=True))]
        time_configs(n, cfgs + cfgs[::-1], rows)
    write_result({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, out_path, t0)


if __name__ == "__main__":
    main(sys.argv[1])
