"""Session 27 (GPU, one-off), after session27_swap_decode.py: the int8s GEMM with the word-op nibble
split (GemmConfig.asm_unpack) at the sizes that run lacked: 1-3 tokens (against the per-lane GEMV), 32 and
64 tokens (against cuBLAS FP8, the scaled_mm operand's decode path) and prefill (2048 / 8192 tokens,
against scaled_mm and the int8s prefill config without the word ops), on the four Llama-2-7B decode
linears (q / k / v and gate / up merged). Timing and checks as session27_swap_decode.py.
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session27_swap_sizes.py OUT.json
With --prefill-sweep: 48 int8s tile configs (all with the word-op split) at 2048 / 8192 tokens only.
"""
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import compile_all, gemm_inputs, planar_weight, write_result  # noqa: E402
from session19_gemv import graph_ms, warm_clocks  # noqa: E402
from session27_swap_decode import baselines  # noqa: E402
from dartquant.kernels.w4a4_gemm import GemmConfig, planar_centered, w4a4_matmul, w4a4_matmul_reference  # noqa: E402

dev = torch.device("cuda")
ROTATE = 240e6
SHAPES = {"L2-7B q+k+v": (12288, 4096), "L2-7B o": (4096, 4096), "L2-7B gate+up": (22016, 4096),
          "L2-7B down": (4096, 11008)}
G = GemmConfig
CONFIGS = {  # tokens -> int8s candidates
    "small": [G(16, 64, 512, 4, 3, asm_unpack=True), G(16, 64, 1024, 4, 3, asm_unpack=True)],
    "batch": [G(32, 64, 512, 4, 3, asm_unpack=True), G(64, 64, 512, 4, 3, asm_unpack=True),
              G(64, 128, 256, 4, 3, asm_unpack=True), G(64, 128, 512, 4, 3, asm_unpack=True),
              G(64, 128, 256, 4, 3)],
    "prefill": [G(256, 128, 128, 8, 3), G(256, 128, 128, 8, 3, asm_unpack=True),
                G(128, 128, 128, 4, 3, asm_unpack=True), G(128, 256, 128, 8, 3, asm_unpack=True),
                G(256, 128, 256, 8, 3, asm_unpack=True), G(128, 128, 256, 4, 3, asm_unpack=True)],
}
MS = {1: "small", 2: "small", 3: "small", 32: "batch", 64: "batch", 2048: "prefill", 8192: "prefill"}
if "--prefill-sweep" in sys.argv:
    CONFIGS = {"sweep": [G(bm, bn, bk, w, st, asm_unpack=True) for bm, bn, bk, w, st in
                         itertools.product((128, 256), (64, 128, 256), (128, 256), (4, 8), (3, 4))]}
    MS = {2048: "sweep", 8192: "sweep"}


def name(cfg):
    return (f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages} sk{cfg.split_k}"
            f"{' asm' if cfg.asm_unpack else ''}")


def main(out_path):
    t0 = time.time()
    jobs = [("gemm", (max(c.block_m, 16), 4096, 4096, c, "int8s")) for cs in CONFIGS.values() for c in cs]
    errors = compile_all(jobs, 15)
    bad = {name(j[1][3]) for j in jobs if str(j) in errors}
    warm_clocks()
    rows = []
    for sname, (n, k) in SHAPES.items():
        for m, kind in MS.items():
            rot = ROTATE if m <= 64 else 0  # prefill is compute-bound: two weight sets
            nsets = max(2, min(48, int(rot // (n * k // 2))))
            sets = [gemm_inputs(m, n, k, dev, s) for s in range(nsets)]
            planar = [planar_centered(a, za, k, torch.int8) for (a, _, za, _) in sets]
            bf16_w = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(max(2, min(48, int(rot // (n * k * 2)) + 1)))]
            fp8_w = [planar_weight(w, torch.float8_e4m3fn) for (_, _, _, w) in sets[:max(2, min(48, int(rot // (n * k)) + 1))]]
            a0, sa0, za0, w0 = sets[0]
            c = min(m, 256)  # the float64 reference on the first rows only (prefill: seconds otherwise)
            ref = w4a4_matmul_reference(a0[:c], sa0[:c], za0[:c], w0)
            row = {"linear": sname, "n": n, "k": k, "m": m, "int8s_us": {}, "exact": {},
                   **baselines(m, n, k, sets, bf16_w, fp8_w)}
            outb = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
            for cfg in CONFIGS[kind]:
                if name(cfg) in bad:
                    continue
                row["exact"][name(cfg)] = bool(torch.equal(w4a4_matmul(planar[0], sa0, None, w0, "int8s", cfg)[:c], ref))
                row["int8s_us"][name(cfg)] = graph_ms(
                    [lambda s=s, p=p: w4a4_matmul(p, s[1], None, s[3], "int8s", cfg, out=outb)
                     for s, p in zip(sets, planar)]) * 1e3
            best = min(row["int8s_us"], key=row["int8s_us"].get)
            row["best"], row["best_us"] = best, row["int8s_us"][best]
            rows.append(row)
            others = " ".join(f"{nm.split(' sk')[0]}{' asm' if 'asm' in nm else ''}={v:.1f}" for nm, v in row["int8s_us"].items())
            print(f"| {sname} | {m} | bf16 {row['bf16_us']:.1f} | fp8 {row.get('scaled_mm_us', float('nan')):.1f} | "
                  f"gemv {row.get('gemv_us', float('nan')):.1f} | best {best} {row['best_us']:.1f} "
                  f"({row['bf16_us'] / row['best_us']:.2f}x bf16) | exact {all(row['exact'].values())} | {others}",
                  flush=True)
            write_result({"device": torch.cuda.get_device_name(), "rows": rows, "compile_errors": errors}, out_path, t0)
            del sets, planar, bf16_w, fp8_w
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1])
