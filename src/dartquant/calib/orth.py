"""Keeping a rotation orthogonal while optimizing it.

Two approaches, both for square matrices, possibly batched ``[..., n, n]``
(e.g. ``[kv_heads, d, d]`` for one rotation per KV head; batched matrices are
always treated as independent: nothing mixes them).

**QR-Orth** (DartQuant, :class:`QROrth`).  Optimize an unconstrained latent
``Z`` and use ``R = Q`` from ``Q, _ = torch.linalg.qr(Z)``.  Any Euclidean
optimizer works on Z (SGD with momentum, Adam); R is orthogonal to machine
precision at every step because Householder QR returns an orthogonal Q
whatever Z is (no drift to correct).  Cost per step: one QR forward
(~4/3 n^3 flops) and its backward (a few n^3), batched over groups.

*Sign fix* (option, default on): Householder QR makes an arbitrary sign
choice per column (LAPACK tends to return negative diagonals in the R factor).
We flip the columns of Q so that ``diag(R_factor) > 0``.  That is the unique
QR with positive diagonal, so ``Q(Z)`` is then a smooth function of Z (no
sign jumps if a diagonal entry crosses zero in LAPACK's convention), and for
an orthogonal ``Z0`` it gives ``Q(Z0) = Z0`` up to roundoff: the optimization
starts exactly at the given initialization (e.g. a random Hadamard).  Without
the fix, Q(Z0) = Z0 D for some diagonal sign matrix D, i.e. the start would
be a sign-flipped version of the init.  The signs are detached (piecewise
constant, zero derivative).

**Cayley SGD** (SpinQuant's optimizer, :class:`CayleySGD` acting on
:class:`CayleyOrth`).  R itself is the parameter and is moved along the
orthogonal group by a Cayley retraction.  With the Euclidean gradient G the
Riemannian descent direction, in the left-trivialized (Lie algebra) form, is
the skew matrix ``-skew(G R^T) = -(G R^T - R G^T)/2``.  Momentum is kept as
such a skew matrix ``B`` (``B <- beta B - skew(G R^T)``): in this form no
vector transport / re-projection is needed between steps.  The update is

    R <- Cay(lr B) R,   Cay(W) = (I - W/2)^{-1} (I + W/2),

which is orthogonal for any skew W.  The scaling (factor 1/2 in the skew
part, alpha = lr) follows Li, Fuxin & Todorovic (ICLR 2020, "Efficient
Riemannian optimization on the Stiefel manifold via the Cayley transform"),
which SpinQuant uses, so learning rates are comparable.

- ``method="exact"`` (default): the Cayley transform by
  ``torch.linalg.solve``.  Cost per step ~ LU (2/3 n^3) + n right-hand sides
  (2 n^3) + the products G R^T, R G^T and C R (~6 n^3): ~9 n^3 flops, similar
  to the QR forward+backward of QR-Orth.  Orthogonal up to accumulated
  roundoff: measured max|R^T R - I| after 2000 whip steps (n = 64, 256):
  ~1e-13 in float64, ~7e-6 in float32 (reached within ~100 steps, then
  flat).  ``reorth_every`` bounds the float32 drift if that matters; the
  trainer projects its final R in float64 anyway.
- ``method="iterative"``: Li et al.'s fixed-point iteration
  ``Y <- R + (a/2) B (R + Y)`` (``iters`` times, starting at Y = R + a B R),
  only matmuls (faster on accelerators), with their step cap
  ``a = min(lr, 1 / (||B||_F + eps))`` so the iteration contracts.  It is an
  *approximation* of the Cayley transform: orthogonality drifts by
  O((a ||B||)^(iters+1)) per step, so use ``reorth_every`` with it.
- ``reorth_every=k`` (0 = off): every k steps, project R back onto the
  orthogonal group (sign-fixed QR in float64).  Changes R only at the level
  of the accumulated drift.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["qr_orthogonal", "orthogonality_error", "project_orthogonal", "QROrth", "CayleyOrth", "CayleySGD"]


def qr_orthogonal(z: torch.Tensor, sign_fix: bool = True) -> torch.Tensor:
    """Orthogonal factor Q of ``z`` (``[..., n, n]``), differentiable in z.

    With ``sign_fix`` the columns are flipped so that the triangular factor
    has a positive diagonal (see the module docstring).
    """
    q, r = torch.linalg.qr(z, mode="reduced")
    if not sign_fix:
        return q
    d = torch.diagonal(r, dim1=-2, dim2=-1)
    # sign(0) would be 0 and zero a column: map 0 -> +1.  Detached: the sign
    # is piecewise constant, its derivative is 0 where it exists.
    s = torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d)).detach()
    return q * s.unsqueeze(-2)  # scale column j by s_j


def orthogonality_error(r: torch.Tensor) -> float:
    """max |R^T R - I| (over all entries and all batched matrices), in float64."""
    r64 = r.detach().to(torch.float64)
    eye = torch.eye(r64.shape[-1], dtype=torch.float64, device=r64.device)
    return (r64.transpose(-2, -1) @ r64 - eye).abs().max().item()


def project_orthogonal(r: torch.Tensor) -> torch.Tensor:
    """Nearby orthogonal matrix (sign-fixed QR computed in float64), same dtype.

    For a nearly orthogonal R (drift eps), the result differs from R by O(eps).
    """
    return qr_orthogonal(_f64(r), sign_fix=True).to(device=r.device, dtype=r.dtype)


def _f64(t: torch.Tensor) -> torch.Tensor:
    # MPS has no float64: fall back to the CPU there
    t = t.detach()
    if t.device.type == "mps":
        t = t.cpu()
    return t.to(torch.float64)


def _check_square(t: torch.Tensor, what: str) -> None:
    if t.dim() < 2 or t.shape[-1] != t.shape[-2]:
        raise ValueError(f"{what} must be square [..., n, n], got {tuple(t.shape)}")


class QROrth(nn.Module):
    """R = Q(Z) from the QR decomposition of a free latent Z ``[..., n, n]``.

    ``init`` should be orthogonal (e.g. a random Hadamard); Z starts as a copy
    of it, so with ``sign_fix=True`` ``forward()`` initially returns ``init``.
    """

    def __init__(self, init: torch.Tensor, sign_fix: bool = True, dtype: torch.dtype | None = None):
        super().__init__()
        _check_square(init, "init")
        z = init.detach().clone().to(dtype or init.dtype)
        self.Z = nn.Parameter(z)
        self.sign_fix = sign_fix

    def forward(self) -> torch.Tensor:
        return qr_orthogonal(self.Z, self.sign_fix)

    @torch.no_grad()
    def final(self) -> torch.Tensor:
        """Q(Z) computed in float64 (for the returned rotation)."""
        return qr_orthogonal(_f64(self.Z), self.sign_fix)


class CayleyOrth(nn.Module):
    """R held directly as the parameter ``R``; step it with :class:`CayleySGD`."""

    def __init__(self, init: torch.Tensor, dtype: torch.dtype | None = None):
        super().__init__()
        _check_square(init, "init")
        self.R = nn.Parameter(init.detach().clone().to(dtype or init.dtype))

    def forward(self) -> torch.Tensor:
        return self.R

    @torch.no_grad()
    def final(self) -> torch.Tensor:
        """R projected onto the orthogonal group in float64 (removes drift)."""
        return project_orthogonal(_f64(self.R))


def _skew(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a - a.transpose(-2, -1))


class CayleySGD(torch.optim.Optimizer):
    """Riemannian SGD with momentum on square orthogonal matrices.

    Every parameter must be square ``[..., n, n]`` and orthogonal at the start;
    batched matrices are stepped independently.  See the module docstring for
    the update, the cost and the ``method`` / ``reorth_every`` options.

    Args:
        params: parameters (or param groups) to optimize.
        lr: step size alpha.
        momentum: beta of the skew-matrix momentum buffer.
        method: ``"exact"`` (linear solve) or ``"iterative"`` (Li et al.).
        iters: fixed-point iterations for ``method="iterative"``.
        reorth_every: project back onto O(n) every k steps (0 = never).
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        method: str = "exact",
        iters: int = 2,
        reorth_every: int = 0,
    ):
        if lr < 0:
            raise ValueError(f"invalid lr {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"invalid momentum {momentum}")
        if method not in ("exact", "iterative"):
            raise ValueError(f"method must be 'exact' or 'iterative', got {method!r}")
        defaults = dict(lr=lr, momentum=momentum, method=method, iters=iters, reorth_every=reorth_every)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                _check_square(p, "CayleySGD parameter")
                r = p.data
                g = p.grad
                state = self.state[p]
                # descent direction in the Lie algebra: -skew(G R^T)
                a = -_skew(g @ r.transpose(-2, -1))
                buf = state.get("momentum_buffer")
                if buf is None or beta == 0.0:
                    buf = a.clone()
                else:
                    buf.mul_(beta).add_(a)
                state["momentum_buffer"] = buf
                state["step"] = state.get("step", 0) + 1

                n = r.shape[-1]
                eye = torch.eye(n, dtype=r.dtype, device=r.device)
                if group["method"] == "exact":
                    w = (0.5 * lr) * buf
                    new = torch.linalg.solve(eye - w, r + w @ r)
                else:
                    # Li et al. step cap, per matrix, so the fixed point contracts
                    nrm = torch.linalg.matrix_norm(buf, ord="fro", keepdim=True)
                    alpha = torch.clamp(1.0 / (nrm + 1e-8), max=lr)
                    br = buf @ r
                    y = r + alpha * br
                    for _ in range(group["iters"]):
                        y = r + (0.5 * alpha) * (buf @ (r + y))
                    new = y
                k = group["reorth_every"]
                if k and state["step"] % k == 0:
                    new = project_orthogonal(new)
                p.data.copy_(new)
        return loss
