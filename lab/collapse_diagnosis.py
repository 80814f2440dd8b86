#!/usr/bin/env python3
"""Why does W4A4KV4 collapse on Qwen2.5-Coder-1.5B? (issue 12; a research one-off, not product code)

    PYTHONPATH=src python lab/collapse_diagnosis.py --model qwen2.5-coder-1.5b --device cuda \
        --windows 4 --seqlen 2048 --methods none quarot dartquant --out collapse.json

Design (short protocol on purpose: the grid has ~60 evaluations per method):
* Perplexity on the first `--windows` held-out wiki windows only (say so next to every number).
* One rotated model per method; its quantizers are installed once (RunConfig defaults:
  A4 asym per token clip 0.9, KV4 asym groups of head_dim) and then switched per grid cell by
  enabling / disabling single ActQuantizers (role x layer, K, V) or changing their bits. Weights
  are RTN 4-bit per channel with MSE clip (the product's weight spec), swapped in and out from two
  stored copies. So every cell differs from the FP rotated model only in what it names.
* Exactness first: the rotated unquantized model (float32) must give the FP perplexity; in float64
  (`--fp64-tokens`) the logits must match to ~1e-9 on a short window.
* Activations of the *unrotated* FP model: per layer, the largest |value| of the residual stream,
  the down_proj input, the k_proj output (and its bias alone), with the token position.
* Per-layer error: per-token relative error of every layer's output hidden state (same basis:
  the rotated FP model), averaged over tokens, for the full W4A4KV4 cell.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from dartquant.adapters import LINEAR_ROLES, adapter_for  # noqa: E402
from dartquant.data import calib_windows, eval_windows  # noqa: E402
from dartquant.eval.ppl import perplexity  # noqa: E402
from dartquant.quant.act import install_quantizers_  # noqa: E402
from dartquant.config import RunConfig  # noqa: E402
from dartquant.quant.primitives import QuantizedTensor  # noqa: E402
from dartquant.transforms import RotationSet, rotate_, untie_embeddings_  # noqa: E402
from dartquant.zoo import load_model  # noqa: E402


def log(*a):
    print("[collapse]", *a, file=sys.stderr, flush=True)


def ppl(model, windows) -> float:
    return perplexity(model, windows, progress=False)["ppl"]


# ---- activations of the FP model -----------------------------------------------------------
@torch.no_grad()
def activation_report(model, ids) -> list[dict]:
    """Per layer: max |x| (and token position) of the residual output, down_proj input, k_proj
    output; max |k bias|; median |residual| for scale."""
    adapter = adapter_for(model)
    rows, hooks = [], []
    for i, layer in enumerate(adapter.layers_of(model)):
        row = {"layer": i}
        rows.append(row)

        def grab(key, row=row):
            def hook(mod, inp, out):
                x = (inp[0] if key == "down_in" else out).detach().float()[0]  # [S, n]
                amax = x.abs().amax(-1)
                t = int(amax.argmax())
                row[key] = {"max": float(amax[t]), "token": t, "channel": int(x[t].abs().argmax()),
                            "max_excl_tok0": float(amax[1:].max()), "median_tok": float(amax.median())}
            return hook

        hooks.append(layer.down.register_forward_hook(grab("down_in")))
        hooks.append(layer.k.register_forward_hook(grab("k_out")))
        hooks.append(layer.v.register_forward_hook(grab("v_out")))
        if layer.k.bias is not None:
            row["k_bias_max"] = float(layer.k.bias.abs().max())
            row["q_bias_max"] = float(layer.q.bias.abs().max())
    out = model(ids.to(next(model.parameters()).device), output_hidden_states=True)
    for h in hooks:
        h.remove()
    for i, hs in enumerate(out.hidden_states[1:]):
        x = hs.float()[0]
        amax = x.abs().amax(-1)
        t = int(amax.argmax())
        rows[i]["resid"] = {"max": float(amax[t]), "token": t, "channel": int(x[t].abs().argmax()),
                            "max_excl_tok0": float(amax[1:].max()), "median_tok": float(amax.median()),
                            "rms_tok0": float(x[0].pow(2).mean().sqrt()), "rms_median": float(x.pow(2).mean(-1).sqrt().median())}
    return rows


# ---- the switchable quantized model --------------------------------------------------------
class Switchboard:
    """A rotated model with every quantizer installed and individually switchable."""

    def __init__(self, model, cfg: RunConfig):
        self.model, self.cfg = model, cfg
        self.adapter = adapter_for(model)
        install_quantizers_(model, cfg.scheme, self.adapter)
        self.acts, self.kv = {}, {}
        for i, block in enumerate(self.adapter.decoder_layers(model)):
            layer = self.adapter.layer(block)
            for role, lin in layer.linears().items():
                self.acts[(i, role)] = lin.input_quantizer
            t = layer.attn.dq_attention
            self.kv[(i, "k")], self.kv[(i, "v")] = t.k_quantizer, t.v_quantizer
        self.transforms = [self.adapter.layer(b).attn.dq_attention for b in self.adapter.decoder_layers(model)]
        self.kbias_from = [t._k_bias_from for t in self.transforms]
        # two dicts: (layer, "k") names both k_proj's input quantizer and the K-cache quantizer
        self.base_act = {k: q.spec for k, q in self.acts.items()}
        self.base_kv = {k: q.spec for k, q in self.kv.items()}
        self.linears = {(i, r): lin for i, layer in enumerate(self.adapter.layers_of(model))
                        for r, lin in layer.linears().items()}
        self.fp_w = {k: lin.weight.data.clone() for k, lin in self.linears.items()}
        spec = cfg.scheme.weight_spec()
        self.q_w = {k: QuantizedTensor.from_float(w.float(), spec).dequantize().to(w.device, w.dtype)
                    for k, w in self.fp_w.items()}

    def set(self, *, w4=False, a=(), kv=(), bits=None, kv_bits=None, kbias=False):
        """a: iterable of (layer, role) at activation bits; kv: iterable of (layer, 'k'|'v');
        bits: {(layer, role): b} activation overrides (e.g. 8); kv_bits: {(layer, 'k'|'v'): b} cache
        overrides (separate: (layer, 'k') names both k_proj's input and the K cache); kbias: K's bias
        kept out of K4."""
        a, kv, bits, kv_bits = set(a), set(kv), bits or {}, kv_bits or {}
        for t, src in zip(self.transforms, self.kbias_from):
            t._k_bias_from = src if kbias else ()
        for k, q in self.acts.items():
            q.enabled = k in a
            b = bits.get(k)
            q.spec = dataclasses.replace(self.base_act[k], bits=b) if b else self.base_act[k]
        for k, q in self.kv.items():
            q.enabled = k in kv
            b = kv_bits.get(k)
            q.spec = dataclasses.replace(self.base_kv[k], bits=b) if b else self.base_kv[k]
        for k, lin in self.linears.items():
            lin.weight.data.copy_(self.q_w[k] if w4 else self.fp_w[k])

    def all_a(self, layers=None, roles=LINEAR_ROLES):
        n = len(self.adapter.decoder_layers(self.model))
        return {(i, r) for i in (layers if layers is not None else range(n)) for r in roles}

    def all_kv(self, layers=None, which=("k", "v")):
        n = len(self.adapter.decoder_layers(self.model))
        return {(i, w) for i in (layers if layers is not None else range(n)) for w in which}


@torch.no_grad()
def layer_errors(sb: Switchboard, ids, cell: dict) -> list[float]:
    """Per-token relative error of each layer's output, averaged over tokens (cell vs all off)."""
    dev = next(sb.model.parameters()).device
    sb.set()
    ref = [h.float() for h in sb.model(ids.to(dev), output_hidden_states=True).hidden_states[1:]]
    sb.set(**cell)
    got = sb.model(ids.to(dev), output_hidden_states=True).hidden_states[1:]
    out = []
    for r, g in zip(ref, got):
        e = (g.float() - r).norm(dim=-1) / r.norm(dim=-1).clamp_min(1e-12)
        out.append(float(e.mean()))
    sb.set()
    return out


def grid(sb: Switchboard, windows, n_layers: int, per_layer: bool, extra: dict, cells=()) -> dict:
    res = {}

    def run(name, **cell):
        if cells and name not in cells:
            return
        t0 = time.time()
        sb.set(**cell)
        res[name] = ppl(sb.model, windows)
        log(f"  {name:<34} {res[name]:12.3f}  ({time.time() - t0:.1f} s)")

    run("fp_rotated")
    run("W4A16KV16", w4=True)
    run("W16A4KV16", a=sb.all_a())
    run("W16A16KV4", kv=sb.all_kv())
    run("W16A16K4", kv=sb.all_kv(which=("k",)))
    run("W16A16V4", kv=sb.all_kv(which=("v",)))
    for r in LINEAR_ROLES:
        run(f"A4_only_{r}", a=sb.all_a(roles=(r,)))
    for r in LINEAR_ROLES:
        run(f"A4KV4_but_{r}", a=sb.all_a(roles=tuple(x for x in LINEAR_ROLES if x != r)), kv=sb.all_kv())
    run("W16A4KV4", a=sb.all_a(), kv=sb.all_kv())
    run("W4A4KV4", w4=True, a=sb.all_a(), kv=sb.all_kv())
    if per_layer:
        for i in range(n_layers):
            run(f"A4KV4_layer{i}_only", a=sb.all_a(layers=[i]), kv=sb.all_kv(layers=[i]))
        for i in range(n_layers):
            run(f"A4KV4_but_layer{i}", a=sb.all_a(layers=[j for j in range(n_layers) if j != i]),
                kv=sb.all_kv(layers=[j for j in range(n_layers) if j != i]))
    for name, fn in extra.items():
        run(name, **fn(sb))
    return res


def candidate_fixes(n_layers: int) -> dict:
    """Cells that give the method what the model needs (a part at 8 bits, K's bias kept out of
    the K quantizer), all else as named."""
    def a8(roles=LINEAR_ROLES, layers=None, kbias=False, w4=True):
        def cell(sb):
            keep = sb.all_a(layers=layers, roles=roles) if roles else set()
            # a layer kept at 8 bits keeps its K / V cache at 8 bits too (RESULTS §7 "layer 0 at 8 bits")
            keep_kv = sb.all_kv(layers=layers) if (roles and layers is not None) else set()
            return {"w4": w4, "a": sb.all_a(), "kv": sb.all_kv(), "bits": {k: 8 for k in keep},
                    "kv_bits": {k: 8 for k in keep_kv}, "kbias": kbias}
        return cell

    def k8(w4=True):
        def cell(sb):
            return {"w4": w4, "a": sb.all_a(), "kv": sb.all_kv(), "kv_bits": {k: 8 for k in sb.all_kv(which=("k",))}}
        return cell
    return {
        "W16A16K4_kbias": lambda sb: {"kv": sb.all_kv(which=("k",)), "kbias": True},
        "W16A16KV4_kbias": lambda sb: {"kv": sb.all_kv(), "kbias": True},
        "W16A4KV4_kbias": a8(roles=(), kbias=True, w4=False),
        "W4A4KV4_kbias": a8(roles=(), kbias=True),
        "W4A4KV4_K8": k8(),
        "W4A4KV4_down8": a8(roles=("down",)),
        "W4A4KV4_down8_kbias": a8(roles=("down",), kbias=True),
        "W4A4KV4_layer0_A8": a8(layers=[0]),
        "W4A4KV4_lastlayer_A8": a8(layers=[n_layers - 1]),
    }


def build(fp_model, method: str, cfg: RunConfig, tok, calib_ids):
    model = copy.deepcopy(fp_model)
    adapter = adapter_for(model)
    geo = adapter.geometry(model.config)
    untie_embeddings_(model, adapter)
    t0 = time.time()
    if method == "none":
        rot = RotationSet()  # fuse norms only: no rotation
    elif method == "quarot":
        rot = RotationSet.quarot(geo, seed=cfg.seed)
    elif method == "dartquant":
        from dartquant.calib.dartquant import calibrate_dartquant
        rot = calibrate_dartquant(model, cfg, calib_ids, progress=False)
    elif method == "spinquant":
        from dartquant.calib.e2e import train_e2e
        train_ids = calib_windows(tok, cfg.data.corpus, cfg.section("e2e").steps * cfg.section("e2e").batch, cfg.section("e2e").seqlen, cfg.seed + 1,
                                  span=(0.0, 0.9))
        rot = train_e2e(model, cfg, train_ids, None, progress=False)
    else:
        raise ValueError(method)
    rotate_(model, rot, adapter)  # folds on the model's device (float64)
    log(f"{method}: rotations ready in {time.time() - t0:.1f} s")
    return model, rot


@torch.no_grad()
def fp64_check(fp_model, tokens: int, device) -> float:
    """Max relative logit error of the QuaRot-rotated model vs the original, both float64."""
    from dartquant.transforms.fuse import exact_norms_

    ref = copy.deepcopy(fp_model).double()
    exact_norms_(ref)  # transformers' RMSNorm works in float32 even on float64 inputs
    rot = copy.deepcopy(ref)
    adapter = adapter_for(rot)
    untie_embeddings_(rot, adapter)
    rotate_(rot, RotationSet.quarot(adapter.geometry(rot.config), seed=0), adapter)
    ids = torch.randint(0, fp_model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    a = ref(ids.to(device)).logits
    del ref
    b = rot(ids.to(device)).logits
    return float((a - b).abs().max() / a.abs().max())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--methods", nargs="+", default=["none", "quarot"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--per-layer", action="store_true")
    ap.add_argument("--cells", nargs="*", default=[], help="run only these grid cells (e.g. W16A16K4 W4A4KV4_kbias)")
    ap.add_argument("--fp64-tokens", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="RunConfig settings (e.g. e2e_steps=20)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import yaml

    extra_cfg = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}
    torch.manual_seed(args.seed)
    fp, tok = load_model(args.model)
    fp.to(args.device)
    geo = adapter_for(fp).geometry(fp.config)
    windows = eval_windows(tok, "wiki", args.seqlen, args.windows)
    result = {"args": vars(args), "geometry": geo.__dict__, "protocol": f"wiki ppl, first {args.windows} held-out "
              f"windows of {args.seqlen} tokens; RTN weights (per channel, MSE clip)", "methods": {}}
    result["fp_ppl"] = ppl(fp, windows)
    log(f"FP ppl {result['fp_ppl']:.3f}")
    result["activations"] = activation_report(fp, windows[:1])
    if args.fp64_tokens:
        result["fp64_max_rel_logit_err"] = fp64_check(fp, args.fp64_tokens, args.device)
        log(f"float64 max relative logit error {result['fp64_max_rel_logit_err']:.2e}")
    cfg = RunConfig.from_flat(model=args.model, device=args.device, seed=args.seed, calib_samples=args.calib_samples,
                      **extra_cfg)
    calib_ids = calib_windows(tok, cfg.data.corpus, cfg.data.samples, cfg.data.seqlen, cfg.seed)
    for method in args.methods:
        t0 = time.time()
        model, rot = build(fp, method, cfg, tok, calib_ids)
        model.to(args.device)
        sb = Switchboard(model, cfg)
        entry = {"grid": grid(sb, windows, geo.n_layers, args.per_layer, candidate_fixes(geo.n_layers), args.cells)}
        if args.cells:  # a quick look: the grid cells only
            result["methods"][method] = entry
            Path(args.out).write_text(json.dumps(result, indent=1))
            continue
        entry["layer_error_W16A4KV4"] = layer_errors(sb, windows[:1], {"a": sb.all_a(), "kv": sb.all_kv()})
        entry["layer_error_W4A4KV4"] = layer_errors(sb, windows[:1], {"w4": True, "a": sb.all_a(), "kv": sb.all_kv()})
        entry["layer_error_W16A16K4"] = layer_errors(sb, windows[:1], {"kv": sb.all_kv(which=("k",))})
        entry["layer_error_W4A4KV4_kbias"] = layer_errors(sb, windows[:1], {"w4": True, "a": sb.all_a(),
                                                                           "kv": sb.all_kv(), "kbias": True})
        entry["seconds"] = round(time.time() - t0, 1)
        result["methods"][method] = entry
        del model, sb
        Path(args.out).write_text(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))
    log("done")


if __name__ == "__main__":
    main()
