"""Issue 17 (CPU probe, one-off): does the 4-bit K/V cache want a clip ratio below 1.0?

Loads quantized run folders and re-evaluates held-out perplexity with the K and V quantizers' clip
ratio set to each --clips value (K and V alike, or only one with --only k|v). The K/V quantizers are
dynamic and plain GPTQ collects its Hessians with them off, so on a run folder this is what a run with
`--kv-clip` gives (the recipe's activation clip search saw the run's own K/V setting). Exploratory: the
windows are held-out text, so a ratio picked here is not a result; a product setting would choose it
on calibration data.
    PYTHONPATH=src python lab/kv_clip_probe.py RUN [RUN ...] --clips 1.0 0.95 0.9 0.85 --windows 8 --json OUT
"""
import argparse
import dataclasses
import json

import torch

from dartquant.data import eval_windows
from dartquant.eval.ppl import perplexity
from dartquant.modules import AttentionTransform
from dartquant.zoo import load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--clips", type=float, nargs="+", default=[1.0, 0.95, 0.9, 0.85])
    ap.add_argument("--only", choices=["k", "v"], help="change only this quantizer's clip")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--json")
    args = ap.parse_args()
    out = []
    for run in args.runs:
        model, tok = load_model(run, dtype=torch.float32)
        model.eval()
        quantizers = []
        for m in model.modules():
            if isinstance(m, AttentionTransform):
                for name in ("k", "v"):
                    q = getattr(m, f"{name}_quantizer")
                    if q is not None and args.only in (None, name):
                        quantizers.append(q)
        if not quantizers:
            raise SystemExit(f"{run}: no K/V quantizer (a 16-bit K/V run?)")
        base = {id(q): q.spec for q in quantizers}
        data = {c: eval_windows(tok, c, seqlen=2048, max_windows=args.windows) for c in ("wiki", "c4")}
        for clip in args.clips:
            for q in quantizers:
                q.spec = dataclasses.replace(base[id(q)], clip_ratio=clip)
            row = {"run": run, "kv_clip": clip, "only": args.only, "windows": args.windows,
                   "run_kv_clip": base[id(quantizers[0])].clip_ratio}
            for c, w in data.items():
                row[c] = perplexity(model, w, progress=False)["ppl"]
            print(f"{run:32s} kv_clip {clip}{' (' + args.only + ' only)' if args.only else ''}: "
                  f"wiki {row['wiki']:.3f}  c4 {row['c4']:.3f}", flush=True)
            out.append(row)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
