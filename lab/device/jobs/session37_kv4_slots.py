"""Session 37 (GPU, one-off, queued): the 4-bit K/V cache's decode attention with one query row and per-slot
online softmax (`kv4_decode_attention(..., slots=True)`, docs/KERNELS.md 4f) against today's paths (tensor-core
dots with the row padded to 16; the CUDA-core path), at the Llama-2-7B shape (32 heads, no GQA, head dim 128),
one query token per sequence over 513 cached positions, 32 layers' caches in one CUDA graph (each its own, so
they stream from HBM), batch 1 / 8 / 64. SDPA over a bf16 cache beside it, as session21_kv4.py times it.
Checked first: each path against fp32 SDPA over the dequantized cache (max error relative to the largest output).
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session37_kv4_slots.py OUT.json
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
# (name, keyword arguments of kv4_decode_attention); None: today's choice
PATHS = [("default", {}), ("dots bs32 w4", dict(block_s=32, num_warps=4, cuda_cores=False)),
         ("cc bs64 w4", dict(block_s=64, num_warps=4, cuda_cores=True))]
PATHS += [(f"slots bs{bs} w{w}", dict(block_s=bs, num_warps=w, slots=True)) for bs in (16, 32, 64) for w in (2, 4, 8)]


def main(out):
    t0 = time.time()
    rows = []
    print("| batch | path | us per layer | GB/s of codes + scales | max rel. error |")
    print("|---|---|---|---|---|")
    for b in (1, 8, 64):
        g = torch.Generator(dev).manual_seed(b)
        smax = CTX + 1
        q = [torch.randn(b, H, 1, D, device=dev, generator=g).bfloat16() for _ in range(LAYERS)]
        kc = [torch.randn(b, H, smax, D, device=dev, generator=g).bfloat16() for _ in range(LAYERS)]
        vc = [torch.randn(b, H, smax, D, device=dev, generator=g).bfloat16() for _ in range(LAYERS)]
        sdpa = graph_ms([lambda i=i: F.scaled_dot_product_attention(q[i], kc[i], vc[i]) for i in range(LAYERS)]) * 1e3
        rows.append(dict(batch=b, path="bf16 sdpa", us=sdpa, gbs=b * H * smax * D * 4 / sdpa / 1e3))
        print(f"| {b} | bf16 SDPA | {sdpa:.1f} | {rows[-1]['gbs']:.0f} (bf16) | - |", flush=True)
        kc.clear()
        vc.clear()
        torch.cuda.empty_cache()
        caches = filled_caches(b, H, smax, smax, g)
        count = torch.tensor(smax, device=dev)
        kq, vq = caches[0].dequantize(torch.bfloat16)
        ref = F.scaled_dot_product_attention(fast_hadamard_transform(q[0]).float(), kq.float(), vq.float()).transpose(1, 2)
        kv4_bytes = b * H * smax * (D + 16)
        for name, kw in PATHS:
            try:
                out0 = kv4_decode_attention(q[0], caches[0], count, D ** -0.5, True, **kw)
                err = ((out0.float() - ref).abs().max() / ref.abs().max()).item()
                us = graph_ms([lambda i=i: kv4_decode_attention(q[i], caches[i], count, D ** -0.5, True, **kw)
                               for i in range(LAYERS)]) * 1e3
            except Exception as e:  # noqa: BLE001 - recorded (refused, out of resources)
                rows.append(dict(batch=b, path=name, error=repr(e)[:300]))
                print(f"| {b} | {name} | error | {repr(e)[:100]} | |", flush=True)
                continue
            rows.append(dict(batch=b, path=name, kwargs=kw, us=us, gbs=kv4_bytes / us / 1e3, max_rel_err=err))
            print(f"| {b} | {name} | {us:.1f} | {kv4_bytes / us / 1e3:.0f} | {err:.2e} |", flush=True)
        del caches
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
              "wall_s": time.time() - t0}
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, out)
    print(f"wrote {out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1])
