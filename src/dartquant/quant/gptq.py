"""GPTQ (Frantar et al., 2022): quantize a linear layer's weight column by column, pushing each
column's rounding error onto the not-yet-quantized columns through the inverse Hessian of the
layer's reconstruction error ``||X W^T - X Q^T||^2``, whose Hessian is ``H = 2/N sum_n x_n x_n^T``.

Design choices:

* ``H`` is **accumulated in float32** by default (``dtype=`` overrides). That is the reference
  choice, halves memory (an 11008-wide down_proj Hessian is 485 MB in float32; several live at
  once per decoder layer), and the accumulation error (relative ~1e-7 per update) is far below
  the 1 % damping that is added anyway. ``N`` counts rows (tokens), and the running average
  ``H <- H * n/(n+m) + 2/(n+m) X^T X`` keeps the magnitude independent of the number of batches.
* The **factorization runs in float64** (damping, Cholesky, inverse, Cholesky of the inverse):
  it is one O(n^3) step per layer, and it is where ill-conditioning (outlier channels whose
  diagonal is orders of magnitude above the rest) costs accuracy. The column loop itself then
  runs in float32 like the weights.
* Two factorizations give the same ``U = chol((H + damp I)^-1)`` (upper). The **reference** one
  (`_inverse_cholesky`: Cholesky, ``cholesky_inverse``, Cholesky again; the published code's) runs
  on the CPU, where its results are the ones recorded in docs/RESULTS.md. On a GPU it held five or
  more float64 copies of the Hessian at once (``cholesky_inverse`` clones on CUDA): 48 GiB for
  Llama-2-70B's 28672-wide down_proj. The **lean** one (`_lean_inverse_cholesky`, the default on
  CUDA) needs one: with J the reversal permutation, ``J H J = L' L'^T`` gives ``H = R R^T`` with
  ``R = J L' J`` upper triangular, so ``H^-1 = (R^-1)^T R^-1`` and ``U = R^-1 = J L'^-1 J``: one
  Cholesky of the reversed Hessian and one triangular inverse, both in place by blocks
  (`_cholesky_lower_`, `_invert_lower_`), then the float32 copy; with ``release_hessian`` the
  float32 Hessian is dropped before that copy. Equal to
  the reference to float64 round-off (tested), not bit for bit.
* Damping: ``percdamp * mean(diag H)`` on the diagonal. If a Cholesky factorization fails
  (indefinite H from float32 round-off, rank deficiency with percdamp=0), the damping is
  multiplied by 10 and retried, up to `MAX_DAMP_RETRIES` times, with a RuntimeWarning.
* Dead inputs (``diag H == 0``: the input channel was always 0 on the calibration data) get
  ``H_ii = 1`` and a zero weight column: the column cannot affect the calibration output, and a
  0 weight is what the data supports.
* Granularity comes from the `QuantSpec`:
    - ``group_size`` None (or -1): qparams from the whole row (or tensor), computed once from the
      weight before the loop, with the spec's MSE clip search if ``mse_search``;
    - ``group_size`` g, dynamic (default): a group's qparams are computed when the loop reaches
      its first column, from the *current* weights, i.e. after every update from all earlier
      columns. The lazy-batch blocks are therefore aligned to multiples of g (block size
      ``g * max(1, blocksize // g)``), so a group never straddles a block and all of its columns
      are up to date at that moment. (The reference implementation reads the group from the
      lazily-updated matrix, which misses the updates made earlier in the same block.)
    - ``static_groups=True``: every group's qparams are computed up front from the original
      weight (dead columns zeroed). This is the only consistent choice with ``act_order``: with
      dynamic groups, act_order would form groups of columns consecutive in *permuted* order,
      which the per-group storage (groups of consecutive *original* columns) cannot express, so
      that combination raises a ValueError.
* ``act_order`` quantizes columns by decreasing ``diag H``; the permutation is undone before
  returning, so codes/scales are in the original column order.
* The result is a `QuantizedTensor` whose ``dequantize()`` is bitwise the weight that GPTQ
  produced: the loop writes ``q * s`` / ``(q - z) * s`` with the very scale values stored in it,
  in float32, which is also the dtype of the stored scales (cast the dequantized weight to the
  model dtype yourself).
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from .gptq_triton import gptq_columns_, triton_columns_available
from .primitives import QuantizedTensor, QuantSpec, candidate_qparams, compute_qparams

__all__ = ["GPTQ", "MAX_DAMP_RETRIES", "CLIP_OBJECTIVES"]

MAX_DAMP_RETRIES = 5
# what a per-row clip search minimises (GPTQ.quantize's clip_objective): the weight's own error, the
# output error of RTN at each candidate, or the output error of GPTQ's result at each candidate
CLIP_OBJECTIVES = ("weight", "output", "gptq")
# clip_objective "gptq": float32 working memory of the candidates run at once (W, Q, C and Err per candidate)
_CANDIDATE_BYTES = 1 << 30
# "auto" column loop: checked once per process and device type against the torch loop
_COLUMNS_KERNEL_CHECKED: dict[str, bool] = {}
_COLUMNS_KERNEL_OK: dict[str, bool] = {}


def _use_columns_kernel(columns: str, dev: torch.device) -> bool:
    if columns == "triton":
        if not triton_columns_available():
            raise ImportError("GPTQ columns='triton' needs Triton: pip install 'dartquant[kernels]'")
        return True
    return (columns == "auto" and dev.type == "cuda" and triton_columns_available()
            and os.environ.get("DARTQUANT_GPTQ_COLUMNS", "auto") != "torch" and _COLUMNS_KERNEL_OK.get(dev.type, True))


def _columns_torch(W1: torch.Tensor, Hinv1: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   col_groups: list[int], spec: QuantSpec, g: int | None, dynamic: bool):
    """One lazy-batch block of the column loop in torch: (Q1, C1, Err1). Dynamic groups get their
    qparams here (written into scale / zero) from the block's current weights."""
    lo, hi = spec.code_range
    sym = spec.symmetric
    W1 = W1.clone()
    Q1 = torch.zeros_like(W1)
    C1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    for i, gi in enumerate(col_groups):
        if dynamic and i % g == 0:  # block starts are aligned to groups: col % g == i % g
            # all columns of this group are in W1 (blocks are aligned) and fully updated
            s_g, z_g = compute_qparams(W1[:, i : i + g], spec)
            scale[:, gi] = s_g[:, 0]
            zero[:, gi] = z_g[:, 0]
        s = scale[:, gi, 0]
        w = W1[:, i]
        # the same expressions as primitives.quantize / dequantize (bitwise round trip)
        if sym:
            q = torch.round(w / s).clamp_(lo, hi)
            qw = q * s
        else:
            z = zero[:, gi, 0]
            q = torch.round(w / s + z).clamp_(lo, hi)
            qw = (q - z) * s
        Q1[:, i] = qw
        C1[:, i] = q
        err = (w - qw) / Hinv1[i, i]
        W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
        Err1[:, i] = err
    return Q1, C1, Err1


