"""Session 48 (issue 16): one launch each of the int8s decode GEMM's default config at the shapes that stay furthest
from 3x bf16 (docs/KERNELS.md 4m: the 7B o and the 8B q+k+v at 8 / 16 tokens; the 7B down beside them), for Nsight
Compute's warp-state statistics: what the warps wait on (the GEMM sits at 1.3-1.6x its read floor; neither the
activation traffic (M = 8 and 16 take the same time) nor the instruction count (a third fewer gave 1-6 %) explains it).
Beside them, session 46's read-only kernel on the o's packed bytes at its best config (16 rows, 2 warps, 128 words,
split 4) and at the GEMM's structure (16 rows, 2 warps, no split): what HBM does when nothing but loads is in the way.
Warm-up launches first, then one profiled launch a case (ncu -k regex:_w4a4_swap --launch-skip 0 sees them all).

    PYTHONPATH=src:benchmarks ncu --set full -k regex:'_w4a4_swap|_read_kernel' python3 lab/device/jobs/session48_gemm_ncu.py
"""
import torch

from kernel_bench import gemm_inputs
from session46_decode_floor import read_call
from dartquant.kernels.w4a4_gemm import default_config, planar_centered, w4a4_matmul

CASES = (("L2-7B o", 4096, 4096, 16), ("L2-7B o", 4096, 4096, 8), ("L3-8B q+k+v", 6144, 4096, 16),
         ("L2-7B down", 4096, 11008, 16))


def main():
    dev = torch.device("cuda")
    for name, n, k, m in CASES:
        a, sa, za, w = gemm_inputs(m, n, k, dev, 0)
        p = planar_centered(a, za, k, torch.int8)
        cfg = default_config(m, n, k, "int8s")
        w4a4_matmul(p, sa, None, w, "int8s", cfg)  # compiles (ncu profiles this one too: the first of each case)
        torch.cuda.synchronize()
        print(name, m, cfg, flush=True)
    w32 = torch.randint(-2**31, 2**31 - 1, (4096, 4096 // 8), dtype=torch.int32, device=dev)  # o's packed codes
    out = torch.empty(4096 * 4, dtype=torch.int32, device=dev)
    for cfg in ((16, 2, 128, 4), (16, 2, 128, 1)):
        read_call(w32, out, cfg)()
        torch.cuda.synchronize()
        print("read o", cfg, flush=True)


if __name__ == "__main__":
    main()
