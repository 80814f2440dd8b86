#!/usr/bin/env python3
"""Issue 17 probe: does MagR (lab/magr.py) lower each linear's 4-bit output error, on windows it did not see?

Plain GPTQ's Hessian is collected from every second calibration window only ("fit"); the others are kept
apart ("held"). For each linear the probe prints the output error of its quantized weight against the
unquantized one,

    e(V) = (w - v) R (w - v)^T / w R w^T        (R = x^T x of the fit or of the held windows)

for V = GPTQ(W) (what the run keeps) and V = GPTQ(MagR(W, alpha)) at each alpha of --alphas, and the
mean largest row magnitude before and after MagR. Also plain GPTQ at other dampings (--damps D ...) and from
only the first k fit windows (--fit-counts k ...: how the held-out error falls with the calibration's size).
Runs `dartquant quantize` in this process, e.g.
    python lab/magr_layers.py --json OUT.json --linears 28 --alphas 0.005 0.02 -- --model smollm2-135m \
        --method duquant --seed 0 --calib-samples 32 --calib-seqlen 512 --eval-max-windows 4 --skip-fp-eval \
        --a-clip-search true --gptq-act-order true --gptq-true-sequential true --out RUN
The run itself then fits on half of its windows: its perplexity is not a headline number.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dartquant.quant import gptq  # noqa: E402
from magr import magnitude_reduce  # noqa: E402
from quantize_probe import Enough, run_quantize  # noqa: E402

_add, _quantize = gptq.GPTQ.add_batch, gptq.GPTQ.quantize
ROWS: list[dict] = []
ALPHAS = [0.005, 0.02]
DAMPS: list[float] = []  # --damps: plain GPTQ at these dampings too (the run keeps its own)
FIT_COUNTS: list[int] = []  # --fit-counts: plain GPTQ from only the first k fit windows too (calibration size)
ITERS = 200
STOP_AFTER = 0


@torch.no_grad()
def add_batch(self, inp, reference=None):
    if not hasattr(self, "probe"):
        n = self.in_features
        self.probe = {"fit": torch.zeros(n, n, dtype=torch.float64), "held": torch.zeros(n, n, dtype=torch.float64),
                      "calls": 0}
    p = self.probe
    for i in range(inp.shape[0] if inp.dim() == 3 else 1):  # one window at a time, alternately
        xi = inp[i] if inp.dim() == 3 else inp
        part = "fit" if p["calls"] % 2 == 0 else "held"
        p["calls"] += 1
        x = xi.reshape(-1, xi.shape[-1]).double().cpu()
        p[part] += x.T @ x
        if part == "fit":
            _add(self, xi, None)
            k = (p["calls"] + 1) // 2  # fit windows so far
            if k in FIT_COUNTS:
                p.setdefault("snap", {})[k] = (self.H.clone(), self._nsamples)


def _err(R: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> float:
    d = (w - v).double()
    return float(((d @ R) * d).sum() / ((w.double() @ R) * w.double()).sum())


@torch.no_grad()
def quantize(self, w, spec, **kw):
    probe = getattr(self, "probe", None)
    if probe is None:
        return _quantize(self, w, spec, **kw)
    kw_keep = {k: v for k, v in kw.items() if k != "release_hessian"}
    w0 = w.detach().float().cpu()
    fit, held = probe["fit"], probe["held"]
    row = {"n": len(ROWS), "shape": list(w0.shape), "linf": float(w0.abs().amax(1).mean())}
    for a in ALPHAS:
        t = time.perf_counter()
        v = magnitude_reduce(w0, self.H.float(), a, ITERS)
        secs = time.perf_counter() - t
        q = _quantize(self, v.to(w.device, w.dtype), spec, **kw_keep).dequantize().float().cpu()
        row[f"magr_{a:g}"] = {"fit": _err(fit, w0, q), "held": _err(held, w0, q), "linf": float(v.abs().amax(1).mean()),
                              "pre_fit": _err(fit, w0, v), "pre_held": _err(held, w0, v), "seconds": secs}
    for k, (H, rows) in sorted(probe.get("snap", {}).items()):
        keep = self.H, self._nsamples
        self.H, self._nsamples = H, rows
        try:
            q = _quantize(self, w, spec, **kw_keep).dequantize().float().cpu()
        finally:
            self.H, self._nsamples = keep
        # "fit" here is the error on all the fit windows, of which GPTQ saw the first k
        row[f"fit_{k}"] = {"fit": _err(fit, w0, q), "held": _err(held, w0, q), "tokens": rows}
    for d in DAMPS:
        q = _quantize(self, w, spec, **{**kw_keep, "percdamp": d}).dequantize().float().cpu()
        row[f"damp_{d:g}"] = {"fit": _err(fit, w0, q), "held": _err(held, w0, q)}
    qt = _quantize(self, w, spec, **kw)
    q = qt.dequantize().float().cpu()
    row["gptq"] = {"fit": _err(fit, w0, q), "held": _err(held, w0, q)}
    ROWS.append(row)
    head = f"[magr] {row['n']:3d} {str(row['shape']):12s} gptq {row['gptq']['fit']:.5f}/{row['gptq']['held']:.5f} "
    print(head + " ".join(
        f"a{a:g} {row[f'magr_{a:g}']['fit']:.5f}/{row[f'magr_{a:g}']['held']:.5f} "
        f"(linf {row['linf']:.3g}->{row[f'magr_{a:g}']['linf']:.3g}, pre {row[f'magr_{a:g}']['pre_held']:.1e}, "
        f"{row[f'magr_{a:g}']['seconds']:.0f}s)" for a in ALPHAS) + " ".join(
        f" d{d:g} {row[f'damp_{d:g}']['fit']:.5f}/{row[f'damp_{d:g}']['held']:.5f}" for d in DAMPS) + " ".join(
        f" k{k} {row[f'fit_{k}']['held']:.5f}" for k in sorted(probe.get("snap", {}))),
        file=sys.stderr, flush=True)
    if STOP_AFTER and len(ROWS) >= STOP_AFTER:
        raise Enough
    return qt


def main() -> None:
    global STOP_AFTER, ALPHAS, ITERS, DAMPS, FIT_COUNTS
    args = sys.argv[1:]
    out = None
    while args and args[0] != "--":
        flag = args.pop(0)
        if flag in ("-h", "--help"):
            print(__doc__)
            return
        if flag == "--json":
            out = args.pop(0)
        elif flag == "--linears":
            STOP_AFTER = int(args.pop(0))
        elif flag == "--iters":
            ITERS = int(args.pop(0))
        elif flag == "--fit-counts":
            while args and not args[0].startswith("--"):
                FIT_COUNTS.append(int(args.pop(0)))
        elif flag in ("--alphas", "--damps"):
            values = []
            while args and not args[0].startswith("--"):
                values.append(float(args.pop(0)))
            if flag == "--alphas":
                ALPHAS = values
            else:
                DAMPS = values
        else:
            raise SystemExit(f"unknown flag {flag}")
    args = args[1:]
    gptq.GPTQ.add_batch, gptq.GPTQ.quantize = add_batch, quantize
    run_quantize(args, out, lambda: {"args": args, "alphas": ALPHAS, "damps": DAMPS, "fit_counts": FIT_COUNTS,
                                     "iters": ITERS, "linears": ROWS}, "magr", STOP_AFTER)


if __name__ == "__main__":
    main()
