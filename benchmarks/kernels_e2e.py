"""End to end: a Llama-shaped model (random weights) in bf16 vs the same model on the W4A4 kernels.

Through a real run folder (the default way: what `dartquant bench` measures), three steps, each
skipped when its output exists under --dir, each a subprocess:
  1. a random-weight sharded float16 model folder of the shape (whole_job.write_model),
  2. `dartquant quantize --method quarot --w-quantizer rtn --stream true` into a run folder
     (random weights: the perplexity is meaningless, the guard is off),
  3. `dartquant bench RUN --prefill 2048 --batch 1 8 64 --json OUT`.
    PYTHONPATH=src python benchmarks/kernels_e2e.py --run-shape llama2-7b --dir /tmp/kb \
        --out docs/results/kernels_bench_h200.json                             # GPU, ~13.5 + 3.8 GB of disk
    PYTHONPATH=src TRITON_INTERPRET=1 python benchmarks/kernels_e2e.py --run-shape tiny --dir /tmp/kb \
        --out /tmp/kb/bench.json --device cpu -- --prefill 16 --batch 4 --context 8 # logic check on the CPU
Arguments after `--` go to `dartquant bench`. On a machine with a per-command time limit, split it:
    PYTHONPATH=src python benchmarks/kernels_e2e.py --run-shape llama2-7b --dir /tmp/kb --prepare-only
    PYTHONPATH=src python -m dartquant.cli bench /tmp/kb/run-llama2-7b-quarot-rtn --json OUT

The older hand-built mode (no run folder; kept for comparison with docs/results/kernels_e2e_h200.json):
    PYTHONPATH=src python benchmarks/kernels_e2e.py --out e2e.json              # Llama-2-7B shape, GPU
    PYTHONPATH=src TRITON_INTERPRET=1 python benchmarks/kernels_e2e.py --tiny   # logic check on the CPU

The W4A4 model is built the way a DartQuant/QuaRot run folder is (QLinear + 4-bit asymmetric
per-token input quantizer, clip 0.9; down_proj with the online Hadamard R4; RTN 4-bit symmetric
per-channel weights), then converted with `kernels.linear.convert_qlinears_`.  Attention, norms,
embeddings and lm_head are transformers' own on both sides (K/V not quantized on either side);
no CUDA graphs or torch.compile on either side.  Prefill: one forward of `--prefill` tokens,
batch 1.  Decode: tokens/s of one-token forwards with a KV cache of 128 tokens, batch 1 / 8 / 64.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from dartquant.kernels.linear import convert_qlinears_  # noqa: E402
from dartquant.modules import OnlineHadamard, as_qlinear  # noqa: E402
from dartquant.quant.act import ActQuantizer  # noqa: E402
from dartquant.quant.primitives import QuantizedTensor, QuantSpec  # noqa: E402

ROLES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def build(tiny: bool, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=128, max_position_embeddings=512)
    else:  # Llama-2-7B
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return model


def to_w4a4_(model):
    """QLinear + quantizers as a run folder has them, then the kernels. Returns the converted names."""
    qtensors = {}
    spec_a = QuantSpec(bits=4, symmetric=False, clip_ratio=0.9)
    for i, layer in enumerate(model.model.layers):
        for role in ROLES:
            parent_name, _, child = role.rpartition(".")
            parent = layer.get_submodule(parent_name)
            q = as_qlinear(getattr(parent, child))
            qt = QuantizedTensor.from_float(q.weight.detach().float(), QuantSpec(bits=4, symmetric=True))
            q.input_quantizer = ActQuantizer(spec_a)
            if child == "down_proj":
                q.input_rotation = OnlineHadamard(q.in_features)
            setattr(parent, child, q)
            qtensors[f"model.layers.{i}.{role}"] = qt
    return convert_qlinears_(model, qtensors)


def linear_bytes(model):
    total = 0
    for layer in model.model.layers:
        for role in ROLES:
            m = layer.get_submodule(role)
            total += sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    return total


def timer(fn, device, reps):
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=50, rep=reps, return_mode="median")
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


@torch.no_grad()
def measure(model, device, prefill, batches, vocab):
    out = {}
    ids = torch.randint(0, vocab, (1, prefill), device=device)
    logits = model(ids).logits
    out["finite"] = bool(torch.isfinite(logits).all().item())
    out["prefill_ms"] = timer(lambda: model(ids), device, 400)
    out["prefill_tok_s"] = prefill / out["prefill_ms"] * 1e3
    for b in batches:
        ctx = torch.randint(0, vocab, (b, 128), device=device)
        res = model(ctx, use_cache=True)
        cache, nxt = res.past_key_values, ctx[:, -1:]
        steps = 16 if device.type == "cuda" else 2
        for _ in range(3):  # warm-up
            res = model(nxt, past_key_values=cache, use_cache=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            res = model(nxt, past_key_values=cache, use_cache=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t) * 1e3 / steps
        out[f"decode_b{b}_ms_per_step"] = ms
        out[f"decode_b{b}_tok_s"] = b / ms * 1e3
        del cache, res
    return out


def via_run_folder(args) -> int:
    """Steps 1-3 of the module docstring; each prints its seconds."""
    import subprocess
    from pathlib import Path

    sys.path.insert(0, os.path.dirname(__file__))
    from whole_job import write_model  # noqa: E402  (random sharded folders, one tensor in memory at a time)

    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    model, run = base / args.run_shape, base / f"run-{args.run_shape}-quarot-rtn"
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "src")}
    if not (model / "model.safetensors.index.json").is_file():
        t = time.time()
        gb = write_model(model, args.run_shape, None, args.device)
        print(f"wrote {model} ({gb:.1f} GB float16) in {time.time() - t:.0f} s", flush=True)
    if not (run / "metrics.json").is_file():
        cmd = [sys.executable, "-m", "dartquant.cli", "quantize", "--model", str(model), "--method", "quarot",
               "--w-quantizer", "rtn", "--stream", "true", "--device", args.device, "--out", str(run),
               "--overwrite", "--skip-fp-eval", "--eval-max-windows", "1", "--eval-seqlen", "512",
               "--guard-windows", "0", "--fail-on-collapse", "false", "--calib-samples", "2", "--calib-seqlen", "64"]
        t = time.time()
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, env=env, check=True)
        print(f"quantized -> {run} in {time.time() - t:.0f} s", flush=True)
    if args.prepare_only:
        return 0
    cmd = [sys.executable, "-m", "dartquant.cli", "bench", str(run), "--device", args.device,
           "--json", args.out, *args.bench_args]
    print(" ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env).returncode


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--out", default="kernels_e2e.json")
    ap.add_argument("--batches", default="1,8,64", help="decode batch sizes")
    ap.add_argument("--run-shape", default=None, help="through a run folder: llama2-7b, llama3-8b, tiny, ...")
    ap.add_argument("--dir", default="/tmp/kb", help="model and run folders (--run-shape)")
    ap.add_argument("--device", default="cuda", help="--run-shape: device of the quantize and bench steps")
    ap.add_argument("--prepare-only", action="store_true", help="--run-shape: steps 1-2 only (the run folder)")
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: more `dartquant bench` flags")
    args = ap.parse_args()
    args.bench_args = [a for a in args.bench_args if a != "--"]
    if args.run_shape:
        return via_run_folder(args)
    device = torch.device("cpu" if args.tiny else "cuda")
    prefill = 16 if args.tiny else args.prefill
    batches = (1, 2) if args.tiny else tuple(int(v) for v in args.batches.split(","))
    model = build(args.tiny, device)
    vocab = model.config.vocab_size
    result = {"shape": "tiny" if args.tiny else "Llama-2-7B (random weights)", "prefill_tokens": prefill}
    result["bf16"] = measure(model, device, prefill, batches, vocab)
    result["bf16"]["linear_weight_bytes"] = linear_bytes(model)
    print("bf16", json.dumps(result["bf16"]), flush=True)
    t = time.time()
    names = to_w4a4_(model)
    result["convert_s"] = time.time() - t
    result["converted_linears"] = len(names)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result["w4a4"] = measure(model, device, prefill, batches, vocab)
    result["w4a4"]["linear_weight_bytes"] = linear_bytes(model)
    print("w4a4", json.dumps(result["w4a4"]), flush=True)
    b, w = result["bf16"], result["w4a4"]
    result["speedup"] = {k.replace("_ms", "").replace("_per_step", ""): b[k] / w[k] for k in b if k.endswith("_ms") or k.endswith("_per_step")}
    result["weight_memory_ratio"] = w["linear_weight_bytes"] / b["linear_weight_bytes"]
    print("speedup vs bf16:", json.dumps({k: round(v, 2) for k, v in result["speedup"].items()}),
          "linear weight bytes ratio:", round(result["weight_memory_ratio"], 3), flush=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    sys.exit(main())
