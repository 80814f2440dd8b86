"""Fused online Hadamard + per-token asymmetric 4-bit quantization + packing (one Triton kernel).

What it computes, per row (token) of ``x [M, N]``, with ``clip = clip_ratio``:

    r      = round_to_input_dtype(x @ hadamard_matrix(N))          # the fake-quant path's value
    scale, zero = compute_qparams(r, QuantSpec(4, symmetric=False, clip_ratio=clip))
    codes  = pack_int4(quantize(r, scale, zero, spec))             # uint8 [M, N / 2]

i.e. exactly what `QLinear` does today with an `OnlineHadamard` rotation and a per-token
asymmetric 4-bit input quantizer, but writing integer codes instead of dequantized floats.
`hadamard_quantize_pack_reference` is that torch composition, beside the kernel.

Design choices:

* **One program holds whole rows.**  Per-token min/max needs the full rotated row before the
  first code is written, so a program loads ``BLOCK_M`` complete rows (viewed as
  ``[BLOCK_M, KP, P]`` with ``N = K * P``, ``KP`` = K padded to a power of two because Triton
  tensors have power-of-two shapes; padded rows of H_K are zero so padding stays zero and does
  not move min/max, which are widened to contain 0 anyway).
* **Hadamard on tensor cores, HadaCore style, two layouts.**  ``H_N = H_K (x) S_F1 (x) S_F2 (x)
  S_F3`` with Sylvester blocks ``S_F`` (16 <= F <= 128: `tl.dot` needs K >= 16).  "3d": each
  factor is one `tl.dot` on the axis it acts on; as in `hadamard._transform` the contracted axis
  is rotated to the front after each power-of-two stage (a permute: a shared-memory layout
  conversion), so after all stages the order is natural again.  "2d": a token as a 2D tile X,
  ``x @ (L (x) S) = L^T X S``: two plain dots, no permutes (widths `layout_2d` accepts; 1.2-1.7x
  faster on the H200).  H_K (or L) is applied first, on the raw input, so the expensive dense
  factor runs once (not split, below).  "blocks": the 2d computation with the left factor as one
  GEMM over T tokens side by side (L^T read once per T tokens instead of once per token) and L^T
  cut into power-of-two blocks (172 -> 128 + 64 instead of 256), `layout_blocks`.
* **Decode: a token over several SMs ("split").**  One program per token is a latency chain on one
  SM (~12 us at 11008).  Up to `DECODE_TOKENS` tokens the token tile is cut into row blocks of 16:
  each program reads the whole X (the left factor mixes all rows), computes its rows and their
  min / max; a second launch quantizes each block with the token's min / max (no cross-program
  waiting inside a launch, which the interpreter and Triton cannot do safely).
* **Precision: fp16 hi/lo split with a power-of-two row prescale.**  Entries of H are +-1, so
  the products are exact; only the representation of the operand rounds.  Each row is scaled by
  a power of two so that max|x| < 1 (exact); a bf16 / fp16 input is then exact in fp16 (except
  values below 2^-17 of the row maximum) and the first stage is a single fp16 dot; later stages
  see fp32 partial sums, split as ``hi = fp16(y)``, ``lo = fp16(y - hi)`` (22 significant bits)
  and run as two dots with fp32 accumulation.  The growth through the stages is at most N <= 2^15
  and fits fp16's range.  (bf16 dots would lose 16 bits; Triton's "tf32x3" costs 3 dots at half
  rate; the interpreter cannot run bf16 dots at all.)
* **Quantization is bit-exact with `primitives`.**  Same expressions in the same order (fp32):
  ``lo = min(x, 0) * clip; scale = (max(x, 0) * clip - lo) / 15``, zero point rounded half up,
  ``round(x / scale + zero)`` half to even, the IEEE quotient (compiled: a reciprocal and two FMAs
  that give its bits, `_quotient`) and no FMA contraction elsewhere (``enable_fp_fusion=False``);
  ``/ 15`` as PyTorch computes it on x's device (`_asym4_qparams`).  Given the same rotated values the codes are identical; the
  Hadamard itself differs from the torch one only by fp32 summation order, which can flip a
  code by one where a value sits on a rounding boundary (measured in the tests / benchmark).
* Codes are packed like `pack_int4` (element 2i in the low nibble), scale / zero are fp32 [M].
* Speed on the H200 (docs/KERNELS.md 1f): with the Hadamard 15-35 % of copy bandwidth (its small
  per-token dots); without it (quantize + pack only) 77-83 %.  Section 1g (session 35, an H100): the
  blocks kernel's right factor as fp32 butterflies in registers (`_butterfly`) instead of a split dot,
  1.1-2.1x faster at 1536-28672 wide except 4096 (equal).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from ..hadamard import _base_matrix, fast_hadamard_transform, hadamard_factorization
from ..quant.primitives import QuantSpec, compute_qparams, pack_int4, quantize
from . import pdl_kwargs, require_triton
from ..triton_utils import round_half_even, round_to_bf16, wait_for_prior_grid

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - exercised only without triton
    triton = tl = libdevice = None

__all__ = ["PackedActivations", "hadamard_quantize_pack", "hadamard_quantize_pack_reference", "layout_2d",
           "layout_blocks", "rmsnorm_quantize_pack", "rmsnorm_quantize_pack_reference", "stage_sizes"]

_MAX_ELEMS_PER_PROGRAM = 32768


# up to this many tokens (decode) "auto" picks for latency, not throughput (run 17, below)
DECODE_TOKENS = 8
# above DECODE_TOKENS and up to this many, "auto" keeps one token a program (session 39, an H100, 16-128 tokens:
# the throughput configs' 2-4 tokens a program left most of the SMs idle and took 1.5-2.9x the time; above 128
# not measured, so the throughput configs stand there)
SMALL_BATCH_TOKENS = 128

# `_quotient`'s reciprocal + FMA division, bit-equal to the IEEE one: None = wherever the kernels are
# compiled (the interpreter's fma rounds twice); True / False force it (tests that give the
# interpreter an exact fma, the lab's A/B timings)
FMA_DIVISION: bool | None = None

# the blocks kernel's right factor S_C: None = the call's choice (`_auto_variant`: the butterfly at
# throughput sizes); True / False force `_butterfly` (log2(C) stages of fp32 adds in registers) or the split
# fp16 dot on tensor cores, for A/B timings (lab/device/jobs/session35_butterfly*.py)
RIGHT_BUTTERFLY: bool | None = None


def _fma_division() -> bool:
    return os.environ.get("TRITON_INTERPRET") != "1" if FMA_DIVISION is None else FMA_DIVISION


def _auto_variant(n: int, rotate: bool, tokens: int | None = None) -> dict:
    """hadamard_quantize_pack's keyword arguments for variant="auto": the fastest on the H200
    (docs/KERNELS.md section 1).  Up to DECODE_TOKENS tokens: above 4096 wide, the split kernel, a
    token over several SMs (run 22, section 1d: 5.6-7.7 us a call at 4864-28672 wide, where one
    program per token took 6.5-24 us); else (run 17) one token per program, 8 warps from 8192 wide,
    wherever the throughput choice below is the blocks or the 2d kernel (3.4-6.6x faster at 4096 /
    8192 than that choice).  Up to SMALL_BATCH_TOKENS (session 39): the throughput choice with one token a
    program, or the split kernel up to 16 tokens above 8192 wide.  Throughput choice (more tokens): the blocks
    kernel wherever `layout_blocks` applies from 1536 wide (run 48, with section 1f's division: 1.04-1.84x
    the choices before), since session 35 with its right factor as a butterfly (section 1g, H100: 1.1-2.1x
    the split dot, equal at 4096); its token tile [KA + KB, C] picks the launch config, each its tile's
    fastest in section 1g's sweep; the 3d kernel where no layout applies (below 1536: not measured)."""
    if tokens is not None and tokens <= DECODE_TOKENS:
        if rotate and n > 4096 and layout_blocks(n) is not None:  # run 22: 1.1-3.1x the choices below
            return dict(variant="split", num_warps=4 if n <= 11008 else 8, rows_per_program=1)
        auto = _auto_variant(n, rotate)
        warps = 8 if n >= 8192 else 4
        if auto["variant"] in ("blocks", "2d") and layout_blocks(n) is not None:
            return dict(variant="blocks", num_warps=warps, rows_per_program=1)
        if rotate and auto["variant"] == "3d" and n > 16384:  # 28672: 8 warps 24.4 us, auto's 27.4 us
            return dict(auto, num_warps=8)
        return auto
    if tokens is not None and tokens <= SMALL_BATCH_TOKENS:
        if rotate and n > 8192 and tokens <= 16 and layout_blocks(n) is not None:
            # session 39 (H100, 16 tokens): the split kernel 0.78-0.87x one token a program's time at 11008 /
            # 14336 / 28672; equal at 32; at 4096 / 8192 one token a program wins at every count
            return dict(variant="split", num_warps=4, rows_per_program=1)
        auto = _auto_variant(n, rotate)
        return dict(auto, rows_per_program=1, groups=1) if auto["variant"] == "blocks" else auto
    blay = layout_blocks(n) if rotate and n >= 1536 else None
    if blay is not None:  # run 48: the blocks kernel at every width it supports, by the size of its token tile
        r, ka, kb, c = blay
        tile = (ka + kb) * c
        # session 35 (KERNELS.md 1g, an H100): the right factor as a butterfly, 1.1-2.1x the split dot
        # with these launch configs (equal at 4096); each config is its tile's fastest in that sweep
        bf = dict(variant="blocks", butterfly=True)
        if tile <= 2048:  # 1536 = 12 * 128
            return dict(bf, num_warps=2, rows_per_program=1, groups=1)
        if tile <= 8192:  # 4096, 8192: four tiles a program; 4864 (76 * 64): one
            return dict(bf, num_warps=4, rows_per_program=1, groups=4 if kb == 0 else 1)
        if tile <= 12288:  # 8960, 11008: two tokens a tile
            return dict(bf, num_warps=4, rows_per_program=2, groups=1)
        if tile <= 16384:  # 16384 (128 x 128) on 8 warps, 14336 (64 + 64 rows) on 4
            return dict(bf, num_warps=8 if kb == 0 else 4, rows_per_program=1, groups=1)
        return dict(bf, num_warps=8, rows_per_program=1, groups=1)
    lay = layout_2d(n) if rotate else None
    if lay is None or n < 4096:
        return dict(variant="3d", num_warps=None, rows_per_program=1)
    r, rp, c = lay  # here a power of two: r == rp
    return dict(variant="2d", num_warps=4 if rp * c <= 8192 else 8, rows_per_program=4)


