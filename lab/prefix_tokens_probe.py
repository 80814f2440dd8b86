"""Issue 17, item 1 (CPU probe, one-off): how much of a W4A4KV4 run's perplexity gap comes from the
first tokens of each window (the attention sink, where models put their massive activations)?

Loads a quantized run folder and evaluates held-out perplexity with every activation quantizer
(linear inputs) and/or the K/V quantizers passing the first `n` positions of each window through
unquantized, the rest as the run does. Per-token quantizers treat tokens independently, so only
those positions change. It also prints, per layer, the largest residual-stream norm at position 0
against the median position (how "massive" the sink is).
    PYTHONPATH=src python lab/prefix_tokens_probe.py RUN --windows 4 --json OUT
With --sinks, for each run folder given: as run, then with the product's `kv_sink_tokens`,
`a_sink_tokens` and both set to each --prefix value: a paired comparison on the same weights (plain
GPTQ collects its Hessians with the activation and K/V quantizers off, so for QuaRot + GPTQ runs this is
exactly what a run with the flags gives; the clip search of a recipe run saw them quantized).
    PYTHONPATH=src python lab/prefix_tokens_probe.py RUN [RUN ...] --sinks --prefix 1 --windows 8 --json OUT
"""
import argparse
import json

import torch
from torch import nn

from dartquant.data import eval_windows
from dartquant.eval.ppl import perplexity
from dartquant.zoo import load_model


class KeepPrefix(nn.Module):
    """The wrapped per-token quantizer, except on the first `n` positions (dim -2) when enabled."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.n = inner, 0

    def forward(self, x):
        y = self.inner(x)
        if self.n:
            y = y.clone()
            y[..., : self.n, :] = x[..., : self.n, :]
        return y


def wrap(model):
    acts, kvs = [], []
    for m in model.modules():
        if isinstance(getattr(m, "input_quantizer", None), nn.Module) and not isinstance(m.input_quantizer, KeepPrefix):
            m.input_quantizer = KeepPrefix(m.input_quantizer)
            acts.append(m.input_quantizer)
        for name in ("k_quantizer", "v_quantizer"):
            q = getattr(m, name, None)
            if isinstance(q, nn.Module) and not isinstance(q, KeepPrefix):
                setattr(m, name, KeepPrefix(q))
                kvs.append(getattr(m, name))
    return acts, kvs


@torch.no_grad()
def sink_norms(model, ids):
    out = model(ids[:1], output_hidden_states=True)
    rows = []
    for i, h in enumerate(out.hidden_states):
        n = h[0].float().norm(dim=-1)
        rows.append({"layer": i, "pos0": float(n[0]), "median": float(n.median()), "max_other": float(n[1:].max()),
                     "argmax_other": int(n[1:].argmax()) + 1})
    return rows


def sinks(args):
    """Per run folder: as run, then the product's kv_sink_tokens, a_sink_tokens and both at each --prefix."""
    from dartquant.adapters import adapter_for
    from dartquant.quant.act import _install_sink_hook_

    out = []
    for run in args.runs:
        model, tok = load_model(run, dtype=torch.float32)
        model.eval()
        adapter = adapter_for(model)
        blocks = list(adapter.decoder_layers(model))
        transforms = [m for m in model.modules() if hasattr(m, "sink_tokens")]
        data = {c: eval_windows(tok, c, seqlen=2048, max_windows=args.windows) for c in ("wiki", "c4")}
        settings = [(0, 0)] + [s for n in args.prefix for s in ((0, n), (n, 0), (n, n))]
        for a_sink, kv_sink in settings:
            for t in transforms:
                t.sink_tokens = kv_sink
            for b in blocks:
                _install_sink_hook_(b, adapter.layer(b), a_sink)
            row = {"run": run, "a_sink_tokens": a_sink, "kv_sink_tokens": kv_sink, "windows": args.windows}
            for c, w in data.items():
                row[c] = perplexity(model, w, progress=False)["ppl"]
            print(f"{run:32s} a_sink {a_sink} kv_sink {kv_sink}: wiki {row['wiki']:.3f}  c4 {row['c4']:.3f}",
                  flush=True)
            out.append(row)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"rows": out}, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--sinks", action="store_true")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--prefix", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.sinks:
        return sinks(args)
    args.run, = args.runs
    model, tok = load_model(args.run, dtype=torch.float32)
    model.eval()
    acts, kvs = wrap(model)
    print(f"wrapped {len(acts)} activation and {len(kvs)} K/V quantizers")
    data = {c: eval_windows(tok, c, seqlen=2048, max_windows=args.windows) for c in ("wiki", "c4")}
    result = {"run": args.run, "windows": args.windows, "rows": []}
    settings = [("as run", 0, 0)]
    for i, n in enumerate(args.prefix):
        settings.append((f"first {n} unquantized: acts + KV", n, n))
        if i == 0:  # the split into activations and K/V, at the shortest prefix only
            settings += [(f"first {n}: acts only", n, 0), (f"first {n}: KV only", 0, n)]
    for name, na, nk in settings:
        for q in acts:
            q.n = na
        for q in kvs:
            q.n = nk
        row = {"setting": name}
        for c, w in data.items():
            row[c] = perplexity(model, w, progress=False)["ppl"]
        print(f"{name:40s} wiki {row['wiki']:.3f}  c4 {row['c4']:.3f}", flush=True)
        result["rows"].append(row)
    for q in acts + kvs:
        q.n = 0
    result["sink_norms"] = sink_norms(model, data["wiki"])
    for r in result["sink_norms"][::4]:
        print(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
