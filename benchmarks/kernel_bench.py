"""W4A4 kernels on the GPU: correctness, then timing tables against the vendor paths.

    PYTHONPATH=src python benchmarks/kernel_bench.py --out kernels_h200.json [--quick]

One script, one call (see docs/KERNELS.md):
1. ceilings measured here: device copy bandwidth, bf16 torch.matmul, FP8 torch._scaled_mm,
   torch._int_mm at 8192^3;
2. fused Hadamard + quantize + pack (`act_quant`): codes vs the torch composition (fresh random
   inputs with outliers, poisoned outputs), then time / effective bandwidth vs a device copy of
   the same tensor, per width and num_warps;
3. W4A4 GEMM (`w4a4_gemm`, int8 and fp8): bit-exact against the integer reference (also the
   worst case |sum| = 120 K for FP8's accumulation), then time at Llama-2-7B / Llama-3-8B /
   Llama-2-70B linear shapes, prefill and decode, vs bf16 torch.matmul, torch._int_mm and
   rowwise-scaled FP8 torch._scaled_mm.  Weights and inputs rotate among copies that together
   exceed the L2 (60 MB), so decode reads HBM, on both sides.
(`--kv4`: the 4-bit K/V cache's decode attention instead, every path checked against fp32 SDPA.)
Kernels are compiled first in a process pool (Triton's on-disk cache), so compile time stays
out of the device budget's critical path.  Timing: triton.testing.do_bench, median.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from dartquant.kernels.act_quant import PackedActivations, hadamard_quantize_pack, hadamard_quantize_pack_reference  # noqa: E402
from dartquant.kernels.w4a4_gemm import (  # noqa: E402
    GemmConfig, planar_centered, planar_weight, prepare_weight, w4a4_matmul, w4a4_matmul_reference)

ACT_WIDTHS = [64, 128, 1536, 4096, 4864, 8192, 8960, 11008, 14336, 16384, 28672]
ACT_VARIANTS = {  # name: (variant, num_warps, rows_per_program); "3d" at widths >= 14336 also tries 16 warps
    "3d w4": ("3d", 4, 1), "3d w8": ("3d", 8, 1),
    "2d w4": ("2d", 4, 1), "2d w8": ("2d", 8, 1), "2d w16": ("2d", 16, 1),
    "2d w4 r4": ("2d", 4, 4), "2d w8 r4": ("2d", 8, 4),
    # run 10: (variant, num_warps, tokens per tile T, tiles per program G)
    "blk t1 w4": ("blocks", 4, 1, 1), "blk t1 w8": ("blocks", 8, 1, 1), "blk t2 w4": ("blocks", 4, 2, 1),
    "blk t2 w8": ("blocks", 8, 2, 1), "blk t4 w8": ("blocks", 8, 4, 1),
    "blk t1 g4 w4": ("blocks", 4, 1, 4), "blk t2 g4 w4": ("blocks", 4, 2, 4), "blk t2 g4 w8": ("blocks", 8, 2, 4),
    "blk t4 g4 w8": ("blocks", 8, 4, 4),
    # session 20 (decode: a token's rows over several programs, then a quantize pass; here at throughput sizes too)
    "split w4": ("split", 4, 1), "split w8": ("split", 8, 1),
    # what the product launches (variant="auto": since session 35 the blocks kernel's right factor as butterflies,
    # which no row above has); its own column in the table
    "auto": ("auto", None),
}  # run 2 also had "3d w16", "2d w16 r4": never the fastest; run 10 "blk t4 w16": wrong codes at 8960 (refused now)
ACT_KW = ("variant", "num_warps", "rows_per_program", "groups")
QUANT_ONLY_SWEEP = [(1, 8), (2, 4), (2, 8), (4, 8), (4, 16), (8, 16)]  # (rows per program, warps), no Hadamard
LINEARS = {  # name: (N, K) of y = x W^T
    "L2-7B qkvo": (4096, 4096), "L2-7B gate/up": (11008, 4096), "L2-7B down": (4096, 11008),
    "L3-8B q/o": (4096, 4096), "L3-8B k/v": (1024, 4096), "L3-8B gate/up": (14336, 4096), "L3-8B down": (4096, 14336),
    "L2-70B q/o": (8192, 8192), "L2-70B k/v": (1024, 8192), "L2-70B gate/up": (28672, 8192), "L2-70B down": (8192, 28672),
}
DECODE_M = [1, 4, 16, 64]
PREFILL_M = [512, 2048, 8192]
DECODE_CONFIGS = [GemmConfig(16, 32, 512, 4, 4), GemmConfig(16, 64, 256, 4, 5), GemmConfig(16, 128, 256, 4, 4),
                  GemmConfig(16, 64, 512, 8, 3),
                  # split-K with the one-launch atomic fixup (run 1's memset + epilogue version was slower)
                  GemmConfig(16, 64, 512, 4, 4, split_k=4), GemmConfig(16, 32, 512, 4, 4, split_k=4),
                  GemmConfig(16, 64, 256, 4, 4, split_k=8)]
GEMV_CONFIGS = [GemmConfig(1, 32, 512, 4, 1), GemmConfig(1, 64, 512, 8, 1), GemmConfig(1, 32, 256, 4, 1),
                GemmConfig(1, 32, 512, 4, 1, split_k=4), GemmConfig(1, 64, 512, 8, 1, split_k=4),
                GemmConfig(1, 16, 512, 4, 1, split_k=8), GemmConfig(1, 32, 256, 4, 1, split_k=8),  # block_m unused
                # run 8: four products per dp4a (w4a4_gemm module notes), on run 3's best gemv shapes
                GemmConfig(1, 16, 512, 4, 1, split_k=8, dp4a=True), GemmConfig(1, 32, 512, 4, 1, split_k=4, dp4a=True),
                GemmConfig(1, 32, 512, 4, 1, dp4a=True), GemmConfig(1, 64, 1024, 8, 1, split_k=4, dp4a=True),
                GemmConfig(1, 32, 1024, 4, 1, split_k=8, dp4a=True),
                # session 19: the per-lane dp4a GEMV's defaults (KERNELS.md 3b; its sweeps: lab/device/jobs/session19_*)
                GemmConfig(1, 4, 4096, 4, 1, dp4a=True, lanes=True), GemmConfig(1, 8, 2048, 2, 1, dp4a=True, lanes=True),
                GemmConfig(1, 4, 1024, 4, 1, dp4a=True, lanes=True), GemmConfig(1, 4, 1024, 2, 1, dp4a=True, lanes=True)]
PREFILL_CONFIGS = [GemmConfig(128, 128, 128, 8, 4), GemmConfig(128, 256, 128, 8, 3), GemmConfig(256, 128, 128, 8, 3),
                   GemmConfig(128, 128, 256, 8, 3)]
CHECK_SHAPES = [(4, DECODE_CONFIGS), (515, PREFILL_CONFIGS)]
# run 6 (--variants): which operand layout limits prefill.  name: (backend, planar centered A,
# planar 1-byte W, Triton-promoted fp8 accumulation)
PREFILL_VARIANTS = {
    "int8 packed": ("int8", False, False, False), "int8 A8": ("int8", True, False, False),
    "int8 A8 W8": ("int8", True, True, False), "fp8 packed": ("fp8", False, False, False),
    "fp8 A8": ("fp8", True, False, False), "fp8 A8 promote": ("fp8", True, False, True),
    "fp8 A8 W8": ("fp8", True, True, False), "fp8 A8 W8 promote": ("fp8", True, True, True),
    # run 7: the packed weight unpacked in registers as the dot's left operand (w4a4_gemm "int8s")
    "int8s A8": ("int8s", True, False, False),
}
# run 7, decode: "int8s" (tokens in the MMA's N: block_m = 16..64 tokens, block_n = weight rows)
# against the int8 / gemv decode configs of run 3
SWAP_DECODE_CONFIGS = [GemmConfig(16, 64, 256, 4, 4), GemmConfig(16, 128, 256, 4, 4), GemmConfig(16, 64, 512, 4, 4),
                       GemmConfig(32, 128, 256, 4, 4), GemmConfig(64, 128, 256, 4, 3)]
VARIANT_DECODE_M = [1, 4, 16, 64]
VARIANT_CONFIGS = PREFILL_CONFIGS + [GemmConfig(128, 256, 256, 8, 3), GemmConfig(128, 128, 256, 8, 4)]
VARIANT_LINEARS = ["L2-7B qkvo", "L2-7B gate/up", "L2-7B down", "L2-70B gate/up", "L2-70B down"]
VARIANT_M = [2048, 8192]  # M off the tile sizes: row masks
L2_BYTES = 60e6
ROTATE_BYTES = 4 * L2_BYTES


def write_result(result: dict, out: str, t0: float) -> None:
    """The run's JSON, written atomically, with its wall time."""
    result["wall_s"] = time.time() - t0
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, out)
    print(f"wrote {out} ({result['wall_s']:.0f} s)")


