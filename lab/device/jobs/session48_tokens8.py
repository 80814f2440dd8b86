"""Session 48 (issue 16): decode tiles of 8 tokens for the int8s GEMM at 3-8 tokens. The int8 MMA (m16n8k32) takes 8
tokens a step; the product's tiles hold 16, so at batch <= 8 half of every IMMA, activation load and shared-memory
byte is padding. Triton's int8 dot accepts N = 8 (min_dot_size (1, 1, 32)). Offline sm_90 SASS (`lab/sass_stats.py
...,8`): the sliced kernel's loop 170 -> 141 instructions (IMMA 16 -> 8, shared memory 36 -> 24 KB), the 32-row tiles
244 -> 208, the 64-row 237 -> 206. Bit-exact in the interpreter (tests/test_kernels.py, 8-token tiles at 1-17 tokens).
Here: each shape's default config against the same config with 8 tokens a tile, at 4 and 8 tokens, each first checked
bit-exact against the integer reference (µs a call, calls in one CUDA graph, weights rotating through 4x the L2).

    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session48_tokens8.py OUT.json
"""
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import write_result  # noqa: E402
from dartquant.kernels.w4a4_gemm import default_config  # noqa: E402

SHAPES = {"L2-7B q+k+v": (12288, 4096), "L2-7B o": (4096, 4096), "L2-7B gate+up": (22016, 4096),
          "L2-7B down": (4096, 11008), "L3-8B q+k+v": (6144, 4096), "L3-8B gate+up": (28672, 4096),
          "L3-8B down": (4096, 14336), "L2-70B o": (8192, 8192), "L2-70B q+k+v": (10240, 8192),
          "L2-70B down": (8192, 28672)}


def main(out_path):
    from session19_gemv import check_and_time, decode_cases, product_matmul, warm_clocks

    dev, t0, rows = torch.device("cuda"), time.time(), []
    warm_clocks()
    for sname, n, k, m, sets, planar, want, outb in decode_cases(SHAPES, lambda n: (4, 8), dev):
        row = {"linear": sname, "n": n, "k": k, "m": m}
        for label, cfg in (("default", default_config(m, n, k, "int8s")),
                           ("tokens8", dataclasses.replace(default_config(m, n, k, "int8s"), block_m=8))):
            row[label + "_cfg"] = str(cfg)
            row[label + "_exact"], row[label + "_us"] = check_and_time(product_matmul(cfg), sets, planar, m, want,
                                                                       outb)
        rows.append(row)
        print(f"| {sname} | {m} | default {row['default_us']:.2f} | 8 tokens a tile {row['tokens8_us']:.2f} "
              f"({row['tokens8_us'] / row['default_us']:.2f}x) | exact {row['default_exact']} / "
              f"{row['tokens8_exact']} |", flush=True)
        write_result({"device": torch.cuda.get_device_name(), "rows": rows}, out_path, t0)


if __name__ == "__main__":
    main(sys.argv[1])
