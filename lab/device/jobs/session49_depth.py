"""Session 49 (issue 16): how deep the decode GEMM's pipeline runs. Session 46's read-only kernel streamed the 7B o's
packed bytes in 4.71 µs (H100) only when every program issued its one load at once (16 rows, split 4: 1024 programs
of one step); the GEMM's default keeps 3 of its 8 K steps in flight (4 stages) and sits at 1.3-1.6x that floor.
Sessions 47-48 swept 2-4 stages only. Here: each shape's default at 8 / 16 tokens against the same config with
more stages (up to every K step in flight), longer K steps, and 8 tokens a tile at 8 tokens; each config first
checked bit-exact against the integer reference (µs a call, calls in one CUDA graph, weights rotating through 4x
the L2). A config over the shared memory fails to compile and is recorded as such.

    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session49_depth.py OUT.json [--slices]

--slices: instead, 2-8 K slices a program on 2-8 warps (16 rows, K steps of 512 / 1024 codes), for more warps an SM.
"""
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import write_result  # noqa: E402
from dartquant.kernels.w4a4_gemm import GemmConfig, default_config  # noqa: E402

SHAPES = {"L2-7B o": (4096, 4096), "L3-8B q+k+v": (6144, 4096), "L2-7B down": (4096, 11008),
          "L2-7B q+k+v": (12288, 4096)}


def variants(m, n, k):
    base = default_config(m, n, k, "int8s")
    out = {"default": base}
    if "--slices" in sys.argv:  # more warps an SM (Nsight Compute: 4 warps an SM on o, each issuing every ~4 cycles):
        # more K slices a program, a warp or half a warp a slice, 16 rows, the default's tokens a tile
        for step in (512, 1024):
            for slices in (2, 4, 8):
                for warps in {slices, max(2, slices // 2)}:
                    for stages in (3, 4):
                        cfg = GemmConfig(base.block_m, 16, step // slices, warps, stages, slices=slices,
                                         asm_unpack=True)
                        if cfg != base and step // slices >= 64:
                            out[f"{step}/S{slices} w{warps} s{stages}"] = cfg
        return out
    for block_k in (base.block_k, 2 * base.block_k):
        for stages in (3, 4, 6, 8):
            for block_m in ((16, 8) if m <= 8 else (16,)):
                cfg = dataclasses.replace(base, block_k=block_k, num_stages=stages, block_m=block_m)
                if cfg != base:
                    out[f"k{block_k} s{stages} t{block_m}"] = cfg
    return out


def main(out_path):
    from session19_gemv import check_and_time, decode_cases, product_matmul, warm_clocks

    dev, t0, rows = torch.device("cuda"), time.time(), []
    warm_clocks()
    # --slices: the sliced tiles' shapes only (N <= 6144)
    tokens = (lambda n: (8, 16) if "--slices" not in sys.argv or n <= 6144 else ())
    for sname, n, k, m, sets, planar, want, outb in decode_cases(SHAPES, tokens, dev):
        row = {"linear": sname, "n": n, "k": k, "m": m, "us": {}, "exact": {}, "failed": {}, "cfg": {}}
        for label, cfg in variants(m, n, k).items():
            row["cfg"][label] = str(cfg)
            try:
                exact, us = check_and_time(product_matmul(cfg), sets, planar, m, want, outb)
            except Exception as e:  # noqa: BLE001 - recorded (over the shared memory)
                row["failed"][label] = repr(e)[:160]
                continue
            row["exact"][label] = exact
            if exact:
                row["us"][label] = us
        rows.append(row)
        d = row["us"]["default"]
        best = min(row["us"], key=row["us"].get)
        top = sorted(row["us"].items(), key=lambda kv: kv[1])[:4]
        print(f"| {sname} | {m} | default {d:.2f} | best {best} {row['us'][best]:.2f} ({row['us'][best] / d:.2f}x) "
              f"| next {', '.join(f'{a} {b:.2f}' for a, b in top[1:])} | not exact {[a for a, e in row['exact'].items() if not e]} "
              f"| failed {len(row['failed'])} |", flush=True)
        write_result({"device": torch.cuda.get_device_name(), "rows": rows}, out_path, t0)


if __name__ == "__main__":
    main(sys.argv[1])
