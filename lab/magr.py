"""Weight magnitude reduction before quantization (MagR, Zhang et al., NeurIPS 2024).

An issue-17 probe (lab/magr_layers.py, RESULTS §44), not a product option: on top of rotations, GPTQ and
the clip search it did not lower the layers' held-out 4-bit output error.

Each weight row w (one output channel) is replaced by the solution of

    min_v  1/2 (v - w)^T H^ (v - w)  +  alpha_row * ||v||_inf,        H^ = H / lambda_max(H)

with H the layer's calibration Hessian (GPTQ's x^T x). The quadratic term keeps the layer's output on the
calibration inputs; the l-inf term lowers each row's largest magnitude, which sets a per-channel 4-bit
scale. What it can move is the part of w that the calibration inputs barely see (H's small eigenvalues),
so it is a calibration-only, per-layer change with no inference cost: the quantized weight is an
ordinary one.

Solved by proximal gradient with step 1 / lambda_max, as the paper does (200 steps there). The proximal
map of t ||.||_inf is v - t P(v / t), P the Euclidean projection onto the unit l1 ball (Duchi et al.,
2008), done for all rows at once by one sort per row.

`alpha` here is relative: alpha_row = alpha * max|w_row|, so the same value means the same thing for a
row whatever its scale (rotations and DuQuant's smoothing rescale rows and columns). The paper's absolute
1e-3 on Llama-2 rows of largest magnitude about 0.05-0.5 corresponds to 2e-3 - 2e-2 here.
"""

from __future__ import annotations

import torch


def project_l1_ball(x: torch.Tensor) -> torch.Tensor:
    """Each row of x [rows, n] projected onto the l1 ball of radius 1 (rows already inside stay)."""
    a = x.abs()
    inside = a.sum(dim=1, keepdim=True) <= 1.0
    mu = torch.sort(a, dim=1, descending=True).values
    cum = mu.cumsum(dim=1) - 1.0
    k = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)
    # the largest k with mu_k > (sum_{j<=k} mu_j - 1) / k; k = 1 always qualifies when the row is outside
    rho = ((mu * k) > cum).to(x.dtype).mul(k).argmax(dim=1, keepdim=True)
    theta = cum.gather(1, rho) / (rho + 1).to(x.dtype)
    proj = (a - theta).clamp_min(0.0) * x.sign()
    return torch.where(inside, x, proj)


def prox_linf(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The proximal map of t_row * ||.||_inf on each row of v (t: [rows, 1], positive)."""
    return v - t * project_l1_ball(v / t)


def _lambda_max(H: torch.Tensor, iters: int = 50) -> float:
    """H's largest eigenvalue by power iteration (H symmetric positive semi-definite), slightly over-estimated
    so that the step 1 / lambda stays a descent step."""
    v = torch.ones(H.shape[0], 1, device=H.device, dtype=H.dtype)
    lam = 0.0
    for _ in range(iters):
        u = H @ v
        lam = float(u.norm())
        if lam == 0.0:
            return 0.0
        v = u / lam
    return lam * 1.05


@torch.no_grad()
def magnitude_reduce(weight: torch.Tensor, H: torch.Tensor, alpha: float, iters: int = 200) -> torch.Tensor:
    """MagR of weight [out, in] under the calibration Hessian H [in, in] (any positive scale); returns a new
    float32 tensor on H's device. alpha: relative to each row's largest magnitude (see the module notes)."""
    if alpha < 0 or iters < 0:
        raise ValueError(f"magnitude_reduce: alpha and iters must be >= 0, got {alpha}, {iters}")
    W = weight.detach().to(device=H.device, dtype=torch.float32)
    if alpha == 0 or iters == 0:
        return W.clone()
    Hf = H.to(torch.float32)
    lam = _lambda_max(Hf)
    if lam == 0.0:
        return W.clone()
    Hn = Hf / lam
    t = (alpha * W.abs().amax(dim=1, keepdim=True)).clamp_min(torch.finfo(torch.float32).tiny)
    V = W.clone()
    for _ in range(iters):
        V = prox_linf(V - (V - W) @ Hn, t)  # H symmetric: (V - W) H^ is each row's gradient
    return V
