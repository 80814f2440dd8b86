"""Session 42 (GPU, one-off; docs/KERNELS.md 4g): the 4-bit decode attention's variants timed against each other at
the Llama-2-7B shape (32 heads, no GQA, head dim 128, 513 cached positions, 32 layers' caches in one CUDA graph),
each path at today's choice and at its neighbours, every variant in two orders.
  --compare exact_k:  the slots loop with K's and V's scales and zeros out of the per-element work (`exact_k`,
                      the default) against the loop before it (K as the fake path holds it)
  --compare fusion:   FMA contraction (`fp_fusion`) on and off
  --compare rotate:   session 43: the decode kernel with and without the query's R3 (its prologue's cost)
  --compare width:    session 43: 8 / 16 / 32 positions a step on 1 / 2 warps (occupancy by registers)
  --compare config:   session 43: the words loop as the model runs it, at several slot widths and warps
  --compare words:    session 43: today's default, with FMA contraction, and the codes
                      read as int32 words (`words`), alone and with both
  --compare gqa:      session 44: the Llama-3-8B shape (8 KV heads, groups of 4): the tensor-core dots on words
                      (the default since) against the dots with K as held, at several steps and warps
(Session 42's runs, at commit 7779162, also compared `nibble_bits` and a V-only factoring; session 43's compared a
lazy rescale, a prefetch and loads one step ahead (kv4_ahead_h100_session43.json, from a switch that was timed and
removed before it was committed); those knobs are gone.)
Checked against fp32 SDPA over the bf16-dequantized cache, and the first variant against the last.
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session42_kv4_bits.py OUT.json [--compare factored]
"""
import argparse
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
COMPARISONS = {  # session 42 also timed `nibble_bits` and a V-only factoring (removed after it; KERNELS 4g)
    "exact_k": dict(
        variants=(("exact K", dict(exact_k=True)), ("held K", dict(exact_k=False))),
        paths=[("default", {})] + [(f"slots bs{bs} w{w}", dict(block_s=bs, num_warps=w, slots=True))
                                   for bs, w in ((32, 2), (64, 2), (32, 4), (64, 4))],
        batches=(64, 8, 1)),
    "fusion": dict(  # queued (session 42): FMA contraction in the decode kernel, off since it was written
        variants=(("fp fusion", dict(fp_fusion=True)), ("no fusion", dict(fp_fusion=False))),
        paths=[("default", {})] + [(f"slots bs{bs} w{w}", dict(block_s=bs, num_warps=w, slots=True))
                                   for bs, w in ((16, 2), (32, 4), (64, 4))],
        batches=(64, 8, 1)),
    "words": dict(  # session 43 (KERNELS 4h); a lazy rescale and a two-step prefetch were timed too (in runs with
        # them; both slower or even once R3 left the kernel) and removed
        variants=(("default", {}), ("fusion", dict(fp_fusion=True)),
                  ("words fusion", dict(words=True, fp_fusion=True)),
                  ("words fusion bs32 w2", dict(words=True, fp_fusion=True, block_s=32, num_warps=2))),
        paths=[("default", {})] + [(f"slots bs{bs} w{w}", dict(block_s=bs, num_warps=w, slots=True))
                                   for bs, w in ((32, 4), (16, 4), (64, 4))],
        batches=(64, 8, 1)),
    "rotate": dict(  # session 43: what the in-kernel R3 of the query costs (rotate_q=False: not the same result)
        variants=(("words, R3 in kernel", dict(words=True, fp_fusion=True)),
                  ("words, no R3", dict(words=True, fp_fusion=True, rotate_q=False)),
                  ("default, no R3", dict(rotate_q=False)), ("default, R3 in kernel", {})),
        paths=[("default", {}), ("slots bs32 w4", dict(block_s=32, num_warps=4, slots=True))],
        batches=(64, 8)),
    "config": dict(  # session 43: the words loop as the model runs it (R3 in the store's launch), its configs
        variants=(("words", dict(rotate_q=False)), ("session 42", dict(words=False, fp_fusion=False))),
        paths=[("default", {})] + [(f"slots bs{bs} w{w}", dict(block_s=bs, num_warps=w, slots=True))
                                   for bs, w in ((32, 4), (16, 2), (16, 4), (64, 4))],
        batches=(64, 8, 1)),
    "gqa": dict(  # session 44: the GQA group on the tensor cores with the codes as words (bf16 numbers by a mask)
        hkv=8,
        variants=(("dots words", dict(rotate_q=False)), ("dots held", dict(rotate_q=False, words=False, exact_k=False))),
        paths=[("default", {})] + [(f"dots bs{bs} w{w}", dict(block_s=bs, num_warps=w))
                                   for bs, w in ((16, 2), (32, 2), (16, 4), (64, 4))],
        batches=(64, 8, 1)),
    "width": dict(  # session 43, after Nsight Compute (25 % occupancy by registers at batch 64): narrower steps
        variants=(("words", dict(rotate_q=False)),),
        paths=[("default", {})] + [(f"slots bs{bs} w{w}", dict(block_s=bs, num_warps=w, slots=True))
                                   for bs, w in ((8, 2), (8, 1), (16, 1), (16, 2), (32, 2))],
        batches=(64, 8)),
}


