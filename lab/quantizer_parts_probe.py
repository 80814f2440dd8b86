"""Issue 17 (CPU probe, one-off): a W4A4KV4 run's gap split into its parts on the *same* weights.

Loads a quantized run folder and evaluates held-out perplexity with the activation quantizers (every
decoder linear's input) and / or the K/V quantizers bypassed: W4A4KV4 as run, W4A4 (K/V at 16 bits),
W4KV4 (activations at 16 bits) and W4 alone. Plain GPTQ, with or without act-order / true-sequential,
collects its Hessians with the activation and K/V quantizers off (`gptq_act_quant` false), so the
weights are the ones a W4-only run would get: unlike RESULTS §31b (each part re-run from the rotations),
this is a paired split with no run-to-run round-off. Runs with `gptq_act_quant` or asymmetric GPTQ fitted
their weights to quantized inputs; for them the W4-only row is the weights' cost *given* that fit.
    PYTHONPATH=src python lab/quantizer_parts_probe.py RUN [RUN ...] --windows 4 [--skip-as-run] --json OUT
"""
import argparse
import json

import torch
from torch import nn

from dartquant.data import eval_windows
from dartquant.eval.ppl import perplexity
from dartquant.zoo import load_model


class Bypass(nn.Module):
    """The wrapped quantizer, or the identity while `off`."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.off = inner, False

    def forward(self, x):
        return x if self.off else self.inner(x)


def wrap(model):
    acts, kvs = [], []
    for m in model.modules():
        q = getattr(m, "input_quantizer", None)
        if isinstance(q, nn.Module) and not isinstance(q, Bypass):
            m.input_quantizer = Bypass(q)
            acts.append(m.input_quantizer)
        for name in ("k_quantizer", "v_quantizer"):
            q = getattr(m, name, None)
            if isinstance(q, nn.Module) and not isinstance(q, Bypass):
                setattr(m, name, Bypass(q))
                kvs.append(getattr(m, name))
    return acts, kvs


SETTINGS = (("W4A4KV4 (as run)", False, False), ("W4A4 (KV16)", False, True),
            ("W4KV4 (A16)", True, False), ("W4 (A16 KV16)", True, True))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--skip-as-run", action="store_true", help="the run's own row is in its metrics.json already")
    ap.add_argument("--only", choices=[name for name, _, _ in SETTINGS], help="this setting alone")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    rows = []
    for run in args.runs:
        model, tok = load_model(run, dtype=torch.float32)
        model.eval()
        acts, kvs = wrap(model)
        print(f"{run}: {len(acts)} activation and {len(kvs)} K/V quantizers", flush=True)
        data = {c: eval_windows(tok, c, seqlen=2048, max_windows=args.windows) for c in ("wiki", "c4")}
        for name, acts_off, kv_off in SETTINGS[1 if args.skip_as_run else 0:]:
            if args.only and name != args.only:
                continue
            for q in acts:
                q.off = acts_off
            for q in kvs:
                q.off = kv_off
            row = {"run": run, "setting": name, "windows": args.windows}
            for c, w in data.items():
                row[c] = perplexity(model, w, progress=False)["ppl"]
            print(f"{run:28s} {name:18s} wiki {row['wiki']:.3f}  c4 {row['c4']:.3f}", flush=True)
            rows.append(row)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
