"""Session 20 (GPU, one-off), run 28: the per-lane GEMV on planar centered int8 activations (A8: no
nibble split per token, no zero-point term) against the packed activations, at the four Llama-2-7B
decode GEMVs (merged q / k / v and gate / up, as the model runs them), 1-8 tokens, default configs;
each time many calls in one CUDA graph, each on another weight (weights through HBM). Outputs compared
with the reference first.
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session20_gemv_a8.py OUT.json
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import gemm_inputs  # noqa: E402
from session19_gemv import graph_ms, warm_clocks  # noqa: E402
from dartquant.kernels.w4a4_gemm import planar_centered, w4a4_matmul, w4a4_matmul_reference  # noqa: E402

dev = torch.device("cuda")
SHAPES = {"L2-7B q+k+v": (12288, 4096), "L2-7B o": (4096, 4096), "L2-7B gate+up": (22016, 4096),
          "L2-7B down": (4096, 11008)}


def main(out_path):
    warm_clocks()
    rows = []
    for name, (n, k) in SHAPES.items():
        nsets = max(2, min(48, int(240e6 // (n * k // 2))))
        sets = [gemm_inputs(8, n, k, dev, s) for s in range(nsets)]
        planes = [planar_centered(a, za, k, torch.int8) for a, _, za, _ in sets]
        for m in (1, 2, 4, 8):
            out = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
            a, sa, za, w = sets[0]
            ref = w4a4_matmul_reference(a[:m], sa[:m], za[:m], w)
            ok_p = torch.equal(w4a4_matmul(a[:m], sa[:m], za[:m], w, "gemv"), ref)
            ok_a8 = torch.equal(w4a4_matmul(planes[0][:m], sa[:m], None, w, "gemv"), ref)
            packed = graph_ms([lambda s=s: w4a4_matmul(s[0][:m], s[1][:m], s[2][:m], s[3], "gemv", out=out)
                               for s in sets]) * 1e3
            a8 = graph_ms([lambda s=s, p=p: w4a4_matmul(p[:m], s[1][:m], None, s[3], "gemv", out=out)
                           for s, p in zip(sets, planes)]) * 1e3
            rows.append({"linear": name, "n": n, "k": k, "m": m, "packed_us": packed, "a8_us": a8,
                         "packed_exact": ok_p, "a8_exact": ok_a8})
            print(f"| {name} | {m} | packed {packed:.2f} us | A8 {a8:.2f} us | {packed / a8:.2f}x | exact {ok_p} {ok_a8} |",
                  flush=True)
    with open(out_path, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