# rows / columns per step of the lean factorization's in-place blocked kernels (temporaries n x 512)
_FACTOR_BLOCK = 512


def _cholesky_lower_(A: torch.Tensor, block: int = _FACTOR_BLOCK) -> bool:
    """Lower Cholesky factor of the symmetric positive definite A, in place (upper triangle zeroed),
    `block` columns at a time (temporaries: n x block); False if A is not positive definite (A is
    then partly overwritten). Right-looking: factor the diagonal block, solve the panel below it,
    subtract the panel's outer product from the lower triangle of the trailing matrix."""
    n = A.shape[0]
    for s in range(0, n, block):
        e = min(s + block, n)
        lkk, info = torch.linalg.cholesky_ex(A[s:e, s:e])
        if info.item() != 0:
            return False
        A[s:e, s:e] = lkk
        A[s:e, e:] = 0.0
        if e == n:
            break
        panel = torch.linalg.solve_triangular(lkk.T, A[e:, s:e], upper=True, left=False)  # X lkk^T = A
        A[e:, s:e] = panel
        for t in range(e, n, block):  # lower triangle only, one block column at a time
            u = min(t + block, n)
            A[t:, t:u].addmm_(panel[t - e:], panel[t - e:u - e].T, alpha=-1.0)
    return True


def _all_finite(A: torch.Tensor, block: int = 4096) -> bool:
    """torch.isfinite(A).all() without an n x n boolean temporary."""
    return all(torch.isfinite(A[s:s + block]).all().item() for s in range(0, A.shape[0], block))


