"""Gemma 3 270M probe, CPU, 1 wiki window (a research one-off, run as is in session 7): Max / RMS of the q and up inputs per token, A4 on up's input alone with and without the input Hadamard (RESULTS §9).

    python lab/gemma3_probes/a4up.py
"""
import sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "src"))
from dartquant.zoo import load_model
from dartquant.data import eval_windows
from dartquant.eval.ppl import perplexity
from dartquant.transforms import RotationSet, rotate_
from dartquant.transforms.fuse import fuse_norms_
from dartquant.adapters import adapter_for
from dartquant.quant.primitives import QuantSpec, fake_quantize
torch.set_num_threads(2)
model, tok = load_model("gemma3-270m")
win = eval_windows(tok, "wiki", 256, 1)
ad = adapter_for(model)
fuse_norms_(model, ad)
stats = {}
def stat_hook(name):
    def h(mod, inp):
        x = inp[0].detach()[0].float()
        r = x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()
        stats[name] = (float(r.median()), float(r.max()), int(r.argmax()), float(x.abs().max()))
    return h
spec = QuantSpec(bits=4, symmetric=False, group_size=None, clip_ratio=0.9)
def q_hook(mod, inp):
    return (fake_quantize(inp[0], spec),)
layers = ad.layers_of(model)
hs = [l.up.register_forward_pre_hook(stat_hook(f"up{i}")) for i, l in enumerate(layers)]
hs += [l.q.register_forward_pre_hook(stat_hook(f"q{i}")) for i, l in enumerate(layers)]
print("FP fused", perplexity(model, win, progress=False)["ppl"])
for h in hs: h.remove()
for k in ["q0", "q1", "q5", "q17", "up0", "up1", "up5", "up17"]:
    print(k, "max/rms per token: median %.1f max %.1f at token %d, max|x| %.1f" % stats[k])
hs = [l.up.register_forward_pre_hook(q_hook) for l in layers]
print("A4 up only, fused:", perplexity(model, win, progress=False)["ppl"])
for h in hs: h.remove()
rotate_(model, RotationSet(r1_online=True), ad)
from dartquant.quant.act import ActQuantizer
print("rotated FP", perplexity(model, win, progress=False)["ppl"])
for l in ad.layers_of(model):
    l.up.input_quantizer = ActQuantizer(spec)
print("A4 up only, with online H:", perplexity(model, win, progress=False)["ppl"])
stats.clear()
for i, l in enumerate(ad.layers_of(model)):
    l.up.input_quantizer = None
    l.up.input_observer = (lambda i: (lambda x: stats.__setitem__(i, (x[0].abs().amax(-1) / x[0].pow(2).mean(-1).sqrt()).max().item())))(i)
perplexity(model, win, progress=False)
print("after H, up input max/rms max over tokens:", {k: round(v, 1) for k, v in stats.items()})
