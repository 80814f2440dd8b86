"""Session 46 (issue 16, GPU, one-off): a generation's prompt into an empty 4-bit cache, one attention layer at the
Llama-2-7B / Llama-3-8B shapes (2048 tokens into a static cache of 4096). Before: the store launch wrote the codes,
then the whole static cache was dequantized in torch and SDPA ran over it (`_before` below, the code of 09a9fb5).
Now (`kv_cache._kv4_attention` with no mask, transformers' empty-cache prefill): one launch stores the codes and
hands back the prompt's own values, and SDPA runs over those. Both with the RoPE in the launch, as `fuse_rope_` runs.
Checks the outputs agree and the codes are the same, then times both (CUDA graph, do_bench median).
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session46_prompt_cache.py OUT.json
"""
import os
import sys
import time
import types

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import write_result  # noqa: E402
from dartquant.kernels.kv_cache import _kv4_attention, _layer_classes, kv4_store  # noqa: E402

SMOKE = os.environ.get("TRITON_INTERPRET") == "1"
SHAPES = {"llama2-7b": (32, 32), "llama3-8b": (32, 8)}
S, MAX_LEN, D, LAYERS = (2048, 4096, 128, 32) if not SMOKE else (24, 40, 64, 1)


def _module(hq, hkv):
    quant = types.SimpleNamespace(spec=types.SimpleNamespace(clip_ratio=0.9))
    return types.SimpleNamespace(dq_attention=types.SimpleNamespace(k_quantizer=quant, v_quantizer=quant,
                                                                     qk_rotation=object()),
                                 num_key_value_groups=hq // hkv, is_causal=True, training=False)


def _before(module, query, pending, rope):  # 09a9fb5's prompt into the cache (R3 on, RoPE in the launch)
    layer = pending.layer
    q = kv4_store(layer.codes, layer.cumulative_length, pending.key_states, pending.value_states, 0.9, True,
                  query=query, rope=rope)
    k, v = layer.codes.dequantize(query.dtype)
    return sdpa_attention_forward(module, q, k, v, None, dropout=0.0, scaling=D ** -0.5)[0]


def empty_cache_prompt_gets_no_mask(dev) -> bool:
    """Whether this transformers hands a prompt into an empty static cache no mask (its SDPA shortcut), which is
    what sends the prompt down the new path: a tiny random Llama, an attention that records the masks it gets."""
    import transformers
    from transformers.cache_utils import StaticCache

    from dartquant.modules import register_attention_function

    seen = []

    def probe(module, query, key, value, attention_mask, **kwargs):
        seen.append(attention_mask is None)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    model = transformers.LlamaForCausalLM(cfg).to(dev)
    model.set_attn_implementation(register_attention_function("session46_probe", probe))
    with torch.no_grad():
        model(torch.arange(8, device=dev)[None], use_cache=True,
              past_key_values=StaticCache(config=cfg, max_cache_len=32))
    return bool(seen) and all(seen)


def main(out):
    t0, dev = time.time(), torch.device("cpu" if SMOKE else "cuda")
    import transformers

    res = {"device": "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(), "torch": torch.__version__,
           "transformers": transformers.__version__, "prompt": S, "max_cache_len": MAX_LEN, "rows": [],
           "empty_cache_prompt_gets_no_mask": empty_cache_prompt_gets_no_mask(dev)}
    print(f"transformers {transformers.__version__}: a prompt into an empty static cache gets no mask: "
          f"{res['empty_cache_prompt_gets_no_mask']}", flush=True)
    g = torch.Generator(dev).manual_seed(0)
    layer_cls = _layer_classes()[0]
    for name, (hq, hkv) in SHAPES.items():
        module = _module(hq, hkv)
        q = torch.randn(1, S, hq, D, device=dev, generator=g).bfloat16().transpose(1, 2)
        k, v = (torch.randn(1, S, hkv, D, device=dev, generator=g).bfloat16().transpose(1, 2) for _ in range(2))
        pos = torch.arange(S, device=dev, dtype=torch.float32)[:, None] / 10000 ** (
            torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D)
        emb = torch.cat((pos, pos), -1)[None]
        rope = (emb.cos().bfloat16(), emb.sin().bfloat16())
        layers = [layer_cls(max_cache_len=MAX_LEN) for _ in range(2)]

        def run(which):
            layer = layers[which]
            layer.reset() if layer.is_initialized else None
            pending, _ = layer.update(k, v)
            if which == 0:
                return _before(module, q, pending, rope)
            return _kv4_attention(module, q, pending, pending.value_states, None, rope=rope, dropout=0.0,
                                  scaling=D ** -0.5)[0]

        before, now = run(0), run(1)
        same_codes = all(torch.equal(getattr(layers[0].codes, f), getattr(layers[1].codes, f))
                         for f in ("k_codes", "v_codes", "k_scale", "k_zero", "v_scale", "v_zero"))
        err = float((before.float() - now.float()).abs().max())
        row = {"shape": name, "query_heads": hq, "kv_heads": hkv, "same_codes": same_codes, "max_abs_diff": err,
               "largest": float(before.float().abs().max())}
        if not SMOKE:
            from triton.testing import do_bench

            for which, key in ((0, "before_us"), (1, "now_us")):
                fn = (lambda w=which: [run(w) for _ in range(LAYERS)])
                fn()
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                row[key] = do_bench(graph.replay, warmup=10, rep=60, return_mode="median") * 1e3 / LAYERS
            row["ratio"] = row["now_us"] / row["before_us"]
            row["saved_ms_per_prompt"] = (row["before_us"] - row["now_us"]) * LAYERS / 1e3
        res["rows"].append(row)
        print(row, flush=True)
        write_result(res, out, t0)


if __name__ == "__main__":
    main(sys.argv[1])
