"""Session 27 (GPU, one-off): the swapped int8 tensor-core GEMM ("int8s") at decode sizes, 4-16 tokens,
with split-K and the weight's nibbles split four bytes per PTX word op (GemmConfig.asm_unpack), against
bf16 F.linear, cuBLAS FP8 on the 1-byte weight and the per-lane dp4a GEMV (up to 8 tokens). Timed as
session19_gemv.py times (calls in one CUDA graph, weights rotating through 4x the L2); every config's
output is first checked bit-equal to the integer reference at 12 and 16 tokens.
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session27_swap_decode.py OUT.json [--small-tiles] [--shapes A,B]
(--shapes: only these SHAPES names; session 28's run 43 took the down projections of --small-tiles;
--split4: session 46, split-K 2 / 4 on 16 / 32-row tiles, the 7B / 8B shapes; session 47 reran it with the
fix-up's adds relaxed, each split config checked exact over 32 calls in a row; --stages: session 47, split 2 / 4 / 8
with 1 / 2 pipeline stages)
"""
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import compile_all, gemm_inputs, planar_weight, write_result  # noqa: E402
from session19_gemv import graph_ms, warm_clocks  # noqa: E402
from dartquant.kernels.w4a4_gemm import (GemmConfig, default_config, planar_centered, w4a4_matmul,  # noqa: E402
                                         w4a4_matmul_reference)

dev = torch.device("cuda")
SPLIT_SWEEP = "--split4" in sys.argv or "--stages" in sys.argv
MS = (4, 8, 12, 16)
ROTATE = 240e6
SHAPES = {"L2-7B q+k+v": (12288, 4096), "L2-7B o": (4096, 4096), "L2-7B gate+up": (22016, 4096),
          "L2-7B down": (4096, 11008), "L3-8B down": (4096, 14336), "L2-70B gate/up": (28672, 8192),
          "L2-70B down": (8192, 28672)}
ALL_SHAPES = dict(SHAPES)
OLD = GemmConfig(16, 64, 256, 4, 4)  # int8s's decode default until now (run 7)
CONFIGS = [OLD, GemmConfig(16, 64, 256, 4, 4, asm_unpack=True)] + [
    GemmConfig(16, bn, bk, 4, st, split_k=sk, asm_unpack=True)
    for bn, bk, sk, st in itertools.product((64, 128), (512, 1024), (1, 2, 4, 8), (3, 4))]

