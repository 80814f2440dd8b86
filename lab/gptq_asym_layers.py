#!/usr/bin/env python3
"""Issue 17 probe: where asymmetric GPTQ goes wrong, linear by linear (RESULTS §26).

`--gptq-asymmetric` fits each linear's weight to W* = W C H~^-1 on its 4-bit inputs (quant/gptq.py)
and collapses Qwen2.5-Coder-0.5B (wiki 12.6 -> 20.9) but not SmolLM2. This probe holds out every
second calibration window of every linear's input (the solver sees the others), and for each linear
prints the output error against the unquantized-activation path,

    e(V) = ||x~ V^T - x W^T||^2 / ||x W^T||^2        (x~: the 4-bit input, x: the unquantized one)

on the windows it was fitted on ("fit") and on the held-out ones ("held"), for V = W (the activation
quantizer's error alone), W* (the target), GPTQ(W*) (what the run keeps), plain GPTQ(W) with the
unquantized inputs' Hessian (the default), and GPTQ of the target shrunk towards W by the ridge
strength the held-out windows prefer (l*: an oracle on those windows, to see what shrinkage could
give; a product version would choose it on a split of the calibration windows). Also |W* - W| / |W| and the largest token's share of the
fit's Hessian trace (massive-activation tokens dominating the least squares). Runs `dartquant
quantize` in this process with the given arguments (which must include --gptq-asymmetric true), e.g.
    python lab/gptq_asym_layers.py --json OUT.json --linears 28 -- --model qwen2.5-coder-0.5b --method duquant \
        --seed 0 --calib-samples 32 --calib-seqlen 512 --eval-max-windows 4 --skip-fp-eval \
        --gptq-asymmetric true --fail-on-collapse false --out RUN
The run itself then fits on half of its windows: its perplexity is not a headline number.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dartquant.quant import gptq  # noqa: E402
from dartquant.quant import weights  # noqa: E402
from quantize_probe import Enough, run_quantize  # noqa: E402

_add, _targets, _quantize = gptq.GPTQ.add_batch, gptq.GPTQ.asymmetric_targets, gptq.GPTQ.quantize
ROWS: list[dict] = []
LAMBDAS = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)  # 1e-3: the product's W*; large: towards W
STOP_AFTER = 0  # --linears N: stop the run after N linears (the first blocks are what the probe is for)


class _Moments:
    """Running sums of x~^T x~, x^T x~, x^T x over some windows (float32: the errors are ~1e-2 of
    the output energy, far above its rounding) and the largest single token's share of
    trace(x~^T x~); float64 for the solves."""

    def __init__(self, n: int):
        self.H = torch.zeros(n, n, dtype=torch.float32)
        self.C = torch.zeros_like(self.H)
        self.R = torch.zeros_like(self.H)
        self.rows, self.top, self.trace = 0, 0.0, 0.0

    def add(self, xq: torch.Tensor, x: torch.Tensor) -> None:
        xq, x = xq.reshape(-1, xq.shape[-1]).float().cpu(), x.reshape(-1, x.shape[-1]).float().cpu()
        self.H += xq.T @ xq
        self.C += x.T @ xq
        self.R += x.T @ x
        energy = xq.square().sum(1)
        self.top, self.trace, self.rows = max(self.top, float(energy.max())), self.trace + float(energy.sum()), self.rows + len(x)

    def error(self, v: torch.Tensor, w: torch.Tensor) -> float:
        v, w = v.double().cpu(), w.double().cpu()
        H, C, R = self.H.double(), self.C.double(), self.R.double()
        num = (v @ H * v).sum() - 2 * (w @ C * v).sum() + (w @ R * w).sum()
        return float(num / (w @ R * w).sum())


@torch.no_grad()
def add_batch(self, inp, reference=None):
    if reference is None:
        return _add(self, inp, reference)
    if not hasattr(self, "probe"):
        self.probe = {"fit": _Moments(self.in_features), "held": _Moments(self.in_features), "calls": 0}
    p = self.probe
    for i in range(inp.shape[0] if inp.dim() == 3 else 1):  # one window at a time, alternately
        xi, ri = (inp[i], reference[i]) if inp.dim() == 3 else (inp, reference)
        part = "fit" if p["calls"] % 2 == 0 else "held"
        p["calls"] += 1
        p[part].add(xi, ri)
        if part == "fit":
            _add(self, xi, ri)


@torch.no_grad()
def asymmetric_targets(self, weights, reldamp=1e-3):
    """The targets of every linear of one input at once (weights.gptq_block_): remembered by the
    identity of the tensor that quantize() then receives."""
    outs = _targets(self, weights, reldamp)
    pairs = self.__dict__.setdefault("probe_pairs", {})
    for w, out in zip(weights, outs):
        pairs[id(out)] = (w.detach().double().cpu(), out.detach().double().cpu())
    return outs


@torch.no_grad()
def quantize(self, w, spec, **kw):
    probe = getattr(self, "probe", None)
    w_orig, target = self.__dict__.get("probe_pairs", {}).pop(id(w), (None, None))
    qt = _quantize(self, w, spec, **kw)
    if probe is None or w_orig is None:
        return qt
    fit, held = probe["fit"], probe["held"]
    plain = gptq.GPTQ(self.in_features, dtype=torch.float32)  # default GPTQ: the unquantized inputs' Hessian
    plain.H, plain._nsamples = (fit.R.double() * (2.0 / fit.rows)).float(), fit.rows
    q_plain = plain.quantize(w_orig.float(), spec, **{k: v for k, v in kw.items() if k != "release_hessian"})
    row = {"n": len(ROWS), "shape": list(w_orig.shape),
           "target_rel_change": float((target - w_orig).norm() / w_orig.norm()),
           "top_token_share": fit.top / max(fit.trace, 1e-30)}
    for name, v in (("w", w_orig), ("target", target), ("gptq_asym", qt.dequantize()), ("gptq_plain", q_plain.dequantize())):
        row[name] = {"fit": fit.error(v, w_orig), "held": held.error(v, w_orig)}
    # the target shrunk towards W, W (C + l D)(H~ + l D)^-1 (D = diag H~), fitted on the fit windows:
    # which l would the held-out windows choose, and what does GPTQ of that target give there
    fH, fC = fit.H.double(), fit.C.double()
    d = torch.diag(torch.diagonal(fH))
    ridge = {}
    for lam in LAMBDAS:
        v = torch.linalg.solve(fH + lam * d, (fC + lam * d).T @ w_orig.T).T
        ridge[lam] = (held.error(v, w_orig), v)
    best = min(ridge, key=lambda k: ridge[k][0])
    shrunk = gptq.GPTQ(self.in_features, dtype=torch.float32)
    shrunk.H, shrunk._nsamples = (fit.H.double() * (2.0 / fit.rows)).float(), fit.rows
    q_shrunk = shrunk.quantize(ridge[best][1].float(), spec, **{k: v for k, v in kw.items() if k != "release_hessian"})
    row["ridge_held"] = {str(k): v[0] for k, v in ridge.items()}
    row["ridge_best"] = best
    row["gptq_ridge_best"] = {"fit": fit.error(q_shrunk.dequantize(), w_orig), "held": held.error(q_shrunk.dequantize(), w_orig)}
    ROWS.append(row)
    print(f"[probe] {row['n']:3d} {str(row['shape']):12s} |W*-W|/|W| {row['target_rel_change']:.3f} "
          f"top {row['top_token_share']:.3f} | " + " ".join(
              f"{k} {row[k]['fit']:.4f}/{row[k]['held']:.4f}" for k in ("w", "target", "gptq_asym", "gptq_plain",
                                                                       "gptq_ridge_best")) + f" l* {best:g}",
          file=sys.stderr, flush=True)
    if STOP_AFTER and len(ROWS) >= STOP_AFTER:
        raise Enough
    return qt


def main() -> None:
    args = sys.argv[1:]
    out = None
    global STOP_AFTER
    if args[:1] == ["--json"]:
        out, args = args[1], args[2:]
    if args[:1] == ["--linears"]:
        STOP_AFTER, args = int(args[1]), args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    gptq.GPTQ.add_batch, gptq.GPTQ.asymmetric_targets, gptq.GPTQ.quantize = add_batch, asymmetric_targets, quantize
    run_quantize(args, out, lambda: {"args": args, "linears": ROWS}, "probe", STOP_AFTER)


if __name__ == "__main__":
    assert weights  # the observer (weights._SharedHessians) calls add_batch with reference=x
    main()
