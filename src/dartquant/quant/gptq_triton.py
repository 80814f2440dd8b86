"""GPTQ's column loop as one Triton kernel per lazy-batch block (`gptq.GPTQ`, ``columns="triton"``).

The torch loop in `gptq.py` launches about a dozen tiny kernels per weight column (divide,
round, clamp, the rank-1 update, ...). On a GPU that is launch-bound: ~36 000 columns per
Llama-2-7B decoder layer cost seconds per layer while the arithmetic is a few milliseconds
(the Llama-2-7B whole job spent more time in GPTQ's loop than in its forwards; docs/RESULTS.md
§12). Here one program holds a tile of rows x the block's columns in registers and walks the
columns itself; rows are independent in GPTQ (they share only Hinv), so programs never talk.

**Bitwise the torch loop.** Every value goes through the same fp32 operations in the same order:
``w / s (+ z)`` with IEEE division (`div_rn`), round half to even, clamp, ``q * s`` or
``(q - z) * s``, ``err = (w - qw) / Hinv[i, i]``, ``W[:, j] - err * Hinv[i, j]`` as a product then
a difference (no FMA contraction: launched with ``enable_fp_fusion=False``). Columns before i are
updated with ``err * 0`` (they are never read again). The column is read out of the register tile
by a masked sum (adding zeros is exact). Scales and zero points are the ones the caller computed
(per row, per tensor or static groups; dynamic groups stay on the torch loop).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None

__all__ = ["gptq_columns_", "triton_columns_available"]

# rows per program: 16 x 128 at 4 warps compiles for sm_90 to 168 registers and no spills (32 rows:
# 255 and a stack; compiled on the CPU with triton.compile(..., target=GPUTarget("cuda", 90, 32)))
BLOCK_R = 16


def triton_columns_available() -> bool:
    return triton is not None


if triton is not None:
    from ..triton_utils import round_half_even

    try:
        from triton.language.extra import libdevice
    except ImportError:  # pragma: no cover
        libdevice = None

    @triton.jit
    def _gptq_columns_kernel(W_ptr, Q_ptr, C_ptr, E_ptr, H_ptr, S_ptr, Z_ptr, n_rows, n_cols,
                             stride_w, stride_q, stride_e, stride_h, stride_s, lo, hi,
                             SYM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                             USE_RINT: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < n_rows
        cmask = cols < n_cols
        tile = tl.load(W_ptr + rows[:, None] * stride_w + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                       other=0.0)
        for i in range(0, BLOCK_C):  # constant bounds (columns past n_cols masked): the interpreter needs them
            live = rmask & (i < n_cols)
            w = tl.sum(tl.where(cols[None, :] == i, tile, 0.0), axis=1)
            s = tl.load(S_ptr + rows * stride_s + i, mask=live, other=1.0)
            if SYM:
                v = tl.math.div_rn(w, s)
            else:
                z = tl.load(Z_ptr + rows * stride_s + i, mask=live, other=0.0)
                v = tl.math.div_rn(w, s) + z
            if USE_RINT:
                r = libdevice.rint(v)
            else:
                r = round_half_even(v)
            q = tl.minimum(tl.maximum(r, lo), hi)
            if SYM:
                qw = q * s
            else:
                qw = (q - z) * s
            d = tl.load(H_ptr + i * stride_h + i, mask=i < n_cols, other=1.0)
            err = tl.math.div_rn(w - qw, d)
            h = tl.load(H_ptr + i * stride_h + cols, mask=cmask & (cols >= i) & (i < n_cols), other=0.0)
            tile = tile - err[:, None] * h[None, :]
            tl.store(Q_ptr + rows * stride_q + i, qw, mask=live)
            tl.store(C_ptr + rows * stride_q + i, q, mask=live)
            tl.store(E_ptr + rows * stride_e + i, err, mask=live)


def gptq_columns_(W1: torch.Tensor, Hinv1: torch.Tensor, S1: torch.Tensor, Z1: torch.Tensor | None,
                  lo: float, hi: float, Q1: torch.Tensor, C1: torch.Tensor, Err1: torch.Tensor) -> None:
    """One lazy-batch block of GPTQ's column loop: W1 [rows, b] (read, not written), Hinv1 [b, b],
    per-column scales S1 / zero points Z1 [rows, b] (Z1 None: symmetric); writes the quantized
    values Q1, codes C1 (as floats) and scaled errors Err1, all [rows, b] fp32 with unit column stride."""
    rows, b = W1.shape
    for t in (W1, Hinv1, S1, Q1, C1, Err1) + ((Z1,) if Z1 is not None else ()):
        if t.dtype != torch.float32 or t.stride(-1) != 1:
            raise ValueError("gptq_columns_ takes float32 tensors with unit column stride")
    if S1.shape != (rows, b) or Hinv1.shape != (b, b) or (Z1 is not None and Z1.stride() != S1.stride()):
        raise ValueError("gptq_columns_: S1 / Z1 must be [rows, b] with one stride, Hinv1 [b, b]")
    interpreted = W1.device.type == "cpu"
    grid = (triton.cdiv(rows, BLOCK_R),)
    _gptq_columns_kernel[grid](
        W1, Q1, C1, Err1, Hinv1, S1, Z1 if Z1 is not None else S1, rows, b,
        W1.stride(0), Q1.stride(0), Err1.stride(0), Hinv1.stride(0), S1.stride(0), float(lo), float(hi),
        SYM=Z1 is None, BLOCK_R=BLOCK_R, BLOCK_C=max(16, triton.next_power_of_2(b)),
        USE_RINT=not interpreted and libdevice is not None, num_warps=4,
        **({} if interpreted else {"enable_fp_fusion": False}))
