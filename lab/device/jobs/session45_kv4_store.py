"""Session 45 (issue 16, GPU, one-off): the 4-bit K/V store launch (`kv_cache._store_launch`) at prefill and decode
sizes, by config. Every `dartquant bench --kv kernels` prefill since session 21 is 3-4 ms (of ~50) slower than the
same run folder with a bf16 cache (1.25x bf16 against 1.35x, H200 and H100 alike), and the only added work is
`kv4_fake_quant`: one launch a layer, 16 rows a program, each program loading the whole 128 x 128 Sylvester matrix
for its 16 rows of data. This times rows a program x warps x R3 as a dot or as fp32 butterflies, against a copy of
the same bytes and flash SDPA at the same shape, and checks each config's outputs equal the default's.
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session45_kv4_store.py OUT.json
"""
import os
import sys
import time

import torch
from triton.testing import do_bench

from dartquant.kernels.kv_cache import STORE_CONFIG, Kv4Codes, kv4_fake_quant, kv4_store
from kernel_bench import write_result

CONFIGS = [(16, 4, False), (16, 4, True), (32, 4, False), (32, 4, True), (64, 4, False), (64, 4, True),
           (64, 8, False), (64, 8, True), (128, 8, False), (128, 8, True),
           (16, 4, True, True), (32, 4, True, True)]  # the compact grid (4th: each role only its own row blocks)
SHAPES = {"llama2-7b": (32, 32), "llama3-8b": (32, 8)}  # (query heads, KV heads), head dim 128


SMOKE = os.environ.get("TRITON_INTERPRET") == "1"  # a CPU dry run of the script through the interpreter


def ms(fn):
    if SMOKE:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def graph_us(fn, calls=32):
    """µs a call of `fn` replayed `calls` times in one CUDA graph, as a decode step runs its layers' stores."""
    if SMOKE:
        return ms(fn) * 1e3
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return ms(graph.replay) * 1e3 / calls


def main(out):
    t0, dev = time.time(), torch.device("cpu" if SMOKE else "cuda")
    res = {"device": "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(), "torch": torch.__version__, "prefill": {}, "decode": {}}
    g = torch.Generator(dev).manual_seed(0)
    for name, (hq, hkv) in SHAPES.items():
        s, d = (40 if SMOKE else 2048), 128
        # as the model hands them over: [B, S, H, D] projections viewed as [B, H, S, D]
        q = torch.randn(1, s, hq, d, device=dev, generator=g).bfloat16().transpose(1, 2)
        k = torch.randn(1, s, hkv, d, device=dev, generator=g).bfloat16().transpose(1, 2)
        v = torch.randn(1, s, hkv, d, device=dev, generator=g).bfloat16().transpose(1, 2)
        nbytes = 2 * (q.numel() + 2 * k.numel()) * 2  # read q, k, v; write them
        src = torch.empty(nbytes // 4, dtype=torch.bfloat16, device=dev)
        dst = torch.empty_like(src)
        row = {"copy_same_bytes_us": ms(lambda: dst.copy_(src)) * 1e3,
               "default_config": STORE_CONFIG}
        row["sdpa_flash_us"] = ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1), is_causal=True)) * 1e3
        ref = kv4_fake_quant(k, v, 0.9, True, q, config=(16, 4, False))
        for cfg in CONFIGS:
            try:
                outs = kv4_fake_quant(k, v, 0.9, True, q, config=cfg)
                diff = [int((a != b).sum().item()) for a, b in zip(outs, ref)]
                us = ms(lambda: kv4_fake_quant(k, v, 0.9, True, q, config=cfg)) * 1e3
                row[str(cfg)] = {"us": us, "of_copy": row["copy_same_bytes_us"] / us, "values_differ_kvq": diff}
                print(f"{name} prefill {cfg}: {us:.1f} us ({row['copy_same_bytes_us'] / us:.2f} of copy), "
                      f"differ from (16, 4, dot): {diff}", flush=True)
            except Exception as e:  # recorded: one config's failure does not lose the others
                row[str(cfg)] = {"error": f"{type(e).__name__}: {e}"[:300]}
                print(f"{name} prefill {cfg}: {row[str(cfg)]['error']}", flush=True)
        print(f"{name} prefill: copy {row['copy_same_bytes_us']:.1f} us, flash SDPA {row['sdpa_flash_us']:.1f} us",
              flush=True)
        res["prefill"][name] = row
        for b in ((1, 2) if SMOKE else (1, 8, 64)):  # a decode step's store: one new token a sequence, the query rotated in the launch
            codes = Kv4Codes(b, hkv, 1024, d, dev)  # the count's position 512 written each call
            count = torch.tensor(513, device=dev)
            kn = torch.randn(b, 1, hkv, d, device=dev, generator=g).bfloat16().transpose(1, 2)
            vn = torch.randn(b, 1, hkv, d, device=dev, generator=g).bfloat16().transpose(1, 2)
            qn = torch.randn(b, 1, hq, d, device=dev, generator=g).bfloat16().transpose(1, 2)
            drow = {"default_config": STORE_CONFIG}
            for cfg in [(16, 4, False), (16, 4, True), (16, 2, True), (32, 4, True), (64, 4, True), (16, 4, True, True)]:
                us = graph_us(lambda: kv4_store(codes, count, kn, vn, 0.9, True, query=qn, config=cfg))
                drow[str(cfg)] = us  # µs a call in a graph of 32
            print(f"{name} decode store b{b}: " + ", ".join(f"{c} {u:.1f}" for c, u in drow.items()
                                                           if c != "default_config"), flush=True)
            res["decode"][f"{name}_b{b}"] = drow
        write_result(res, out, t0)


if __name__ == "__main__":
    main(sys.argv[1])
