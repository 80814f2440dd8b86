"""Session 38 (GPU, one-off): a second, wider A/B of the 4-bit K/V decode attention's slots path (docs/KERNELS.md 4f)
before any default takes it. Session 38's first run (`session37_kv4_slots.py`, one H100) found slots 0.89x the
default's time at batch 8 and 0.88x at batch 64, one timing each, the winner picked among 9 configs. Here: the
Llama-2-7B shape (32 heads, no GQA, head dim 128), 513 and 2049 cached positions, batch 1-64, 32 layers' caches in
one CUDA graph (each its own, so they stream from HBM); the default path and slots of 16 / 32 / 64 positions on 4
warps, each timed twice in alternating order (A B C D, then D C B A) so drift shows. Run 2 (after the slots became
the choice without GQA) adds "auto", the choice as the code makes it. SDPA over a bf16 cache where it
fits in 24 GB. Each path is checked against fp32 SDPA over the dequantized cache first.
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session38_kv4_slots_ab.py OUT.json
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import write_result  # noqa: E402
from session19_gemv import graph_ms  # noqa: E402
from session21_kv4 import D, LAYERS, filled_caches  # noqa: E402
from dartquant.hadamard import fast_hadamard_transform  # noqa: E402
from dartquant.kernels.kv_cache import kv4_decode_attention  # noqa: E402

dev = torch.device("cuda")
F = torch.nn.functional
H = 32
# "default": the path chosen before session 38 (dots; CUDA cores at batch 1); "auto": kv4_decode_attention's choice
PATHS = [("auto", {}), ("default", {"slots": False}), ("slots bs16 w4", dict(block_s=16, num_warps=4, slots=True)),
         ("slots bs32 w4", dict(block_s=32, num_warps=4, slots=True)),
         ("slots bs64 w4", dict(block_s=64, num_warps=4, slots=True))]


def main(out):
    t0 = time.time()
    rows = []
    print("| positions | batch | path | us per layer, 1st / 2nd | GB/s of codes + scales | max rel. error |")
    print("|---|---|---|---|---|---|")
    for ctx in (512, 2048):
        for b in (1, 2, 4, 8, 16, 32, 64):
            g = torch.Generator(dev).manual_seed(b)
            smax = ctx + 1
            q = [torch.randn(b, H, 1, D, device=dev, generator=g).bfloat16() for _ in range(LAYERS)]
            bf16_bytes = LAYERS * b * H * smax * D * 4
            if bf16_bytes < 24e9:
                kc = [torch.randn(b, H, smax, D, device=dev, generator=g).bfloat16() for _ in range(LAYERS)]
                vc = [torch.randn(b, H, smax, D, device=dev, generator=g).bfloat16() for _ in range(LAYERS)]
                sdpa = graph_ms([lambda i=i: F.scaled_dot_product_attention(q[i], kc[i], vc[i])
                                 for i in range(LAYERS)]) * 1e3
                rows.append(dict(positions=smax, batch=b, path="bf16 sdpa", us=[sdpa]))
                print(f"| {smax} | {b} | bf16 SDPA | {sdpa:.1f} | - | - |", flush=True)
                del kc, vc
                torch.cuda.empty_cache()
            caches = filled_caches(b, H, smax, smax, g)
            count = torch.tensor(smax, device=dev)
            kq, vq = caches[0].dequantize(torch.bfloat16)
            ref = F.scaled_dot_product_attention(fast_hadamard_transform(q[0]).float(), kq.float(),
                                                 vq.float()).transpose(1, 2)
            del kq, vq
            kv4_bytes = b * H * smax * (D + 16)
            times = {name: [] for name, _ in PATHS}
            errs = {}
            for order in (PATHS, PATHS[::-1]):
                for name, kw in order:
                    out0 = kv4_decode_attention(q[0], caches[0], count, D ** -0.5, True, **kw)
                    errs[name] = ((out0.float() - ref).abs().max() / ref.abs().max()).item()
                    times[name].append(graph_ms([lambda i=i: kv4_decode_attention(q[i], caches[i], count, D ** -0.5,
                                                                                  True, **kw)
                                                 for i in range(LAYERS)]) * 1e3)
            for name, kw in PATHS:
                us = times[name]
                rows.append(dict(positions=smax, batch=b, path=name, kwargs=kw, us=us,
                                 gbs=kv4_bytes / min(us) / 1e3, max_rel_err=errs[name]))
                print(f"| {smax} | {b} | {name} | {us[0]:.1f} / {us[1]:.1f} | {kv4_bytes / min(us) / 1e3:.0f} | "
                      f"{errs[name]:.2e} |", flush=True)
            del caches
            torch.cuda.empty_cache()
    write_result({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, out, t0)


if __name__ == "__main__":
    main(sys.argv[1])
