#!/usr/bin/env python3
"""K at 4 bits alone, with and without its RoPE'd bias, unrotated: Qwen2.5-Coder-0.5B (issue 12, CPU).

    PYTHONPATH=src python lab/k4_bias_check.py   # writes k4_05.json
"""
import json
from dartquant.adapters import adapter_for
from dartquant.data import eval_windows
from dartquant.eval.ppl import perplexity
from dartquant.quant.act import install_quantizers_
from dartquant.config import RunConfig
from dartquant.zoo import load_model
model, tok = load_model("qwen2.5-coder-0.5b")
ids = eval_windows(tok, "wiki", seqlen=512, max_windows=2)
res = {"fp": perplexity(model, ids, progress=False)["ppl"]}
print(res, flush=True)
for exclude in (False, True):
    install_quantizers_(model, RunConfig.from_flat(a_bits=16, kv_bits=4, kv_exclude_k_bias=exclude).scheme)
    for layer in adapter_for(model).layers_of(model):
        layer.attn.dq_attention.v_quantizer = None
    res[f"K4_exclude_{exclude}"] = perplexity(model, ids, progress=False)["ppl"]
    print(res, flush=True)
json.dump(res, open("k4_05.json", "w"))
