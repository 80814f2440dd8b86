"""Session 35 (GPU, one-off): the butterfly right factor (act_quant.RIGHT_BUTTERFLY) over the blocks kernel's
launch configs, codes checked against the torch reference; prints ms and the fraction of copy bandwidth.
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session35_butterfly_sweep.py OUT.json
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import act_input, bench, rotating, time_copy, write_result  # noqa: E402
from dartquant.kernels import act_quant  # noqa: E402
from dartquant.kernels.act_quant import hadamard_quantize_pack, hadamard_quantize_pack_reference  # noqa: E402

dev = torch.device("cuda")
WIDTHS = [4096, 11008, 14336, 8192, 16384, 28672, 4864, 8960, 1536]
CONFIGS = [(4, 1, 1), (4, 1, 2), (4, 2, 1), (8, 2, 1), (4, 2, 2), (2, 1, 1)]  # (warps, tokens a tile, tiles a program)


def main(out_path):
    t0 = time.time()
    act_quant.RIGHT_BUTTERFLY = True
    rows = []
    for n in WIDTHS:
        x = act_input(272, n, dev, n)
        ref = hadamard_quantize_pack_reference(x, 0.9)
        m = 32768
        sets, nxt = rotating(lambda: act_input(m, n, dev, 1), m * n * 2)
        t_copy, copy_gbs = time_copy(m, n, dev)
        for w, t, g in CONFIGS:
            cfg = dict(variant="blocks", num_warps=w, rows_per_program=t, groups=g)
            try:
                got = hadamard_quantize_pack(x, 0.9, **cfg)
                bad = int((got.codes != ref.codes).sum())
                ms = bench(lambda: hadamard_quantize_pack(nxt(), 0.9, **cfg))
            except Exception as e:  # noqa: BLE001 - refused or out of resources: recorded
                rows.append(dict(n=n, cfg=cfg, error=repr(e)[:200]))
                continue
            gbs = (m * n * 2.5 + 8 * m) / ms / 1e6
            rows.append(dict(n=n, cfg=cfg, ms=ms, of_copy=gbs / copy_gbs, codes_differ=bad))
            print(f"| {n} | w{w} t{t} g{g} | {ms:.4f} | {gbs / copy_gbs:.3f} | {bad} |", flush=True)
    act_quant.RIGHT_BUTTERFLY = None
    write_result({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, out_path, t0)


if __name__ == "__main__":
    main(sys.argv[1])
