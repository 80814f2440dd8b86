"""Session 42 (GPU, one-off): the 4-bit decode attention with its nibbles made floats by their bits (`nibble_bits`,
`kv_cache._centered_halves`) against the int -> float conversion before it, and (FACTORED=1) the slots loop with the
scales and zeros out of the per-element work (`factored`, `kv_cache._slots_loop_factored`), at the Llama-2-7B shape (32 heads, no
GQA, head dim 128, 513 cached positions, 32 layers' caches in one CUDA graph), batch 1 / 8 / 64, each path at
today's choice and at its neighbours, in two orders. Checked against fp32 SDPA over the dequantized cache, and the
two paths' outputs against each other (they should be equal: both subtractions are exact).
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session42_kv4_bits.py OUT.json
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from session19_gemv import graph_ms  # noqa: E402
from session21_kv4 import CTX, D, LAYERS, filled_caches  # noqa: E402
from dartquant.hadamard import fast_hadamard_transform  # noqa: E402
from dartquant.kernels.kv_cache import kv4_decode_attention  # noqa: E402

dev = torch.device("cuda")
F = torch.nn.functional
H = 32
if os.environ.get("FACTORED") == "1":  # variant pairs: (today's, factored) at the same block / warps
    PATHS = [("default", {})] + [(f"slots bs{bs} w{w}", dict(block_s=bs, num_warps=w, slots=True))
                                 for bs, w in ((32, 2), (64, 2), (32, 4), (64, 4))]
    VARIANTS = ("factored kv", dict(factored="kv")), ("factored v", dict(factored="v")), ("today", {})
else:
    VARIANTS = ("bits", dict(nibble_bits=True)), ("convert", dict(nibble_bits=False))
PATHS = PATHS if os.environ.get("FACTORED") == "1" else [("default", {}), ("slots bs32 w8", dict(block_s=32, num_warps=8, slots=True)),
         ("slots bs16 w4", dict(block_s=16, num_warps=4, slots=True)), ("slots bs64 w8", dict(block_s=64, num_warps=8, slots=True))]


def main(out):
    t0, rows = time.time(), []
    print("| batch | path | nibbles | us per layer | GB/s of codes + scales | max rel. error | != other path |")
    print("|---|---|---|---|---|---|---|")
    for b in ((64, 8) if os.environ.get("FACTORED") == "1" else (64, 8, 1)):
        g = torch.Generator(dev).manual_seed(b)
        smax = CTX + 1
        q = [torch.randn(b, H, 1, D, device=dev, generator=g).bfloat16() for _ in range(LAYERS)]
        caches = filled_caches(b, H, smax, smax, g)
        count = torch.tensor(smax, device=dev)
        kq, vq = caches[0].dequantize(torch.bfloat16)
        ref = F.scaled_dot_product_attention(fast_hadamard_transform(q[0]).float(), kq.float(), vq.float()).transpose(1, 2)
        kv4_bytes = b * H * smax * (D + 16)
        for order in (0, 1):
            for name, kw in PATHS:
                outs = {}
                for bits, vkw in (VARIANTS if order == 0 else VARIANTS[::-1]):
                    kwb = dict(kw, **vkw)
                    try:
                        outs[bits] = kv4_decode_attention(q[0], caches[0], count, D ** -0.5, True, **kwb)
                        err = ((outs[bits].float() - ref).abs().max() / ref.abs().max()).item()
                        us = graph_ms([lambda i=i: kv4_decode_attention(q[i], caches[i], count, D ** -0.5, True, **kwb)
                                       for i in range(LAYERS)]) * 1e3
                    except Exception as e:  # noqa: BLE001 - recorded (refused, out of resources)
                        rows.append(dict(batch=b, path=name, bits=bits, error=repr(e)[:300]))
                        print(f"| {b} | {name} | {bits} | error | {repr(e)[:100]} | | |", flush=True)
                        continue
                    o = list(outs.values())
                    diff = (o[0] != o[-1]).sum().item() if len(o) >= 2 else None
                    if diff is not None and os.environ.get("FACTORED") == "1":  # not equal: how far apart
                        diff = ((o[-1].float() - o[0].float()).abs().max() / ref.abs().max()).item()
                    rows.append(dict(batch=b, path=name, kwargs=kw, bits=bits, order=order, us=us,
                                     gbs=kv4_bytes / us / 1e3, max_rel_err=err, differing_outputs=diff))
                    print(f"| {b} | {name} | {bits} | {us:.1f} | {kv4_bytes / us / 1e3:.0f} | "
                          f"{err:.2e} | {'' if diff is None else diff} |", flush=True)
        del caches
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
              "wall_s": time.time() - t0}
    with open(out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(out + ".tmp", out)
    print(f"wrote {out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1])