@dataclass
class PackedActivations:
    """Per-token asymmetric 4-bit activations: codes packed two per byte, fp32 scale / zero."""

    codes: torch.Tensor  # uint8 [M, N / 2]
    scale: torch.Tensor  # float32 [M]
    zero: torch.Tensor  # float32 [M], integers in [0, 15]
    n: int  # unpacked width N


def stage_sizes(p: int) -> tuple[int, ...]:
    """Split the Sylvester order p = 2**m into blocks 2**a with 4 <= a <= 7, few and balanced."""
    m = p.bit_length() - 1
    if p != 1 << m or m < 4:
        raise ValueError(f"power-of-two factor {p} of the Hadamard size must be >= 16 for the kernel")
    t = max(1, m // 4)
    q, r = divmod(m, t)
    parts = [q + (i < r) for i in range(t)]
    if max(parts) > 7 or len(parts) > 3:
        raise ValueError(f"power-of-two factor {p} is too large for the kernel (at most 2**15)")
    return tuple(1 << a for a in parts)


@functools.lru_cache(maxsize=64)
def _factor_tensors(n: int, device: torch.device):
    """(H_K padded to KP x KP, [S_F ...]) as fp16 tensors of +-1 on `device`."""
    k, p = hadamard_factorization(n)
    kp = 1 << (k - 1).bit_length() if k > 1 else 1
    hk = torch.zeros(max(kp, 1), max(kp, 1), dtype=torch.float16)
    hk[:k, :k] = torch.from_numpy(_base_matrix(k).astype("float32"))
    sylv = []
    for f in stage_sizes(p):
        h = torch.ones(1, 1)
        while h.shape[0] < f:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        sylv.append(h.to(device=device, dtype=torch.float16).contiguous())
    return hk.to(device).contiguous(), sylv


if triton is not None:

    @triton.jit
    def _pow2_stage(y, s_ptr, R: tl.constexpr, L: tl.constexpr, F: tl.constexpr, SPLIT: tl.constexpr):
        """[R, L] fp32 -> contract the last log2(F) index bits with S_F, rotate them to the front."""
        y = tl.reshape(y, (R * (L // F), F))
        f = tl.arange(0, F)
        s = tl.load(s_ptr + f[:, None] * F + f[None, :])
        hi = y.to(tl.float16)
        z = tl.dot(hi, s, out_dtype=tl.float32)
        if SPLIT:
            lo = (y - hi.to(tl.float32)).to(tl.float16)
            z = tl.dot(lo, s, z, out_dtype=tl.float32)
        z = tl.reshape(z, (R, L // F, F))
        z = tl.permute(z, (0, 2, 1))
        return tl.reshape(z, (R, L))

    @triton.jit
    def _asym4_qparams(xmin, xmax, clip_ratio, RECIP: tl.constexpr):
        """primitives._qparams_from_stats for 4-bit asymmetric, same fp32 expressions and order.

        RECIP: ``/ 15`` as a multiplication by fp32(1/15), which is what PyTorch's CUDA division by
        a Python scalar computes (its CPU path divides); chosen to match the torch path on the
        device the kernel runs on."""
        xmin = tl.minimum(xmin, 0.0)
        xmax = tl.maximum(xmax, 0.0)
        lo = xmin * clip_ratio
        if RECIP:
            scale = (xmax * clip_ratio - lo) * (1.0 / 15.0)
        else:
            scale = tl.math.div_rn(xmax * clip_ratio - lo, tl.full(lo.shape, 15.0, tl.float32))
        scale = tl.where(scale > 0, scale, 1.0)
        f = tl.math.div_rn(-lo, scale)
        fl = tl.math.floor(f)
        zero = fl + ((f - fl) >= 0.5).to(tl.float32)  # half up, as primitives
        zero = tl.minimum(tl.maximum(zero, 0.0), 15.0)
        return scale, zero

    @triton.jit
    def _quotient(y, scale, FMA_DIV: tl.constexpr):
        """y / scale rounded once (IEEE, as torch divides); scale one value per row (positive),
        broadcastable to y.

        FMA_DIV (compiled only: the interpreter's fma rounds twice): Markstein's division by a
        reciprocal, per row sigma = the power of two that brings the scale to s1 in [1, 2) and rho =
        RN(1 / s1), per element y1 = y * sigma (exact: |y| <= 15 * scale / clip), q0 = RN(y1 * rho),
        the remainder y1 - q0 * s1 (exact in an FMA), q0 + remainder * rho rounded once = RN(y1 / s1) =
        RN(y / scale).  Four instructions where `div.rn.f32` is a subroutine of about ten with a
        slow-path branch, and the kernels are instruction-bound (docs/KERNELS.md 1f).  Scaling every
        row keeps the remainder clear of underflow without a branch (a per-tile branch to the
        unscaled three-instruction form cost registers: 84 against 52 at 16384 wide, half the
        occupancy).  Quotients below 2^-20, where the remainder of a subnormal y can round, give the
        code of 0 either way.  Non-finite scales (inf / NaN inputs) give codes as meaningless as
        torch's, not the same ones."""
        if FMA_DIV:
            e = tl.minimum(tl.maximum((scale.to(tl.int32, bitcast=True) >> 23) & 0xFF, 1), 253)
            sigma = ((254 - e) << 23).to(tl.float32, bitcast=True)  # 2^(127 - e)
            s1 = scale * sigma
            rho = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), s1)
            y1 = y * tl.broadcast_to(sigma, y.shape)
            q0 = y1 * rho
            # -s1 per row, not -q0 per element: a negation is an instruction of its own (0 - x)
            r = tl.fma(q0, tl.broadcast_to(-s1, y.shape), y1)
            return tl.fma(r, tl.broadcast_to(rho, y.shape), q0)
        return tl.math.div_rn(y, tl.broadcast_to(scale, y.shape))

    @triton.jit
    def _codes(y, scale, zero, USE_RINT: tl.constexpr, FMA_DIV: tl.constexpr = False):
        """round(y / scale + zero) half to even, clamped to [0, 15], uint32 (packed in 32-bit lanes, cast
        to bytes when stored; scale / zero one value per row, broadcastable to y).

        USE_RINT: one cvt.rni instruction (compiled); else the exact floor-based helper (interpreter).
        FMA_DIV: the division by `_quotient`'s reciprocal and FMA correction (same bits)."""
        v = _quotient(y, scale, FMA_DIV) + zero
        if USE_RINT:  # cvt.rni.u32: half to even, and negatives / NaN to 0 (a clamp for free)
            return tl.minimum(libdevice.float2uint_rn(v), tl.full((1,), 15, tl.uint32))  # unsigned min
        r = round_half_even(v)
        return tl.minimum(tl.maximum(r, 0.0), 15.0).to(tl.uint32)

    @triton.jit
    def _centered_byte(q, zero, PLANAR: tl.constexpr):
        """q - zero (an integer in [-15, 15]) as the byte of an int8 (PLANAR 1) or e4m3 (PLANAR 2)."""
        c = q.to(tl.float32) - zero
        if PLANAR == 1:
            return c.to(tl.int8).to(tl.uint8, bitcast=True)
        return c.to(tl.float16).to(tl.float8e4nv).to(tl.uint8, bitcast=True)

    @triton.jit
    def _store_code_pairs(cptr, q_lo, q_hi, zb, HALF: tl.constexpr, mask, PLANAR: tl.constexpr):
        """Codes of features 2i (q_lo) and 2i + 1 (q_hi): packed into one byte (pack_int4), or PLANAR
        (w4a4_gemm A8) even features then, HALF bytes on, odd ones, centered, one byte each."""
        if PLANAR:
            tl.store(cptr, _centered_byte(q_lo, zb, PLANAR), mask=mask)
            tl.store(cptr + HALF, _centered_byte(q_hi, zb, PLANAR), mask=mask)
        else:
            tl.store(cptr, q_lo + q_hi * 16, mask=mask)

    @triton.jit
    def _prescale(amax):
        """Powers of two (pre, post = 1 / pre) with amax * pre < 1: exact scalings."""
        e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
        pre = ((253 - e) << 23).to(tl.float32, bitcast=True)
        post = ((e + 1) << 23).to(tl.float32, bitcast=True)
        return pre, post

    @triton.jit
    def _unscale_round(y, post, inv_sqrt_n, ROUND_BF16: tl.constexpr, ROUND_FP16: tl.constexpr):
        """Undo the row prescale (``post``, broadcast to y), normalise by 1/sqrt(N), and round to the
        model dtype as the fake-quant path does with the rotated activations."""
        return _round_model((y * post) * inv_sqrt_n, ROUND_BF16, ROUND_FP16)

    @triton.jit
    def _round_model(y, ROUND_BF16: tl.constexpr, ROUND_FP16: tl.constexpr):
        """fp32 -> the model dtype -> fp32 (bf16 / fp16; fp32 models: unchanged)."""
        if ROUND_BF16:
            y = round_to_bf16(y)
        if ROUND_FP16:
            y = y.to(tl.float16).to(tl.float32)
        return y

    @triton.jit
    def _split_dot(a, b, acc, A_IS_DATA: tl.constexpr, SPLIT: tl.constexpr):
        """acc + a @ b with the fp32 data operand as fp16 hi (+ lo when SPLIT); H operand fp16 +-1."""
        if A_IS_DATA:
            hi = a.to(tl.float16)
            acc = tl.dot(hi, b, acc, out_dtype=tl.float32)
            if SPLIT:
                acc = tl.dot((a - hi.to(tl.float32)).to(tl.float16), b, acc, out_dtype=tl.float32)
        else:
            hi = b.to(tl.float16)
            acc = tl.dot(a, hi, acc, out_dtype=tl.float32)
            if SPLIT:
                acc = tl.dot(a, (b - hi.to(tl.float32)).to(tl.float16), acc, out_dtype=tl.float32)
        return acc

    @triton.jit
    def _hadamard_quant_2d_kernel(
        x_ptr, left_ptr, right_ptr, codes_ptr, scale_ptr, zero_ptr,
        M, stride_xm, stride_cm, clip_ratio, inv_sqrt_n,
        R: tl.constexpr, RP: tl.constexpr, C: tl.constexpr, ROWS: tl.constexpr,
        SPLIT_FIRST: tl.constexpr, ROUND_BF16: tl.constexpr, ROUND_FP16: tl.constexpr, RECIP: tl.constexpr,
        USE_RINT: tl.constexpr, PLANAR: tl.constexpr = 0,
        FMA_DIV: tl.constexpr = False, PDL: tl.constexpr = False,
    ):
        """One token at a time as a 2D tile X [RP, C] (feature n = r * C + c, rows r >= R padded):
        x @ (L (x) S_C) = L^T X S_C, two plain dots and no permutes (L = H_K, or S_R when N is a
        power of two).  `left_ptr` holds L^T padded to [RP, RP]; ROWS tokens per program."""
        wait_for_prior_grid(PDL)
        pid = tl.program_id(0)
        r = tl.arange(0, RP)
        c = tl.arange(0, C)
        offs = r[:, None] * C + c[None, :]
        pr = tl.arange(0, RP)
        lt = tl.load(left_ptr + pr[:, None] * RP + pr[None, :])
        rt = tl.load(right_ptr + c[:, None] * C + c[None, :])
        poffs = r[:, None] * (C // 2) + tl.arange(0, C // 2)[None, :]
        for i in range(ROWS):
            row = pid * ROWS + i
            valid = (r[:, None] < R) & (c[None, :] < C) & (row < M)
            x = tl.load(x_ptr + row.to(tl.int64) * stride_xm + offs, mask=valid, other=0.0).to(tl.float32)
            pre, post = _prescale(tl.max(tl.max(tl.abs(x), axis=1), axis=0))
            y = x * pre
            # left factor first, on the (exact in fp16) input; then the right one, split
            y = _split_dot(lt, y, tl.zeros((RP, C), dtype=tl.float32), False, SPLIT_FIRST)
            y = _split_dot(y, rt, tl.zeros((RP, C), dtype=tl.float32), True, True)
            y = _unscale_round(y, post, inv_sqrt_n, ROUND_BF16, ROUND_FP16)
            y = tl.where(valid, y, 0.0)
            scale, zero = _asym4_qparams(tl.min(tl.min(y, axis=1), axis=0), tl.max(tl.max(y, axis=1), axis=0),
                                         clip_ratio, RECIP)
            q = _codes(y, scale, zero, USE_RINT, FMA_DIV)
            q_lo, q_hi = tl.split(tl.reshape(q, (RP, C // 2, 2)))
            cptr = codes_ptr + row.to(tl.int64) * stride_cm + poffs
            if PLANAR:  # even features, then odd ones, centered, one byte each (w4a4_gemm A8)
                tl.store(cptr, _centered_byte(q_lo, zero, PLANAR), mask=(r[:, None] < R) & (row < M))
                tl.store(cptr + (R * C) // 2, _centered_byte(q_hi, zero, PLANAR), mask=(r[:, None] < R) & (row < M))
            else:
                tl.store(cptr, q_lo + q_hi * 16, mask=(r[:, None] < R) & (row < M))
            tl.store(scale_ptr + row, scale, mask=row < M)
            tl.store(zero_ptr + row, zero, mask=row < M)

    @triton.jit
    def _load_square_block(ptr, LD: tl.constexpr, R0: tl.constexpr, C0: tl.constexpr, RB: tl.constexpr,
                           CB: tl.constexpr):
        i = tl.arange(0, RB)
        j = tl.arange(0, CB)
        return tl.load(ptr + (R0 + i)[:, None] * LD + (C0 + j)[None, :])

    @triton.jit
    def _butterfly(y, ROWS: tl.constexpr, C: tl.constexpr, LOG_C: tl.constexpr):
        """y [ROWS, C] fp32 times the Sylvester S_C (entries +-1) as LOG_C radix-2 stages of fp32 adds:
        each stage takes the top index bit, adds and subtracts the two halves, and joins the result back
        as the lowest bit (a perfect shuffle), so after LOG_C stages the order is natural again.  No
        tensor cores and no fp16 hi / lo split: one add per element a stage, each rounded once in fp32
        (the split dot keeps 22 bits of each partial sum; the codes agree but for rounding ties)."""
        for _ in tl.static_range(LOG_C):
            a, b = tl.split(tl.permute(tl.reshape(y, (ROWS, 2, C // 2)), (0, 2, 1)))
            y = tl.reshape(tl.join(a + b, a - b), (ROWS, C))
        return y

    @triton.jit
    def _right_factor(y, rt, post, inv_sqrt_n, RB: tl.constexpr, T: tl.constexpr, C: tl.constexpr,
                      ROUND_BF16: tl.constexpr, ROUND_FP16: tl.constexpr, LOG_C: tl.constexpr = 0):
        """[RB, T * C] (columns token-major) -> [RB, T, C]: each token's C-slice times S_C (a split dot,
        or with LOG_C > 0 `_butterfly`), the row prescale undone, the 1/sqrt(N) normalisation, the model
        dtype's rounding."""
        if LOG_C > 0:
            y = _butterfly(tl.reshape(y, (RB * T, C)), RB * T, C, LOG_C)
        else:
            y = _split_dot(tl.reshape(y, (RB * T, C)), rt, tl.zeros((RB * T, C), dtype=tl.float32), True, True)
        return _unscale_round(tl.reshape(y, (RB, T, C)), post[None, :, None], inv_sqrt_n, ROUND_BF16, ROUND_FP16)

    @triton.jit
    def _store_codes(q, zero, codes_ptr, tok, stride_cm, r0, RB: tl.constexpr, T: tl.constexpr,
                     C: tl.constexpr, R: tl.constexpr, M, PLANAR: tl.constexpr):
        """q [RB, T, C] (rows r0 + i of the [R, C] token tile) packed like `pack_int4` (or planar)."""
        q_lo, q_hi = tl.split(tl.reshape(q, (RB, T, C // 2, 2)))
        r = r0 + tl.arange(0, RB)
        c2 = tl.arange(0, C // 2)
        cptr = (codes_ptr + tok.to(tl.int64)[None, :, None] * stride_cm + r[:, None, None] * (C // 2)
                + c2[None, None, :])
        mask = (r[:, None, None] < R) & (tok[None, :, None] < M)
        if PLANAR:  # even features, then odd ones, centered, one byte each (w4a4_gemm A8)
            zb = zero[None, :, None]
            tl.store(cptr, _centered_byte(q_lo, zb, PLANAR), mask=mask)
            tl.store(cptr + (R * C) // 2, _centered_byte(q_hi, zb, PLANAR), mask=mask)
        else:
            tl.store(cptr, q_lo + q_hi * 16, mask=mask)

    @triton.jit
    def _hadamard_quant_blocks_kernel(
        x_ptr, left_ptr, right_ptr, codes_ptr, scale_ptr, zero_ptr,
        M, stride_xm, stride_cm, clip_ratio, inv_sqrt_n,
        R: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, C: tl.constexpr, T: tl.constexpr,
        GROUPS: tl.constexpr, SPLIT_FIRST: tl.constexpr, ROUND_BF16: tl.constexpr,
        ROUND_FP16: tl.constexpr, RECIP: tl.constexpr, USE_RINT: tl.constexpr, PLANAR: tl.constexpr = 0,
        FMA_DIV: tl.constexpr = False, PDL: tl.constexpr = False, LOG_C: tl.constexpr = 0,
        LATE_LEFT: tl.constexpr = False,
    ):
        """`_hadamard_quant_2d_kernel` with the left factor as a GEMM over T tokens at once and
        its padding cut (run 10, docs/KERNELS.md section 1):

        * T tokens side by side, ``[L^T X_1 S | ... | L^T X_T S]``: the left dot is
          ``L^T @ [X_1 | ... | X_T]`` (N = T * C), so L^T is read once per T tokens, not per token
          (the 2d kernel read a 256 x 256 fp16 H_172 from L2 for every 22 KB token of 11008).
        * L^T of order R split into power-of-two blocks KA + KB (172 -> 128 + 64, 140 -> 128 + 16,
          76 -> 64 + 16) instead of one padded to the next power of two (256, 256, 128): 1.8-3.2x
          fewer tensor-core MACs; rows R.. of the B block are zero (L^T's padding) and masked.
        GROUPS tiles of T tokens per program reuse the loaded L^T blocks.  Measured (run 10): the
        padding cut is what paid (1.5-2.3x at 4864 / 8960 / 11008); T > 1 and GROUPS > 1 did not
        (re-reading L^T was not the limit)."""
        wait_for_prior_grid(PDL)
        pid = tl.program_id(0)
        LD: tl.constexpr = KA + KB
        if not LATE_LEFT:
            laa = _load_square_block(left_ptr, LD, 0, 0, KA, KA)
        if LOG_C > 0:
            rt = 0.0  # the butterflies need no S_C (which is a 1 x 1 stand-in for a wide right factor)
        else:
            rt = _load_square_block(right_ptr, C, 0, 0, C, C)
        ta = tl.arange(0, T)
        ra = tl.arange(0, KA)
        c = tl.arange(0, C)
        offs_a = ra[:, None, None] * C + c[None, None, :]  # [KA, 1, C]
        if KB > 0:
            if not LATE_LEFT:
                lab = _load_square_block(left_ptr, LD, 0, KA, KA, KB)
                lba = _load_square_block(left_ptr, LD, KA, 0, KB, KA)
                lbb = _load_square_block(left_ptr, LD, KA, KA, KB, KB)
            rb = KA + tl.arange(0, KB)
            offs_b = rb[:, None, None] * C + c[None, None, :]  # [KB, 1, C]
        for g in range(GROUPS):
            tok = (pid * GROUPS + g) * T + ta  # [T]
            base = tok.to(tl.int64)[None, :, None] * stride_xm
            tmask = tok[None, :, None] < M
            xa = tl.load(x_ptr + base + offs_a, mask=tmask & (ra[:, None, None] < R), other=0.0).to(tl.float32)
            amax = tl.max(tl.max(tl.abs(xa), axis=2), axis=0)  # [T]
            if KB > 0:
                xb = tl.load(x_ptr + base + offs_b, mask=tmask & (rb[:, None, None] < R), other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.max(tl.max(tl.abs(xb), axis=2), axis=0))
            pre, post = _prescale(amax)
            # left factor first, on the (exact in fp16) input, as one GEMM over the T tokens
            xa2 = tl.reshape(xa * pre[None, :, None], (KA, T * C))
            if LATE_LEFT:  # each block of L^T loaded where it is used, so no two are live at once
                laa = _load_square_block(left_ptr, LD, 0, 0, KA, KA)
            ya = _split_dot(laa, xa2, tl.zeros((KA, T * C), dtype=tl.float32), False, SPLIT_FIRST)
            if KB > 0:
                xb2 = tl.reshape(xb * pre[None, :, None], (KB, T * C))
                if LATE_LEFT:
                    lab = _load_square_block(left_ptr, LD, 0, KA, KA, KB)
                ya = _split_dot(lab, xb2, ya, False, SPLIT_FIRST)
                if LATE_LEFT:
                    lba = _load_square_block(left_ptr, LD, KA, 0, KB, KA)
                yb = _split_dot(lba, xa2, tl.zeros((KB, T * C), dtype=tl.float32), False, SPLIT_FIRST)
                if LATE_LEFT:
                    lbb = _load_square_block(left_ptr, LD, KA, KA, KB, KB)
                yb = _split_dot(lbb, xb2, yb, False, SPLIT_FIRST)
            ya = _right_factor(ya, rt, post, inv_sqrt_n, KA, T, C, ROUND_BF16, ROUND_FP16, LOG_C)
            ya = tl.where(ra[:, None, None] < R, ya, 0.0)
            ymin = tl.min(tl.min(ya, axis=2), axis=0)
            ymax = tl.max(tl.max(ya, axis=2), axis=0)
            if KB > 0:
                yb = _right_factor(yb, rt, post, inv_sqrt_n, KB, T, C, ROUND_BF16, ROUND_FP16, LOG_C)
                yb = tl.where(rb[:, None, None] < R, yb, 0.0)
                ymin = tl.minimum(ymin, tl.min(tl.min(yb, axis=2), axis=0))
                ymax = tl.maximum(ymax, tl.max(tl.max(yb, axis=2), axis=0))
            scale, zero = _asym4_qparams(ymin, ymax, clip_ratio, RECIP)
            q = _codes(ya, scale[None, :, None], zero[None, :, None], USE_RINT, FMA_DIV)
            _store_codes(q, zero, codes_ptr, tok, stride_cm, 0, KA, T, C, R, M, PLANAR)
            if KB > 0:
                q = _codes(yb, scale[None, :, None], zero[None, :, None], USE_RINT, FMA_DIV)
                _store_codes(q, zero, codes_ptr, tok, stride_cm, KA, KB, T, C, R, M, PLANAR)
            tl.store(scale_ptr + tok, scale, mask=tok < M)
            tl.store(zero_ptr + tok, zero, mask=tok < M)

    @triton.jit
    def _hadamard_split_kernel(
        x_ptr, left_ptr, right_ptr, ws_ptr, mm_ptr, stride_xm, inv_sqrt_n,
        R: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, C: tl.constexpr, RB: tl.constexpr,
        NBP: tl.constexpr, SPLIT_FIRST: tl.constexpr, ROUND_BF16: tl.constexpr, ROUND_FP16: tl.constexpr,
        PDL: tl.constexpr = False, LOG_C: tl.constexpr = 0,
    ):
        """The split variant's first pass (decode: the blocks kernel runs a token on one SM, a
        latency chain of ~12 us at 11008, docs/KERNELS.md 1d).  Program (token, b) computes rows
        b * RB .. of the token tile ``L^T X S_C`` of `layout_blocks` (every program reads the
        whole X, which the left factor mixes) exactly as the blocks kernel does, and writes them
        (rounded to the model dtype, as fp32) and their min / max to workspaces;
        `_quantize_split_kernel` then quantizes with the token's min / max."""
        wait_for_prior_grid(PDL)
        tok = tl.program_id(0)
        blk = tl.program_id(1)
        LD: tl.constexpr = KA + KB
        c = tl.arange(0, C)
        ra = tl.arange(0, KA)
        xrow = x_ptr + tok.to(tl.int64) * stride_xm
        xa = tl.load(xrow + ra[:, None] * C + c[None, :], mask=ra[:, None] < R, other=0.0).to(tl.float32)
        amax = tl.max(tl.max(tl.abs(xa), axis=1), axis=0)
        if KB > 0:
            rb = KA + tl.arange(0, KB)
            xb = tl.load(xrow + rb[:, None] * C + c[None, :], mask=rb[:, None] < R, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.max(tl.abs(xb), axis=1), axis=0))
        pre, post = _prescale(amax)
        i = blk * RB + tl.arange(0, RB)  # this program's rows of L^T
        la = tl.load(left_ptr + i[:, None] * LD + ra[None, :], mask=i[:, None] < LD, other=0.0)
        y = _split_dot(la, xa * pre, tl.zeros((RB, C), dtype=tl.float32), False, SPLIT_FIRST)
        if KB > 0:
            lb = tl.load(left_ptr + i[:, None] * LD + (KA + tl.arange(0, KB))[None, :], mask=i[:, None] < LD,
                         other=0.0)
            y = _split_dot(lb, xb * pre, y, False, SPLIT_FIRST)
        if LOG_C > 0:  # the right factor as `_butterfly` (opt-in here: not timed at decode sizes yet)
            y = _butterfly(y, RB, C, LOG_C)
        else:
            rt = _load_square_block(right_ptr, C, 0, 0, C, C)
            y = _split_dot(y, rt, tl.zeros((RB, C), dtype=tl.float32), True, True)
        y = tl.where(i[:, None] < R, _unscale_round(y, post, inv_sqrt_n, ROUND_BF16, ROUND_FP16), 0.0)
        tl.store(ws_ptr + tok.to(tl.int64) * (NBP * RB * C) + i[:, None] * C + c[None, :], y)
        mm = mm_ptr + (tok * NBP + blk) * 2
        tl.store(mm, tl.min(tl.min(y, axis=1), axis=0))
        tl.store(mm + 1, tl.max(tl.max(y, axis=1), axis=0))

    @triton.jit
    def _quantize_split_kernel(
        ws_ptr, mm_ptr, codes_ptr, scale_ptr, zero_ptr, stride_cm, clip_ratio,
        R: tl.constexpr, C: tl.constexpr, RB: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr,
        RECIP: tl.constexpr, USE_RINT: tl.constexpr, PLANAR: tl.constexpr = 0,
        FMA_DIV: tl.constexpr = False, PDL: tl.constexpr = False,
    ):
        """The split variant's second pass: program (token, b) quantizes and packs rows b * RB ..
        of the token's rotated tile with the min / max of all of them (every program computes the
        same scale and zero point; program 0 stores them)."""
        wait_for_prior_grid(PDL)
        tok = tl.program_id(0)
        blk = tl.program_id(1)
        j = tl.arange(0, NBP)
        mm = mm_ptr + (tok * NBP + j) * 2
        lo = tl.min(tl.load(mm, mask=j < NB, other=0.0), axis=0)  # 0 is in every row's range anyway
        hi = tl.max(tl.load(mm + 1, mask=j < NB, other=0.0), axis=0)
        scale, zero = _asym4_qparams(lo, hi, clip_ratio, RECIP)
        i = blk * RB + tl.arange(0, RB)
        c = tl.arange(0, C)
        y = tl.load(ws_ptr + tok.to(tl.int64) * (NBP * RB * C) + i[:, None] * C + c[None, :])
        q = _codes(y, scale, zero, USE_RINT, FMA_DIV)
        q_lo, q_hi = tl.split(tl.reshape(q, (RB, C // 2, 2)))
        cptr = codes_ptr + tok.to(tl.int64) * stride_cm + i[:, None] * (C // 2) + tl.arange(0, C // 2)[None, :]
        _store_code_pairs(cptr, q_lo, q_hi, zero, (R * C) // 2, i[:, None] < R, PLANAR)
        if blk == 0:
            tl.store(scale_ptr + tok, scale)
            tl.store(zero_ptr + tok, zero)

    @triton.jit
    def _hadamard_quant_kernel(
        x_ptr, hk_ptr, s1_ptr, s2_ptr, s3_ptr, codes_ptr, scale_ptr, zero_ptr,
        M, stride_xm, stride_cm, clip_ratio, inv_sqrt_n,
        K: tl.constexpr, KP: tl.constexpr, P: tl.constexpr, NCOLS: tl.constexpr,
        F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr,
        BLOCK_M: tl.constexpr, ROTATE: tl.constexpr, SPLIT_FIRST: tl.constexpr,
        ROUND_BF16: tl.constexpr, ROUND_FP16: tl.constexpr, RECIP: tl.constexpr,
        USE_RINT: tl.constexpr, PLANAR: tl.constexpr = 0,
        FMA_DIV: tl.constexpr = False, PDL: tl.constexpr = False,
    ):
        wait_for_prior_grid(PDL)
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        a = tl.arange(0, KP)
        b = tl.arange(0, P)
        col = a[:, None] * P + b[None, :]  # [KP, P], row-major index of the N = K * P axis
        # NCOLS < K * P only without rotation (any even width, padded to a power of two)
        valid = (rows[:, None, None] < M) & (a[None, :, None] < K) & (col[None, :, :] < NCOLS)
        x = tl.load(x_ptr + rows[:, None, None].to(tl.int64) * stride_xm + col[None, :, :],
                    mask=valid, other=0.0).to(tl.float32)  # [BLOCK_M, KP, P]

        if ROTATE:
            # power-of-two row prescale: max |y| < 1, exact, undone at the end
            pre, post = _prescale(tl.max(tl.max(tl.abs(x), axis=2), axis=1))
            y = x * pre[:, None, None]
            first_split = SPLIT_FIRST
            if KP > 1:
                # H_K on the K axis: [BM, KP, P] -> [BM * P, KP] @ H_K -> back
                ka = tl.arange(0, KP)
                hk = tl.load(hk_ptr + ka[:, None] * KP + ka[None, :])
                t = tl.reshape(tl.permute(y, (0, 2, 1)), (BLOCK_M * P, KP))
                hi = t.to(tl.float16)
                z = tl.dot(hi, hk, out_dtype=tl.float32)
                if SPLIT_FIRST:
                    z = tl.dot((t - hi.to(tl.float32)).to(tl.float16), hk, z, out_dtype=tl.float32)
                y = tl.permute(tl.reshape(z, (BLOCK_M, P, KP)), (0, 2, 1))
                first_split = True
            y = tl.reshape(y, (BLOCK_M * KP, P))
            y = _pow2_stage(y, s3_ptr, BLOCK_M * KP, P, F3, first_split)
            if F2 > 1:
                y = _pow2_stage(y, s2_ptr, BLOCK_M * KP, P, F2, True)
            if F1 > 1:
                y = _pow2_stage(y, s1_ptr, BLOCK_M * KP, P, F1, True)
            y = tl.reshape(y, (BLOCK_M, KP, P))
            y = _unscale_round(y, post[:, None, None], inv_sqrt_n, ROUND_BF16, ROUND_FP16)
            y = tl.where(valid, y, 0.0)
        else:
            y = x  # masked lanes were loaded as 0

        xmin = tl.min(tl.min(y, axis=2), axis=1)
        xmax = tl.max(tl.max(y, axis=2), axis=1)
        scale, zero = _asym4_qparams(xmin, xmax, clip_ratio, RECIP)

        q = _codes(y, scale[:, None, None], zero[:, None, None], USE_RINT, FMA_DIV)
        # pack: element 2i -> low nibble, 2i + 1 -> high nibble (pack_int4)
        q_lo, q_hi = tl.split(tl.reshape(q, (BLOCK_M, KP, P // 2, 2)))
        pcol = a[:, None] * (P // 2) + tl.arange(0, P // 2)[None, :]
        pvalid = (rows[:, None, None] < M) & (a[None, :, None] < K) & (pcol[None, :, :] < NCOLS // 2)
        cptr = codes_ptr + rows[:, None, None].to(tl.int64) * stride_cm + pcol[None, :, :]
        _store_code_pairs(cptr, q_lo, q_hi, zero[:, None, None], NCOLS // 2, pvalid, PLANAR)
        tl.store(scale_ptr + rows, scale, mask=rows < M)
        tl.store(zero_ptr + rows, zero, mask=rows < M)

    @triton.jit
    def _rmsnorm_quant_kernel(
        x_ptr, g_ptr, codes_ptr, scale_ptr, zero_ptr,
        M, stride_xm, stride_cm, clip_ratio, eps,
        N: tl.constexpr, NP: tl.constexpr, BLOCK_M: tl.constexpr, GAIN: tl.constexpr,
        ROUND_BF16: tl.constexpr, ROUND_FP16: tl.constexpr, RECIP: tl.constexpr,
        USE_RINT: tl.constexpr, PLANAR: tl.constexpr, FMA_DIV: tl.constexpr = False, PDL: tl.constexpr = False,
    ):
        """modules.RMSNorm (Llama style: normalise in fp32, round to the model dtype, times the gain
        in the model dtype) then the 4-bit quantize + pack of `_hadamard_quant_kernel` without the
        Hadamard: the normalised row is never written."""
        wait_for_prior_grid(PDL)
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        col = tl.arange(0, NP)
        valid = (rows[:, None] < M) & (col[None, :] < N)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + col[None, :], mask=valid,
                    other=0.0).to(tl.float32)
        ss = tl.sum(x * x, axis=1)  # fp32, like torch's pow(2).mean(); only the summation order differs
        if RECIP:  # CUDA's mean multiplies the sum by fp32(1 / N), the CPU's divides
            var = ss * (1.0 / N)
        else:
            var = tl.math.div_rn(ss, tl.full(ss.shape, N, tl.float32))
        v = var + eps
        if RECIP:
            r = tl.math.rsqrt(v)  # CUDA's rsqrtf (libdevice), as torch.rsqrt on the GPU
        else:
            r = tl.math.div_rn(tl.full(v.shape, 1.0, tl.float32), tl.math.sqrt_rn(v))  # the CPU's 1 / sqrt
        y = x * r[:, None]
        if ROUND_BF16:
            y = round_to_bf16(y)
        if ROUND_FP16:
            y = y.to(tl.float16).to(tl.float32)
        if GAIN:  # gain * h in the model dtype: the fp32 product of two 16-bit values, rounded once
            g = tl.load(g_ptr + col, mask=col < N, other=0.0).to(tl.float32)
            y = y * g[None, :]
            if ROUND_BF16:
                y = round_to_bf16(y)
            if ROUND_FP16:
                y = y.to(tl.float16).to(tl.float32)
        y = tl.where(valid, y, 0.0)

        xmin = tl.min(y, axis=1)
        xmax = tl.max(y, axis=1)
        scale, zero = _asym4_qparams(xmin, xmax, clip_ratio, RECIP)
        q = _codes(y, scale[:, None], zero[:, None], USE_RINT, FMA_DIV)
        q_lo, q_hi = tl.split(tl.reshape(q, (BLOCK_M, NP // 2, 2)))
        pcol = tl.arange(0, NP // 2)
        pvalid = (rows[:, None] < M) & (pcol[None, :] < N // 2)
        cptr = codes_ptr + rows[:, None].to(tl.int64) * stride_cm + pcol[None, :]
        _store_code_pairs(cptr, q_lo, q_hi, zero[:, None], N // 2, pvalid, PLANAR)
        tl.store(scale_ptr + rows, scale, mask=rows < M)
        tl.store(zero_ptr + rows, zero, mask=rows < M)


def _launch_params(kp: int, p: int, m: int, num_warps: int | None, block_m: int | None):
    elems = kp * p
    if elems > _MAX_ELEMS_PER_PROGRAM:
        raise ValueError(f"row of {elems} padded elements is too wide for one program (max {_MAX_ELEMS_PER_PROGRAM})")
    if block_m is None:
        block_m = max(1, min(64, 4096 // elems))
        block_m = min(block_m, 1 << max(0, (m - 1).bit_length()))
    if num_warps is None:
        num_warps = 4 if block_m * elems <= 4096 else 8 if block_m * elems <= 8192 else 16
    return block_m, num_warps


def _unrotated_warps(n: int, m: int, num_warps: int | None) -> int | None:
    """Warps of the one-row-per-program kernels without a Hadamard (quantize-only, RMSNorm +
    quantize): at decode sizes, from 4096 wide, 16 (run 24, 4096 wide, 1 / 8 tokens: 2.3-2.9 us a
    call, 1.2-1.3x the 4 warps of the throughput rule); else `_launch_params`' rule."""
    if num_warps is None and m <= DECODE_TOKENS and n >= 4096:
        return 16
    return num_warps


def _sylvester16(f: int, device) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < f:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h.to(device=device, dtype=torch.float16).contiguous()


def layout_2d(n: int) -> tuple[int, int, int] | None:
    """(R, RP, C) of the permute-free kernel for width n, or None where it does not apply.

    N = K * P with K > 1 and 16 <= P <= 128: X [K, P], left H_K, right S_P.  N = 2^m with
    8 <= m <= 14: X [2^(m//2), 2^(m - m//2)], left and right Sylvester."""
    k, p = hadamard_factorization(n)
    if k > 1 and 16 <= p <= 128:
        return k, 1 << (k - 1).bit_length(), p
    m = p.bit_length() - 1
    if k == 1 and 8 <= m <= 14:
        return 1 << (m // 2), 1 << (m // 2), 1 << (m - m // 2)
    return None


@functools.lru_cache(maxsize=64)
def _factor_tensors_2d(n: int, device: torch.device):
    """(L^T padded to [RP, RP], S_C) as fp16 +-1 for `layout_2d(n)`."""
    k, p = hadamard_factorization(n)
    r, rp, c = layout_2d(n)
    lt = torch.zeros(rp, rp, dtype=torch.float16)
    if k > 1:
        lt[:k, :k] = torch.from_numpy(_base_matrix(k).T.astype("float32"))
    else:
        lt = _sylvester16(rp, "cpu")  # symmetric
    return lt.to(device).contiguous(), _sylvester16(c, device)


def layout_blocks(n: int, right: int | None = None) -> tuple[int, int, int, int] | None:
    """(R, KA, KB, C) of `_hadamard_quant_blocks_kernel` for width n, or None where it does not apply.

    A token is a tile X [R, C] with ``H_N = L (x) S_C``: N = K * P with K > 1 and P >= 16 takes
    C = min(P, 128) and the dense L = H_K (x) S_(P / C) of order R = K * P / C (14336 = 28 * 512:
    R = 112); N = 2^m with 8 <= m <= 14 takes R = 2^(m // 2), C = 2^(m - m // 2).  R is covered by
    power-of-two blocks KA (>= 16) and KB (0 when KA covers R; else >= 16), KA + KB <= 256.

    ``right`` (a power of two, 16 <= right <= P; at N = 2^m also R = N / right >= 16): that C instead, for a right factor
    computed as butterflies, which need no C x C matrix (section 1h: 14336 as R = 28, C = 512 leaves the
    dense left factor H_28 alone, 32 padded MACs an element instead of 128)."""
    k, p = hadamard_factorization(n)
    if right is not None:
        if right < 16 or right & (right - 1) or right > p or (k == 1 and right > p // 16):
            return None  # tl.dot needs >= 16 rows of the left factor too
        r, c = k * (p // right), right
    elif k > 1:
        if p < 16:
            return None
        c = min(p, 128)
        r = k * (p // c)
    else:
        m = p.bit_length() - 1
        if not 8 <= m <= 14:
            return None
        r, c = 1 << (m // 2), 1 << (m - m // 2)
    ka = max(16, 1 << (r.bit_length() - 1))
    kb = 0 if ka >= r else max(16, 1 << (r - ka - 1).bit_length())
    if ka + kb > 256:
        return None
    return r, ka, kb, c


@functools.lru_cache(maxsize=8)
def _unused_matrix(device: torch.device) -> torch.Tensor:
    """The matrix argument of a kernel launched without rotation (made once: not a fill per call)."""
    return torch.zeros(1, 1, device=device)


@functools.lru_cache(maxsize=64)
def _factor_tensors_blocks(n: int, device: torch.device, right: int | None = None):
    """(L^T padded to [KA + KB]^2, S_C) as fp16 +-1 for `layout_blocks(n, right)`; S_C is a 1 x 1 stand-in
    when ``right`` is given (the butterflies need no matrix)."""
    k, p = hadamard_factorization(n)
    r, ka, kb, c = layout_blocks(n, right)
    left = torch.kron(torch.from_numpy(_base_matrix(k).T.astype("float32")).contiguous(),
                      _sylvester16(r // k, "cpu").float())
    lt = torch.zeros(ka + kb, ka + kb, dtype=torch.float16)
    lt[:r, :r] = left  # L = H_K (x) S_q, L^T = H_K^T (x) S_q (Sylvester matrices are symmetric)
    return lt.to(device).contiguous(), _sylvester16(1 if right is not None else c, device)


# the split variant's rows of the token tile per program (tl.dot's smallest M)
SPLIT_ROWS = 16

# the 3d variant's padded elements per thread, at most (run 48: 256 compiled at 28672 on 4 warps and wrote
# 0.6 % of the codes wrong, scales off by up to 3 %, with triton 3.6; 128 and fewer were exact everywhere)
THREE_D_ELEMENTS_PER_THREAD = 128
# the blocks variant's, at most: the largest tile verified exact on the H200 (runs 10 and 48: 256 a thread
# at 16384 and 28672 wide); larger ones are refused rather than trusted, after the 3d variant's miscompile
BLOCKS_ELEMENTS_PER_THREAD = 256


def _check_elements_per_thread(variant: str, rows: int, row_elements: int, num_warps: int) -> None:
    """Refuse a tile of `rows` padded rows (tokens) of `row_elements` on `num_warps` warps that holds more
    elements a thread than the variant's cap (THREE_D_ / BLOCKS_ELEMENTS_PER_THREAD)."""
    cap = {"3d": THREE_D_ELEMENTS_PER_THREAD, "blocks": BLOCKS_ELEMENTS_PER_THREAD}[variant]
    per_thread = rows * row_elements // (32 * num_warps)
    if per_thread > cap:
        raise ValueError(f"the {variant} variant holds at most {cap} padded elements per thread: {rows} row(s) of "
                         f"{row_elements} on {num_warps} warps is {per_thread}; take fewer rows per program or "
                         "more warps (or leave them to the launcher)")


def _check_input(x: torch.Tensor, clip_ratio: float, planar, what: str) -> int:
    """The checks the activation kernels share; returns the row width N."""
    require_triton()
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"{what} needs a bf16 / fp16 / fp32 tensor, got {x.dtype}")
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio={clip_ratio} must be in (0, 1]")
    n = x.shape[-1]
    if n % 2:
        raise ValueError(f"last dimension {n} must be even to pack two 4-bit codes per byte")
    if planar not in (None, torch.int8, torch.float8_e4m3fn):
        raise TypeError(f"planar must be None, torch.int8 or torch.float8_e4m3fn, got {planar}")
    return n


def hadamard_quantize_pack(
    x: torch.Tensor,
    clip_ratio: float = 1.0,
    rotate: bool = True,
    num_warps: int | None = None,
    block_m: int | None = None,
    out: PackedActivations | None = None,
    variant: str = "auto",
    rows_per_program: int = 1,
    planar: torch.dtype | None = None,
    groups: int = 1,
    butterfly: bool | None = None,
    right_width: int | None = None,
    max_registers: int | None = None,
    late_left: bool = False,
) -> PackedActivations:
    """x [..., N] (bf16 / fp16 / fp32) -> per-token 4-bit codes of ``x @ hadamard_matrix(N)``.

    ``rotate=False`` skips the Hadamard (quantize + pack only).  The rotated values are rounded
    to x's dtype before quantizing, as `QLinear` with `OnlineHadamard` does.  Leading dims are
    flattened into tokens.  ``out`` (optional) receives the results (benchmarks poison it).
    ``variant``: "3d" (stages with permutes, any size, several rows per program), "2d" (two plain
    dots per token, `layout_2d` sizes), "blocks" (the 2d computation with the left factor as one
    GEMM over ``rows_per_program`` tokens and split into power-of-two blocks, `layout_blocks`
    sizes; ``groups`` such token tiles per program), "split" (decode: one token's rotation over
    several programs, then a second launch that quantizes; `layout_blocks` sizes), "auto"
    (`_auto_variant`, which also picks num_warps and rows_per_program).  Scale / zero match the torch path on x's device (see
    `_asym4_qparams`).  ``butterfly`` (blocks variant): the right factor S_C as fp32 butterflies in registers
    instead of a split fp16 dot (None: auto's choice, else the dot; `RIGHT_BUTTERFLY` overrides both); the split
    variant takes it too, though auto never asks it there (not timed at decode sizes).
    ``right_width`` (blocks variant with the butterfly): the right factor's width C, a power of two up to N's
    power-of-two factor (`layout_blocks(n, right)`; None: `layout_blocks(n)`'s C, which auto always takes:
    wider measured slower, docs/KERNELS.md 1h).
    ``max_registers`` (blocks variant): a cap on the registers a thread (ptxas' maxnreg; None: the compiler's
    choice). The kernel is latency-bound at one-eighth occupancy from 11008 wide (docs/KERNELS.md 1i); a cap
    made it 1.3-2.7x slower there on an H100 (1j): kept for A/B timings, auto never sets it.
    ``late_left`` (blocks variant): each block of the left factor loaded where its dot uses it, not all four
    before the tile, so fewer are live at once (offline sm_90: 11008 / 14336 / 28672 need 66 / 41 / 98 KB of
    shared memory a program instead of 107 / 57 / 164); the same codes. Timed (1j): 1.00-1.07x auto's time.
    ``planar`` (torch.int8 or torch.float8_e4m3fn): instead of packed nibbles, ``codes`` is the
    [M, N] operand of `w4a4_gemm.planar_centered` (code - zero, even features then odd ones).
    """
    n = _check_input(x, clip_ratio, planar, "hadamard_quantize_pack")
    if rotate:
        k, p = hadamard_factorization(n)
        stages = stage_sizes(p)
    else:  # quantize-only: view N as [1, N_pad], N_pad the next power of two (masked)
        k, p, stages = 1, max(2, 1 << (n - 1).bit_length()), (1,)
    kp = 1 << (k - 1).bit_length() if k > 1 else 1
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    width = n if planar is not None else n // 2
    if out is not None:
        codes, scale, zero = out.codes, out.scale, out.zero
        if codes.shape != (m, width) or scale.shape != (m,) or zero.shape != (m,) or (
                planar is not None and codes.dtype != planar):
            raise ValueError("out has the wrong shapes or dtype")
    else:
        codes = torch.empty(m, width, dtype=planar or torch.uint8, device=x.device)
        scale = torch.empty(m, dtype=torch.float32, device=x.device)
        zero = torch.empty(m, dtype=torch.float32, device=x.device)
    result = PackedActivations(codes, scale, zero, n)
    codes = codes.view(torch.uint8)  # the kernels write bytes
    if m == 0:
        return result
    common = dict(SPLIT_FIRST=x.dtype == torch.float32, ROUND_BF16=rotate and x.dtype == torch.bfloat16,
                  ROUND_FP16=rotate and x.dtype == torch.float16, RECIP=x.is_cuda,
                  USE_RINT=os.environ.get("TRITON_INTERPRET") != "1",
                  PLANAR={None: 0, torch.int8: 1, torch.float8_e4m3fn: 2}[planar], FMA_DIV=_fma_division())
    pdl = pdl_kwargs(m, x.device)  # kernels.pdl_launch
    if variant == "auto":
        auto = _auto_variant(n, rotate, m)
        variant, rows_per_program, groups = auto["variant"], auto["rows_per_program"], auto.get("groups", 1)
        num_warps = num_warps or auto["num_warps"]
        butterfly = auto.get("butterfly", False) if butterfly is None else butterfly
    if RIGHT_BUTTERFLY is not None:
        butterfly = RIGHT_BUTTERFLY
    if right_width is not None and (variant != "blocks" or not butterfly):
        raise ValueError("right_width needs the blocks variant with butterfly=True (the dot's S_C is layout_blocks' "
                         "own C, at most 128)")
    if max_registers is not None and (variant != "blocks" or max_registers < 24):
        raise ValueError(f"max_registers={max_registers} needs the blocks variant and at least 24 registers")
    if late_left and variant != "blocks":
        raise ValueError("late_left needs the blocks variant")
    lay = layout_2d(n) if rotate else None
    if variant not in ("2d", "3d", "blocks", "split"):
        raise ValueError(f"variant must be auto, 2d, 3d, blocks or split, got {variant!r}")
    if variant == "2d" and lay is None:
        raise ValueError(f"the 2d variant does not support width {n}")
    if variant in ("blocks", "split") and num_warps not in (None, 1, 2, 4, 8):
        # run 10 (docs/KERNELS.md section 1): 16 warps compiled, and gave wrong codes at 8960 (4 %)
        raise ValueError(f"num_warps={num_warps}: the {variant} variant takes 1, 2, 4 or 8 warps "
                         "(16 gave wrong codes on the H200 with triton 3.6)")
    if variant == "split":  # two launches: the rotation over several programs per token, then the quantization
        blay = layout_blocks(n) if rotate else None
        if blay is None:
            raise ValueError(f"the split variant does not support width {n}" + ("" if rotate else " without rotation"))
        r, ka, kb, c = blay
        lt, rt = _factor_tensors_blocks(n, x.device)
        nb = triton.cdiv(r, SPLIT_ROWS)
        nbp = 1 << (nb - 1).bit_length()
        # the rotated rows (fp32) and each row block's min / max, written before they are read
        ws = torch.empty(m, nbp * SPLIT_ROWS * c, dtype=torch.float32, device=x.device)
        mm = torch.empty(m, nbp, 2, dtype=torch.float32, device=x.device)
        nw = num_warps or (8 if n >= 8192 else 4)
        _hadamard_split_kernel[(m, nb)](
            x2, lt, rt, ws, mm, x2.stride(0), 1.0 / math.sqrt(n), R=r, KA=ka, KB=kb, C=c, RB=SPLIT_ROWS, NBP=nbp,
            SPLIT_FIRST=common["SPLIT_FIRST"], ROUND_BF16=common["ROUND_BF16"], ROUND_FP16=common["ROUND_FP16"],
            LOG_C=c.bit_length() - 1 if butterfly else 0, num_warps=nw, enable_fp_fusion=False, **pdl,
        )
        _quantize_split_kernel[(m, nb)](
            ws, mm, codes, scale, zero, codes.stride(0), float(clip_ratio), R=r, C=c, RB=SPLIT_ROWS, NB=nb, NBP=nbp,
            RECIP=common["RECIP"], USE_RINT=common["USE_RINT"], PLANAR=common["PLANAR"], FMA_DIV=common["FMA_DIV"],
            num_warps=4, **pdl,
            enable_fp_fusion=False,
        )
        return result
    if variant == "blocks":
        blay = layout_blocks(n, right_width) if rotate else None
        if blay is None:
            raise ValueError(f"the blocks variant does not support width {n}" + ("" if rotate else " without rotation")
                             + (f" with right_width={right_width}" if right_width is not None else ""))
        r, ka, kb, c = blay
        lt, rt = _factor_tensors_blocks(n, x.device, right_width)
        t = rows_per_program
        if t < 1 or t & (t - 1):
            raise ValueError(f"rows_per_program={t} must be a power of two for the blocks variant")
        nw = num_warps or 8
        _check_elements_per_thread("blocks", t, (ka + kb) * c, nw)
        _hadamard_quant_blocks_kernel[(triton.cdiv(m, t * groups),)](
            x2, lt, rt, codes, scale, zero, m, x2.stride(0), codes.stride(0), float(clip_ratio),
            1.0 / math.sqrt(n), R=r, KA=ka, KB=kb, C=c, T=t, GROUPS=groups, num_warps=nw,
            LOG_C=c.bit_length() - 1 if butterfly else 0, LATE_LEFT=late_left, enable_fp_fusion=False,
            **common, **pdl,
            **({"maxnreg": max_registers} if max_registers else {}),
        )
        return result
    if variant == "2d":
        r, rp, c = lay
        lt, rt = _factor_tensors_2d(n, x.device)
        nw = num_warps or (4 if rp * c <= 4096 else 8 if rp * c <= 8192 else 16)
        _hadamard_quant_2d_kernel[(triton.cdiv(m, rows_per_program),)](
            x2, lt, rt, codes, scale, zero, m, x2.stride(0), codes.stride(0), float(clip_ratio),
            1.0 / math.sqrt(n), R=r, RP=rp, C=c, ROWS=rows_per_program, num_warps=nw,
            enable_fp_fusion=False, **common, **pdl,
        )
        return result
    hk, sylv = _factor_tensors(n, x.device) if rotate else (_unused_matrix(x.device), [])
    fs = list(stages) if rotate else []
    while len(fs) < 3:
        fs.insert(0, 1)
    mats = [None] * (3 - len(sylv)) + list(sylv)
    mats = [t if t is not None else hk for t in mats]
    bm, nw = _launch_params(kp, p, m, num_warps if rotate else _unrotated_warps(n, m, num_warps), block_m)
    if rotate:
        _check_elements_per_thread("3d", bm, kp * p, nw)
    grid = (triton.cdiv(m, bm),)
    _hadamard_quant_kernel[grid](
        x2, hk, mats[0], mats[1], mats[2], codes, scale, zero,
        m, x2.stride(0), codes.stride(0), float(clip_ratio), 1.0 / math.sqrt(n),
        K=k, KP=kp, P=p, NCOLS=n, F1=fs[0], F2=fs[1], F3=fs[2],
        BLOCK_M=bm, ROTATE=rotate, num_warps=nw, enable_fp_fusion=False, **common, **pdl,
    )
    return result


def rmsnorm_quantize_pack(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    clip_ratio: float = 1.0,
    planar: torch.dtype | None = None,
    num_warps: int | None = None,
    block_m: int | None = None,
) -> PackedActivations:
    """x [..., N] -> per-token 4-bit codes of ``modules.RMSNorm(x)`` (Llama style: gain
    ``weight`` times the normalised row rounded to x's dtype; None: unit gain), quantized and
    packed as `hadamard_quantize_pack(..., rotate=False)` does.  One read of x; the normalised
    tensor is never written.  Equal to the torch composition up to the fp32 summation order of
    the mean of squares (tests: a code off by one on a rounding boundary, rarely)."""
    n = _check_input(x, clip_ratio, planar, "rmsnorm_quantize_pack")
    if weight is not None and (weight.shape != (n,) or weight.dtype != x.dtype):
        raise ValueError(f"gain of shape {tuple(weight.shape)} / {weight.dtype} for rows of {n} in {x.dtype}")
    np2 = max(2, 1 << (n - 1).bit_length())
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    codes = torch.empty(m, n if planar is not None else n // 2, dtype=planar or torch.uint8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    zero = torch.empty(m, dtype=torch.float32, device=x.device)
    result = PackedActivations(codes, scale, zero, n)
    if m == 0:
        return result
    bm, nw = _launch_params(1, np2, m, _unrotated_warps(n, m, num_warps), block_m)
    gain = weight.contiguous() if weight is not None else scale  # (unused pointer without GAIN)
    _rmsnorm_quant_kernel[(triton.cdiv(m, bm),)](
        x2, gain, codes.view(torch.uint8), scale, zero, m, x2.stride(0), codes.stride(0), float(clip_ratio),
        float(eps), N=n, NP=np2, BLOCK_M=bm, GAIN=weight is not None,
        ROUND_BF16=x.dtype == torch.bfloat16, ROUND_FP16=x.dtype == torch.float16, RECIP=x.is_cuda,
        USE_RINT=os.environ.get("TRITON_INTERPRET") != "1",
        PLANAR={None: 0, torch.int8: 1, torch.float8_e4m3fn: 2}[planar], FMA_DIV=_fma_division(), num_warps=nw,
        enable_fp_fusion=False, **pdl_kwargs(m, x.device),
    )
    return result


def rmsnorm_quantize_pack_reference(x: torch.Tensor, norm, clip_ratio: float = 1.0) -> PackedActivations:
    """The torch composition `rmsnorm_quantize_pack` implements: ``norm`` (a modules.RMSNorm), then
    `hadamard_quantize_pack_reference` without the Hadamard."""
    return hadamard_quantize_pack_reference(norm(x), clip_ratio, rotate=False)


def hadamard_quantize_pack_reference(x: torch.Tensor, clip_ratio: float = 1.0, rotate: bool = True) -> PackedActivations:
    """The torch composition the kernel implements (see the module docstring)."""
    n = x.shape[-1]
    r = fast_hadamard_transform(x) if rotate else x
    r = r.reshape(-1, n)
    spec = QuantSpec(bits=4, symmetric=False, clip_ratio=clip_ratio)
    scale, zero = compute_qparams(r, spec)
    codes = quantize(r, scale, zero, spec)
    return PackedActivations(pack_int4(codes), scale.reshape(-1).float(), zero.reshape(-1).float(), n)