if "--small-tiles" in sys.argv:  # session 28, runs 41 / 43: narrower row tiles (mma.sync m16n8k32 instead of wgmma, so
    # 2-4x the programs on the 4096-row linears, whose 64 tiles of 64 rows leave half the SMs idle)
    MS = (3, 8, 16)
    SHAPES = {k: v for k, v in SHAPES.items() if k.startswith("L2-7B") or k == "L3-8B down"}
    CONFIGS = [GemmConfig(16, 64, 512, 4, 3, asm_unpack=True), GemmConfig(16, 64, 1024, 4, 3, asm_unpack=True)] + [
        GemmConfig(16, bn, bk, w, st, split_k=sk, asm_unpack=True)
        for bn, w, bk, st, sk in itertools.product((16, 32), (1, 2, 4), (512, 1024, 2048), (3, 4), (1, 2))
        if bn * bk // 2 >= 128 * w]

if "--split4" in sys.argv:  # session 46: the decode floor (session46_decode_floor.py) read the 7B / 8B weights
    # fastest with split-K 4 on 16 / 32-row programs (o: 4.7 against 7.0 µs without a split); run 41 stopped at split 2
    MS = (8, 16)  # both compiled in the pool (8 specializes apart from 16)
    SHAPES = {k: v for k, v in ALL_SHAPES.items() if not k.startswith("L2-70B")}
    SHAPES["L3-8B q+k+v"], SHAPES["L3-8B gate+up"] = (6144, 4096), (28672, 4096)
    CONFIGS = [default_config(16, n, k, "int8s") for n, k in ((4096, 4096), (4096, 11008), (22016, 4096))] + [
        GemmConfig(16, bn, bk, 2, 3, split_k=sk, asm_unpack=True)
        for bn, bk, sk in itertools.product((16, 32), (1024, 2048), (2, 4))]

if "--stages" in sys.argv:  # session 47: with the fix-up's adds relaxed, split 2 won on the down projections only;
    # at one K step a split (per_split = 1) the pipeline's stages only take shared memory from co-resident programs
    MS = (8, 16)
    SHAPES = {k: v for k, v in ALL_SHAPES.items() if not k.startswith("L2-70B")}
    SHAPES["L3-8B q+k+v"], SHAPES["L3-8B gate+up"] = (6144, 4096), (28672, 4096)
    CONFIGS = [default_config(16, n, k, "int8s") for n, k in ((4096, 4096), (4096, 11008), (22016, 4096))] + [
        GemmConfig(16, 32, 1024, 2, 3, split_k=2, asm_unpack=True)] + [
        GemmConfig(16, bn, bk, 2, st, split_k=sk, asm_unpack=True)
        for bn, bk, st, sk in itertools.product((16, 32), (512, 1024), (1, 2), (2, 4, 8))]

if "--shapes" in sys.argv:
    _only = sys.argv[sys.argv.index("--shapes") + 1].split(",")
    SHAPES = {k: v for k, v in ALL_SHAPES.items() if k in _only}


def baselines(m, n, k, sets, bf16_w, fp8_w) -> dict:
    """µs per call of bf16 F.linear, cuBLAS FP8 on the 1-byte weight (from 2 tokens) and the default
    per-lane GEMV (up to 8 tokens) on the first m rows of `sets` (gemm_inputs tuples)."""
    out = {}
    xb = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    out["bf16_us"] = graph_ms([lambda w=w: torch.nn.functional.linear(xb, w) for w in bf16_w]) * 1e3
    if m > 1:
        xa = torch.randint(-8, 8, (m, k), device=dev).to(torch.float32).to(torch.float8_e4m3fn)
        sa, sw = torch.ones(m, 1, device=dev), torch.ones(1, n, device=dev)
        out["scaled_mm_us"] = graph_ms([lambda w=w: torch._scaled_mm(xa, w.t(), sa, sw, out_dtype=torch.bfloat16)
                                        for w in fp8_w]) * 1e3
    if m <= 8:
        cfg, outb = default_config(m, n, k, "gemv"), torch.empty(m, n, dtype=torch.bfloat16, device=dev)
        out["gemv_us"] = graph_ms([lambda s=s: w4a4_matmul(s[0][:m], s[1][:m], s[2][:m], s[3], "gemv", cfg, out=outb)
                                   for s in sets]) * 1e3
    return out


def name(cfg):  # run 36's names (4 warps everywhere) carry no warp count
    warps = "" if cfg.num_warps == 4 else f" w{cfg.num_warps}"
    return f"{cfg.block_n}x{cfg.block_k}{warps} s{cfg.num_stages} sk{cfg.split_k}{' asm' if cfg.asm_unpack else ''}"


def main(out_path):
    t0 = time.time()
    # every shape's K: Triton specialises on K's divisibility, and 70 configs compiled one by one at first
    # use cost run 42 its time limit
    jobs = {(n, k): [("gemm", (m, n, k, c, "int8s")) for c in CONFIGS for m in sorted({16, *MS} if SPLIT_SWEEP
                                                                                    else {16})]
            for n, k in SHAPES.values()}
    errors = compile_all([j for js in jobs.values() for j in js], 15)
    configs = [c for c in CONFIGS if not any(str(j) in errors for js in jobs.values() for j in js if j[1][3] == c)]
    warm_clocks()
    rows = []
    for sname, (n, k) in SHAPES.items():
        nsets = max(2, min(48, int(ROTATE // (n * k // 2))))
        sets = [gemm_inputs(16, n, k, dev, s) for s in range(nsets)]
        planar = [planar_centered(a, za, k, torch.int8) for (a, _, za, _) in sets]
        bf16_w = [torch.randn(n, k, device=dev, dtype=torch.bfloat16)
                  for _ in range(max(2, min(48, int(ROTATE // (n * k * 2)) + 1)))]
        fp8_w = [planar_weight(w, torch.float8_e4m3fn) for (_, _, _, w) in sets[:max(2, min(48, int(ROTATE // (n * k)) + 1))]]
        a0, sa0, za0, w0 = sets[0]
        refs = {m: w4a4_matmul_reference(a0[:m], sa0[:m], za0[:m], w0) for m in (12, 16)}
        # split-K's fix-up orders its partial sums by one acq_rel counter (session 47: the adds relaxed), so a race
        # would show only now and then: the split sweeps check each split config over 32 calls in a row, outputs
        # kept apart
        reps = {cfg: 32 if SPLIT_SWEEP and cfg.split_k > 1 else 1 for cfg in configs}
        exact = {name(cfg): all(torch.equal(y, refs[m]) for m in refs for y in
                                [w4a4_matmul(planar[0][:m], sa0[:m], None, w0, "int8s", cfg) for _ in range(reps[cfg])])
                 for cfg in configs}
        for m in MS:
            row = {"linear": sname, "n": n, "k": k, "m": m, "int8s_us": {}, "exact": exact,
                   **baselines(m, n, k, sets, bf16_w, fp8_w)}
            outb = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
            for cfg in configs:
                row["int8s_us"][name(cfg)] = graph_ms(
                    [lambda s=s, p=p: w4a4_matmul(p[:m], s[1][:m], None, s[3], "int8s", cfg, out=outb)
                     for s, p in zip(sets, planar)]) * 1e3
            best = min(row["int8s_us"], key=row["int8s_us"].get)
            row["best"], row["best_us"] = best, row["int8s_us"][best]
            row["default"] = name(default_config(m, n, k, "int8s"))
            if SPLIT_SWEEP:
                d = row["int8s_us"].get(row["default"], float("nan"))
                print(f"| {sname} | {m} | bf16 {row['bf16_us']:.1f} | default {row['default']} {d:.2f} | best {best} "
                      f"{row['best_us']:.2f} | bf16 / default {row['bf16_us'] / d:.2f}x, / best "
                      f"{row['bf16_us'] / row['best_us']:.2f}x | exact {all(exact.values())} |", flush=True)
            rows.append(row)
            print(f"| {sname} ({n}x{k}) | {m} | {row['bf16_us']:.1f} | {row['scaled_mm_us']:.1f} | "
                  f"{row.get('gemv_us', float('nan')):.1f} | {row['int8s_us'].get(name(OLD), float('nan')):.1f} | "
                  f"{row['int8s_us'].get(name(CONFIGS[1]), float('nan')):.1f} | {best} {row['best_us']:.1f} | "
                  f"{row['bf16_us'] / row['best_us']:.2f}x | {n * k / 2 / row['best_us'] / 1e3:.0f} | "
                  f"{all(exact.values())} |", flush=True)
            write_result({"device": torch.cuda.get_device_name(), "rows": rows, "compile_errors": errors},
                         out_path, t0)
        del sets, planar, bf16_w, fp8_w
        torch.cuda.empty_cache()
    src = [torch.empty(64 << 20, dtype=torch.uint8, device=dev) for _ in range(4)]
    dst = [torch.empty_like(s) for s in src]
    copy_gbs = 2 * (64 << 20) / graph_ms([lambda s=s, d=d: d.copy_(s) for s, d in zip(src, dst)]) / 1e6
    print(f"copy {copy_gbs:.0f} GB/s")
    write_result({"device": torch.cuda.get_device_name(), "copy_gbs": copy_gbs, "rows": rows,
                  "compile_errors": errors}, out_path, t0)


if __name__ == "__main__":
    main(sys.argv[1])