def _invert_lower_(L: torch.Tensor, block: int = _FACTOR_BLOCK) -> None:
    """Invert the lower-triangular L in place, `block` rows at a time (temporaries: block x n).

    With the leading s x s block already inverted, rows [s, e) of the inverse are
    [-C^-1 B A^-1, C^-1] for L's rows [B, C]: one matmul with the inverted block, one small solve."""
    n = L.shape[0]
    for s in range(0, n, block):
        e = min(s + block, n)
        eye = torch.eye(e - s, dtype=L.dtype, device=L.device)
        c_inv = torch.linalg.solve_triangular(L[s:e, s:e], eye, upper=False)
        if s:
            L[s:e, :s] = -(c_inv @ (L[s:e, :s] @ L[:s, :s]))
        L[s:e, s:e] = c_inv


def _with_damping(factor, percdamp: float, mean_diag: float) -> torch.Tensor:
    """`factor(damp)` (None where the factorization failed) at damping percdamp * mean_diag,
    retried with 10x the damping up to MAX_DAMP_RETRIES times (with a warning), else an error."""
    damp = percdamp * mean_diag
    first = damp
    for attempt in range(MAX_DAMP_RETRIES + 1):
        U = factor(damp)
        if U is not None:
            if attempt:
                warnings.warn(
                    f"GPTQ: Cholesky failed with damping {first:.3g} (percdamp={percdamp}); "
                    f"succeeded with damping {damp:.3g} after {attempt} retr{'y' if attempt == 1 else 'ies'}",
                    RuntimeWarning,
                    stacklevel=6,  # the caller of GPTQ.quantize (through _quantize and its no_grad wrapper)
                )
            return U
        # percdamp = 0 has nothing to multiply: start from 1 % of the mean diagonal
        damp = damp * 10 if damp > 0 else 0.01 * mean_diag
    raise RuntimeError(
        f"GPTQ: Cholesky of the damped Hessian failed even with damping {damp / 10:.3g} "
        f"(percdamp={percdamp}, mean diag {mean_diag:.3g}); the calibration inputs are degenerate"
    )


# the asymmetric target's shrinkage towards W (gptq_asymmetric_holdout): 1e-3 is the plain target's
# damping, 10 is nearly W itself
SHRINK_GRID = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)