def main(out, compare):
    cmp = COMPARISONS[compare]
    t0, rows = time.time(), []
    print("| batch | path | variant | us per layer | GB/s of codes + scales | max rel. error | first vs last variant |")
    print("|---|---|---|---|---|---|---|")
    for b in cmp["batches"]:
        g = torch.Generator(dev).manual_seed(b)
        smax = CTX + 1
        q = [torch.randn(b, H, 1, D, device=dev, generator=g).bfloat16() for _ in range(LAYERS)]
        q_r3 = [fast_hadamard_transform(x) for x in q]  # rotate_q=False: the query as the store's launch leaves it
        hkv = cmp.get("hkv", H)
        caches = filled_caches(b, hkv, smax, smax, g)
        count = torch.tensor(smax, device=dev)
        kq, vq = caches[0].dequantize(torch.bfloat16)
        kq, vq = (t.repeat_interleave(H // hkv, 1) for t in (kq, vq))
        ref = F.scaled_dot_product_attention(fast_hadamard_transform(q[0]).float(), kq.float(), vq.float()).transpose(1, 2)
        kv4_bytes = b * hkv * smax * (D + 16)
        for order in (0, 1):
            for name, kw in cmp["paths"]:
                outs = {}
                for label, vkw in (cmp["variants"] if order == 0 else cmp["variants"][::-1]):
                    kwv = dict(kw, **vkw)
                    rot = kwv.pop("rotate_q", True)
                    qs = q if rot else q_r3
                    try:
                        outs[label] = kv4_decode_attention(qs[0], caches[0], count, D ** -0.5, rot, **kwv)
                        err = ((outs[label].float() - ref).abs().max() / ref.abs().max()).item()
                        us = graph_ms([lambda i=i: kv4_decode_attention(qs[i], caches[i], count, D ** -0.5, rot, **kwv)
                                       for i in range(LAYERS)]) * 1e3
                    except Exception as e:  # noqa: BLE001 - recorded (refused, out of resources)
                        rows.append(dict(batch=b, path=name, variant=label, error=repr(e)[:300]))
                        print(f"| {b} | {name} | {label} | error | {repr(e)[:100]} | | |", flush=True)
                        continue
                    o = list(outs.values())
                    diff = ((o[-1].float() - o[0].float()).abs().max() / ref.abs().max()).item() if len(o) >= 2 else None
                    rows.append(dict(batch=b, path=name, kwargs=kw, variant=label, order=order, us=us,
                                     gbs=kv4_bytes / us / 1e3, max_rel_err=err, vs_first_variant=diff))
                    print(f"| {b} | {name} | {label} | {us:.1f} | {kv4_bytes / us / 1e3:.0f} | {err:.2e} | "
                          f"{'' if diff is None else f'{diff:.2e}'} |", flush=True)
        del caches
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "compare": compare, "rows": rows,
              "wall_s": time.time() - t0}
    with open(out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(out + ".tmp", out)
    print(f"wrote {out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--compare", choices=sorted(COMPARISONS), default="exact_k")
    args = ap.parse_args()
    main(args.out, args.compare)
