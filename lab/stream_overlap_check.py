#!/usr/bin/env python3
"""Does `BlockRunner.run_` overlap its host <-> GPU copies with the compute, and give the same bits?

One Llama decoder block of a real shape (random float32 weights) over N windows of host-resident
hidden states, three ways: pageable host memory (the synchronous path), pinned (the overlapped
path), and resident on the GPU (no copies: the floor). Prints ms per window and whether the pinned
path's outputs equal the pageable path's bit for bit; writes JSON.

    python lab/stream_overlap_check.py --shape llama2-7b --windows 24 --out overlap.json   # GPU
    python lab/stream_overlap_check.py --shape tiny --windows 3 --device cpu               # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from dartquant.adapters import adapter_for  # noqa: E402
from dartquant.layerwise import register_attention  # noqa: E402
from dartquant.stream.passes import BlockRunner  # noqa: E402

SHAPES = {"llama2-7b": (4096, 11008, 32, 32), "llama2-70b": (8192, 28672, 64, 8), "tiny": (64, 128, 4, 2)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    hidden, inter, heads, kv = SHAPES[args.shape]
    seqlen = args.seqlen if args.shape != "tiny" else 16
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                      num_hidden_layers=1, vocab_size=256, max_position_embeddings=seqlen)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float().eval()
    model.set_attn_implementation(register_attention())
    adapter = adapter_for(model)
    dev = torch.device(args.device)
    block = adapter.decoder_layers(model)[0].to(dev)
    runner = BlockRunner(model, adapter, dev)
    states = torch.randn(args.windows, seqlen, hidden)

    def timed(h):
        runner.run_(block, h)  # warm-up (and the result that is compared)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        runner.run_(block, h.clone() if h.device.type == "cpu" and not h.is_pinned() else h)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1e3 / args.windows

    res = {"shape": args.shape, "windows": args.windows, "seqlen": seqlen, "device": str(dev),
           "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None}
    pageable = states.clone()
    res["pageable_ms_per_window"] = timed(pageable)
    if dev.type == "cuda":
        pinned = states.clone().pin_memory()
        res["pinned_ms_per_window"] = timed(pinned)
        # bit equality: one pass each from the same input
        a, b = states.clone(), states.clone().pin_memory()
        runner.run_(block, a)
        runner.run_(block, b)
        res["pinned_equals_pageable"] = bool(torch.equal(a, b))
        resident = states.to(dev)
        res["resident_ms_per_window"] = timed(resident)
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
