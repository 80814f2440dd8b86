"""Session 18 (GPU, one-off): the dp4a GEMV's configs at the Llama-2-7B decode shapes, the merged
siblings' (q+k+v 12288 x 4096, gate+up 22016 x 4096) among them, 1 and 4 tokens, weights rotating
through HBM; bf16 F.linear beside. Prints a table, writes JSON.
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session18_gemv_sweep.py OUT.json
"""
import json
import sys

import torch

from kernel_bench import bench, gemm_inputs, rotating
from dartquant.kernels.w4a4_gemm import GemmConfig, default_config, w4a4_matmul, w4a4_matmul_reference

dev = torch.device("cuda")
SHAPES = {"q+k+v 12288x4096": (12288, 4096), "gate+up 22016x4096": (22016, 4096), "o 4096x4096": (4096, 4096),
          "down 4096x11008": (4096, 11008)}
CONFIGS = [GemmConfig(1, bn, bk, 4, 1, split_k=sk, dp4a=True) for bn in (16, 32) for bk in (512, 1024)
           for sk in (2, 4, 8)] + [GemmConfig(1, 64, 512, 8, 1, split_k=4, dp4a=True),
                                   GemmConfig(1, 16, 512, 8, 1, split_k=8, dp4a=True)]
rows = []
for name, (n, k) in SHAPES.items():
    for m in (1, 4):
        _, nxt = rotating(lambda: (torch.randn(m, k, device=dev, dtype=torch.bfloat16),
                                   torch.randn(n, k, device=dev, dtype=torch.bfloat16)), (m + n) * k * 2)
        bf16 = bench(lambda: torch.nn.functional.linear(*nxt()))
        sets, nxt = rotating(lambda: gemm_inputs(m, n, k, dev, 3), m * k // 2 + n * k // 2)
        out = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
        a, sa, za, w = sets[0]
        ref = w4a4_matmul_reference(a, sa, za, w).to(torch.bfloat16)
        default = default_config(m, n, k, "gemv")
        res = {}
        for cfg in [default] + CONFIGS:
            key = f"{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} sk{cfg.split_k}"
            try:
                got = w4a4_matmul(a, sa, za, w, "gemv", cfg, out=torch.empty_like(out))
                ok = bool(((got.float() - ref.float()).abs() <= 2.0**-7 * ref.float().abs() + 1e-6).all())
                t = bench(lambda: w4a4_matmul(*nxt(), "gemv", cfg, out=out))
                res[key] = {"ms": t, "exact_within_epilogue": ok}
            except Exception as e:  # recorded
                res[key] = {"error": repr(e)[:160]}
        best = min((v["ms"], key) for key, v in res.items() if "ms" in v and v["exact_within_epilogue"])
        dkey = f"{default.block_n}x{default.block_k} w{default.num_warps} sk{default.split_k}"
        wbytes = n * k / 2
        row = {"linear": name, "m": m, "bf16_ms": bf16, "default": dkey, "default_ms": res[dkey].get("ms"),
               "best": best[1], "best_ms": best[0], "best_weight_gbs": wbytes / best[0] / 1e6, "configs": res}
        rows.append(row)
        print(f"| {name} | {m} | {bf16 * 1e3:.1f} | {row['default_ms'] * 1e3:.1f} | {best[1]} {best[0] * 1e3:.1f} | "
              f"{bf16 / best[0]:.2f}x | {row['best_weight_gbs']:.0f} |", flush=True)
json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, open(sys.argv[1], "w"), indent=1)
