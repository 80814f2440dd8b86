"""Session 19 (GPU, one-off), run 20: the decode table of docs/KERNELS.md 3b at every linear shape of
kernel_bench.LINEARS (Llama-2-7B, Llama-3-8B, Llama-2-70B) with the default GEMV configs, 1 / 4 / 8
tokens, beside bf16 F.linear and cuBLAS FP8 on the 1-byte weight; timed as session19_gemv.py times
(calls in one CUDA graph, weights rotating through 4x the L2), outputs checked bit-equal first.
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session19_decode_table.py OUT.json
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import LINEARS, compile_all, gemm_inputs, planar_weight, write_result  # noqa: E402
from session19_gemv import graph_ms, warm_clocks  # noqa: E402
from dartquant.kernels.w4a4_gemm import default_config, w4a4_matmul, w4a4_matmul_reference  # noqa: E402

dev = torch.device("cuda")
MS = (1, 4, 8)
ROTATE = 240e6


def main(out_path):
    t0 = time.time()
    compile_all([("gemm", (m, n, k, default_config(m, n, k, "gemv"), "gemv")) for (n, k) in LINEARS.values()
                 for m in MS], 15)
    warm_clocks()
    rows = []
    for name, (n, k) in LINEARS.items():
        nsets = max(2, min(48, int(ROTATE // (n * k // 2))))
        sets = [gemm_inputs(8, n, k, dev, s) for s in range(nsets)]
        bf16_w = [torch.randn(n, k, device=dev, dtype=torch.bfloat16)
                  for _ in range(max(2, min(48, int(ROTATE // (n * k * 2)) + 1)))]
        fp8_w = [planar_weight(w, torch.float8_e4m3fn) for (_, _, _, w) in sets[:max(2, min(48, int(ROTATE // (n * k)) + 1))]]
        for m in MS:
            row = {"linear": name, "n": n, "k": k, "m": m}
            xb = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            row["bf16_us"] = graph_ms([lambda w=w: torch.nn.functional.linear(xb, w) for w in bf16_w]) * 1e3
            if m > 1:
                xa = torch.randint(-8, 8, (m, k), device=dev).to(torch.float32).to(torch.float8_e4m3fn)
                sa, sw = torch.ones(m, 1, device=dev), torch.ones(1, n, device=dev)
                try:
                    row["scaled_mm_us"] = graph_ms([lambda w=w: torch._scaled_mm(xa, w.t(), sa, sw,
                                                                                  out_dtype=torch.bfloat16)
                                                    for w in fp8_w]) * 1e3
                except RuntimeError as e:
                    row["scaled_mm_us"] = repr(e)[:200]
            cfg = default_config(m, n, k, "gemv")
            a, sa_, za, w = sets[0]
            row["config"] = f"{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} sk{cfg.split_k}"
            row["bit_equal"] = bool(torch.equal(w4a4_matmul(a[:m], sa_[:m], za[:m], w, "gemv", cfg),
                                                w4a4_matmul_reference(a[:m], sa_[:m], za[:m], w)))
            outb = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
            row["gemv_us"] = graph_ms([lambda s=s: w4a4_matmul(s[0][:m], s[1][:m], s[2][:m], s[3], "gemv", cfg,
                                                               out=outb) for s in sets]) * 1e3
            row["bf16_over_gemv"] = row["bf16_us"] / row["gemv_us"]
            row["weight_gbs"] = n * k / 2 / row["gemv_us"] / 1e3
            rows.append(row)
            sm = row.get("scaled_mm_us")
            print(f"| {name} ({n}x{k}) | {m} | {row['bf16_us']:.1f} | {sm if not isinstance(sm, float) else f'{sm:.1f}'} | "
                  f"{row['gemv_us']:.1f} | {row['bf16_over_gemv']:.2f}x | {row['weight_gbs']:.0f} | {row['bit_equal']} |",
                  flush=True)
        del sets, bf16_w, fp8_w
        torch.cuda.empty_cache()
    src = [torch.empty(64 << 20, dtype=torch.uint8, device=dev) for _ in range(4)]
    dst = [torch.empty_like(s) for s in src]
    copy_gbs = 2 * (64 << 20) / graph_ms([lambda s=s, d=d: d.copy_(s) for s, d in zip(src, dst)]) / 1e6
    out = {"device": torch.cuda.get_device_name(), "copy_gbs": copy_gbs, "rows": rows}
    print(f"copy {out['copy_gbs']:.0f} GB/s")
    write_result(out, out_path, t0)


if __name__ == "__main__":
    main(sys.argv[1])
