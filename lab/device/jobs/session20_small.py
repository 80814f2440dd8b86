"""Session 20 (GPU, one-off), run 24: warp counts of the two one-program-per-token kernels a decode
step runs besides the split one: the fused RMSNorm + quantize (64 calls a 7B step) and the
quantize-only kernel (o_proj's input, 32 calls), at 4096 wide, 1 and 8 tokens, as the model runs
them (32 calls on 32 inputs in one CUDA graph). Outputs first compared with the default's.
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session20_small.py OUT.json
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import act_input  # noqa: E402
from session19_gemv import graph_ms, warm_clocks  # noqa: E402
from dartquant.kernels.act_quant import hadamard_quantize_pack, rmsnorm_quantize_pack  # noqa: E402

dev = torch.device("cuda")


def same(a, b):
    return torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)


def main(out_path):
    warm_clocks()
    rows = []
    gain = torch.rand(4096, device=dev).to(torch.bfloat16) + 0.5
    kernels = {"rmsnorm_quant": lambda x, **kw: rmsnorm_quantize_pack(x, gain, 1e-5, 0.9, **kw),
               "quant_only": lambda x, **kw: hadamard_quantize_pack(x, 0.9, rotate=False, **kw)}
    for name, fn in kernels.items():
        for m in (1, 8):
            xs = [act_input(m, 4096, dev, s) for s in range(32)]
            ref = fn(xs[0])
            res = {"default": graph_ms([lambda x=x: fn(x) for x in xs]) * 1e3}
            for w in (1, 2, 4, 8, 16):
                try:
                    if not same(fn(xs[0], num_warps=w), ref):
                        res[f"w{w}"] = "differs"
                        continue
                    res[f"w{w}"] = graph_ms([lambda x=x: fn(x, num_warps=w) for x in xs]) * 1e3
                except Exception as e:  # recorded
                    res[f"w{w}"] = repr(e)[:200]
            rows.append({"kernel": name, "n": 4096, "m": m, "us": res})
            print(f"| {name} | {m} | " + " | ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in res.items()) + " |", flush=True)
    with open(out_path, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