def bench(fn, rep=40):
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=rep, return_mode="median")  # ms


def rotating(make, one_bytes):
    """A list of input sets that together exceed the L2 several times, and a cycling getter."""
    n = max(1, min(16, math.ceil(ROTATE_BYTES / max(one_bytes, 1))))
    sets = [make() for _ in range(n)]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % n
        return sets[state["i"]]

    return sets, nxt


def act_input(m, n, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, n, device=device, generator=g)
    # a few outlier channels, as real activations have
    idx = torch.randint(0, n, (max(1, n // 512),), device=device, generator=g)
    x[:, idx] *= 20
    return x.to(torch.bfloat16)


def act_variants(n):
    from dartquant.hadamard import hadamard_factorization
    from dartquant.kernels.act_quant import _check_elements_per_thread, layout_2d, layout_blocks, stage_sizes

    out = []
    for name, (v, nw, *rest) in ACT_VARIANTS.items():
        if (v == "2d" and layout_2d(n) is None) or (v in ("blocks", "split") and layout_blocks(n) is None):
            continue
        if v == "3d" and nw == 16 and n < 14336:
            continue
        try:  # what the launcher refuses (too many padded elements a thread, run 48), before compiling it
            if v == "blocks":
                r, ka, kb, c = layout_blocks(n)
                _check_elements_per_thread("blocks", rest[0], (ka + kb) * c, nw)
            elif v == "3d":
                k, p = hadamard_factorization(n)
                stage_sizes(p)
                _check_elements_per_thread("3d", 1, (1 << (k - 1).bit_length() if k > 1 else 1) * p, nw)
        except ValueError:
            continue
        out.append(name)
    return out


def act_rows(n):
    return 32768 * 32 if n <= 128 else 32768


# ----------------------------------------------------------------------------- compile pool


def _warm(job):
    kind, args = job
    dev = torch.device("cuda")
    t = time.time()
    try:
        if kind == "act":
            n, name, rotate = args
            x = act_input(64, n, dev, 0)  # rows divisible by 16, like the timed and checked ones
            if name is None:
                hadamard_quantize_pack(x, 0.9, rotate=rotate)
            else:
                hadamard_quantize_pack(x, 0.9, rotate=rotate, **dict(zip(ACT_KW, ACT_VARIANTS[name])))
        elif kind == "actq":
            n, bm, nw = args
            hadamard_quantize_pack(act_input(64, n, dev, 0), 0.9, rotate=False, block_m=bm, num_warps=nw)
        elif kind == "gemm8":
            m, n, k, cfg, variant = args
            run_variant(variant_operands(*gemm_inputs(m, n, k, dev, 0), variant), variant, cfg)
        else:
            m, n, k, cfg, be = args
            a = torch.randint(0, 256, (m, k // 2), dtype=torch.uint8, device=dev)
            w = prepare_weight(torch.randint(-8, 8, (n, k), dtype=torch.int8, device=dev), torch.rand(n, device=dev))
            za = torch.zeros(m, device=dev)
            if be == "int8s":  # the swapped GEMM reads planar centered int8 activations
                a, za = planar_centered(a, za, k, torch.int8), None
            w4a4_matmul(a, torch.rand(m, device=dev), za, w, be, cfg)
        torch.cuda.synchronize()
        return job, time.time() - t, None
    except Exception as e:  # reported, the main pass skips it
        return job, time.time() - t, repr(e)[:300]


def compile_all(jobs, workers, warm=None):
    """Compile (and launch once) every job in worker processes; returns {str(job): error} of those that failed.
    A CUDA error is sticky: once one launch faults, every later job of that worker fails with the same error
    (session 48: one config's "misaligned address" at 14336 wide took 60 others with it). Such jobs run again,
    each in a fresh process, and only what fails there too is recorded."""
    warm = warm or _warm
    t = time.time()
    errors = {}
    ctx = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for job, dt, err in pool.map(warm, jobs):
            if err:
                errors[str(job)] = err
    sticky = [job for job in jobs if "CUDA error" in str(errors.get(str(job), ""))]
    if sticky:
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, max_tasks_per_child=1) as pool:
            for job, dt, err in pool.map(warm, sticky):
                if err:
                    errors[str(job)] = err
                else:
                    del errors[str(job)]
        print(f"{len(sticky)} jobs hit a CUDA error, each ran again in its own process", flush=True)
    for job in jobs:
        if str(job) in errors:
            print(f"compile FAIL {job}: {str(errors[str(job)])[:300]}", flush=True)  # the whole error: the JSON
    print(f"compiled {len(jobs)} kernels in {time.time() - t:.0f} s ({len(errors)} failed)", flush=True)
    return errors


# ----------------------------------------------------------------------------- ceilings


def ceilings(dev):
    out = {}
    x = torch.randn(2**28, device=dev, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x))
    out["copy_TBps"] = 2 * x.numel() * 2 / t / 1e9
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    out["bf16_TFLOPs"] = 2 * n**3 / bench(lambda: a @ b) / 1e9
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
    one = torch.ones((), device=dev)
    out["fp8_scaled_mm_TFLOPs"] = 2 * n**3 / bench(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16)) / 1e9
    ai = torch.randint(-8, 8, (n, n), device=dev, dtype=torch.int8)
    bi = torch.randint(-8, 8, (n, n), device=dev, dtype=torch.int8).t()
    out["int_mm_TOPs"] = 2 * n**3 / bench(lambda: torch._int_mm(ai, bi)) / 1e9
    return out


# ----------------------------------------------------------------------------- activation kernel


def check_act(n, dev, seed, skip_names=()):
    x = act_input(272, n, dev, seed)  # not a multiple of the wider BLOCK_Ms: exercises the row mask
    m = x.shape[0]
    res = {}
    cases = [(name, True) for name in act_variants(n) if name not in skip_names] + (
        [(None, False)] if n & (n - 1) == 0 else [])
    for name, rotate in cases:
        out = PackedActivations(torch.full((m, n // 2), 0x5A, dtype=torch.uint8, device=dev),
                                torch.full((m,), float("nan"), device=dev), torch.full((m,), float("nan"), device=dev), n)
        kw = {} if name is None else dict(zip(ACT_KW, ACT_VARIANTS[name]))
        got = hadamard_quantize_pack(x, 0.9, rotate=rotate, out=out, **kw)
        ref = hadamard_quantize_pack_reference(x, 0.9, rotate=rotate)
        lo = lambda c: torch.stack(((c & 15).int(), (c >> 4).int()), -1)  # noqa: E731
        dcode = (lo(got.codes) - lo(ref.codes)).abs()
        res[name if rotate else "quant_only"] = {
            "codes_differ_frac": dcode.ne(0).float().mean().item(),
            "codes_max_abs_diff": dcode.max().item(),
            "scale_max_rel_diff": ((got.scale - ref.scale).abs() / ref.scale).max().item(),
            "zero_differ": (got.zero != ref.zero).sum().item(),
            "nan_left": int(torch.isnan(got.scale).sum().item() + torch.isnan(got.zero).sum().item()),
        }
    return res


def time_act(n, name, dev, rotate=True, **extra):
    m = act_rows(n)
    bytes_moved = m * n * 2 + m * n // 2 + 8 * m
    sets, nxt = rotating(lambda: act_input(m, n, dev, 1), m * n * 2)
    outs = PackedActivations(torch.empty(m, n // 2, dtype=torch.uint8, device=dev), torch.empty(m, device=dev),
                             torch.empty(m, device=dev), n)
    kw = dict(extra) if name is None else dict(zip(ACT_KW, ACT_VARIANTS[name]))
    t = bench(lambda: hadamard_quantize_pack(nxt(), 0.9, rotate=rotate, out=outs, **kw))
    return m, t, bytes_moved / t / 1e6  # GB/s (t in ms)


def time_copy(m, n, dev):
    x = torch.randn(m, n, device=dev).to(torch.bfloat16)
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x))
    return t, 2 * x.numel() * 2 / t / 1e6  # GB/s


# ----------------------------------------------------------------------------- GEMM


def gemm_inputs(m, n, k, dev, seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    a = torch.randint(0, 256, (m, k // 2), dtype=torch.uint8, device=dev, generator=g)
    sa = torch.rand(m, device=dev, generator=g) * 0.1 + 0.01
    za = torch.randint(0, 16, (m,), device=dev, generator=g).float()
    wc = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=dev, generator=g)
    w = prepare_weight(wc, torch.rand(n, device=dev, generator=g) * 0.01 + 0.001)
    return a, sa, za, w


def check_gemm(m, n, k, be, cfg, dev, seed):
    a, sa, za, w = gemm_inputs(m, n, k, dev, seed)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=dev)
    y = w4a4_matmul(a, sa, za, w, be, cfg, out=out)
    ref = w4a4_matmul_reference(a, sa, za, w)
    res = {"bit_exact": bool(torch.equal(y, ref)), "nan_left": int(torch.isnan(y).sum().item())}
    # worst case for fp8 accumulation: a = 15 (both nibbles 0xF), w = -8: the raw dot is -120 K;
    # with zero point 15 the exact result is 0, so any rounding of the accumulator shows
    a.fill_(0xFF)
    za.fill_(15.0)
    w = prepare_weight(torch.full((n, k), -8, dtype=torch.int8, device=dev), torch.ones(n, device=dev))
    y = w4a4_matmul(a, torch.ones_like(sa), za, w, be, cfg)
    res["worst_case_exact"] = bool(torch.all(y == 0).item())
    za.fill_(14.0)  # now y = -8 K exactly (representable in bf16 for these K)
    y = w4a4_matmul(a, torch.ones_like(sa), za, w, be, cfg)
    res["worst_case_exact"] &= bool(torch.all(y.float() == -8.0 * k).item())
    return res


def _check_configs(cfgs):
    return cfgs[:2] + [c for c in cfgs[2:] if c.split_k > 1 or c.lanes]


def best_config(row, label, configs, run, failed):
    """Time `run(cfg)` for every config that compiled: each time in row["configs"], the fastest as
    row[label_ms] / row[label_cfg]."""
    best = None
    for cfg in configs:
        if failed(cfg):
            continue
        try:
            t = bench(lambda: run(cfg))
        except Exception as e:  # noqa: BLE001
            print(f"  {label} {cfg} failed: {e!r}"[:200], flush=True)
            continue
        key = (f"{label} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages} sk{cfg.split_k}"
               + (" dp4a" if cfg.dp4a else ""))
        row.setdefault("configs", {})[key] = t
        if best is None or t < best[0]:
            best = (t, cfg)
    if best:
        row[f"{label}_ms"], row[f"{label}_cfg"] = best[0], str(best[1])


def time_gemm(m, n, k, dev, configs, errors):
    row = {}
    # bf16 baseline (F.linear): x [M, K], W [N, K]
    _, nxt = rotating(lambda: (torch.randn(m, k, device=dev, dtype=torch.bfloat16),
                               torch.randn(n, k, device=dev, dtype=torch.bfloat16)), (m + n) * k * 2)
    row["bf16_ms"] = bench(lambda: torch.nn.functional.linear(*nxt()))
    # torch._int_mm: int8 [M, K] x int8 [K, N] (column-major view of [N, K])
    try:
        _, nxt = rotating(lambda: (torch.randint(-8, 8, (m, k), dtype=torch.int8, device=dev),
                                   torch.randint(-8, 8, (n, k), dtype=torch.int8, device=dev)), (m + n) * k)
        row["int_mm_ms"] = bench(lambda: torch._int_mm(*(lambda p: (p[0], p[1].t()))(nxt())))
    except Exception as e:
        row["int_mm_ms"] = None
        row["int_mm_error"] = repr(e)[:120]
    # FP8 rowwise torch._scaled_mm, bf16 out
    try:
        def mk():
            return (torch.randn(m, k, device=dev).to(torch.float8_e4m3fn), torch.randn(n, k, device=dev).to(torch.float8_e4m3fn),
                    torch.rand(m, 1, device=dev), torch.rand(1, n, device=dev))
        _, nxt = rotating(mk, (m + n) * k)

        def sm():
            a8, w8, sa, sw = nxt()
            return torch._scaled_mm(a8, w8.t(), sa, sw, out_dtype=torch.bfloat16)
        row["scaled_mm_ms"] = bench(sm)
        # does cuBLAS sum 4-bit codes exactly at this shape (the scaled_mm backend's probe)?
        from dartquant.kernels.w4a4_gemm import scaled_mm_exact

        row["scaled_mm_exact"] = scaled_mm_exact(m, n, k, dev)
    except Exception as e:
        row["scaled_mm_ms"] = None
        row["scaled_mm_error"] = repr(e)[:120]
    # ours
    _, nxt = rotating(lambda: gemm_inputs(m, n, k, dev, 3), m * k // 2 + n * k // 2)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
    for be in ("int8", "fp8", "gemv"):
        if be == "gemv" and m > 8:
            continue
        best_config(row, be, GEMV_CONFIGS if be == "gemv" else configs,
                    lambda cfg: w4a4_matmul(*nxt(), be, cfg, out=out),
                    lambda cfg: str(("gemm", (m, n, k, cfg, be))) in errors)
    return row


# ----------------------------------------------------------------------------- run 6: operand variants


def variant_operands(a, sa, za, w, variant):
    """The operands of one PREFILL_VARIANTS entry from the packed ones (conversion untimed)."""
    be, a8, w8, _ = PREFILL_VARIANTS[variant]
    dt = torch.float8_e4m3fn if be == "fp8" else torch.int8
    return (planar_centered(a, za, w.k, dt) if a8 else a, sa, None if a8 else za, w,
            planar_weight(w, dt) if w8 else None)


def run_variant(ops, variant, cfg, out=None):
    """One GEMM of `variant` on operands from `variant_operands`."""
    be, _, _, promote = PREFILL_VARIANTS[variant]
    a_op, sa, za_op, w, w_op = ops
    if promote:
        cfg = GemmConfig(cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, cfg.group_m,
                         cfg.split_k, promote=cfg.block_k // 2)
    return w4a4_matmul(a_op, sa, za_op, w, be, cfg, out=out, w_planar=w_op)


def check_variant(m, n, k, variant, cfg, dev, seed):
    """Bit-exact vs the integer reference on random codes; the worst accumulation case exact."""
    a, sa, za, w = gemm_inputs(m, n, k, dev, seed)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=dev)
    y = run_variant(variant_operands(a, sa, za, w, variant), variant, cfg, out=out)
    res = {"bit_exact": bool(torch.equal(y, w4a4_matmul_reference(a, sa, za, w))),
           "nan_left": int(torch.isnan(y).sum().item())}
    # a = 15 with zero point 0 (centered 15) against w = -8: the exact fp32 value is -120 K
    a.fill_(0xFF)
    w = prepare_weight(torch.full((n, k), -8, dtype=torch.int8, device=dev), torch.ones(n, device=dev))
    y = run_variant(variant_operands(a, torch.ones_like(sa), torch.zeros_like(za), w, variant), variant, cfg,
                    out=torch.empty(m, n, dtype=torch.float32, device=dev))
    res["worst_case_exact"] = bool(torch.all(y == -120.0 * k).item())
    return res


def prefill_variants(dev, errors, names):
    rows, checks = [], {}
    for name in VARIANT_LINEARS:
        n, k = LINEARS[name]
        for variant in names:
            for cfg in VARIANT_CONFIGS[:1] + VARIANT_CONFIGS[3:]:
                if str(("gemm8", (515, n, k, cfg, variant))) in errors:
                    continue
                key = f"{name} M=515 {variant} {cfg.block_m}x{cfg.block_n}x{cfg.block_k}"
                try:
                    checks[key] = check_variant(515, n, k, variant, cfg, dev, len(checks))
                except Exception as e:  # noqa: BLE001
                    checks[key] = {"error": repr(e)[:200]}
    bad = {k: v for k, v in checks.items() if not (v.get("bit_exact") and v.get("worst_case_exact") and not v.get("nan_left"))}
    print(f"variant checks: {len(checks)} run, {len(bad)} not exact: {json.dumps(bad)[:1500]}", flush=True)
    for name in VARIANT_LINEARS:
        n, k = LINEARS[name]
        for m in VARIANT_M:
            row = {"linear": name, "M": m, "N": n, "K": k}
            _, nxt = rotating(lambda: (torch.randn(m, k, device=dev, dtype=torch.bfloat16),
                                       torch.randn(n, k, device=dev, dtype=torch.bfloat16)), (m + n) * k * 2)
            row["bf16_ms"] = bench(lambda: torch.nn.functional.linear(*nxt()))
            a8 = torch.randn(m, k, device=dev).to(torch.float8_e4m3fn)
            w8 = torch.randn(n, k, device=dev).to(torch.float8_e4m3fn)
            sa, sw = torch.rand(m, 1, device=dev), torch.rand(1, n, device=dev)
            row["scaled_mm_ms"] = bench(lambda: torch._scaled_mm(a8, w8.t(), sa, sw, out_dtype=torch.bfloat16))
            out = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
            for variant in names:
                sets, nxt = rotating(lambda: variant_operands(*gemm_inputs(m, n, k, dev, 3), variant), (m + n) * k)
                best_config(row, variant, VARIANT_CONFIGS,
                            lambda cfg: run_variant(nxt(), variant, cfg, out=out),
                            lambda cfg: str(("gemm8", (m, n, k, cfg, variant))) in errors)
                del sets
            flops = 2 * m * n * k
            print(f"variants {name} M={m}: bf16 {row['bf16_ms']:.4f} ms, scaled_mm {row['bf16_ms'] / row['scaled_mm_ms']:.2f}x | "
                  + ", ".join(f"{v} {row['bf16_ms'] / row[v + '_ms']:.2f}x ({flops / row[v + '_ms'] / 1e9:.0f})"
                              for v in names if row.get(v + "_ms")), flush=True)
            rows.append(row)
    return {"checks": checks, "rows": rows}


def decode_variants(dev, errors):
    """Decode rows (weights rotated through HBM): run 3's backends (time_gemm) and "int8s"."""
    rows, checks = [], {}
    for name in VARIANT_LINEARS:
        n, k = LINEARS[name]
        for m in VARIANT_DECODE_M:
            for cfg in SWAP_DECODE_CONFIGS[:2]:
                key = f"{name} M={m} int8s A8 {cfg.block_m}x{cfg.block_n}x{cfg.block_k}"
                try:
                    checks[key] = check_variant(m, n, k, "int8s A8", cfg, dev, len(checks))
                except Exception as e:  # noqa: BLE001
                    checks[key] = {"error": repr(e)[:200]}
            row = {"linear": name, "M": m, "N": n, "K": k}
            row.update(time_gemm(m, n, k, dev, DECODE_CONFIGS, errors))
            sets, nxt = rotating(lambda: variant_operands(*gemm_inputs(m, n, k, dev, 3), "int8s A8"), m * k + n * k // 2)
            out = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
            best_config(row, "int8s A8", SWAP_DECODE_CONFIGS,
                        lambda cfg: run_variant(nxt(), "int8s A8", cfg, out=out),
                        lambda cfg: str(("gemm8", (m, n, k, cfg, "int8s A8"))) in errors)
            del sets
            sp = {b: round(row["bf16_ms"] / row[f"{b}_ms"], 2) for b in ("int8", "gemv", "int8s A8") if row.get(f"{b}_ms")}
            print(f"decode {name} M={m}: bf16 {row['bf16_ms']:.4f} ms, speedup vs bf16 {sp}", flush=True)
            rows.append(row)
    bad = {k: v for k, v in checks.items() if not (v.get("bit_exact") and v.get("worst_case_exact") and not v.get("nan_left"))}
    print(f"decode variant checks: {len(checks)} run, {len(bad)} not exact: {json.dumps(bad)[:1000]}", flush=True)
    return {"checks": checks, "rows": rows}


# ----------------------------------------------------------------------------- run 9: cuBLAS FP8 (scaled_mm)
SCALED_MM_LINEARS = ["L2-7B qkvo", "L2-7B gate/up", "L2-7B down", "L3-8B k/v", "L3-8B gate/up", "L3-8B down",
                     "L2-70B q/o", "L2-70B gate/up", "L2-70B down"]
SCALED_MM_M = [8, 16, 64, 512, 2048, 8192]  # decode batches, then prefill


def scaled_mm_main(args):
    """The `scaled_mm` prefill backend (w4a4_gemm: both operands as 1-byte e4m3 codes on cuBLAS's FP8
    GEMM) against bf16 F.linear and today's default (int8s: the packed weight, Triton), per linear:
    exactness first (the backend's own per-shape probe, the random-code result in fp32 against the
    integer reference, the worst accumulation case), then time. No config sweep: each backend as the
    model runs it (default configs)."""
    dev = torch.device("cuda")
    from dartquant.kernels.w4a4_gemm import scaled_mm_exact

    t0 = time.time()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv),
              "ceilings": ceilings(dev), "rows": []}
    print(f"ceilings: {json.dumps({k: round(v, 1) for k, v in result['ceilings'].items()})}", flush=True)
    e4 = torch.float8_e4m3fn
    print("| linear | M | bf16 ms | int8s x bf16 | scaled_mm x bf16 | scaled_mm TFLOP/s (of FP8 ceiling) | exact |")
    print("|---|---|---|---|---|---|---|")
    for name in SCALED_MM_LINEARS:
        n, k = LINEARS[name]
        for m in SCALED_MM_M:
            row = {"linear": name, "M": m, "N": n, "K": k, "probe_exact": scaled_mm_exact(m, n, k, dev)}
            a, sa, za, w = gemm_inputs(m, n, k, dev, 11)
            a8, w8 = planar_centered(a, za, k, e4), planar_weight(w, e4)
            y32 = w4a4_matmul(a8, sa, None, w, "scaled_mm", out=torch.empty(m, n, device=dev), w_planar=w8)
            ref = w4a4_matmul_reference(a, sa, za, w)
            row["fp32_path_bit_exact"] = bool(torch.equal(y32.bfloat16(), ref))
            y16 = w4a4_matmul(a8, sa, None, w, "scaled_mm", w_planar=w8)
            nz = ref != 0  # cuBLAS's own bf16 epilogue vs the Triton kernels' (fp32 product order)
            row["bf16_max_rel_diff"] = float(((y16.float() - ref.float()).abs()[nz] / ref.float().abs()[nz]).max())
            row["bf16_differing_frac"] = float((y16 != ref).float().mean())
            row["bf16_nonzero_where_exact_zero"] = int((y16[~nz] != 0).sum())
            w_neg = prepare_weight(torch.full((n, k), -8, dtype=torch.int8, device=dev), torch.ones(n, device=dev))
            worst = w4a4_matmul(torch.full((m, k), 15.0, device=dev).to(e4), torch.ones(m, device=dev), None, w_neg,
                                "scaled_mm", out=torch.empty(m, n, device=dev), w_planar=planar_weight(w_neg, e4))
            row["worst_case_exact"] = bool(torch.all(worst == -120.0 * k))
            del a8, w8, y32, y16, w_neg, worst
            _, nxt = rotating(lambda: (torch.randn(m, k, device=dev, dtype=torch.bfloat16),
                                       torch.randn(n, k, device=dev, dtype=torch.bfloat16)), (m + n) * k * 2)
            row["bf16_ms"] = bench(lambda: torch.nn.functional.linear(*nxt()))
            out = torch.empty(m, n, dtype=torch.bfloat16, device=dev)

            def operands(dtype, seed):  # planar centered activations of `dtype`, the packed weight
                a, sa, za, w = gemm_inputs(m, n, k, dev, seed)
                return planar_centered(a, za, k, dtype), sa, w

            sets, nxt = rotating(lambda: (*operands(e4, 3), planar_weight(gemm_inputs(m, n, k, dev, 4)[3], e4)),
                                 (m + n) * k)
            row["scaled_mm_ms"] = bench(lambda: (lambda o: w4a4_matmul(o[0], o[1], None, o[2], "scaled_mm", out=out,
                                                                       w_planar=o[3]))(nxt()))
            sets, nxt = rotating(lambda: operands(torch.int8, 5), m * k + n * k // 2)
            row["int8s_ms"] = bench(lambda: (lambda o: w4a4_matmul(o[0], o[1], None, o[2], "int8s", out=out))(nxt()))
            del sets
            tflops = 2 * m * n * k / row["scaled_mm_ms"] / 1e9
            row["scaled_mm_TFLOPs"] = tflops
            ok = row["probe_exact"] and row["fp32_path_bit_exact"] and row["worst_case_exact"]
            print(f"| {name} | {m} | {row['bf16_ms']:.4f} | {row['bf16_ms'] / row['int8s_ms']:.2f}x | "
                  f"{row['bf16_ms'] / row['scaled_mm_ms']:.2f}x | {tflops:.0f} "
                  f"({tflops / result['ceilings']['fp8_scaled_mm_TFLOPs']:.2f}) | {'yes' if ok else 'NO'} |", flush=True)
            result["rows"].append(row)
    write_result(result, args.out, t0)


# ----------------------------------------------------------------------------- main


def norm_quant_main(args):
    """The block norm + its readers' quantization: transformers-style RMSNorm then the quant-only
    kernel (what runs unfused) vs `rmsnorm_quantize_pack` (one kernel), bf16 in, planar e4m3 and
    packed out. Codes of the fused kernel compared with the torch norm + quantizer."""
    from dartquant.kernels.act_quant import rmsnorm_quantize_pack, rmsnorm_quantize_pack_reference
    from dartquant.modules import RMSNorm

    dev = torch.device("cuda")
    t0 = time.time()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    fp8 = torch.float8_e4m3fn
    print("| N | tokens | torch RMSNorm ms | quant-only ms | unfused sum ms | fused (e4m3) ms | fused (packed) ms |"
          " fused / unfused | fused GB/s (of copy) | codes != torch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in (2048, 4096, 5120, 8192):
        for m in (1, 8, 64, 2048, 16384):
            norm = RMSNorm(torch.nn.Parameter(torch.ones(n, device=dev, dtype=torch.bfloat16)), 1e-5)
            sets, nxt = rotating(lambda: act_input(m, n, dev, 3), m * n * 2)
            x = sets[0]
            got = rmsnorm_quantize_pack(x, None, 1e-5, 0.9)
            ref = rmsnorm_quantize_pack_reference(x, norm, 0.9)
            diff = float((got.codes != ref.codes).float().mean())
            t_norm = bench(lambda: norm(nxt()))
            xs = [norm(v) for v in sets]
            state = {"i": 0}

            def normed():
                state["i"] = (state["i"] + 1) % len(xs)
                return xs[state["i"]]

            t_q = bench(lambda: hadamard_quantize_pack(normed(), 0.9, rotate=False, planar=fp8))
            t_f = bench(lambda: rmsnorm_quantize_pack(nxt(), None, 1e-5, 0.9, planar=fp8))
            t_p = bench(lambda: rmsnorm_quantize_pack(nxt(), None, 1e-5, 0.9))
            t_copy, copy_gbs = time_copy(m, n, dev)
            gbs = (m * n * 2 + m * n + 8 * m) / t_f / 1e6
            row = dict(n=n, tokens=m, torch_norm_ms=t_norm, quant_only_ms=t_q, fused_fp8_ms=t_f, fused_packed_ms=t_p,
                       copy_ms=t_copy, copy_gbs=copy_gbs, fused_gbs=gbs, codes_differ=diff)
            result["rows"].append(row)
            print(f"| {n} | {m} | {t_norm:.4f} | {t_q:.4f} | {t_norm + t_q:.4f} | {t_f:.4f} | {t_p:.4f} | "
                  f"{t_f / (t_norm + t_q):.2f} | {gbs:.0f} ({gbs / copy_gbs:.2f}) | {diff:.1e} |", flush=True)
    write_result(result, args.out, t0)
    return 0


# ----------------------------------------------------------------------------- the 4-bit K/V cache's decode attention
# (batch, query heads, KV heads, head dim, cached positions, cache slots): one slice and several (merge), MHA and
# GQA (groups of 4 and 7), head dims 64 and 128
KV4_SHAPES = [(4, 32, 32, 128, 300, 320), (64, 32, 32, 128, 513, 513), (4, 32, 8, 128, 300, 320),
              (64, 32, 8, 128, 513, 513), (3, 28, 4, 128, 200, 256), (2, 16, 4, 64, 100, 130), (2, 8, 8, 64, 77, 90)]
KV4_PATHS = {  # name: (kwargs, whether K is exact (else as the fake path holds it), MHA only)
    "default": ({}, True, False), "bytes (slots)": (dict(words=False), True, True),
    "held K": (dict(words=False, exact_k=False), False, False),
    "dots on words": (dict(slots=False, cuda_cores=False), True, True),
    "CUDA cores": (dict(slots=False, cuda_cores=True), False, True)}


def kv4_main(args):
    """`kv4_decode_attention` on the GPU, every path at several shapes: against fp32 SDPA over the cache (exact K on
    the paths that attend over it, else K as the fake path holds it in bf16), a query rotated as the model's
    store leaves it and scaled x1 and x8 (large logits), and at x1 a left-padded batch (`starts`: sequence i
    attends from position i * n / 2b; SDPA over each sequence's own positions). The bounds are the CPU tests': 2^-7
    of the largest output at x1, 1e-2 at x8 (docs/KERNELS.md, Correctness)."""
    from dartquant.hadamard import fast_hadamard_transform
    from dartquant.kernels.kv_cache import Kv4Codes, kv4_decode_attention, kv4_store

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: under TRITON_INTERPRET=1
    t0, rows = time.time(), []
    print("| batch | heads / KV | D | path | query x | max error / max output | within the bound |\n|---|---|---|---|---|---|---|")
    for b, h, hkv, d, n, smax in KV4_SHAPES:
        g = torch.Generator(dev).manual_seed(b * h + d)
        k, v = (torch.randn(b, hkv, n, d, device=dev, generator=g) for _ in range(2))
        k[0, 0, 1] *= 50.0  # a massive key
        codes, count = Kv4Codes(b, hkv, smax, d, dev), torch.tensor(n, device=dev)
        kv4_store(codes, count, k.bfloat16(), v.bfloat16(), 0.9, True)
        exact_k = codes.dequantize(torch.float32)[0][:, :, :n].repeat_interleave(h // hkv, 1)
        held_k, vq = (t[:, :, :n].float().repeat_interleave(h // hkv, 1) for t in codes.dequantize(torch.bfloat16))
        starts = torch.arange(b, device=dev, dtype=torch.int32) * (n // (2 * b))  # a left-padded batch
        for mult, padded in ((1.0, False), (8.0, False), (1.0, True)):
            q = fast_hadamard_transform((torch.randn(b, h, 1, d, device=dev, generator=g) * mult).bfloat16())
            for name, (kw, exact, mha_only) in KV4_PATHS.items():
                if mha_only and h != hkv:
                    continue
                kq = exact_k if exact else held_k
                ref = torch.cat([torch.nn.functional.scaled_dot_product_attention(
                    q[i:i + 1].float(), kq[i:i + 1, :, lo:], vq[i:i + 1, :, lo:])
                    for i, lo in enumerate(starts.tolist() if padded else [0] * b)]).transpose(1, 2)
                label = name + (", left-padded" if padded else "")
                row = dict(batch=b, heads=h, kv_heads=hkv, d=d, path=name, query_x=mult, left_padded=padded)
                try:
                    out = kv4_decode_attention(q, codes, count, d ** -0.5, False, starts=starts if padded else None,
                                               **kw).float()
                    err = ((out - ref).abs().max() / ref.abs().max()).item()
                except Exception as e:  # noqa: BLE001 - recorded
                    rows.append(dict(row, error=repr(e)[:300]))
                    print(f"| {b} | {h} / {hkv} | {d} | {label} | {mult:g} | error: {repr(e)[:80]} | no |", flush=True)
                    continue
                ok = err <= (2 ** -7 if mult == 1 else 1e-2)
                rows.append(dict(row, max_rel_err=err, ok=ok))
                print(f"| {b} | {h} / {hkv} | {d} | {label} | {mult:g} | {err:.2e} | {'yes' if ok else 'no'} |",
                      flush=True)
    result = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "kv4_checks": rows,
              "all_ok": all(r.get("ok", False) for r in rows)}
    write_result(result, args.out, t0)
    return 0 if result["all_ok"] else 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="kernels_h200.json")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (smoke test)")
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: act,gemm")
    ap.add_argument("--decode-only", action="store_true", help="GEMM rows for decode M only")
    ap.add_argument("--decode-m", type=int, nargs="+", default=None, help="these decode M only (e.g. 1 4)")
    ap.add_argument("--act-widths", default="", help="comma list: time only these activation widths")
    ap.add_argument("--profile", action="store_true", help="launch each profiled kernel once (run under ncu)")
    ap.add_argument("--norm-quant", action="store_true",
                    help="only the fused RMSNorm + quantize kernel vs the norm and the quant-only kernel apart")
    ap.add_argument("--scaled-mm", action="store_true",
                    help="run 9 only: the scaled_mm backend (cuBLAS FP8 on 1-byte codes) vs bf16 and int8s, exactness first")
    ap.add_argument("--variants", action="store_true",
                    help="runs 6-7 only: prefill operand variants (planar A / W, fp8 promotion, int8s), decode int8s")
    ap.add_argument("--variant-names", nargs="+", choices=list(PREFILL_VARIANTS), default=None,
                    help="with --variants: only these prefill variants (default: all)")
    ap.add_argument("--kv4", action="store_true",
                    help="only the 4-bit K/V cache's decode attention: every path against fp32 SDPA, several shapes")
    args = ap.parse_args()
    if args.kv4:
        return kv4_main(args)
    if args.profile:
        return profile_launches()
    if args.variants:
        return variants_main(args)
    if args.scaled_mm:
        return scaled_mm_main(args)
    if args.norm_quant:
        return norm_quant_main(args)
    global PREFILL_M, ACT_WIDTHS, DECODE_M, LINEARS
    if args.decode_only:
        PREFILL_M = []
    if args.decode_m:
        DECODE_M = args.decode_m
    if args.act_widths:
        ACT_WIDTHS = [int(v) for v in args.act_widths.split(",")]
    dev = torch.device("cuda")
    skip = set(filter(None, args.skip.split(",")))
    if args.quick:
        ACT_WIDTHS = [128, 4096, 11008]
        LINEARS = {k: LINEARS[k] for k in ("L2-7B qkvo", "L2-7B down")}
        DECODE_M, PREFILL_M = [1, 16], [2048]
    t0 = time.time()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton

    result["triton"] = triton.__version__

    jobs = []
    if "act" not in skip:
        jobs += [("act", (n, name, True)) for n in ACT_WIDTHS for name in act_variants(n)]
        jobs += [("act", (n, None, False)) for n in ACT_WIDTHS if n & (n - 1) == 0]
        jobs += [("actq", (n, bm, nw)) for n in ACT_WIDTHS if n & (n - 1) == 0 for bm, nw in QUANT_ONLY_SWEEP]
    if "gemm" not in skip:
        for name, (n, k) in LINEARS.items():
            for m in DECODE_M + PREFILL_M:
                for cfg in (DECODE_CONFIGS if m <= 64 else PREFILL_CONFIGS):
                    for be in ("int8", "fp8"):
                        jobs.append(("gemm", (m, n, k, cfg, be)))
                if m <= 8:
                    jobs += [("gemm", (m, n, k, cfg, "gemv")) for cfg in GEMV_CONFIGS]
            for m, cfgs in CHECK_SHAPES:
                if m > 64 and not PREFILL_M:
                    continue
                for cfg in _check_configs(cfgs):
                    for be in ("int8", "fp8"):
                        jobs.append(("gemm", (m, n, k, cfg, be)))
                if m <= 8:
                    jobs += [("gemm", (m, n, k, cfg, "gemv")) for cfg in _check_configs(GEMV_CONFIGS)]
    # the kernels only differ by constexprs / int specializations: dedupe by what compiles
    seen, uniq = set(), []
    for j in jobs:
        key = (j[0], j[1][0], j[1][1], j[1][2]) if j[0] in ("act", "actq") else (
            "gemm", j[1][0] == 1, j[1][0] % 16 == 0, j[1][0] if j[1][4] == "gemv" else 0,
            j[1][1] % 16 == 0, j[1][2] % 32 == 0, j[1][3], j[1][4])
        if key not in seen:
            seen.add(key)
            uniq.append(j)
    errors = compile_all(uniq, args.workers)
    result["compile_errors"] = errors
    result["ceilings"] = ceil = ceilings(dev)
    print(f"ceilings: {json.dumps({k: round(v, 1) for k, v in ceil.items()})}", flush=True)

    if "act" not in skip:
        acts = []
        for i, n in enumerate(ACT_WIDTHS):
            try:
                chk = check_act(n, dev, 100 + i, [nm for nm in act_variants(n) if str(("act", (n, nm, True))) in errors])
            except Exception as e:  # noqa: BLE001
                chk = {"error": repr(e)[:300]}
            row = {"N": n, "check": chk, "warps": {}}
            for name in act_variants(n):
                if str(("act", (n, name, True))) in errors:
                    continue
                try:
                    m, t, bw = time_act(n, name, dev)
                except Exception as e:  # noqa: BLE001
                    print(f"act {n} {name} failed {e!r}"[:200], flush=True)
                    continue
                row["warps"][name] = {"ms": t, "GBps": bw}
                row["M"] = m
            if n & (n - 1) == 0:
                m, t, bw = time_act(n, None, dev, rotate=False)
                row["quant_only"] = {"ms": t, "GBps": bw}
                for bm, nw in QUANT_ONLY_SWEEP:  # run 10: rows per program / warps of the quant-only kernel
                    try:
                        _, t, bw = time_act(n, None, dev, rotate=False, block_m=bm, num_warps=nw)
                    except Exception as e:  # noqa: BLE001
                        print(f"quant-only {n} bm{bm} w{nw} failed {e!r}"[:200], flush=True)
                        continue
                    row.setdefault("quant_only_sweep", {})[f"bm{bm} w{nw}"] = {"ms": t, "GBps": bw}
            if row["warps"]:
                tc, bwc = time_copy(row["M"], n, dev)
                best = min(row["warps"].items(), key=lambda kv: kv[1]["ms"])
                row.update(best_warps=best[0], ms=best[1]["ms"], GBps=best[1]["GBps"], copy_ms=tc, copy_GBps=bwc,
                           frac_of_copy_bw=best[1]["GBps"] / bwc, time_vs_copy=best[1]["ms"] / tc)
            acts.append(row)
            print(f"act N={n}: {json.dumps({k: v for k, v in row.items() if k != 'warps'})}", flush=True)
        # the torch path it replaces (fast_hadamard_transform + fake_quantize), two widths
        from dartquant.hadamard import fast_hadamard_transform
        from dartquant.quant.primitives import QuantSpec, fake_quantize

        spec = QuantSpec(bits=4, symmetric=False, clip_ratio=0.9)
        for n in (14336, 28672):
            x = act_input(8192, n, dev, 5)
            t = bench(lambda: fake_quantize(fast_hadamard_transform(x), spec), rep=100)
            result.setdefault("torch_fake_quant_path_ms_M8192", {})[n] = t
        result["act"] = acts
        print(f"[{time.time() - t0:.0f} s]", flush=True)

    if "gemm" not in skip:
        checks = {}
        for name, (n, k) in LINEARS.items():
            for m, cfgs in CHECK_SHAPES:
                if m > 64 and not PREFILL_M:
                    continue
                for be in ("int8", "fp8", "gemv"):
                    if be == "gemv" and m > 8:
                        continue
                    for cfg in (_check_configs(GEMV_CONFIGS) if be == "gemv" else _check_configs(cfgs)):
                        if str(("gemm", (m, n, k, cfg, be))) in errors:
                            continue
                        key = f"{name} M={m} {be} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} sk{cfg.split_k}"
                        try:
                            checks[key] = check_gemm(m, n, k, be, cfg, dev, len(checks))
                        except Exception as e:  # noqa: BLE001
                            checks[key] = {"error": repr(e)[:200]}
        bad = {k: v for k, v in checks.items() if not (v.get("bit_exact") and v.get("worst_case_exact") and not v.get("nan_left"))}
        print(f"gemm checks: {len(checks)} run, {len(bad)} not exact: {json.dumps(bad)[:1500]}", flush=True)
        result["gemm_checks"] = checks
        rows = []
        for name, (n, k) in LINEARS.items():
            for m in DECODE_M + PREFILL_M:
                row = {"linear": name, "M": m, "N": n, "K": k}
                row.update(time_gemm(m, n, k, dev, DECODE_CONFIGS if m <= 64 else PREFILL_CONFIGS, errors))
                rows.append(row)
                flops = 2 * m * n * k
                s = {kk: round(v, 4) for kk, v in row.items() if kk.endswith("_ms") and v}
                sp = {b: round(row["bf16_ms"] / row[f"{b}_ms"], 2) for b in ("int8", "fp8", "gemv") if row.get(f"{b}_ms")}
                print(f"gemm {name} M={m}: {s} speedup vs bf16 {sp} "
                      f"int8 {flops / row.get('int8_ms', float('inf')) / 1e9:.0f} TOP/s", flush=True)
        result["gemm"] = rows
    write_result(result, args.out, t0)
    print_tables(result)


def variants_main(args):
    dev = torch.device("cuda")
    import triton

    t0 = time.time()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "command": " ".join(sys.argv)}
    names = args.variant_names or list(PREFILL_VARIANTS)
    result["prefill_variant_names"] = names
    jobs = [("gemm8", (m, LINEARS[nm][0], LINEARS[nm][1], cfg, v)) for nm in VARIANT_LINEARS for m in [515] + VARIANT_M
            for v in names for cfg in VARIANT_CONFIGS]
    for nm in VARIANT_LINEARS:
        n, k = LINEARS[nm]
        for m in VARIANT_DECODE_M:
            jobs += [("gemm8", (m, n, k, cfg, "int8s A8")) for cfg in SWAP_DECODE_CONFIGS]
            jobs += [("gemm", (m, n, k, cfg, be)) for cfg in DECODE_CONFIGS for be in ("int8", "fp8")]
            jobs += [("gemm", (m, n, k, cfg, "gemv")) for cfg in GEMV_CONFIGS if m <= 8]
    seen, uniq = set(), []
    for j in jobs:  # what compiles differs only by the constexprs and the divisibility of M / N / K
        m, n, k, cfg, v = j[1]  # (the gemv kernel also by M itself: its M_PAD)
        key = (m % 16 == 0, n % 16 == 0, k % 32 == 0, cfg, v, m if v == "gemv" else 0)
        if key not in seen:
            seen.add(key)
            uniq.append(j)
    errors = compile_all(uniq, args.workers)
    # a config that failed to compile for one shape fails for all shapes of the same divisibility
    for j in jobs:
        m, n, k, cfg, v = j[1]
        for u in uniq:
            if (str(u) in errors and u[0] == j[0] and u[1][3:] == (cfg, v) and (u[1][0] % 16 == 0) == (m % 16 == 0)
                    and (v != "gemv" or u[1][0] == m)):
                errors[str(j)] = errors[str(u)]
    result["compile_errors"] = errors
    result["ceilings"] = ceilings(dev)
    print(f"ceilings: {json.dumps({k: round(v, 1) for k, v in result['ceilings'].items()})}", flush=True)
    result["variants"] = prefill_variants(dev, errors, names)
    result["decode_variants"] = decode_variants(dev, errors)
    write_result(result, args.out, t0)


def profile_launches():
    """One launch of each kernel worth a hardware-counter look (ncu -k regex:_hadamard|_w4a4)."""
    dev = torch.device("cuda")
    for n, name in ((4096, "3d w4"), (4096, "2d w4"), (11008, "2d w8"), (11008, "3d w8"), (11008, "blk t2 w8")):
        x = act_input(8192, n, dev, 0)
        hadamard_quantize_pack(x, 0.9, **dict(zip(ACT_KW, ACT_VARIANTS[name])))
    for m, cfg, be in ((1, DECODE_CONFIGS[0], "int8"), (1, GEMV_CONFIGS[0], "gemv"), (8192, PREFILL_CONFIGS[2], "int8")):
        a, sa, za, w = gemm_inputs(m, 4096, 4096, dev, 0)
        w4a4_matmul(a, sa, za, w, be, cfg)
    torch.cuda.synchronize()


def print_tables(r):
    c = r["ceilings"]
    print(f"\nceilings: copy {c['copy_TBps']:.2f} TB/s, bf16 {c['bf16_TFLOPs']:.0f} TFLOP/s, "
          f"fp8 _scaled_mm {c['fp8_scaled_mm_TFLOPs']:.0f}, _int_mm {c['int_mm_TOPs']:.0f} TOP/s")
    if "act" in r:
        print("\n| N | rows | ms | GB/s | copy GB/s | frac of copy | variant | codes differ | scale rel | quant-only frac "
              "| auto (the product's) frac of copy |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for a in r["act"]:
            if "ms" not in a:
                print(f"| {a['N']} | failed | | | | | | | | | |")
                continue
            ch = a["check"].get(a["best_warps"], {"codes_differ_frac": float("nan"), "scale_max_rel_diff": float("nan")})
            qo = a.get("quant_only")
            qf = f"{qo['GBps'] / a['copy_GBps']:.2f}" if qo else "-"
            auto = a["warps"].get("auto")
            af = f"{auto['GBps'] / a['copy_GBps']:.2f}" if auto else "-"
            print(f"| {a['N']} | {a['M']} | {a['ms']:.3f} | {a['GBps']:.0f} | {a['copy_GBps']:.0f} | "
                  f"{a['frac_of_copy_bw']:.2f} | {a['best_warps']} | {ch['codes_differ_frac']:.1e} | "
                  f"{ch['scale_max_rel_diff']:.1e} | {qf} | {af} |")
    if "gemm" in r:
        print("\n| linear | M | bf16 ms | int_mm | scaled_mm (exact on 4-bit codes) | int8 ms | fp8 ms | gemv ms | "
              "best x bf16 | TOP/s | weight GB/s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for g in r["gemm"]:
            ours = min((g[k] for k in ("int8_ms", "fp8_ms", "gemv_ms") if g.get(k)), default=None)
            f = lambda v: f"{v:.4f}" if v else "-"  # noqa: E731
            if ours:
                tops = 2 * g["M"] * g["N"] * g["K"] / ours / 1e9
                wbw = g["N"] * g["K"] / 2 / ours / 1e6
                extra = f"{g['bf16_ms'] / ours:.2f} | {tops:.0f} | {wbw:.0f}"
            else:
                extra = "- | - | -"
            exact = {True: " (exact)", False: " (NOT exact)"}.get(g.get("scaled_mm_exact"), "")
            print(f"| {g['linear']} | {g['M']} | {f(g['bf16_ms'])} | {f(g.get('int_mm_ms'))} | {f(g.get('scaled_mm_ms'))}{exact} | "
                  f"{f(g.get('int8_ms'))} | {f(g.get('fp8_ms'))} | {f(g.get('gemv_ms'))} | {extra} |")


if __name__ == "__main__":
    sys.exit(main())
