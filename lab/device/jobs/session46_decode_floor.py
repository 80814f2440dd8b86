"""Session 46 (issue 16, GPU, one-off): what bounds the per-linear decode target (3x bf16 at <= 16 tokens) on the
7B / 8B linear shapes, measured. Section 2f calls it "each call's fixed cost": the o projection's 8 MB of packed
weight take 7.4 µs, 2.4 µs at copy speed. This times, per shape, in one CUDA graph with the weights rotating through
4x the L2 (session19_gemv.py's harness, as every per-linear decode number):
  * bf16 F.linear at 1 / 8 / 16 tokens, and today's W4A4 defaults (the dp4a GEMV at 1, int8s at 8 / 16);
  * an empty Triton kernel on the int8s default's grid (the per-call floor of any launch in a graph);
  * a read-only Triton kernel that streams the same packed weight bytes and does nothing with them (xor), swept
    over rows a program x warps x K step x split-K: the best any one-kernel-per-linear design of this shape can do;
  * a D2D copy of the packed bytes (reads and writes them, so twice the traffic).
If the best read alone takes longer than bf16 / 3, the target is out of reach for one kernel a linear.
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session46_decode_floor.py OUT.json
(TRITON_INTERPRET=1: a CPU smoke run of every kernel once, on a tiny shape.)
"""
import itertools
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import gemm_inputs, write_result  # noqa: E402
from dartquant.kernels.w4a4_gemm import default_config, planar_centered, w4a4_matmul  # noqa: E402

SMOKE = os.environ.get("TRITON_INTERPRET") == "1"
SHAPES = {"L2-7B q+k+v": (12288, 4096), "L2-7B o": (4096, 4096), "L2-7B gate+up": (22016, 4096),
          "L2-7B down": (4096, 11008), "L3-8B q+k+v": (6144, 4096), "L3-8B gate+up": (28672, 4096),
          "L3-8B down": (4096, 14336)}
if SMOKE:
    SHAPES = {"tiny": (64, 256)}
MS = (1, 8, 16)
ROTATE = 240e6
# rows a program, warps, K step in int32 words (8 codes each), split-K
READ_CONFIGS = [c for c in itertools.product((16, 32, 64), (2, 4, 8), (128, 256), (1, 2, 4))
                if c[0] * c[2] >= 32 * 32 * c[1]]
if SMOKE:
    READ_CONFIGS = [(16, 2, 8, 1), (16, 2, 8, 2)]


@triton.jit
def _empty_kernel(out_ptr):
    if tl.program_id(0) == 0:
        tl.store(out_ptr, 1)