class GPTQ:
    """Hessian accumulator + GPTQ solver for one linear layer (or several sharing one input)."""

    def __init__(self, in_features: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 holdout: bool = False):
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        self.in_features = in_features
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.H: torch.Tensor | None = None  # allocated at the first add_batch (on its device by default)
        self.C: torch.Tensor | None = None  # with references: 2/N sum x_ref x^T (asymmetric_target)
        self._nsamples = 0
        # holdout (with references): every second calibration window's sums x^T x and x_ref^T x also
        # kept apart, so that asymmetric_target can choose its shrinkage on windows it did not fit
        self.holdout = holdout
        self._held: tuple[torch.Tensor, torch.Tensor] | None = None
        self._held_rows = 0
        self._windows = 0
        self.shrink: float | list | None = None  # the ridge strength(s) the last holdout targets chose (for the log)

    @property
    def nsamples(self) -> int:
        """Number of input rows (tokens) seen so far."""
        return self._nsamples

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        """Add inputs [..., in_features] to the running average H = 2/N sum x x^T.

        `reference`: the inputs the layer's output should have come from (e.g. `inp` before its
        activation quantizer), accumulated as C = 2/N sum x_ref x^T for `asymmetric_target`; give it
        on every batch or on none."""
        if inp.shape[-1] != self.in_features:
            raise ValueError(f"GPTQ(in_features={self.in_features}) got an input of last dimension {inp.shape[-1]}")
        if (reference is not None) != (self.C is not None) and self._nsamples:
            raise ValueError("GPTQ.add_batch: give a reference with every batch or with none")
        device = self.device if self.device is not None else inp.device
        x = inp.detach().reshape(-1, self.in_features).to(device=device, dtype=self.dtype)
        m = x.shape[0]
        if m == 0:
            return
        if self.H is None:
            self.H = torch.zeros(self.in_features, self.in_features, device=device, dtype=self.dtype)
        if reference is not None and self.C is None:
            self.C = torch.zeros_like(self.H)
        total = self._nsamples + m
        self.H.mul_(self._nsamples / total)
        x = x * math.sqrt(2.0 / total)
        self.H.addmm_(x.T, x)
        if reference is not None:
            if reference.shape != inp.shape:
                raise ValueError(f"GPTQ.add_batch: reference {tuple(reference.shape)} != input {tuple(inp.shape)}")
            r = reference.detach().reshape(-1, self.in_features).to(device=device, dtype=self.dtype)
            self.C.mul_(self._nsamples / total)
            self.C.addmm_((r * math.sqrt(2.0 / total)).T, x)
            if self.holdout:
                self._add_held(inp, reference, device)
        self._nsamples = total

    def _add_held(self, inp: torch.Tensor, reference: torch.Tensor, device) -> None:
        """Plain sums over the odd-numbered windows (a [windows, seq, n] input's first dimension,
        counted across calls; any other input is one window), however the windows are batched."""
        n = self.in_features
        first = inp.shape[0] if inp.dim() == 3 else 1
        held = [k for k in range(first) if (self._windows + k) % 2 == 1]
        self._windows += first
        if not held:
            return
        if self._held is None:
            self._held = tuple(torch.zeros(n, n, device=device, dtype=self.dtype) for _ in range(2))
        sel = (lambda t: t[held]) if inp.dim() == 3 else (lambda t: t)
        x = sel(inp.detach()).reshape(-1, n).to(device=device, dtype=self.dtype)
        r = sel(reference.detach()).reshape(-1, n).to(device=device, dtype=self.dtype)
        self._held[0].addmm_(x.T, x)
        self._held[1].addmm_(r.T, x)
        self._held_rows += x.shape[0]

    @torch.no_grad()
    def asymmetric_target(self, weight: torch.Tensor, reldamp: float = 1e-3) -> torch.Tensor:
        """The weight W* = W C H^-1 that the layer should have on the inputs it gets.

        With H from the inputs x the layer will see (activation-quantized) and C from the inputs it
        should have seen (`reference`), ||x W_q^T - x_ref W^T||^2 = ||x (W_q - W*)^T||^2 + const:
        GPTQ on W* with this H minimizes the output error against the reference path, so the weights
        absorb what they can of the activation quantizer's error (the least-squares, Wiener-filter
        correction; the "asymmetric calibration" of GPTAQ, Li et al. 2025). float64; damped per
        channel (H + reldamp diag H): GPTQ's damping by the *mean* diagonal would pull the target of
        low-energy channels towards zero (by 1/(1 + damp / H_ii)), and the target, unlike GPTQ's
        error feedback, is kept. float32 out, on the weight's device."""
        return self.asymmetric_targets([weight], reldamp)[0]

    @torch.no_grad()
    def asymmetric_targets(self, weights: list[torch.Tensor], reldamp: float = 1e-3) -> list[torch.Tensor]:
        """`asymmetric_target` of each weight of the linears sharing this input (q / k / v, gate /
        up), with one set of solves for all of them (the holdout's cross-validation is 17 of them)."""
        if self.C is None or self.H is None:
            raise RuntimeError("GPTQ.asymmetric_target needs add_batch(..., reference=...)")
        rows = [v.shape[0] for v in weights]
        w = torch.cat([v.to(device=self.H.device, dtype=torch.float64) for v in weights])
        if self.holdout:
            out = self._shrunk_target(w, rows)
        else:
            H = self.H.to(torch.float64, copy=True)  # never a view of self.H (GPTQ factors it next)
            dead = torch.diagonal(H) == 0
            H[dead, dead] = 1.0
            H.diagonal().mul_(1.0 + reldamp)
            out = torch.linalg.solve(H, self.C.to(torch.float64).T @ w.T).T  # W C H^-1 (H symmetric)
            out[:, dead] = 0.0
        return [t.to(device=v.device, dtype=torch.float32) for t, v in zip(out.split(rows), weights)]

    @torch.no_grad()
    def _shrunk_target(self, w: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """W(l) = W (C + l D)(H + l D)^-1 (D = diag H: the least-squares target shrunk towards W by a
        ridge penalty l ||(V - W) D^1/2||^2), with l from SHRINK_GRID chosen by two-fold
        cross-validation over the calibration windows (fit on the even ones, score the output error
        on the odd ones, and the reverse), separately for each linear (`rows`: their output counts in
        the stacked float64 `w`). The target is a regression with one unknown per input channel and
        output: on a wide input with few tokens per channel (Qwen2.5-0.5B's 4864-wide down_proj) the
        plain least squares fits the calibration windows' noise (RESULTS §26c)."""
        if self._held is None or not 0 < self._held_rows < self._nsamples:
            raise RuntimeError("GPTQ: the asymmetric target's holdout needs at least two calibration windows")
        total = (self.H.double() * (self._nsamples / 2.0), self.C.double() * (self._nsamples / 2.0))
        held = (self._held[0].double(), self._held[1].double())
        fit = (total[0] - held[0], total[1] - held[1])
        dead = torch.diagonal(total[0]) == 0

        def target(S: torch.Tensor, C: torch.Tensor, lam: float, w: torch.Tensor) -> torch.Tensor:
            d = torch.diagonal(S).clone()
            d[dead | (d <= 0)] = 1.0  # a channel zero on one fold: the penalty still pins it to W
            A = S.clone()
            A[dead, dead] = 1.0
            A.diagonal().add_(lam * d)
            B = C.T.clone()
            B.diagonal().add_(lam * d)
            return torch.linalg.solve(A, B @ w.T).T  # W (C + l D) (S + l D)^-1

        def error(v: torch.Tensor, S: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
            # per linear: ||x~ v^T - x w^T||^2 - const
            per_row = (v @ S * v).sum(dim=1) - 2 * (w @ C * v).sum(dim=1)
            return torch.stack([r.sum() for r in per_row.split(rows)])

        scores = torch.stack([sum(error(target(*a, lam, w), *b) for a, b in ((fit, held), (held, fit)))
                              for lam in SHRINK_GRID])  # [grid, linears]
        best = [SHRINK_GRID[k] for k in scores.argmin(dim=0).tolist()]
        self.shrink = best[0] if len(set(best)) == 1 else best
        out = torch.empty_like(w)
        starts = [sum(rows[:k]) for k in range(len(rows))]
        for lam in set(best):
            sel = torch.cat([torch.arange(s, s + r) for s, r, b in zip(starts, rows, best) if b == lam]).to(w.device)
            out[sel] = target(*total, lam, w[sel])
        out[:, dead] = 0.0
        return out

    def free(self) -> None:
        """Drop the Hessian (the object can accumulate again afterwards)."""
        self.H = None
        self.C = None
        self._nsamples = 0
        self._held, self._held_rows, self._windows = None, 0, 0

    def _lean_inverse_cholesky(self, dead: torch.Tensor, perm: torch.Tensor | None, percdamp: float,
                               mean_diag: float, release: bool = False) -> torch.Tensor:
        """float32 upper Cholesky factor of (H + damp I)^-1 for the Hessian in the loop's column order
        (`perm`, dead inputs' diagonal set to 1) with one float64 n x n tensor: the reversed damped
        Hessian, built from self.H by row blocks, factored and then inverted in place by blocks, and
        copied out (reversed) into the float32 result by row blocks. Each retry (`_with_damping`)
        rebuilds it from self.H; with `release`, self.H is dropped once the factor is final (before
        the float32 copy is allocated), so the Hessian's last user peaks at 1.5 n^2 x 8 bytes more
        (float64 factor + float32 result) instead of 2 n^2 x 8 + n^2 x 4."""
        n = self.in_features
        rev = perm.flip(0) if perm is not None else torch.arange(n - 1, -1, -1, device=self.H.device)
        rows = _FACTOR_BLOCK

        def factor(damp: float) -> torch.Tensor | None:
            Hr = torch.empty(n, n, dtype=torch.float64, device=self.H.device)  # J P^T H P J
            for s in range(0, n, rows):
                Hr[s:s + rows] = self.H[rev[s:s + rows]][:, rev]
            Hr.diagonal()[dead[rev]] = 1.0
            Hr.diagonal().add_(damp)
            if not _cholesky_lower_(Hr, rows):
                return None
            _invert_lower_(Hr, rows)
            if not _all_finite(Hr):
                return None
            if release:
                self.free()
            U = torch.empty(n, n, dtype=torch.float32, device=Hr.device)
            for s in range(0, n, rows):  # U = J L'^-1 J: row s of U is row n-1-s of L'^-1, reversed
                e = min(s + rows, n)
                U[s:e] = Hr[n - e:n - s].flip((0, 1))
            return U

        return _with_damping(factor, percdamp, mean_diag)

    @staticmethod
    def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
        """Upper Cholesky factor of (H + damp I)^-1, retrying with 10x damping on failure."""

        def factor(damp: float) -> torch.Tensor | None:
            Hd = H.clone()
            Hd.diagonal().add_(damp)
            L, info = torch.linalg.cholesky_ex(Hd)
            if info.item() != 0:
                return None
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            return U if info.item() == 0 and torch.isfinite(U).all() else None

        return _with_damping(factor, percdamp, torch.diagonal(H).mean().item())

    def quantize(
        self,
        weight: torch.Tensor,
        spec: QuantSpec,
        *,
        blocksize: int = 128,
        percdamp: float = 0.01,
        act_order: bool = False,
        static_groups: bool = False,
        columns: str = "auto",
        factorization: str = "auto",
        release_hessian: bool = False,
        clip_objective: str = "weight",
    ) -> QuantizedTensor:
        """GPTQ-quantize weight [out, in_features]; returns codes + float32 scales on weight's device.

        columns: how the column loop runs: "torch", "triton" (`gptq_triton`, the same bits), or
        "auto" (Triton on a GPU when it is installed, after one check against the torch loop).
        factorization: "reference", "lean" (one float64 Hessian copy instead of five or more; see
        the module's notes), or "auto" (lean on a GPU, reference elsewhere; the environment variable
        DARTQUANT_GPTQ_FACTORIZATION=reference|lean overrides it).
        release_hessian: this is the Hessian's last use: drop it (`free`) as soon as the factorization
        no longer needs it, which lowers the peak (a 70B down_proj's Hessian is 3 GiB in float32).
        clip_objective: with spec.mse_search, what the per-row clip search minimises: "weight"
        (the spec's sum |w - w_hat|^mse_norm), "output" (the row's output error on the calibration
        inputs, (w - w_hat) H (w - w_hat)^T, of RTN at each candidate) or "gptq" (that error of
        GPTQ's own result at each candidate: one column loop per candidate). One scale per row only."""
        return self._quantize(
            weight, spec, blocksize=blocksize, percdamp=percdamp, act_order=act_order, static_groups=static_groups,
            columns=columns, factorization=factorization, release_hessian=release_hessian,
            clip_objective=clip_objective,
        )[0]

    @staticmethod
    def _column_loop(W: torch.Tensor, Hinv: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     col_group: torch.Tensor, spec: QuantSpec, g: int | None, dynamic: bool, bs: int,
                     columns: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The column loop over lazy-batch blocks (W is updated in place): the written weight Q, the
        codes C (as floats) and each row's output error sum_j err_j^2, which is (w - q) H (w - q)^T
        for the damped H (err_j = (w'_j - q_j) / U_jj with U = chol(H^-1), upper)."""
        n_out, n = W.shape
        dev = W.device
        lo, hi = spec.code_range
        Q = torch.zeros_like(W)
        C = torch.zeros_like(W)  # codes as floats; converted once at the end
        loss = torch.zeros(n_out, device=dev, dtype=torch.float32)
        col_group_list = col_group.tolist()
        kernel = not dynamic and _use_columns_kernel(columns, dev)
        for i1 in range(0, n, bs):
            i2 = min(i1 + bs, n)
            Hinv1 = Hinv[i1:i2, i1:i2]
            if kernel:
                cg = col_group[i1:i2]
                S1 = scale[:, cg, 0].expand(n_out, -1).contiguous()
                Z1 = None if spec.symmetric else zero[:, cg, 0].expand(n_out, -1).contiguous()
                Err1 = torch.empty(n_out, i2 - i1, device=dev, dtype=torch.float32)
                try:
                    gptq_columns_(W[:, i1:i2], Hinv1.contiguous(), S1, Z1, lo, hi, Q[:, i1:i2], C[:, i1:i2], Err1)
                    failed = None
                except Exception as e:  # noqa: BLE001 (auto: e.g. a GPU Triton cannot compile for)
                    if columns == "triton":
                        raise
                    failed = f"failed ({type(e).__name__}: {str(e)[:200]})"
                ref = None
                if failed is None and columns == "auto" and not _COLUMNS_KERNEL_CHECKED.get(dev.type, False):
                    _COLUMNS_KERNEL_CHECKED[dev.type] = True  # once per process: against the torch loop
                    ref = _columns_torch(W[:, i1:i2], Hinv1, scale, zero, col_group_list[i1:i2], spec, g, dynamic)
                    if not all(torch.equal(a, b) for a, b in zip(ref, (Q[:, i1:i2], C[:, i1:i2], Err1))):
                        failed = "differs from the torch loop"
                if failed is not None:
                    warnings.warn(f"GPTQ: the Triton column loop {failed}; using the torch loop from now on "
                                  "(slower, same results)", RuntimeWarning, stacklevel=5)
                    _COLUMNS_KERNEL_OK[dev.type] = False
                    kernel = False
                    Q[:, i1:i2], C[:, i1:i2], Err1 = ref or _columns_torch(W[:, i1:i2], Hinv1, scale, zero,
                                                                            col_group_list[i1:i2], spec, g, dynamic)
            else:
                Q[:, i1:i2], C[:, i1:i2], Err1 = _columns_torch(W[:, i1:i2], Hinv1, scale, zero,
                                                                 col_group_list[i1:i2], spec, g, dynamic)
            loss += Err1.square().sum(dim=1)
            if i2 < n:  # lazy update of all later columns with this block's errors
                W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        return Q, C, loss

    def _best_of_candidates(self, W: torch.Tensor, Hinv: torch.Tensor, candidates, col_group: torch.Tensor,
                            spec: QuantSpec, bs: int, columns: str):
        """GPTQ of W under each candidate (scale, zero) of one scale per row; per row, the candidate
        whose GPTQ result has the smallest output error. GPTQ treats rows independently, so this
        is the exact best of the candidates for the layer's calibration objective. Candidates run
        a few at a time, rows stacked, within _CANDIDATE_BYTES of float32 working copies."""
        n_out, n = W.shape
        per = max(1, min(len(candidates), _CANDIDATE_BYTES // (4 * 4 * n_out * n)))
        best = None
        for c0 in range(0, len(candidates), per):
            chunk = candidates[c0:c0 + per]
            k = len(chunk)
            S = torch.cat([s for s, _ in chunk])
            Z = torch.cat([z for _, z in chunk])
            Q, C, loss = self._column_loop(W.repeat(k, 1), Hinv, S, Z, col_group, spec, None, False, bs, columns)
            loss, pick = loss.view(k, n_out).min(dim=0)  # ties: the earlier (larger) clip ratio
            rows = pick * n_out + torch.arange(n_out, device=W.device)
            found = (loss, Q[rows], C[rows], S[rows], Z[rows])
            if best is None:
                best = found
                continue
            better = found[0] < best[0]  # strict: ties keep the earlier chunk's (larger) ratio
            best = tuple(torch.where(better.view(-1, *[1] * (a.ndim - 1)), a, b) for a, b in zip(found, best))
        return best[1], best[2], best[3], best[4]

    @torch.no_grad()
    def _quantize(
        self, weight: torch.Tensor, spec: QuantSpec, *, blocksize: int, percdamp: float, act_order: bool,
        static_groups: bool, columns: str = "auto", factorization: str = "auto", release_hessian: bool = False,
        clip_objective: str = "weight",
    ) -> tuple[QuantizedTensor, torch.Tensor]:
        """`quantize`, also returning the float32 weight the loop wrote (tests check it equals
        the container's dequantize() bitwise)."""
        if self.H is None or self._nsamples == 0:
            raise RuntimeError("GPTQ.quantize: no calibration data; call add_batch first")
        if weight.ndim != 2 or weight.shape[1] != self.in_features:
            raise ValueError(f"GPTQ(in_features={self.in_features}) cannot quantize a weight of shape {tuple(weight.shape)}")
        if not spec.enabled:
            raise ValueError(f"GPTQ needs a quantizing spec, got bits={spec.bits}")
        spec.validate(self.in_features)
        if blocksize < 1:
            raise ValueError(f"blocksize must be >= 1, got {blocksize}")
        if percdamp < 0:
            raise ValueError(f"percdamp must be >= 0, got {percdamp}")
        if columns not in ("auto", "torch", "triton"):
            raise ValueError(f"columns must be auto, torch or triton, got {columns!r}")
        if factorization not in ("auto", "reference", "lean"):
            raise ValueError(f"factorization must be auto, reference or lean, got {factorization!r}")
        if clip_objective not in CLIP_OBJECTIVES:
            raise ValueError(f"clip_objective must be one of {CLIP_OBJECTIVES}, got {clip_objective!r}")
        output_search = clip_objective == "output" and spec.mse_search
        if clip_objective != "weight" and spec.mse_search and spec.group_size is not None:
            raise ValueError(f"clip_objective {clip_objective} searches one clip ratio per row: use group_size None")
        g = spec.group_size if spec.group_size is not None and spec.group_size > 0 else None
        if act_order and g is not None and not static_groups:
            raise ValueError(
                "GPTQ: act_order with group_size needs static_groups=True (dynamic groups would be "
                "formed in permuted column order, which group-wise scales cannot represent)"
            )
        dynamic = g is not None and not static_groups

        dev = self.H.device
        if factorization == "auto":  # DARTQUANT_GPTQ_FACTORIZATION=reference|lean overrides the device's choice
            factorization = os.environ.get("DARTQUANT_GPTQ_FACTORIZATION", "auto")
            if factorization not in ("auto", "reference", "lean"):
                raise ValueError(f"DARTQUANT_GPTQ_FACTORIZATION must be reference or lean, got {factorization!r}")
        lean = factorization == "lean" or (factorization == "auto" and dev.type == "cuda")
        if not _all_finite(self.H):
            raise ValueError("GPTQ: the Hessian has non-finite entries (NaN/inf in the calibration inputs?)")
        W = weight.detach().to(device=dev, dtype=torch.float32).clone()
        n_out, n = W.shape
        diag = torch.diagonal(self.H).to(torch.float64, copy=True)  # not a view of self.H
        dead = diag == 0
        diag[dead] = 1.0  # the diagonal of H below
        W[:, dead] = 0.0
        search_error = None
        if output_search:  # before the Hessian can be released; float32 keeps the n_out x n x n products cheap
            Hs = self.H.to(torch.float32, copy=True)
            Hs[dead, dead] = 1.0

            def search_error(diff: torch.Tensor) -> torch.Tensor:  # diff: [n_out, 1, n] -> [n_out, 1, 1]
                d = diff[:, 0]
                return ((d @ Hs) * d).sum(dim=-1, keepdim=True).unsqueeze(-1)
        H = None
        if not lean:  # the whole Hessian in float64 now (lean: built inside its factorization)
            H = self.H.to(torch.float64, copy=True)  # never self.H itself (a float64 accumulator)
            H[dead, dead] = 1.0
            if release_hessian:
                self.free()

        candidates = None
        if dynamic:
            scale = torch.empty(n_out, n // g, 1, device=dev, dtype=torch.float32)
            zero = torch.zeros_like(scale)
        elif clip_objective == "gptq" and spec.mse_search:  # each row's scale is chosen after the column loops
            candidates = candidate_qparams(W, spec)
        else:  # per row / per tensor / static groups: all qparams from the (dead-zeroed) weight now
            scale, zero = compute_qparams(W, spec, search_error)
            search_error = Hs = None
        # column -> group index into scale[:, group, 0] (per row / per tensor: group 0)
        col_group = torch.arange(n, device=dev) // g if g is not None else torch.zeros(n, dtype=torch.long, device=dev)

        perm = None
        if act_order:
            perm = torch.argsort(diag, descending=True)
            W = W[:, perm]
            col_group = col_group[perm]
            if H is not None:
                H = H[perm][:, perm]
        if lean:
            Hinv = self._lean_inverse_cholesky(dead, perm, percdamp, diag.mean().item(), release_hessian)
        else:
            Hinv = self._inverse_cholesky(H, percdamp).to(torch.float32)
            del H

        bs = g * max(1, blocksize // g) if dynamic else blocksize
        if candidates is None:
            Q, C, _ = self._column_loop(W, Hinv, scale, zero, col_group, spec, g, dynamic, bs, columns)
        else:  # GPTQ once per candidate clip (rows stacked), each row keeps its smallest output error
            Q, C, scale, zero = self._best_of_candidates(W, Hinv, candidates, col_group, spec, bs, columns)

        if perm is not None:
            inv = torch.argsort(perm)
            C = C[:, inv]
            Q = Q[:, inv]
        codes = C.to(spec.code_dtype)
        out_dev = weight.device
        qt = QuantizedTensor(codes.to(out_dev), scale.to(out_dev), zero.to(out_dev), spec, torch.Size(weight.shape))
        return qt, Q.to(out_dev)
