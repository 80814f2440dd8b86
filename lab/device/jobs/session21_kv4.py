"""Session 21 (GPU, one-off): the 4-bit K/V cache kernels (kernels.kv_cache) against bf16 SDPA over a
bf16 static cache, as one decode step runs them: 32 layers (each its own cache, so the caches
stream from HBM) captured in one CUDA graph; per layer the new token's K / V written, then the
attention of one query token per sequence over 512 + 1 cached positions.
Checked first on the GPU: the stored codes against the fake-quant path (bf16, R3 on K), and the
attention against fp32 SDPA over the dequantized cache.
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session21_kv4.py OUT.json
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from session19_gemv import graph_ms, warm_clocks  # noqa: E402
from dartquant.hadamard import fast_hadamard_transform  # noqa: E402
from dartquant.kernels.kv_cache import Kv4Codes, kv4_decode_attention, kv4_store  # noqa: E402
from dartquant.quant.primitives import QuantSpec, fake_quantize  # noqa: E402

dev = torch.device("cuda")
F = torch.nn.functional
LAYERS, CTX, D = 32, 512, 128
SHAPES = [("L2-7B", 32, 32), ("L3-8B", 32, 8)]


def check(b, h, hkv):
    g = torch.Generator(dev).manual_seed(b)
    k = torch.randn(b, hkv, CTX + 1, D, device=dev, generator=g).bfloat16()
    v = torch.randn(b, hkv, CTX + 1, D, device=dev, generator=g).bfloat16()
    k[:, :, 0] *= 30  # massive first-token keys
    codes = Kv4Codes(b, hkv, CTX + 1, D, dev)
    count = torch.tensor(CTX, device=dev)
    kv4_store(codes, count, k[:, :, :CTX], v[:, :, :CTX], 1.0, True)
    count += 1
    kv4_store(codes, count, k[:, :, CTX:], v[:, :, CTX:], 1.0, True)
    kq, vq = codes.dequantize(torch.bfloat16)
    spec = QuantSpec(bits=4, symmetric=False, clip_ratio=1.0)
    k_off = (kq != fake_quantize(fast_hadamard_transform(k), spec)).float().mean().item()
    v_off = (vq != fake_quantize(v, spec)).float().mean().item()
    q = torch.randn(b, h, 1, D, device=dev, generator=g).bfloat16()
    out = kv4_decode_attention(q, codes, count, D ** -0.5, True)
    rep = h // hkv
    ref = F.scaled_dot_product_attention(fast_hadamard_transform(q).float(), kq.float().repeat_interleave(rep, 1),
                                         vq.float().repeat_interleave(rep, 1)).transpose(1, 2)
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    return {"k_values_differing": k_off, "v_values_differing": v_off, "attn_max_rel_err": err}


def filled_caches(b, hkv, smax, n, g):
    """LAYERS 4-bit caches of `smax` slots, the first `n` holding random bf16 K / V."""
    caches = []
    for _ in range(LAYERS):
        c = Kv4Codes(b, hkv, smax, D, dev)
        kv4_store(c, torch.tensor(n, device=dev), torch.randn(b, hkv, n, D, device=dev, generator=g).bfloat16(),
                  torch.randn(b, hkv, n, D, device=dev, generator=g).bfloat16(), 1.0, True)
        caches.append(c)
    return caches


def timing(b, h, hkv):
    g = torch.Generator(dev).manual_seed(0)
    smax = CTX + 1
    q = [torch.randn(b, h, 1, D, device=dev, generator=g).bfloat16() for _ in range(LAYERS)]
    knew = [torch.randn(b, hkv, 1, D, device=dev, generator=g).bfloat16() for _ in range(LAYERS)]
    vnew = [torch.randn(b, hkv, 1, D, device=dev, generator=g).bfloat16() for _ in range(LAYERS)]
    pos = torch.tensor([CTX], device=dev)
    res = {}
    # bf16: transformers' static layer (index_copy_ at the position) + SDPA over the whole cache
    kc = [torch.randn(b, hkv, smax, D, device=dev, generator=g).bfloat16() for _ in range(LAYERS)]
    vc = [torch.randn(b, hkv, smax, D, device=dev, generator=g).bfloat16() for _ in range(LAYERS)]

    def bf16(i):
        kc[i].index_copy_(2, pos, knew[i])
        vc[i].index_copy_(2, pos, vnew[i])
        return F.scaled_dot_product_attention(q[i], kc[i], vc[i], enable_gqa=h != hkv)

    res["bf16 sdpa us"] = graph_ms([lambda i=i: bf16(i) for i in range(LAYERS)]) * 1e3
    res["bf16 sdpa only us"] = graph_ms([lambda i=i: F.scaled_dot_product_attention(
        q[i], kc[i], vc[i], enable_gqa=h != hkv) for i in range(LAYERS)]) * 1e3
    kc.clear()  # the bf16 caches go before the 4-bit ones are made
    vc.clear()
    torch.cuda.empty_cache()
    caches = filled_caches(b, hkv, smax, CTX, g)
    count = torch.tensor(smax, device=dev)

    def kv4(i):
        kv4_store(caches[i], count, knew[i], vnew[i], 1.0, True)
        return kv4_decode_attention(q[i], caches[i], count, D ** -0.5, True)

    res["kv4 us"] = graph_ms([lambda i=i: kv4(i) for i in range(LAYERS)]) * 1e3
    res["kv4 attention only us"] = graph_ms([lambda i=i: kv4_decode_attention(q[i], caches[i], count, D ** -0.5, True)
                                             for i in range(LAYERS)]) * 1e3
    sweep = [(64, 8, False), (128, 4, False), (128, 8, False), (32, 4, False)]  # the default: 64, 4 warps, dots
    sweep += [(64, 4, True), (128, 4, True)] if h == hkv else []
    for bs, w, cc in sweep:
        try:
            res[f"kv4 attention bs{bs} w{w}{' cc' if cc else ''} us"] = graph_ms([lambda i=i: kv4_decode_attention(
                q[i], caches[i], count, D ** -0.5, True, block_s=bs, num_warps=w, cuda_cores=cc)
                for i in range(LAYERS)]) * 1e3
        except Exception as e:  # recorded
            res[f"kv4 attention bs{bs} w{w} us"] = repr(e)[:200]
    res["kv4 store only us"] = graph_ms([lambda i=i: kv4_store(caches[i], count, knew[i], vnew[i], 1.0, True)
                                         for i in range(LAYERS)]) * 1e3
    bf16_bytes = b * hkv * smax * D * 2 * 2
    kv4_bytes = b * hkv * smax * (D + 16)
    res["bf16 cache MB per layer"] = bf16_bytes / 1e6
    res["kv4 cache MB per layer"] = kv4_bytes / 1e6
    res["bf16 sdpa GB/s"] = bf16_bytes / res["bf16 sdpa only us"] / 1e3
    res["kv4 attention GB/s"] = kv4_bytes / res["kv4 attention only us"] / 1e3
    return res


def shape_rows(timing_fn):
    """One row per (shape, batch): the GPU checks, then `timing_fn(batch, heads, kv_heads)`."""
    rows = []
    for name, h, hkv in SHAPES:
        for b in (1, 8, 64):
            row = {"shape": name, "heads": h, "kv_heads": hkv, "batch": b, "context": CTX + 1}
            try:
                row.update(check(b, h, hkv))
                row.update(timing_fn(b, h, hkv))
            except Exception as e:  # recorded
                row["error"] = repr(e)[:500]
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    return rows


def main(out_path):
    t0 = time.time()
    warm_clocks()
    x = torch.empty(512 * 2**20, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    copy_us = graph_ms([lambda: y.copy_(x)] * 8) * 1e3
    rows = shape_rows(timing)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "copy_GBps": 2 * x.numel() / copy_us / 1e3, "rows": rows, "seconds": time.time() - t0}
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"copy {out['copy_GBps']:.0f} GB/s (read + write); {out['seconds']:.0f} s")
    for r in rows:
        if "error" in r:
            print(r["shape"], r["batch"], "ERROR", r["error"])
            continue
        print(f"{r['shape']:6} b{r['batch']:<3} bf16 {r['bf16 sdpa us']:8.1f} us (sdpa {r['bf16 sdpa only us']:7.1f}, "
              f"{r['bf16 sdpa GB/s']:5.0f} GB/s) | kv4 {r['kv4 us']:7.1f} us (attn {r['kv4 attention only us']:6.1f}, "
              f"{r['kv4 attention GB/s']:5.0f} GB/s; store {r['kv4 store only us']:5.1f}) | x{r['bf16 sdpa us'] / r['kv4 us']:.2f}"
              f" | sweep {[(k.split()[2:4], round(v, 1)) for k, v in r.items() if ' bs' in k and isinstance(v, float)]}"
              f" | k/v values off {r['k_values_differing']:.1e}/{r['v_values_differing']:.1e} attn err {r['attn_max_rel_err']:.1e}")


if __name__ == "__main__":
    main(sys.argv[1])
