"""Session 21 (CPU, one-off): the 4-bit K/V cache kernels (kernels.kv_cache) on a real quantized run,
e.g. README's quickstart (SmolLM2-135M, QuaRot + GPTQ, W4A4KV4; 9 query / 3 KV heads, head dim 64).

Teacher-forced decoding of a held-out wiki window: a prompt through the cache, then one true token
at a time, with (a) the fake-quant model's own attention over transformers' static cache in
float32, (b) the `dartquant_kv4` attention over `Kv4StaticCache` (codes in the cache, the Triton
kernels through the interpreter), (c) the fake-quant model in float64. A W4A4KV4 model re-quantizes
every activation, so a last-bit difference anywhere can flip a 4-bit code downstream and move the
logits by whole units (float32 against float64 of the same fake path shows it): the comparison is
(a)-(b) against (a)-(c), and the mean log-likelihood of the true tokens.
    TRITON_INTERPRET=1 PYTHONPATH=src python lab/kv4_real_model.py runs/quickstart [--tokens 64]
"""
import argparse
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from transformers import StaticCache  # noqa: E402

from dartquant.kernels.bench import _cache_bytes  # noqa: E402
from dartquant.kernels.kv_cache import Kv4StaticCache, check_kv4_support, register_kv4_attention  # noqa: E402
from dartquant.zoo import load_model  # noqa: E402


@torch.no_grad()
def teacher_forced(model, ids, prompt, cache):
    """Logits [T - prompt + 1, vocab] of the positions prompt-1 .. T-1: the prompt through the cache,
    then each true token alone."""
    import inspect

    n = ids.shape[1]
    pos = torch.arange(n)
    kw = {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}
    out = [model(ids[:, :prompt], **kw, use_cache=True, position_ids=pos[None, :prompt],
                 cache_position=pos[:prompt]).logits[0, -1]]
    for t in range(prompt, n - 1):
        p = pos[t:t + 1]
        out.append(model(ids[:, t:t + 1], **kw, use_cache=True, position_ids=p[None], cache_position=p).logits[0, -1])
    return torch.stack(out).double()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    args = ap.parse_args()
    from dartquant.data import eval_windows

    model, tok = load_model(args.run, dtype=torch.float32)
    model.eval()
    ids = eval_windows(tok, "wiki", seqlen=args.tokens, max_windows=1)[:1]
    targets = ids[0, args.prompt:]

    def nll(logits):
        return float(torch.nn.functional.cross_entropy(logits, targets))

    n = ids.shape[1]
    fake = teacher_forced(model, ids, args.prompt, StaticCache(config=model.config, max_cache_len=n))
    check_kv4_support(model)
    model.set_attn_implementation(register_kv4_attention())
    cache = Kv4StaticCache(model.config, max_cache_len=n)
    kern = teacher_forced(model, ids, args.prompt, cache)
    m64, _ = load_model(args.run, dtype=torch.float64)
    m64.eval()
    f64 = teacher_forced(m64, ids, args.prompt, StaticCache(config=m64.config, max_cache_len=n))
    res = {"run": args.run, "tokens": n, "prompt": args.prompt,
           "mean_nll": {"fake_fp32": nll(fake), "kv4_kernels_fp32": nll(kern), "fake_fp64": nll(f64)},
           "max_abs_logit_diff": {"kv4_vs_fake_fp32": float((kern - fake).abs().max()),
                                  "fake_fp64_vs_fake_fp32": float((f64 - fake).abs().max())},
           "rel_norm_diff": {"kv4_vs_fake_fp32": float((kern - fake).norm() / fake.norm()),
                             "fake_fp64_vs_fake_fp32": float((f64 - fake).norm() / fake.norm())},
           "top1_agree": {"kv4_vs_fake_fp32": float((kern.argmax(-1) == fake.argmax(-1)).double().mean()),
                          "fake_fp64_vs_fake_fp32": float((f64.argmax(-1) == fake.argmax(-1)).double().mean())},
           "kv4_cache_bytes": _cache_bytes(cache),
           "bf16_cache_bytes_would_be": 8 * sum(layer.codes.k_codes.numel() for layer in cache.layers)}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
