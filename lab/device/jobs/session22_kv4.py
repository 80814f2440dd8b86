"""Session 22 (GPU, one-off): the 4-bit K/V cache's decode attention with the even / odd dims kept apart
(run 34) against run 33's kernel (an untracked copy, `src/dartquant/kernels/kv_cache_run33.py`, when
present) and bf16 SDPA, as session21_kv4.py times them: 32 layers' caches in one CUDA graph, one query
token per sequence over 513 cached positions, head dim 128; a sweep of positions per step, warps and
the CUDA-core row. Codes and attention checked on the GPU first (session21_kv4.check).
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session22_kv4.py OUT.json
"""
import importlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from session19_gemv import graph_ms, warm_clocks  # noqa: E402
from session21_kv4 import CTX, D, LAYERS, filled_caches, shape_rows  # noqa: E402
from dartquant.kernels.kv_cache import kv4_decode_attention  # noqa: E402

dev = torch.device("cuda")
F = torch.nn.functional
try:
    old = importlib.import_module("dartquant.kernels.kv_cache_run33")
except ImportError:
    old = None


def timing(b, h, hkv):
    g = torch.Generator(dev).manual_seed(0)
    smax = CTX + 1
    q = [torch.randn(b, h, 1, D, device=dev, generator=g).bfloat16() for _ in range(LAYERS)]
    res = {}
    kc = [torch.randn(b, hkv, smax, D, device=dev, generator=g).bfloat16() for _ in range(LAYERS)]
    vc = [torch.randn(b, hkv, smax, D, device=dev, generator=g).bfloat16() for _ in range(LAYERS)]
    res["bf16 sdpa only us"] = graph_ms([lambda i=i: F.scaled_dot_product_attention(
        q[i], kc[i], vc[i], enable_gqa=h != hkv) for i in range(LAYERS)]) * 1e3
    kc.clear()
    vc.clear()
    torch.cuda.empty_cache()
    caches = filled_caches(b, hkv, smax, smax, g)
    count = torch.tensor(smax, device=dev)
    res["kv4 attention (default) us"] = graph_ms([lambda i=i: kv4_decode_attention(
        q[i], caches[i], count, D ** -0.5, True) for i in range(LAYERS)]) * 1e3
    if old is not None:
        res["run33 attention (default) us"] = graph_ms([lambda i=i: old.kv4_decode_attention(
            q[i], caches[i], count, D ** -0.5, True) for i in range(LAYERS)]) * 1e3
    sweep = [(32, 4, False), (64, 8, False), (128, 4, False), (128, 8, False)]
    sweep += [(64, 4, True), (128, 4, True), (64, 8, True), (128, 8, True), (256, 8, True)] if h == hkv else []
    for bs, w, cc in sweep:
        key = f"kv4 attention bs{bs} w{w}{' cc' if cc else ''} us"
        try:
            res[key] = graph_ms([lambda i=i: kv4_decode_attention(
                q[i], caches[i], count, D ** -0.5, True, block_s=bs, num_warps=w, cuda_cores=cc)
                for i in range(LAYERS)]) * 1e3
        except Exception as e:  # recorded
            res[key] = repr(e)[:200]
    kv4_bytes = b * hkv * smax * (D + 16)
    res["bf16 sdpa GB/s"] = b * hkv * smax * D * 4 / res["bf16 sdpa only us"] / 1e3
    res["kv4 attention GB/s"] = kv4_bytes / res["kv4 attention (default) us"] / 1e3
    return res


def main(out_path):
    t0 = time.time()
    warm_clocks()
    rows = shape_rows(timing)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
           "seconds": time.time() - t0}
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)
    for r in rows:
        if "error" in r:
            print(r["shape"], r["batch"], "ERROR", r["error"])
            continue
        best = min((v, k.split()[2:5]) for k, v in r.items() if " bs" in k and isinstance(v, float))
        print(f"{r['shape']:6} b{r['batch']:<3} sdpa {r['bf16 sdpa only us']:7.1f} us | kv4 {r['kv4 attention (default) us']:7.1f}"
              f" (run33 {r.get('run33 attention (default) us', float('nan')):7.1f}) | best sweep {best[0]:.1f} {best[1]}"
              f" | attn err {r['attn_max_rel_err']:.1e} k off {r['k_values_differing']:.1e}")
    print(f"{out['seconds']:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1])
