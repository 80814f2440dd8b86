"""Session 18, run 13 (GPU, one-off): (1) the fused norm kernel's codes against the torch norm + the
quant-only kernel on the real residual streams of the Llama-2-7B-shape model in memory (prefill
2048, every block norm); (2) how far one flipped low bit of the input moves the logits of this
random 4-bit model (is a 1.9 logits difference chaos or an error?); (3) merged siblings on / off,
alternating, scaled_mm prefill and decode batch 1 / 8.
    PYTHONPATH=src python3 lab/device/jobs/session18_check.py OUT.json
"""
import json
import sys

import torch

sys.path.insert(0, "benchmarks")
import kernels_e2e as ke  # noqa: E402
from dartquant.kernels.act_quant import hadamard_quantize_pack, rmsnorm_quantize_pack  # noqa: E402
from dartquant.kernels.bench import BenchSettings, time_decode, time_prefill  # noqa: E402
from dartquant.kernels.fusions import NormQuant, merge_siblings_  # noqa: E402
from dartquant.kernels.linear import W4A4Linear  # noqa: E402

out = {}
dev = torch.device("cuda")
model = ke.build_w4a4(dev, "scaled_mm")
ids = torch.randint(0, 32000, (1, 2048), device=dev, generator=torch.Generator(dev).manual_seed(1))

# (1) codes on the real residual streams
rows = []


def hook(mod, args):
    x = args[0].reshape(-1, args[0].shape[-1])
    fused = rmsnorm_quantize_pack(x, None, mod.norm.variance_epsilon, mod.clip_ratio, planar=torch.float8_e4m3fn)
    ref = hadamard_quantize_pack(mod.norm(x), mod.clip_ratio, rotate=False, planar=torch.float8_e4m3fn)
    a, b = fused.codes.view(torch.uint8), ref.codes.view(torch.uint8)
    rows.append({"codes_differ": int((a != b).sum()), "codes": a.numel(),
                 "scales_differ": int((fused.scale != ref.scale).sum()), "zeros_differ": int((fused.zero != ref.zero).sum())})


hooks = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, NormQuant)]
with torch.no_grad():
    logits = model(ids, use_cache=False).logits.float()
for h in hooks:
    h.remove()
out["codes_on_residual_streams"] = {"norms": len(rows), "codes_differ": sum(r["codes_differ"] for r in rows),
                                    "codes": sum(r["codes"] for r in rows),
                                    "scales_differ": sum(r["scales_differ"] for r in rows),
                                    "zeros_differ": sum(r["zeros_differ"] for r in rows), "per_norm": rows}
print(json.dumps({k: v for k, v in out["codes_on_residual_streams"].items() if k != "per_norm"}), flush=True)

# (2) sensitivity: one embedding entry of one token moved by one bf16 ulp
emb = model.model.embed_tokens.weight
tok = int(ids[0, 1000])
with torch.no_grad():
    old = emb[tok, 7].clone()
    emb.view(torch.int16)[tok, 7] += 1  # one bf16 ulp, by bits
    bumped = model(ids, use_cache=False).logits.float()
    emb[tok, 7] = old
out["one_ulp_input_change"] = {"logits_max_abs_diff": (bumped - logits).abs().max().item(),
                               "logits_max_abs": logits.abs().max().item(),
                               "positions_changed": int(((bumped - logits).abs().amax(-1) > 0).sum())}
print(json.dumps(out["one_ulp_input_change"]), flush=True)

# (3) merged siblings on / off, alternating
s = BenchSettings(prefill=2048, batches=[1, 8], context=512)


def unmerge():
    for m in model.modules():
        if isinstance(m, W4A4Linear):
            m.merged = None


def timings():
    r = {"prefill_ms": time_prefill(model, s, dev)["prefill_ms"]}
    for b in (1, 8):
        r[f"decode_b{b}_ms"] = time_decode(model, b, s, dev)["ms_per_step"]
    return r


out["merge_ab"] = []
for rnd in range(2):
    unmerge()
    a = timings()
    merge_siblings_(model)
    b = timings()
    out["merge_ab"].append({"apart": a, "merged": b})
    print(f"round {rnd}: apart {a}, merged {b}", flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
