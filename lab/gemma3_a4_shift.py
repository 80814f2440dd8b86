#!/usr/bin/env python3
"""Gemma 3 270M at 4-bit activations (RESULTS §9; a research one-off, CPU, 1 wiki window of 512).

Norms fused and r1_online's Hadamards folded (the function unchanged), then 4-bit per-token
asymmetric quantizers on the q/k/v and/or gate/up inputs, with and without subtracting each
input's mean over 4 c4 calibration windows (a shift a bias W m restores exactly), and with
activation groups / clip 1.0. Prints one perplexity per setting.

    PYTHONPATH=src python lab/gemma3_a4_shift.py
"""

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from dartquant.zoo import load_model
from dartquant.data import eval_windows, calib_windows
from dartquant.eval.ppl import perplexity
from dartquant.transforms import RotationSet, rotate_
from dartquant.adapters import adapter_for
from dartquant.quant.primitives import QuantSpec, fake_quantize
torch.set_num_threads(1)
model, tok = load_model("gemma3-270m")
win = eval_windows(tok, "wiki", 512, 1)
cal = calib_windows(tok, "c4", 4, 512, seed=0)
ad = adapter_for(model)
rotate_(model, RotationSet(r1_online=True), ad)  # norms fused + online H before q/k/v and gate/up
layers = ad.layers_of(model)
spec = QuantSpec(bits=4, symmetric=False, group_size=None, clip_ratio=0.9)
# mean of each branch input after H (what the quantizer sees), over the calibration windows
means = {}
def obs(key):
    def f(x):
        s, n = means.get(key, (0, 0))
        means[key] = (s + x.detach().reshape(-1, x.shape[-1]).double().sum(0), n + x.shape[0] * x.shape[1])
    return f
for i, l in enumerate(layers):
    l.q.input_observer = obs((i, "attn")); l.up.input_observer = obs((i, "mlp"))
with torch.no_grad():
    for w in cal:
        model(w[None])
for l in layers:
    l.q.input_observer = l.up.input_observer = None
mu = {k: (s / n).float() for k, (s, n) in means.items()}
print("FP", perplexity(model, win, progress=False)["ppl"], flush=True)
class Q(torch.nn.Module):
    def __init__(self, m=None): super().__init__(); self.m = m
    def forward(self, x):
        if self.m is None: return fake_quantize(x, spec)
        return fake_quantize(x - self.m, spec) + self.m   # shift: quantize the residue, add the constant back (a bias W m)
for shift in (False, True):
    for branch, roles in (("mlp", ("gate", "up")), ("attn", ("q", "k", "v")), ("both", ("q", "k", "v", "gate", "up"))):
        for i, l in enumerate(layers):
            for r in ("q", "k", "v", "gate", "up"):
                getattr(l, r).input_quantizer = None
            for r in roles:
                key = (i, "attn" if r in ("q", "k", "v") else "mlp")
                getattr(l, r).input_quantizer = Q(mu[key] if shift else None)
        print(f"A4 on {branch} inputs (after H), shift={shift}: ppl {perplexity(model, win, progress=False)['ppl']:.2f}", flush=True)


# finer activation groups and clip 1.0, all five inputs at once
class QG(torch.nn.Module):
    def __init__(self, m, spec): super().__init__(); self.m = m; self.spec = spec
    def forward(self, x):
        if self.m is None: return fake_quantize(x, self.spec)
        return fake_quantize(x - self.m, self.spec) + self.m
for shift, gs, clip in ((False, 128, 0.9), (True, 128, 0.9), (True, 32, 0.9), (True, None, 1.0), (False, None, 1.0)):
    sp = dataclasses.replace(spec, group_size=gs, clip_ratio=clip)
    for i, l in enumerate(layers):
        for r in ("q", "k", "v", "gate", "up"):
            key = (i, "attn" if r in ("q", "k", "v") else "mlp")
            getattr(l, r).input_quantizer = QG(mu[key] if shift else None, sp)
    print(f"A4 on q/k/v + gate/up inputs (after H), shift={shift}, group={gs}, clip={clip}: ppl {perplexity(model, win, progress=False)['ppl']:.2f}", flush=True)
