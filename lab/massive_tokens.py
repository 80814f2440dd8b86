#!/usr/bin/env python3
"""Why does DartQuant's R1 not beat QuaRot's? The rare massive-activation tokens, measured.

    python lab/massive_tokens.py --model smollm2-135m --seeds 0 1 2 --out docs/results/massive_tokens_cpu.json

For each seed: DartQuant calibrates R1 (and R2) on the calibration windows of that seed
(learning rates `--r1-lr` / `--r2-lr`, the held-out choices of RESULTS §3c/§2); then *all* tokens
of `--eval-samples` other calibration windows are captured at the inputs R1 acts on (q_proj and
up_proj of every layer). Each row is rotated by QuaRot's R1 (the random Hadamard DartQuant starts
from) and by DartQuant's, quantized as the run quantizes activations (4-bit asymmetric per token,
clip 0.9), and scored: SQNR per token, split into the "massive" rows (the top `--top` fraction by
max|x| / rms(x)) and the rest, and the share of the total squared error that the massive rows
carry. A mean-token loss (Whip) can trade a worse error on a few massive tokens for a better one
on the many ordinary tokens; DFRot argues the massive ones decide the end result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def score(x, r, spec, massive):
    import torch

    from dartquant.quant.primitives import fake_quantize

    out = {}
    err_all, sig_all = [], []
    for i in range(0, x.shape[0], 65536):
        xr = x[i: i + 65536].float() @ r
        e = (fake_quantize(xr, spec) - xr).pow(2).sum(-1)
        err_all.append(e)
        sig_all.append(xr.pow(2).sum(-1))
    err, sig = torch.cat(err_all), torch.cat(sig_all)
    sqnr = 10 * torch.log10(sig / err.clamp_min(1e-30))
    for name, m in (("all", torch.ones_like(massive)), ("massive", massive), ("rest", ~massive)):
        out[f"sqnr_db_{name}"] = sqnr[m].mean().item()
        out[f"sqnr_db_{name}_pooled"] = (10 * torch.log10(sig[m].sum() / err[m].sum())).item()
    out["massive_error_share"] = (err[massive].sum() / err.sum()).item()
    out["worst_token_sqnr_db"] = sqnr.min().item()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--eval-samples", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--r1-lr", type=float, default=0.1)
    ap.add_argument("--r2-lr", type=float, default=1.0)
    ap.add_argument("--top", type=float, default=0.005, help="fraction of rows called massive")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    from dartquant.adapters import adapter_for
    from dartquant.calib.capture import capture_activations
    from dartquant.calib.dartquant import calibrate_dartquant
    from dartquant.data import calib_windows
    from dartquant.hadamard import random_hadamard_matrix
    from dartquant.config import RunConfig
    from dartquant.transforms import fuse_norms_
    from dartquant.zoo import load_model

    model, tok = load_model(args.model)
    fuse_norms_(model)
    geo = adapter_for(model).geometry(model.config)
    # all tokens of windows no calibration below uses (seed 10_000, a different region)
    eval_ids = calib_windows(tok, "wiki", args.eval_samples, args.seqlen, seed=10_000, span=(0.9, 1.0))
    x = capture_activations(model, eval_ids, fraction=1.0, max_r1_tokens=None, seed=0, progress=False).r1
    ratio = x.float().abs().amax(-1) / x.float().pow(2).mean(-1).sqrt()
    k = max(1, int(args.top * x.shape[0]))
    massive = torch.zeros(x.shape[0], dtype=torch.bool)
    massive[ratio.topk(k).indices] = True
    spec = RunConfig.from_flat().scheme.act_spec("q", geo.head_dim)
    rows = []
    for seed in args.seeds:
        cfg = RunConfig.from_flat(model=args.model, seed=seed, calib_samples=args.calib_samples, calib_seqlen=args.seqlen,
                          dq_r1_lr=args.r1_lr, dq_r2_lr=args.r2_lr)
        ids = calib_windows(tok, "wiki", args.calib_samples, args.seqlen, seed, span=(0.0, 0.9))
        rs = calibrate_dartquant(model, cfg, ids, progress=False)
        quarot = random_hadamard_matrix(geo.hidden, seed).float()
        row = {"seed": seed, "quarot": score(x, quarot, spec, massive), "dartquant": score(x, rs.r1.float(), spec, massive)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    info = {"rows_total": int(x.shape[0]), "rows_massive": k,
            "massive_ratio_min": ratio[massive].min().item(), "ratio_median": ratio.median().item(),
            "ratio_max": ratio.max().item()}
    Path(args.out).write_text(json.dumps({"args": vars(args), "info": info, "rows": rows}, indent=1))
    keys = ["sqnr_db_all", "sqnr_db_rest", "sqnr_db_massive", "sqnr_db_massive_pooled", "massive_error_share",
            "worst_token_sqnr_db"]
    print(f"{args.model}: {info}")
    print("| R1 | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1))
    for method in ("quarot", "dartquant"):
        cells = []
        for key in keys:
            v = [r[method][key] for r in rows]
            cells.append(f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}")
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
