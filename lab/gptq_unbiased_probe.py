#!/usr/bin/env python3
"""Issue 17 probe: asymmetric GPTQ with an *unbiased* target instead of the least-squares one.

`--gptq-asymmetric` fits W* = W C H~^-1 (C = x^T x~, H~ = x~^T x~): the least-squares weight on the
4-bit inputs, which also shrinks the directions where rounding noise dominates (a Wiener filter).
On SmolLM2 that helped in-domain wiki and hurt c4 badly (RESULTS §17b). This probe keeps only the
de-biasing part: model the quantizer's systematic effect as x~ ~ A x (A = C^T H^-1, H = x^T x: mostly
the clipping's shrinkage of each token's extremes), and target W* = W A^-1 = W H C^-T, so that
W* x~ ~ W x in expectation without attenuating anything for noise. GPTQ then runs on W* with H~.
Patches GPTQ in this process only, then runs `dartquant quantize` with the given arguments
(which must include --gptq-asymmetric true):
    python lab/gptq_unbiased_probe.py --model smollm2-135m --method quarot --seed 0 --calib-samples 16 \
        --calib-seqlen 512 --eval-max-windows 16 --skip-fp-eval --gptq-asymmetric true --out RUN
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dartquant.quant import gptq  # noqa: E402

_add = gptq.GPTQ.add_batch


@torch.no_grad()
def add_batch(self, inp, reference=None):
    if reference is not None:  # also H_ref = 2/N sum x_ref x_ref^T, with the same running average
        r = reference.detach().reshape(-1, self.in_features).to(dtype=self.dtype)
        n, m = self.nsamples, r.shape[0]
        if getattr(self, "R", None) is None or n == 0:
            self.R = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=r.device)
        self.R.mul_(n / (n + m)).addmm_((r * math.sqrt(2.0 / (n + m))).T, r * math.sqrt(2.0 / (n + m)))
    _add(self, inp, reference)


@torch.no_grad()
def asymmetric_target(self, weight, reldamp: float = 1e-3):
    H = self.R.to(torch.float64)
    C = self.C.to(torch.float64)
    dead = torch.diagonal(H) == 0
    Ct = C.T.clone()
    Ct[dead, dead] = 1.0
    Ct.diagonal().mul_(1.0 + reldamp)
    w = weight.to(dtype=torch.float64, device=H.device)
    # W* = W H C^-T  <=>  W* C^T = W H  <=>  C W*^T = H W^T
    target = torch.linalg.solve(Ct.T, H @ w.T).T
    target[:, dead] = 0.0
    return target.to(device=weight.device, dtype=torch.float32)


gptq.GPTQ.add_batch = add_batch
gptq.GPTQ.asymmetric_target = asymmetric_target

if __name__ == "__main__":
    if "--gptq-asymmetric" not in sys.argv:
        raise SystemExit("give --gptq-asymmetric true (this probe replaces its target)")
    from dartquant.cli import main

    sys.exit(main(["quantize", *sys.argv[1:]]))
