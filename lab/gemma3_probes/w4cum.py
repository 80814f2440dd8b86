"""Gemma 3 270M probe, CPU, 1 wiki window (a research one-off, run as is in session 7): W4 RTN on all roles of the first L layers, per channel / groups of 128 / 32 (RESULTS §9: 673 / 197 / 139).

    python lab/gemma3_probes/w4cum.py
"""
import sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "src"))
from dartquant.zoo import load_model
from dartquant.config import RunConfig
from dartquant.data import eval_windows
from dartquant.eval.ppl import perplexity
from dartquant.quant.primitives import QuantizedTensor
import dataclasses
torch.set_num_threads(1)
model, tok = load_model("gemma3-270m")
win = eval_windows(tok, "wiki", 512, 1)
spec = RunConfig(model="gemma3-270m").scheme.weight_spec()
lin = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
fp = {n: m.weight.data.clone() for n, m in lin.items()}
for gs in (None, 128, 32):
    s = dataclasses.replace(spec, group_size=gs)
    for L in (6, 12, 18):
        for n, m in lin.items():
            li = int(n.split(".layers.")[1].split(".")[0])
            m.weight.data.copy_(QuantizedTensor.from_float(fp[n], s).dequantize() if li < L else fp[n])
        print(f"group {gs} W4 all roles, layers < {L}: ppl {perplexity(model, win, progress=False)['ppl']:.3f}", flush=True)
