"""Gemma 3 270M probe, CPU, 1 wiki window (a research one-off, run as is in session 7): Input-norm gains and W4 RTN of one role after fusing the norms (RESULTS §9: q 535.7, gate 5,920).

    python lab/gemma3_probes/w4fuse.py
"""
import sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "src"))
from dartquant.zoo import load_model
from dartquant.config import RunConfig
from dartquant.data import eval_windows
from dartquant.eval.ppl import perplexity
from dartquant.quant.primitives import QuantizedTensor
from dartquant.transforms.fuse import fuse_norms_
from dartquant.adapters import adapter_for
torch.set_num_threads(1)
model, tok = load_model("gemma3-270m")
for n, p in model.named_parameters():
    if "layers.3." in n and "norm" in n: print(n, tuple(p.shape), f"min {p.min():.2f} max {p.max():.2f} mean|.| {p.abs().mean():.2f}")
win = eval_windows(tok, "wiki", 512, 1)
spec = RunConfig(model="gemma3-270m").scheme.weight_spec()
fuse_norms_(model, adapter_for(model))
print("fused FP", perplexity(model, win, progress=False)["ppl"], flush=True)
lin = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
fp = {n: m.weight.data.clone() for n, m in lin.items()}
for role in ["q_proj", "gate_proj", "down_proj", "o_proj"]:
    for n, m in lin.items():
        if n.endswith(role):
            m.weight.data.copy_(QuantizedTensor.from_float(fp[n], spec).dequantize())
    print(f"fused, W4 {role}: ppl {perplexity(model, win, progress=False)['ppl']:.3f}", flush=True)
    for n, m in lin.items(): m.weight.data.copy_(fp[n])
