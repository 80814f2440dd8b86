"""Session 48 (issue 16), an experiment: the K-sliced int8s decode GEMM (`_w4a4_swap_sliced_kernel`) with its tiles
loaded by TMA (Triton tensor descriptors) instead of per-thread cp.async. Section 4l / 4m's SASS: of the sliced
kernel's ~170 loop instructions a warp a step, 16 are IMMA and about 50 are the per-thread loads' 64-bit address
increments, masks and LDGSTS; a tensor-memory copy is one instruction a tile, its bounds checked by the hardware (the
rows past M and the K past KH read as zeros). If the per-warp instruction chain bounds the small linears (o, the 8B
q+k+v: 1.3-1.6x their read floor), fewer instructions should show.

Offline (`--sass`, 16 rows, 2 slices of 128 bytes, 2 warps, 4 stages): it compiles to UTMALDG.3D and mbarrier waits,
but the loop is 168 instructions against the cp.async kernel's 170: the per-thread address work is gone, and about
as many uniform-datapath, election, barrier and fence instructions came with the TMA. Whether it is faster anyway
(the loads no longer on the warps' chain) only the GPU can say; not timed yet.

The tiles come as 3-D boxes: the weight codes viewed [N, KH / SLICE_KH, SLICE_KH] (box [rows, SLICES, SLICE_KH]),
the planar activations' low and high halves each viewed [M, KH / SLICE_KH, SLICE_KH] from their own base (box
[16, SLICES, SLICE_KH]); permuted to the batched dot's [SLICES, rows, K] x [SLICES, K, tokens]. KH must be a
multiple of SLICE_KH (K = 4096 / 11008 / 14336 with SLICE_KH = 128).

    TRITON_INTERPRET=1 PYTHONPATH=src:benchmarks python lab/device/jobs/session48_tma.py --check   # CPU, bit-exact
    PYTHONPATH=src python lab/device/jobs/session48_tma.py --sass            # CPU: sm_90 SASS counts, no GPU
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session48_tma.py OUT.json   # GPU: timed against the default
"""
import os
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from dartquant.kernels.w4a4_gemm import _nibbles_times16, _swap_epilogue_store

# (weight rows a program, packed K bytes a slice a step (128: the default's 256 codes), slices, warps, stages)
CONFIGS = [(16, 128, 2, 2, 4), (16, 128, 2, 2, 3), (16, 128, 4, 4, 3), (32, 128, 2, 2, 3), (16, 128, 1, 1, 4),
           (16, 256, 2, 2, 3)]
SHAPES = {"L2-7B q+k+v": (12288, 4096), "L2-7B o": (4096, 4096), "L2-7B gate+up": (22016, 4096),
          "L2-7B down": (4096, 11008), "L3-8B q+k+v": (6144, 4096), "L3-8B down": (4096, 14336)}


@triton.jit
def _sliced_tma_kernel(w_desc, alo_desc, ahi_desc, sa_ptr, sw_ptr, y_ptr, M, N, steps, stride_ym,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLICE_KH: tl.constexpr, SLICES: tl.constexpr,
                       STATIC_STEPS: tl.constexpr, ASM: tl.constexpr):
    pid = tl.program_id(0)
    n0 = pid * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((SLICES, BLOCK_N, BLOCK_M), dtype=tl.int32)
    for i in range(0, STATIC_STEPS if STATIC_STEPS > 0 else steps):
        w8 = tl.permute(w_desc.load([n0, i * SLICES, 0]), (1, 0, 2)).to(tl.int8, bitcast=True)
        a_lo = tl.permute(alo_desc.load([0, i * SLICES, 0]), (1, 2, 0))  # [SLICES, SLICE_KH, BLOCK_M]
        a_hi = tl.permute(ahi_desc.load([0, i * SLICES, 0]), (1, 2, 0))
        acc = tl.dot(_nibbles_times16(w8, False, ASM), a_lo, acc, out_dtype=tl.int32)
        acc = tl.dot(_nibbles_times16(w8, True, ASM), a_hi, acc, out_dtype=tl.int32)
    _swap_epilogue_store(tl.sum(acc, axis=0) >> 4, sa_ptr, sw_ptr, y_ptr, stride_ym, offs_m, offs_n, offs_m < M,
                         offs_n < N, False)


def descriptors(a_planar, codes, rows, slice_kh, slices):
    """The three TMA descriptors (module doc); KH a multiple of slice_kh."""
    m, kh = a_planar.shape[0], codes.shape[1]
    if kh % slice_kh or a_planar.shape[1] != 2 * kh:
        raise ValueError(f"KH = {kh} must be a multiple of {slice_kh}, activations [M, 2 KH]")
    nsl = kh // slice_kh
    w = TensorDescriptor(codes, [codes.shape[0], nsl, slice_kh], [codes.stride(0), slice_kh, 1],
                         [rows, slices, slice_kh])
    lo = TensorDescriptor(a_planar, [m, nsl, slice_kh], [a_planar.stride(0), slice_kh, 1], [16, slices, slice_kh])
    hi = TensorDescriptor(a_planar[:, kh:], [m, nsl, slice_kh], [a_planar.stride(0), slice_kh, 1],
                          [16, slices, slice_kh])
    return w, lo, hi


