"""Session 45 (issue 16, GPU, one-off): what transformers' RoPE (apply_rotary_pos_emb, ~10 elementwise kernels a layer)
costs the bf16 side, so the w4a4 side's RoPE fusion can be quoted against a baseline that fused it too: 32 layers'
worth in one CUDA graph, at a 2048-token prompt and at decode batches 1 / 8 / 64 (Llama-2-7B: 32 heads, head dim 128;
Llama-3-8B: 8 KV heads).
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session45_rope_cost.py OUT.json
"""
import sys
import time

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from triton.testing import do_bench

from kernel_bench import write_result


def graph_ms(fn, calls=32):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return float(do_bench(g.replay, warmup=25, rep=100, return_mode="median"))


def main(out):
    t0, dev, res = time.time(), torch.device("cuda"), {"device": torch.cuda.get_device_name()}
    for name, hkv in (("llama2-7b", 32), ("llama3-8b", 8)):
        for b, s in ((1, 2048), (1, 1), (8, 1), (64, 1)):
            qkv = torch.randn(b, s, (32 + 2 * hkv) * 128, device=dev).bfloat16()  # one merged projection's output
            q = qkv[..., :4096].view(b, s, 32, 128).transpose(1, 2)
            k = qkv[..., 4096:4096 + hkv * 128].view(b, s, hkv, 128).transpose(1, 2)
            cos, sin = torch.randn(1, s, 128, device=dev).bfloat16(), torch.randn(1, s, 128, device=dev).bfloat16()
            ms = graph_ms(lambda: apply_rotary_pos_emb(q, k, cos, sin))
            res[f"{name}_b{b}_s{s}_32_layers_ms"] = ms
            print(f"{name} batch {b} x {s} tokens: RoPE of 32 layers {ms:.3f} ms", flush=True)
    write_result(res, out, t0)


if __name__ == "__main__":
    main(sys.argv[1])
