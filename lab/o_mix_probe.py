"""Issue 17 (CPU probe, one-off): the o_proj input quantized after a mix across heads, on the same 4-bit weights.

RESULTS §54's floor probe found the o_proj input the one stream whose 4-bit error sits well above a random
rotation's (1.4-3x on Qwen's recipe): R2 and DuQuant's DQ_o rotate within each head and nothing mixes the heads,
whose scales differ. QuaRot puts an online Hadamard across the heads there. This re-evaluates a finished run
with each chosen layer's o_proj input quantized as Q(x M) M^T (M a full-width Hadamard, or Haar-random): the
weights are the run's 4-bit ones, untouched, so the pair isolates the activation error's effect. (A method that
mixes for real folds M into o_proj before GPTQ; this probe does not.)
    PYTHONPATH=src python lab/o_mix_probe.py RUN --mix hadamard haar --groups 0-23 --windows 4 --baselines PRIOR.json --json OUT
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from layer_gap_probe import load_wrapped, parse_group, read_baselines, rewrap  # noqa: E402

from dartquant.data import eval_windows  # noqa: E402
from dartquant.eval.ppl import perplexity  # noqa: E402
from dartquant.hadamard import fast_hadamard_transform, hadamard_transform_T  # noqa: E402


class Mixed(torch.nn.Module):
    """x -> inner(x M) M^T while `mode` is set ("hadamard" or "haar"), else inner(x)."""

    def __init__(self, inner, width: int, g: torch.Generator):
        super().__init__()
        self.inner, self.mode = inner, None
        self.q = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))[0].float()

    def forward(self, x):
        if self.mode == "hadamard":
            return hadamard_transform_T(self.inner(fast_hadamard_transform(x)))
        if self.mode == "haar":
            return self.inner(x @ self.q) @ self.q.T
        return self.inner(x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--mix", nargs="+", choices=["hadamard", "haar"], default=["hadamard"])
    ap.add_argument("--groups", nargs="+", default=["0-23"])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baselines", help="a layer_gap_probe JSON of the same run and windows (as run, W4 only: the "
                    "shares of the A4 + KV4 cost); without it, the run's own metrics.json (as run alone)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.baselines:
        prior = read_baselines(args.baselines, args.run, args.windows)
    else:  # the run's own score, on the same first windows as `eval_windows` gives (check its count)
        m = json.loads((Path(args.run) / "metrics.json").read_text())
        if m["ppl"]["tokens"] // 2 // 2047 != args.windows:
            raise SystemExit(f"--windows {args.windows}: {args.run} was scored on {m['ppl']['tokens'] // 2 // 2047}")
        prior = [{"setting": "as run", "windows": args.windows, **m["ppl"]}]
    model, tok, layers = load_wrapped(args.run)
    g = torch.Generator().manual_seed(args.seed)
    mixers = []
    for grp in args.groups:
        for i in parse_group(grp):
            (b,) = layers[i]["o"]
            mixers.append(rewrap(model, b, lambda q, owner: Mixed(q, owner.in_features, g)))
    data = {c: eval_windows(tok, c, seqlen=2048, max_windows=args.windows) for c in ("wiki", "c4")}
    full, w4 = prior[0], (prior[1:] or [None])[0]
    out = {"run": args.run, "groups": args.groups, "windows": args.windows, "rows": prior}
    for mode in args.mix:
        for m in mixers:
            m.mode = mode
        row = {"setting": f"o_proj input quantized after a {mode} mix, layers {' '.join(args.groups)}",
               "windows": args.windows}
        for c, w in data.items():
            row[c] = perplexity(model, w, progress=False)["ppl"]
            row[f"{c}_vs_run"] = row[c] - full[c]
            if w4 is not None:
                row[f"{c}_share"] = (full[c] - row[c]) / (full[c] - w4[c])
        out["rows"].append(row)
        share = "" if w4 is None else f"   share of A4 + KV4 {row['wiki_share']:.1%} / {row['c4_share']:.1%}"
        print(f"{row['setting']:60s} wiki {row['wiki']:.3f}  c4 {row['c4']:.3f}   against the run "
              f"{row['wiki_vs_run']:+.3f} / {row['c4_vs_run']:+.3f}{share}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
