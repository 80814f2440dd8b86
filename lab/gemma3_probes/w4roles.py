"""Gemma 3 270M probe, CPU, 1 wiki window (a research one-off, run as is in session 7): W4 RTN per channel on one role at a time, norms unfused (RESULTS §9: q 62.2 ... down 97.2, FP 57.57).

    python lab/gemma3_probes/w4roles.py
"""
import sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "src"))
from dartquant.zoo import load_model
from dartquant.config import RunConfig
from dartquant.data import eval_windows
from dartquant.eval.ppl import perplexity
from dartquant.quant.primitives import QuantizedTensor
torch.set_num_threads(1)
model, tok = load_model("gemma3-270m")
win = eval_windows(tok, "wiki", 512, 1)
spec = RunConfig(model="gemma3-270m").scheme.weight_spec()
print("spec", spec, flush=True)
print("FP", perplexity(model, win, progress=False)["ppl"], flush=True)
lin = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
fp = {n: m.weight.data.clone() for n, m in lin.items()}
for role in ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]:
    for n, m in lin.items():
        if n.endswith(role):
            m.weight.data.copy_(QuantizedTensor.from_float(fp[n], spec).dequantize().to(m.weight.dtype))
    p = perplexity(model, win, progress=False)["ppl"]
    errs = sorted(((fp[n] - lin[n].weight.data).norm() / fp[n].norm()).item() for n in lin if n.endswith(role))
    print(f"W4 {role}: ppl {p:.3f}  rel err min {errs[0]:.3f} max {errs[-1]:.3f}", flush=True)
    for n, m in lin.items():
        m.weight.data.copy_(fp[n])
# worst single layer for the worst role