def tma_matmul(a_planar, a_scale, weight, cfg, out=None):
    rows, slice_k, slices, warps, stages = cfg
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    m, n, kh = a_planar.shape[0], weight.codes.shape[0], weight.codes.shape[1]
    out = torch.empty(m, n, dtype=torch.bfloat16, device=a_planar.device) if out is None else out
    w, lo, hi = descriptors(a_planar, weight.codes, rows, slice_k, slices)
    steps = triton.cdiv(kh, slices * slice_k)
    _sliced_tma_kernel[(triton.cdiv(n, rows),)](
        w, lo, hi, a_scale, weight.scale, out, m, n, steps, out.stride(0), BLOCK_M=16, BLOCK_N=rows,
        SLICE_KH=slice_k, SLICES=slices, STATIC_STEPS=steps if interpret else 0, ASM=not interpret,
        num_warps=warps, num_stages=stages)
    return out


def check():
    """Bit-exact against the integer reference on small shapes (tokens 3 / 16, K ragged in the last step)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "benchmarks"))
    from kernel_bench import gemm_inputs
    from dartquant.kernels.w4a4_gemm import planar_centered, w4a4_matmul_reference

    for n, k in ((48, 768), (32, 1280)):
        a, sa, za, w = gemm_inputs(16, n, k, "cpu", 0)
        p = planar_centered(a, za, k, torch.int8)
        for cfg in ((16, 128, 2, 2, 2), (16, 128, 1, 1, 2), (32, 128, 4, 4, 2)):
            for m in (3, 16):
                got = tma_matmul(p[:m], sa[:m], w, cfg)
                want = w4a4_matmul_reference(a[:m], sa[:m], za[:m], w)
                assert torch.equal(got, want), (n, k, cfg, m, (got.float() - want.float()).abs().max())
    print("tma sliced: bit-exact")


def sass(cfg):
    """Compile for sm_90 on the CPU (lab/sass_stats.py's tools): registers and the loop's instruction count."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from triton.backends.compiler import GPUTarget

    import sass_stats

    rows, slice_k, slices, warps, stages = cfg
    kernel = _sliced_tma_kernel
    sig = dict(w_desc=f"tensordesc<u8[{rows}, {slices}, {slice_k}]>",
               alo_desc=f"tensordesc<i8[16, {slices}, {slice_k}]>", ahi_desc=f"tensordesc<i8[16, {slices}, {slice_k}]>",
               sa_ptr="*fp32", sw_ptr="*fp32", y_ptr="*bf16", M="i32", N="i32", steps="i32", stride_ym="i32")
    consts = dict(BLOCK_M=16, BLOCK_N=rows, SLICE_KH=slice_k, SLICES=slices, STATIC_STEPS=0, ASM=True)
    sig.update({k: "constexpr" for k in consts})
    attrs = {(kernel.arg_names.index(k),): [["tt.divisibility", 16]] for k in ("sa_ptr", "sw_ptr", "y_ptr", "N",
                                                                                 "stride_ym")}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, attrs=attrs,
                                    constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=warps, num_stages=stages, enable_fp_fusion=False))
    return sass_stats.sass_stats(compiled)


def main(out_path):
    """On the GPU: each config bit-exact first, then timed against the product's default (µs a call, calls in one
    CUDA graph, weights rotating through 4x the L2: session47_sliced.py's harness)."""
    import time

    sys.path.insert(0, os.path.dirname(__file__))
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "benchmarks"))
    from kernel_bench import write_result
    from session19_gemv import check_and_time, decode_cases, product_matmul, warm_clocks
    from dartquant.kernels.w4a4_gemm import default_config

    dev, t0, rows = torch.device("cuda"), time.time(), []
    warm_clocks()
    for sname, n, k, m, sets, planar, want, outb in decode_cases(SHAPES, lambda n: (8, 16), dev):
        dcfg = default_config(m, n, k, "int8s")
        row = {"linear": sname, "n": n, "k": k, "m": m, "exact": {}, "us": {}, "failed": {}}
        row["default_exact"], row["default_us"] = check_and_time(product_matmul(dcfg), sets, planar, m, want, outb)
        for cfg in CONFIGS:
            name = "{}x{}B S{} w{} s{}".format(*cfg)
            try:
                row["exact"][name], row["us"][name] = check_and_time(
                    lambda p, sa, w, out=None, c=cfg: tma_matmul(p, sa, w, c, out=out), sets, planar, m, want, outb)
            except Exception as e:  # noqa: BLE001 - recorded
                row["failed"][name] = repr(e)[:200]
        best = min(row["us"], key=row["us"].get) if row["us"] else None
        rows.append(row)
        print(f"| {sname} | {m} | default {row['default_us']:.2f} (exact {row['default_exact']}) | best TMA "
              f"{best} {row['us'].get(best, float('nan')):.2f} | all exact {all(row['exact'].values())} | "
              f"failed {len(row['failed'])} |", flush=True)
        write_result({"device": torch.cuda.get_device_name(), "rows": rows}, out_path, t0)


if __name__ == "__main__":
    if "--check" in sys.argv:
        check()
    elif "--sass" in sys.argv:
        for cfg in CONFIGS:
            print(cfg, sass(cfg))
    else:
        main(sys.argv[1])
