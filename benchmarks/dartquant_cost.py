#!/usr/bin/env python3
"""DartQuant calibration cost (capture + R1 + R2): wall time and peak memory, one table.

    python benchmarks/dartquant_cost.py --shapes llama2-7b llama3-8b --device cuda --out cost.json

Random weights of a real architecture's shape are enough for timing: the work does not depend
on the values. The model lives on the CPU; one decoder block at a time goes to the device (as
in every dartquant pipeline), in float16. Settings follow the paper: 128 sequences x 2048
tokens, 10% token sampling, 10 epochs; R1 sees at most `--max-r1-tokens` pooled tokens.
Peak device memory is reported per stage (capture / R1 / R2); `--buffers host` keeps the
captured buffers on the host and moves only minibatches (`device`: each buffer on the GPU for
its own stage; `auto`: `device` when the buffer takes at most 40% of the free device memory).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000),
}


def shape_config(shape: str, layers: int | None = None):
    """The LlamaConfig of a known shape, optionally cut to `layers` decoder layers (for costs
    that are measured at a reduced depth and extrapolated linearly in depth)."""
    from transformers import LlamaConfig

    kw = dict(SHAPES[shape])
    if layers is not None:
        kw["num_hidden_layers"] = int(layers)
    return LlamaConfig(**kw, max_position_embeddings=4096)


def random_model(shape: str, dtype, layers: int | None = None, init_device: str = "cpu", device: str = "cpu"):
    """Random weights (std 0.02, norms 1) of a known shape, living on `device` (the host for
    DartQuant, which moves one block at a time; the GPU for end-to-end training). The numbers
    are drawn on `init_device` (a GPU draws billions of them in seconds; the CPU needs minutes
    at 7B)."""
    import torch
    from transformers import LlamaForCausalLM

    config = shape_config(shape, layers)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=init_device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:  # std 0.02, filled in float32 chunks: fast and no fp16 overflow
                flat = p.view(-1)
                for i in range(0, flat.numel(), 1 << 26):
                    chunk = flat[i: i + (1 << 26)]
                    chunk.copy_(torch.randn(chunk.numel(), generator=g, device=init_device) * 0.02)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)  # its buffers were left empty
    return model.eval()


def run(shape: str, device: str, samples: int, seqlen: int, epochs: int, max_r1_tokens: int,
        buffers: str = "auto") -> dict:
    """Capture, R1, R2 as calibrate_dartquant runs them (fit_r1 / fit_r2: index splits, each
    buffer on the device only for its own stage, R1 buffer freed before R2), each stage with its
    own wall time and peak device memory (reset_peak_memory_stats before, max_memory_allocated
    after)."""
    import torch

    from dartquant.adapters import adapter_for
    from dartquant.calib.capture import capture_activations
    from dartquant.calib.dartquant import fit_r1, fit_r2
    from dartquant.config import RunConfig

    cuda = device.startswith("cuda")
    t = time.perf_counter()
    model = random_model(shape, torch.float16, init_device=device)
    build = time.perf_counter() - t
    geo = adapter_for(model).geometry(model.config)
    ids = torch.randint(0, geo.vocab, (samples, seqlen), generator=torch.Generator().manual_seed(0))
    out = {"shape": shape, "samples": samples, "seqlen": seqlen, "epochs": epochs, "buffers": buffers,
           "build_s": round(build, 1)}
    cfg = RunConfig.from_flat(device=device, dq_epochs=epochs, dq_r1_lr=1e-3, dq_r2_lr=1e-3, seed=0)

    def stage(name, fn):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = fn()
        if cuda:
            torch.cuda.synchronize()
            out[f"peak_gpu_{name}_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out[f"{name}_s"] = round(time.perf_counter() - t0, 1)
        return res

    acts = stage("capture", lambda: capture_activations(model, ids, fraction=cfg.dq_token_fraction,
                                                        max_r1_tokens=max_r1_tokens, seed=0, device=device,
                                                        progress=False))
    out["r1_tokens"], out["r2_tokens_per_head"] = acts.r1.shape[0], acts.r2.shape[-2]
    out["buffers_GiB"] = round((acts.r1.numel() + acts.r2.numel()) * 2 / 2**30, 2)
    _, h1 = stage("r1", lambda: fit_r1(acts, geo, cfg, progress=False, buffers=buffers))
    acts.r1 = None
    out["r1_steps"] = h1["steps"]
    _, h2 = stage("r2", lambda: fit_r2(acts, geo, cfg, progress=False, buffers=buffers))
    acts.r2 = None
    out["r2_steps"] = h2["steps"]
    if cuda:
        out["peak_gpu_GiB"] = max(out[f"peak_gpu_{k}_GiB"] for k in ("capture", "r1", "r2"))
    out["total_s"] = round(out["capture_s"] + out["r1_s"] + out["r2_s"], 1)
    out["peak_cpu_rss_GiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["llama2-7b", "llama3-8b"], choices=list(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--max-r1-tokens", type=int, default=262_144)
    ap.add_argument("--buffers", nargs="+", default=["auto"], choices=["auto", "device", "host"],
                    help="where captured buffers live while R1 / R2 train (one row per shape and mode)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch

    rows = []
    for shape in args.shapes:
        for buffers in args.buffers:
            rows.append(run(shape, args.device, args.samples, args.seqlen, args.epochs, args.max_r1_tokens, buffers))
            print(json.dumps(rows[-1]), file=sys.stderr)
    info = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    Path(args.out).write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows}, indent=1))
    cols = ["shape", "buffers", "capture_s", "r1_s", "r2_s", "total_s", "peak_gpu_capture_GiB", "peak_gpu_r1_GiB",
            "peak_gpu_r2_GiB", "peak_cpu_rss_GiB", "buffers_GiB", "r1_tokens", "r2_tokens_per_head"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |")


if __name__ == "__main__":
    main()