@triton.jit
def _read_kernel(w_ptr, out_ptr, kw, per_split, stride, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                 STATIC_STEPS: tl.constexpr):
    """Stream rows [pid * BLOCK_N, +BLOCK_N) x words [split * per_split, +per_split) and xor them together."""
    pid, split = tl.program_id(0), tl.program_id(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_KW), tl.int32)
    # STATIC_STEPS: the interpreter only (numpy >= 2.4 cannot range() over its scalars), as in w4a4_gemm
    for i in range(0, STATIC_STEPS if STATIC_STEPS > 0 else per_split // BLOCK_KW):
        cols = split * per_split + i * BLOCK_KW + tl.arange(0, BLOCK_KW)
        acc ^= tl.load(w_ptr + rows[:, None] * stride + cols[None, :], mask=cols[None, :] < kw, other=0)
    tl.store(out_ptr + rows * 4 + split, tl.xor_sum(acc, 1))


def graph_ms(calls, reps=15):
    if SMOKE:
        for c in calls:
            c()
        return float("nan")
    from session19_gemv import graph_ms as timed

    return timed(calls, reps)


def read_call(w32, out, cfg):
    bn, warps, bkw, split = cfg
    n, kw = w32.shape
    per_split = triton.cdiv(triton.cdiv(kw, bkw), split) * bkw
    return lambda: _read_kernel[(n // bn, split)](w32, out, kw, per_split, w32.stride(0), BLOCK_N=bn, BLOCK_KW=bkw,
                                                  STATIC_STEPS=per_split // bkw if SMOKE else 0, num_warps=warps, num_stages=3)


def main(out_path):
    t0, dev = time.time(), torch.device("cpu" if SMOKE else "cuda")
    if not SMOKE:
        from session19_gemv import warm_clocks

        warm_clocks()
    res = {"device": "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "rows": []}
    print("| linear (N x K) | packed MB | bf16 µs at 1 / 8 / 16 | W4A4 µs at 1 / 8 / 16 | empty kernel µs | best read µs "
          "(config) | copy of the bytes µs | bf16@16 / 3 | read GB/s |", flush=True)
    for sname, (n, k) in SHAPES.items():
        nbytes = n * k // 2
        nsets = 2 if SMOKE else max(2, min(48, int(ROTATE // nbytes)))
        sets = [gemm_inputs(16, n, k, dev, s) for s in range(nsets)]
        planar = [planar_centered(a, za, k, torch.int8) for (a, _, za, _) in sets]
        words = [s[3].codes.view(torch.int32) for s in sets]
        nb = 2 if SMOKE else max(2, min(48, int(ROTATE // (n * k * 2)) + 1))
        bf16_w = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(nb)]
        row = {"linear": sname, "n": n, "k": k, "packed_bytes": nbytes, "bf16_us": {}, "w4a4_us": {}, "read_us": {}}
        for m in MS:
            xb = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            row["bf16_us"][m] = graph_ms([lambda w=w: torch.nn.functional.linear(xb, w) for w in bf16_w]) * 1e3
            outb = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
            if m == 1:  # the product's choice at one token: the per-lane dp4a GEMV on the packed codes
                cfg = default_config(m, n, k, "gemv")
                calls = [lambda s=s: w4a4_matmul(s[0][:m], s[1][:m], s[2][:m], s[3], "gemv", cfg, out=outb)
                         for s in sets]
            else:
                cfg = default_config(m, n, k, "int8s")
                calls = [lambda s=s, p=p: w4a4_matmul(p[:m], s[1][:m], None, s[3], "int8s", cfg, out=outb)
                         for s, p in zip(sets, planar)]
            row["w4a4_us"][m] = graph_ms(calls) * 1e3
        cfg16 = default_config(16, n, k, "int8s")
        tiles = triton.cdiv(n, cfg16.block_n)
        flag = torch.zeros(1, dtype=torch.int32, device=dev)
        row["empty_us"] = graph_ms([lambda: _empty_kernel[(tiles,)](flag, num_warps=cfg16.num_warps)] * 32) * 1e3
        sink = torch.zeros(n * 4, dtype=torch.int32, device=dev)
        for cfg in READ_CONFIGS:
            if n % cfg[0]:
                continue
            row["read_us"][str(cfg)] = graph_ms([read_call(w, sink, cfg) for w in words]) * 1e3
        dst = [torch.empty_like(w) for w in words]
        row["copy_us"] = graph_ms([lambda s=s, d=d: d.copy_(s) for s, d in zip(words, dst)]) * 1e3
        best = min(row["read_us"], key=row["read_us"].get)
        row["best_read"], row["best_read_us"] = best, row["read_us"][best]
        res["rows"].append(row)
        b, w = row["bf16_us"], row["w4a4_us"]
        print(f"| {sname} ({n}x{k}) | {nbytes / 1e6:.1f} | {b[1]:.1f} / {b[8]:.1f} / {b[16]:.1f} | "
              f"{w[1]:.1f} / {w[8]:.1f} / {w[16]:.1f} | {row['empty_us']:.2f} | {row['best_read_us']:.2f} ({best}) | "
              f"{row['copy_us']:.2f} | {b[16] / 3:.2f} | {nbytes / row['best_read_us'] / 1e3:.0f} |", flush=True)
        write_result(res, out_path, t0)
        del sets, planar, words, bf16_w, dst
        if not SMOKE:
            torch.cuda.empty_cache()
    if not SMOKE:  # the copy bandwidth at a size far over the L2, as every other table quotes it
        src = [torch.empty(64 << 20, dtype=torch.uint8, device=dev) for _ in range(4)]
        dst = [torch.empty_like(s) for s in src]
        res["copy_gbs"] = 2 * (64 << 20) / graph_ms([lambda s=s, d=d: d.copy_(s) for s, d in zip(src, dst)]) / 1e6
        print(f"copy {res['copy_gbs']:.0f} GB/s")
    write_result(res, out_path, t0)


if __name__ == "__main__":
    main(sys.argv[1])
