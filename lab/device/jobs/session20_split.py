"""Session 20 (GPU, one-off), run 21: the split activation kernel (one token over several programs,
the last one quantizing) against today's decode choice, and the SiLU x up product fused into it,
timed as a decode step runs them (32 calls on 32 inputs in one CUDA graph), at 1 and 8 tokens.
Every timed output is first compared with the reference (auto on x, or auto on the torch product).
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session20_split.py OUT.json
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import act_input  # noqa: E402
from session19_gemv import graph_ms, warm_clocks  # noqa: E402
from dartquant.kernels.act_quant import hadamard_quantize_pack  # noqa: E402

dev = torch.device("cuda")
WIDTHS = [4096, 4864, 8192, 8960, 11008, 14336, 28672]
F = torch.nn.functional


def differs(a, b):
    return int((a.codes != b.codes).sum()) + int((a.scale != b.scale).sum()) + int((a.zero != b.zero).sum())


def main(out_path):
    t0 = time.time()
    warm_clocks()
    rows = []
    for n in WIDTHS:
        for m in (1, 8):
            xs = [act_input(m, n, dev, s) for s in range(32)]
            us = [act_input(m, n, dev, 100 + s) for s in range(32)]
            res = {}
            ref = hadamard_quantize_pack(xs[0], 0.9)
            gref = hadamard_quantize_pack(F.silu(xs[0]) * us[0], 0.9)
            cands = {"auto": {}}
            for w in (4, 8):
                cands[f"split w{w}"] = dict(variant="split", num_warps=w)
            for name, kw in cands.items():
                try:
                    d = differs(hadamard_quantize_pack(xs[0], 0.9, **kw), ref)
                    t = graph_ms([lambda x=x: hadamard_quantize_pack(x, 0.9, **kw) for x in xs]) * 1e3
                    res[name] = {"us": t, "differs": d}
                except Exception as e:  # recorded
                    res[name] = {"error": repr(e)[:300]}
            # SiLU x up: the model's two elementwise kernels + the kernel, against the fused input
            res["silu*up then auto"] = {"us": graph_ms([lambda x=x, u=u: hadamard_quantize_pack(F.silu(x) * u, 0.9)
                                                       for x, u in zip(xs, us)]) * 1e3, "differs": 0}
            for name, kw in cands.items():
                try:
                    d = differs(hadamard_quantize_pack(xs[0], 0.9, gated_up=us[0], **kw), gref)
                    t = graph_ms([lambda x=x, u=u: hadamard_quantize_pack(x, 0.9, gated_up=u, **kw)
                                  for x, u in zip(xs, us)]) * 1e3
                    res["gated " + name] = {"us": t, "differs": d}
                except Exception as e:  # recorded
                    res["gated " + name] = {"error": repr(e)[:300]}
            rows.append({"n": n, "m": m, "results": res})
            print(f"| {n} | {m} | " + " | ".join(f"{k} {v['us']:.1f}" + (f" (differs {v['differs']})" if v["differs"] else "")
                                             if "us" in v else f"{k} ERR" for k, v in res.items()) + " |", flush=True)
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "seconds": time.time() - t0}
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)
    for r in rows:
        for k, v in r["results"].items():
            if "error" in v:
                print(r["n"], r["m"], k, v["error"])


if __name__ == "__main__":
    main(sys.argv[1])
