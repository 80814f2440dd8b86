"""Session 20 (GPU, one-off), run 27: the SiLU x up product fused into the blocks activation kernel at
prefill sizes, against the model's path (torch's silu and the product on the column halves of the
merged gate / up output, then the kernel), at 11008 wide (Llama-2-7B's down_proj input), 512-8192 tokens.
Outputs compared first. Times: calls on 4 inputs in one CUDA graph, median.
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session20_gated_prefill.py OUT.json
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import act_input  # noqa: E402
from session19_gemv import graph_ms, warm_clocks  # noqa: E402
from dartquant.kernels.act_quant import hadamard_quantize_pack  # noqa: E402

dev = torch.device("cuda")
F = torch.nn.functional
N = 11008


def main(out_path):
    warm_clocks()
    rows = []
    for m in (512, 2048, 8192):
        merged = [torch.cat([act_input(m, N, dev, s), act_input(m, N, dev, 50 + s)], 1) for s in range(4)]
        halves = [(t[:, :N], t[:, N:]) for t in merged]
        g, u = halves[0]
        ref = hadamard_quantize_pack(F.silu(g) * u, 0.9)
        got = hadamard_quantize_pack(g, 0.9, gated_up=u)
        differs = int((got.codes != ref.codes).sum()) + int((got.scale != ref.scale).sum())
        plain = graph_ms([lambda g=g: hadamard_quantize_pack(g, 0.9) for g, _ in halves]) * 1e3
        model = graph_ms([lambda g=g, u=u: hadamard_quantize_pack(F.silu(g) * u, 0.9) for g, u in halves]) * 1e3
        fused = graph_ms([lambda g=g, u=u: hadamard_quantize_pack(g, 0.9, gated_up=u) for g, u in halves]) * 1e3
        rows.append({"m": m, "n": N, "kernel_alone_us": plain, "silu_mul_then_kernel_us": model, "fused_us": fused,
                     "differs": differs})
        print(f"| {m} | kernel alone {plain:.1f} | silu, mul, kernel {model:.1f} | fused {fused:.1f} | differs {differs} |",
              flush=True)
    with open(out_path, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
