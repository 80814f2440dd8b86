"""W4A4 GEMM: packed 4-bit activations x packed 4-bit weights, exact integer accumulation.

    y[m, n] = s_a[m] * s_w[n] * sum_k (a[m, k] - z_a[m]) * w[n, k]          (bf16 out)

with ``a`` the asymmetric activation codes in [0, 15] (per token scale / zero, from
`act_quant.hadamard_quantize_pack`) and ``w`` the symmetric weight codes in [-8, 7] (per
output channel scale), both packed two per byte along K exactly as `primitives.pack_int4`
packs them (so `QuantizedTensor.to_state_dict`'s ``codes`` are the kernel's weight operand).
`w4a4_matmul_reference` is the same formula in torch (int64 products).

Design choices:

* **No interleave.**  A dot over K does not care about the order of k as long as both operands
  use the same one, so the kernel never re-interleaves nibbles: it runs one dot over the low
  nibbles (even k) and one over the high nibbles (odd k) of the same packed tile.
* **Zero point in the epilogue.**  ``sum_k (a - z) w = sum_k a w - z * rowsum(w)``: the integer
  dot uses the raw unsigned codes (they fit int8 and e4m3) and ``rowsum(w)`` is precomputed once
  per weight (`prepare_weight`).  The correction is an int32 subtraction, still exact.
* **INT8 backend**: `tl.dot(int8, int8) -> int32` (wgmma s8 on Hopper).  Exact: |sum| <= 120 K.
* **FP8 backend**: the codes are exact in e4m3 (|c| <= 15) and so are the products; each K block
  is a fresh dot (its partial sum <= 120 * BLOCK_K < 2^14, exact even with the tensor core's
  reduced-precision fp8 accumulation) added to an fp32 accumulator on the CUDA cores, exact
  below 2^24 (K <= 139000).  Exactness is checked against the int reference, not assumed.
* **Epilogue in fp32**: ``float(acc - z * rowsum) * s_a * s_w`` (the int is exact in fp32 below
  2^24), then bf16.  Relative to the float64 value of the fake-quant path the error is the two
  fp32 roundings plus the bf16 rounding of the output.
* **Planar 8-bit operands** (docs/KERNELS.md 2b): the activation as
  ``a - z_a`` (in [-15, 15]) in int8 or e4m3, one byte per code, "planar" (per row: the even-k
  codes, then the odd-k ones, so the low / high nibble halves of a packed weight tile meet two
  contiguous loads): no unpacking of A and no zero-point term; `W4A4Linear` uses it (int8) at
  prefill.  The weight may be planar too (1 byte per code, twice the packed weight's bytes: the
  benchmark's measure of what unpacking costs).  FP8 accumulation is
  either promoted by hand per K block or by Triton (``max_num_imprecise_acc``, GemmConfig.promote).
* **cuBLAS FP8** (``scaled_mm`` backend, prefill): both operands as planar e4m3 bytes (the
  activation's centered codes, the weight's codes: 1 byte per code, half of bf16's bytes), the dot
  and the per-token x per-channel scales in one ``torch._scaled_mm`` (rowwise scales, bf16 out;
  ``use_fast_accum=False``: cuBLAS promotes the tensor cores' partial sums into fp32). The H200's
  FP8 tensor cores accumulate with limited precision, so exactness is not assumed: on CUDA every
  new (M, N, K) is first checked on codes of the worst magnitude (every product 120) and on random
  codes against the float64 value (`scaled_mm_exact`), and a shape that fails runs on the Triton
  fp8 kernel instead, with a warning. The epilogue is cuBLAS's: in bf16 it may round one ulp
  away from the Triton kernels' (fp32 product order), within the stated 2^-8 tolerance.
* **GEMV with dp4a** (``GemmConfig.dp4a``, gemv backend): the packed bytes read as 32-bit words,
  nibbles split by masks into four byte lanes, the weight's signed codes made unsigned by flipping
  bit 3 (two's complement nibble -> ``w + 8``), and four products summed per PTX ``dp4a`` (the
  plain gemv spends several integer instructions per product, which at decode competes with the
  weight stream). ``sum a (w + 8) - 8 sum a`` is the same integer, so the output is bit for bit
  the gemv's. Triton's interpreter runs no PTX: there the same lane sums come from shifts and masks.
* **The per-lane dp4a GEMV** (``GemmConfig.lanes``, the default up to 8 tokens from session 19, up to 2 since session 27):
  the first dp4a kernel built a [tokens, rows, words] product and let Triton pick its layout, which
  cost scalar loads and a shared-memory layout conversion per step.  This one keeps every tensor
  in the weight tile's [rows, words] layout: each token's activation words are loaded through a
  pointer tile that repeats them down the rows (L1 serves the repeats), each token keeps its own
  [rows, words] int32 accumulator (a tuple unrolled over the tokens) reduced once after the loop,
  and the weight nibbles become signed bytes once per word for ``dp4a.u32.s32`` with the unsigned
  activation codes, so no ``sum a`` correction.  Since session 48 those bytes are 16 w, as in the
  int8s GEMM (below): the high nibbles one AND a word, the low ones a shift and an AND (before: four
  and five ops), the sums shifted right by 4 after the loop; the loop 257 -> 161 instructions at one
  token in offline sm_90 SASS.  All loads are 16 bytes wide (tested on the PTX).  Measured at one token at
  2.4-3.3 TB/s of packed weights on the large 7B / 8B / 70B linears (docs/KERNELS.md 3b); the
  run-8 kernel (``lanes=False``) stays for the benchmarks' comparisons.
* **The int8s unpack by word ops** (``GemmConfig.asm_unpack``, session 27): the swapped GEMM's weight
  nibbles become the wgmma's int8 register operand through an elementwise PTX asm that takes four
  packed bytes per 32-bit register (``pack=4``): int8 shifts had the compiler take each byte apart
  (the K loop 3.4x longer in SASS, docs/KERNELS.md 2e).  Since session 48 (``_nibbles_times16``) each
  nibble goes to its byte's top four bits instead of being sign-extended: that byte, read as int8,
  is the two's complement code times 16, so the high half is one AND a word and the low half a shift
  and an AND (session 27's sign extension took 4-5 ops a half).  The int32 sums are then 16 times the
  true ones and are shifted right by 4 once after the loop, exactly: every term is a multiple of 16,
  and ``|16 w a| <= 16 * 8 * 15`` keeps K up to 2^20 far inside int32 (checked).  Byte lanes cannot
  carry into each other (the low half's carry out of a byte is masked off), so any grouping of four
  elements gives the same bytes as the int8 shifts the interpreter runs.
* **K slices in one program** (``GemmConfig.slices``, int8s at decode, session 47): split-K across
  programs pays each extra program's prologue and an L2 round trip in the atomic fix-up, and lost to no
  split on most 7B / 8B shapes even with fence-free adds. Instead one program takes ``slices`` K slices of
  its weight rows a step as one batched (3-D) dot, ``[slices, rows, K/slices] x [slices, K/slices, tokens]``,
  its warps spread over the slices, and sums the slices once after the loop: more warps and bytes in
  flight a program, no workspace, no atomics. On an H100 with 16 rows and 2 slices on 2 warps it took
  the o / down / Llama-3-8B q+k+v decode linears from 2.2-2.6x to 2.6-3.3x bf16 (docs/KERNELS.md 4l).
* **Configs**: prefill uses big tiles (tensor-core bound); decode (M <= 64) is weight-bandwidth
  bound: BLOCK_M = 16 (the smallest dot), narrow BLOCK_N so that N / BLOCK_N programs fill the
  132 SMs, long BLOCK_K and deep pipelining; optionally split-K with an int32 atomic workspace.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from ..quant.primitives import pack_int4, unpack_int4
from . import pdl_kwargs, require_triton
from ..triton_utils import round_to_bf16, wait_for_prior_grid

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None

__all__ = ["PackedWeight", "GemmConfig", "prepare_weight", "w4a4_matmul", "w4a4_matmul_reference", "default_config",
           "planar_centered", "planar_weight", "scaled_mm_exact"]


@dataclass
class PackedWeight:
    """Symmetric per-output-channel 4-bit weight: codes packed along K, scale, row sums."""

    codes: torch.Tensor  # uint8 [N, K / 2], pack_int4 layout
    scale: torch.Tensor  # float32 [N]
    rowsum: torch.Tensor  # int32 [N], sum_k of the signed codes
    k: int


# "auto" takes the dp4a GEMV up to this many tokens: session 19 (KERNELS.md 3b, one CUDA graph of calls
# per config) measured the per-lane GEMV at 4-8 tokens at 0.49-0.87x cuBLAS FP8's time on the 1-byte
# weight at all 11 7B / 8B / 70B linear shapes (run 20; the tensor-core GEMMs are slower than cuBLAS there)
GEMV_MAX_TOKENS = 8


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int  # unpacked K per step (packed bytes: block_k / 2)
    num_warps: int
    num_stages: int
    group_m: int = 8
    split_k: int = 1
    promote: int = 0  # fp8: 0 = a fresh dot per K block added by hand; > 0 = Triton's max_num_imprecise_acc
    dp4a: bool = False  # gemv: four 4-bit products per dp4a instruction (module notes)
    lanes: bool = False  # dp4a gemv: the per-lane kernel (one 2-D accumulator per token, module notes)
    asm_unpack: bool = False  # int8s: the weight's nibbles split four bytes per PTX word op (module notes)
    slices: int = 1  # int8s: K slices of block_k each a step, one batched dot over the warps (module notes)


def prepare_weight(codes: torch.Tensor, scale: torch.Tensor) -> PackedWeight:
    """Signed codes int8 [N, K] in [-8, 7] (or already packed uint8 [N, K/2] with ``k``) -> PackedWeight."""
    if codes.dtype != torch.int8 or codes.ndim != 2:
        raise TypeError(f"prepare_weight needs int8 codes [N, K], got {codes.dtype} {tuple(codes.shape)}")
    if codes.shape[1] % 2:
        raise ValueError(f"K={codes.shape[1]} must be even")
    return PackedWeight(
        pack_int4(codes).contiguous(),
        scale.reshape(-1).to(torch.float32).contiguous(),
        codes.to(torch.int32).sum(1).to(torch.int32).contiguous(),
        codes.shape[1],
    )


def _planar_operand(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Integer codes [..., K] -> the even-k columns, then the odd-k ones, as int8 or e4m3 (exact
    for every integer in [-16, 16])."""
    if dtype not in (torch.int8, torch.float8_e4m3fn):
        raise TypeError(f"planar operands are int8 or float8_e4m3fn, got {dtype}")
    planar = torch.cat((codes[..., 0::2], codes[..., 1::2]), dim=-1).contiguous()
    return planar.to(dtype) if dtype == torch.int8 else planar.to(torch.float32).to(dtype)


def planar_centered(a_codes: torch.Tensor, a_zero: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Packed activation codes + zero point -> ``a - z`` as a planar int8 / e4m3 operand [M, K]
    (the zero point is an integer: `compute_qparams` rounds it)."""
    return _planar_operand(unpack_int4(a_codes, k, signed=False).to(torch.int16)
                           - a_zero.to(torch.int16)[:, None], dtype)


def planar_weight(weight: "PackedWeight", dtype: torch.dtype) -> torch.Tensor:
    """The weight's signed codes as a planar int8 / e4m3 operand [N, K] (1 byte per code)."""
    return _planar_operand(unpack_int4(weight.codes, weight.k, signed=True), dtype)


def default_config(m: int, n: int, k: int, backend: str = "int8") -> GemmConfig:
    """The configs that measured fastest on the H200 (docs/KERNELS.md, runs 2-50) and, for the int8s decode tiles
    since session 46, on an H100 (sections 4k-4n)."""
    big = n * k >= 1 << 26  # e.g. 8192 x 8192 and up: split K to fill the SMs
    if backend == "gemv":  # the per-lane dp4a GEMV (K a multiple of 8), session 19's sweeps (KERNELS.md 3b):
        # 3-8 tokens: run 15's config of the lowest geometric-mean time over six 7B / 8B / 70B shapes (within
        # 1.19x (4 tokens) and 1.01x (8) of each shape's best; no split-K won anywhere); 1-2 tokens: run 17's
        # longer K blocks, the lowest summed time over the four 7B decode GEMVs (0.91x / 0.93x run 15's)
        if k % 8:
            return GemmConfig(1, 16, 512, 4, 1, split_k=8)  # the plain GEMV (run 3)
        if m == 1:
            return GemmConfig(1, 4, 4096, 4, 1, dp4a=True, lanes=True)
        if m == 2:
            return GemmConfig(1, 8, 2048, 2, 1, dp4a=True, lanes=True)
        return GemmConfig(1, 4, 1024, 4 if m <= 4 else 2, 1, dp4a=True, lanes=True)
    if backend == "int8s":  # block_m: tokens per tile (the MMA's N); session 27's sweeps with the word-op
        # nibble split (KERNELS.md 2e): within 1.15x of each 7B / 8B / 70B shape's best at 4-16 tokens (K steps
        # of 1024 where K > N, the down projections), the best at 32 / 64 / 2048 / 8192 tokens on the 7B shapes;
        # session 28 (runs 41 / 43): 32 weight rows per tile on two warps (twice the tiles) where 64-row tiles
        # leave SMs idle or a ragged last wave (N <= 16384: at most 2 waves over 132 SMs): 7B / 8B down 0.84-0.86x
        # the time, o 0.88-0.90x, q+k+v 0.94-0.98x; gate+up (22016 rows, 2.6 waves) gained nothing
        # session 47 (lab/device/jobs/session47_sliced.py, H100, KERNELS.md 4l): at N <= 6144 (7B / 8B o, down,
        # 8B q+k+v) 16 rows a program with the same K a step as two K slices on two warps: 0.80-0.98x the time of
        # the 32-row tiles; at N >= 12288 (7B q+k+v, gate+up) 0.99-1.09x at best, so those keep them
        # session 49 (session48_tokens8.py, H100, KERNELS.md 4n): at <= 8 tokens tiles of 8 tokens, the int8 MMA's
        # own N (16-token tiles spend half of each IMMA and activation load on padding): 0.86-0.99x the time on
        # every 7B / 8B / 70B linear at 4 and 8 tokens
        tokens = 8 if m <= 8 else 16
        if m <= 16 and n <= 6144:
            return GemmConfig(tokens, 16, 512 if k > n else 256, 2, 4, slices=2, asm_unpack=True)
        if m <= 16:
            return GemmConfig(tokens, 32 if n <= 16384 else 64, 1024 if k > n else 512, 2 if n <= 16384 else 4, 3,
                              asm_unpack=True)
        if m <= 64:
            return GemmConfig(64, 128, 256, 4, 3, asm_unpack=True) if m > 32 and n >= 2 * k else \
                GemmConfig(32, 64, 512, 4, 3, asm_unpack=True)
        return GemmConfig(128, 128, 128, 4, 3, asm_unpack=True)
    if m <= 16:
        return GemmConfig(16, 64, 256, 4, 4, split_k=8) if big else GemmConfig(16, 32, 512, 4, 4)
    if m <= 64:
        return GemmConfig(16, 128, 256, 4, 4)
    return GemmConfig(256, 128, 128, 8, 3)


if triton is not None:

    @triton.jit
    def _grouped_tile(pid, num_rows, num_cols, GROUP: tl.constexpr):
        """(row tile, column tile) of program `pid` in grouped order: GROUP row tiles walk the
        columns together, so the column tile they share stays in L2."""
        per_group = GROUP * num_cols
        first = (pid // per_group) * GROUP
        group_size = tl.minimum(num_rows - first, GROUP)
        return first + (pid % per_group) % group_size, (pid % per_group) // group_size

    @triton.jit
    def _epilogue_store(acc_i, za_ptr, wsum_ptr, sa_ptr, sw_ptr, y_ptr, stride_ym, offs_m, offs_n, mask_m, mask_n,
                        OUT_F32: tl.constexpr, HAS_ZERO: tl.constexpr = True):
        """y = float(acc - z_a * rowsum(w)) * s_a * s_w -> bf16 or fp32 (the int part exact, see module doc).
        Without HAS_ZERO (planar centered activations) the zero point is already in acc."""
        sa = tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)
        sw = tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0)
        if HAS_ZERO:
            za = tl.load(za_ptr + offs_m, mask=mask_m, other=0.0).to(tl.int32)
            wsum = tl.load(wsum_ptr + offs_n, mask=mask_n, other=0)
            acc_i = acc_i - za[:, None] * wsum[None, :]
        y = (acc_i.to(tl.float32) * sa[:, None]) * sw[None, :]
        ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        if OUT_F32:
            tl.store(ptrs, y, mask=mask_m[:, None] & mask_n[None, :])
        else:
            tl.store(ptrs, round_to_bf16(y).to(tl.bfloat16), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _splitk_fixup(acc_i, ws_ptr, cnt_ptr, tile, N, SPLIT_K: tl.constexpr,
                      za_ptr, wsum_ptr, sa_ptr, sw_ptr, y_ptr, stride_ym, offs_m, offs_n, mask_m, mask_n,
                      OUT_F32: tl.constexpr, HAS_ZERO: tl.constexpr = True):
        """Split-K in one launch: int32 partial sums added atomically into a workspace; the last
        program of the tile (per-tile arrival counter) takes the total with an atomic exchange
        against 0 and runs the epilogue, which leaves workspace and counter zeroed for the next
        call.  Integer adds commute, so the result is exact and deterministic."""
        mask = mask_m[:, None] & mask_n[None, :]
        ws = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        # The partial sums are fence-free reductions (relaxed): the default acq_rel put a GPU-scope fence before
        # every element's atomic (18 MEMBAR + ATOMG a program at 32 rows, split 2), which made split-K slower than
        # no split.  Ordering comes from the CTA barrier and the counter's one acq_rel atomic: its release publishes
        # the whole CTA's adds (cumulative over the barrier), its acquire orders the last program's reads after them.
        tl.atomic_add(ws, acc_i, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partial sums issued before the arrival is counted
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.atomic_xchg(ws, tl.zeros_like(acc_i), mask=mask, sem="relaxed")
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed")  # seen by the next launch (kernel boundary)
            _epilogue_store(total, za_ptr, wsum_ptr, sa_ptr, sw_ptr, y_ptr, stride_ym, offs_m, offs_n, mask_m, mask_n,
                            OUT_F32, HAS_ZERO)

    @triton.jit
    def _w4a4_kernel(
        a_ptr, w_ptr, sa_ptr, za_ptr, sw_ptr, wsum_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, N, KH, per_split, stride_am, stride_wn, stride_ym,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr,
        GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, FP8: tl.constexpr, STATIC_STEPS: tl.constexpr,
        OUT_F32: tl.constexpr, A8: tl.constexpr = False, W8: tl.constexpr = False, PROMOTE: tl.constexpr = 0,
    ):
        """A8: planar centered 1-byte activations (no unpack, no zero point); W8: planar 1-byte
        weight codes; else packed nibbles.  The planar hi half starts KH columns after the lo half."""
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        # programs sharing a weight tile run together (L2 reuse)
        pid_m, pid_n = _grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_KH)
        mask_m = offs_m < M
        mask_n = offs_n < N
        a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
        w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BLOCK_KH, BLOCK_N]
        if FP8:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        k_first = pid_k * per_split
        a_ptrs += k_first * BLOCK_KH
        w_ptrs += k_first * BLOCK_KH
        # STATIC_STEPS: interpreter only (numpy >= 2.4 cannot range() over the interpreter's scalar
        # tensors, and it turns every assigned value into one, hence the inline expression)
        for i in range(0, STATIC_STEPS if STATIC_STEPS > 0 else per_split):
            ks = k_first + i  # past the end in the last split: fully masked
            kmask = ks * BLOCK_KH + offs_k < KH
            amask = mask_m[:, None] & kmask[None, :]
            wmask = kmask[:, None] & mask_n[None, :]
            if A8:  # already centered; e4m3 arrives as its bytes (masked lanes: 0x00 = +0.0)
                a_lo = tl.load(a_ptrs, mask=amask, other=0)
                a_hi = tl.load(a_ptrs + KH, mask=amask, other=0)
                if FP8:
                    a_lo = a_lo.to(tl.float8e4nv, bitcast=True)
                    a_hi = a_hi.to(tl.float8e4nv, bitcast=True)
            else:
                a = tl.load(a_ptrs, mask=amask, other=0)
                a_lo = (a & 0xF).to(tl.int8)
                a_hi = (a >> 4).to(tl.int8)
                if FP8:
                    a_lo = a_lo.to(tl.float16).to(tl.float8e4nv)
                    a_hi = a_hi.to(tl.float16).to(tl.float8e4nv)
            if W8:
                w_lo = tl.load(w_ptrs, mask=wmask, other=0)
                w_hi = tl.load(w_ptrs + KH, mask=wmask, other=0)
                if FP8:
                    w_lo = w_lo.to(tl.float8e4nv, bitcast=True)
                    w_hi = w_hi.to(tl.float8e4nv, bitcast=True)
            elif FP8 and A8:
                # nibble -> e4m3 without int -> float conversions: v ^ 8 is the offset-binary
                # nibble v + 8; fp16 bits 0x6400 | n are 1024 + n, so subtracting 1032 gives v
                # exactly; fp16 -> e4m3 is one packed conversion
                wo = tl.load(w_ptrs, mask=wmask, other=0) ^ 0x88
                w_lo = (((wo & 0xF).to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0).to(tl.float8e4nv)
                w_hi = (((wo >> 4).to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0).to(tl.float8e4nv)
            else:
                w8 = tl.load(w_ptrs, mask=wmask, other=0).to(tl.int8, bitcast=True)
                w_lo = (w8 << 4) >> 4  # sign-extend the low nibble
                w_hi = w8 >> 4
                if FP8:
                    w_lo = w_lo.to(tl.float16).to(tl.float8e4nv)
                    w_hi = w_hi.to(tl.float16).to(tl.float8e4nv)
            if FP8 and PROMOTE > 0:  # Triton promotes the tensor core's partial sums every PROMOTE k
                acc = tl.dot(a_lo, w_lo, acc, out_dtype=tl.float32, max_num_imprecise_acc=PROMOTE)
                acc = tl.dot(a_hi, w_hi, acc, out_dtype=tl.float32, max_num_imprecise_acc=PROMOTE)
            elif FP8:
                blk = tl.dot(a_lo, w_lo, out_dtype=tl.float32)
                blk = tl.dot(a_hi, w_hi, blk, out_dtype=tl.float32)
                acc += blk  # promote per K block: exact fp32 adds of integers < 2^24
            else:
                acc = tl.dot(a_lo, w_lo, acc, out_dtype=tl.int32)
                acc = tl.dot(a_hi, w_hi, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_KH
            w_ptrs += BLOCK_KH
        acc_i = acc.to(tl.int32)
        if SPLIT_K > 1:
            _splitk_fixup(acc_i, ws_ptr, cnt_ptr, pid, N, SPLIT_K, za_ptr, wsum_ptr, sa_ptr, sw_ptr, y_ptr, stride_ym,
                          offs_m, offs_n, mask_m, mask_n, OUT_F32, not A8)
        else:
            _epilogue_store(acc_i, za_ptr, wsum_ptr, sa_ptr, sw_ptr, y_ptr, stride_ym, offs_m, offs_n, mask_m, mask_n,
                            OUT_F32, not A8)

    @triton.jit
    def _nibbles_times16(w8, HIGH: tl.constexpr, ASM: tl.constexpr):
        """16 times the low (HIGH=False) or high signed nibble of each int8 of w8, as int8: the nibble
        moved to the byte's top four bits is its two's complement code times 16, so no sign extension
        (the kernels shift the exact int32 sums right by 4 once, after the loop). On the GPU four bytes
        per 32-bit register at once: the high half one AND a word, the low half a shift and an AND (the
        shift's carry from byte i's high nibble into byte i + 1 is masked out); the interpreter runs no
        PTX, so there the same values come from int8 shifts."""
        if ASM:
            if HIGH:
                return tl.inline_asm_elementwise("and.b32 $0, $1, 0xF0F0F0F0;", "=r,r", [w8], dtype=tl.int8,
                                                 is_pure=True, pack=4)
            return tl.inline_asm_elementwise("{ .reg .b32 t; shl.b32 t, $1, 4; and.b32 $0, t, 0xF0F0F0F0; }",
                                             "=r,r", [w8], dtype=tl.int8, is_pure=True, pack=4)
        if HIGH:
            return (w8 >> 4) << 4
        return w8 << 4

    @triton.jit
    def _swap_epilogue_store(acc, sa_ptr, sw_ptr, y_ptr, stride_ym, offs_m, offs_n, mask_m, mask_n,
                             OUT_F32: tl.constexpr):
        """The int8s kernels' output: exact int32 sums [rows, tokens] times the token and row scales (the
        same two fp32 products as _epilogue_store), stored transposed into y [tokens, rows]."""
        sa = tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)
        sw = tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0)
        y = (acc.to(tl.float32) * sa[None, :]) * sw[:, None]
        ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
        if OUT_F32:
            tl.store(ptrs, y, mask=mask_n[:, None] & mask_m[None, :])
        else:
            tl.store(ptrs, round_to_bf16(y).to(tl.bfloat16), mask=mask_n[:, None] & mask_m[None, :])

    @triton.jit
    def _w4a4_swap_kernel(
        a_ptr, w_ptr, sa_ptr, sw_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, KH, per_split, stride_am, stride_wn, stride_ym,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr, GROUP_N: tl.constexpr,
        SPLIT_K: tl.constexpr, STATIC_STEPS: tl.constexpr, OUT_F32: tl.constexpr, ASM: tl.constexpr = False,
        PDL: tl.constexpr = False,
    ):
        """y^T = W A^T on int8 tensor cores ("int8s"): the packed weight, unpacked in registers, is
        the dot's *left* operand (on Hopper wgmma can take it from registers, no shared-memory round
        trip), the planar centered int8 activations the right one ([K, M] tiles, K-major, loaded and
        pipelined straight into shared memory).  Tokens sit in the MMA's N dimension, so a small M
        (decode) is a narrow tile instead of rows padded to 64.  Exact int32, no zero-point term.
        SPLIT_K > 1: program (tile, s) sums `per_split` K steps from s * per_split and the tile's last
        program runs the epilogue (`_splitk_fixup`), which decode needs to fill the SMs (N / BLOCK_N
        tiles alone are 64-344 programs at 7B-70B shapes)."""
        wait_for_prior_grid(PDL)
        # programs sharing an activation tile run together (L2 reuse)
        pid = tl.program_id(0)
        pid_n, pid_m = _grouped_tile(pid, tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_N)
        k0 = tl.program_id(1) * per_split * BLOCK_KH  # this split's first packed column
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_KH)
        mask_n = offs_n < N
        mask_m = offs_m < M
        kend = tl.minimum(k0 + per_split * BLOCK_KH, KH)
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (k0 + offs_k)[None, :]  # [BLOCK_N, BLOCK_KH]
        a_ptrs = a_ptr + offs_m[None, :].to(tl.int64) * stride_am + (k0 + offs_k)[:, None]  # [BLOCK_KH, BLOCK_M]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
        for i in range(0, STATIC_STEPS if STATIC_STEPS > 0 else tl.cdiv(kend - k0, BLOCK_KH)):
            kmask = k0 + i * BLOCK_KH + offs_k < kend
            w8 = tl.load(w_ptrs, mask=mask_n[:, None] & kmask[None, :], other=0).to(tl.int8, bitcast=True)
            a_lo = tl.load(a_ptrs, mask=kmask[:, None] & mask_m[None, :], other=0)
            a_hi = tl.load(a_ptrs + KH, mask=kmask[:, None] & mask_m[None, :], other=0)
            acc = tl.dot(_nibbles_times16(w8, False, ASM), a_lo, acc, out_dtype=tl.int32)  # low nibbles: even k
            acc = tl.dot(_nibbles_times16(w8, True, ASM), a_hi, acc, out_dtype=tl.int32)
            w_ptrs += BLOCK_KH
            a_ptrs += BLOCK_KH
        acc = acc >> 4  # every product was 16 w a: exact (module notes)
        if SPLIT_K > 1:  # the shared fixup works on [tokens, rows]; no zero-point term (za / wsum unused)
            _splitk_fixup(tl.trans(acc), ws_ptr, cnt_ptr, pid, N, SPLIT_K, sa_ptr, sa_ptr, sa_ptr, sw_ptr, y_ptr,
                          stride_ym, offs_m, offs_n, mask_m, mask_n, OUT_F32, HAS_ZERO=False)
        else:
            _swap_epilogue_store(acc, sa_ptr, sw_ptr, y_ptr, stride_ym, offs_m, offs_n, mask_m, mask_n, OUT_F32)

    @triton.jit
    def _w4a4_swap_sliced_kernel(
        a_ptr, w_ptr, sa_ptr, sw_ptr, y_ptr, M, N, KH, steps, stride_am, stride_wn, stride_ym,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLICE_KH: tl.constexpr, SLICES: tl.constexpr,
        GROUP_N: tl.constexpr, STATIC_STEPS: tl.constexpr, OUT_F32: tl.constexpr, ASM: tl.constexpr = False,
        PDL: tl.constexpr = False,
    ):
        """`_w4a4_swap_kernel` with SLICES consecutive K slices of SLICE_KH packed bytes a step, as one
        batched dot [SLICES, BLOCK_N, SLICE_KH] x [SLICES, SLICE_KH, BLOCK_M] (Triton spreads the warps
        over the slices); the slices' int32 sums are added once after the loop, so still exact."""
        wait_for_prior_grid(PDL)
        pid = tl.program_id(0)
        pid_n, pid_m = _grouped_tile(pid, tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_N)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        kcol = tl.arange(0, SLICES)[:, None] * SLICE_KH + tl.arange(0, SLICE_KH)[None, :]  # [S, SLICE_KH]
        mask_n = offs_n < N
        mask_m = offs_m < M
        w_ptrs = w_ptr + offs_n[None, :, None].to(tl.int64) * stride_wn + kcol[:, None, :]  # [S, BLOCK_N, SLICE_KH]
        a_ptrs = a_ptr + offs_m[None, None, :].to(tl.int64) * stride_am + kcol[:, :, None]  # [S, SLICE_KH, BLOCK_M]
        acc = tl.zeros((SLICES, BLOCK_N, BLOCK_M), dtype=tl.int32)
        for i in range(0, STATIC_STEPS if STATIC_STEPS > 0 else steps):
            kmask = i * SLICES * SLICE_KH + kcol < KH
            w8 = tl.load(w_ptrs, mask=mask_n[None, :, None] & kmask[:, None, :], other=0).to(tl.int8, bitcast=True)
            amask = kmask[:, :, None] & mask_m[None, None, :]
            a_lo = tl.load(a_ptrs, mask=amask, other=0)
            a_hi = tl.load(a_ptrs + KH, mask=amask, other=0)
            acc = tl.dot(_nibbles_times16(w8, False, ASM), a_lo, acc, out_dtype=tl.int32)  # low nibbles: even k
            acc = tl.dot(_nibbles_times16(w8, True, ASM), a_hi, acc, out_dtype=tl.int32)
            w_ptrs += SLICES * SLICE_KH
            a_ptrs += SLICES * SLICE_KH
        _swap_epilogue_store(tl.sum(acc, axis=0) >> 4, sa_ptr, sw_ptr, y_ptr, stride_ym, offs_m, offs_n, mask_m, mask_n,
                             OUT_F32)

    @triton.jit
    def _gemv_finish(acc2, ws_ptr, cnt_ptr, pid, N, SPLIT_K: tl.constexpr, za_ptr, wsum_ptr, sa_ptr, sw_ptr, y_ptr,
                     stride_ym, offs_m, offs_n, mask_m, mask_n, OUT_F32: tl.constexpr):
        """A GEMV program's [tokens, rows] integer sums -> the epilogue, through split-K's workspace if split."""
        if SPLIT_K > 1:
            _splitk_fixup(acc2, ws_ptr, cnt_ptr, pid, N, SPLIT_K, za_ptr, wsum_ptr, sa_ptr, sw_ptr, y_ptr, stride_ym,
                          offs_m, offs_n, mask_m, mask_n, OUT_F32)
        else:
            _epilogue_store(acc2, za_ptr, wsum_ptr, sa_ptr, sw_ptr, y_ptr, stride_ym, offs_m, offs_n, mask_m, mask_n,
                            OUT_F32)

    @triton.jit
    def _dp4a(a, b, c, ASM: tl.constexpr, SIGNED_B: tl.constexpr = False):
        """c + the dot of the four unsigned bytes of a and the four bytes of b, unsigned or (SIGNED_B)
        two's complement (int32 lanes)."""
        if ASM:
            if SIGNED_B:
                return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                                 dtype=tl.int32, is_pure=True, pack=1)
            return tl.inline_asm_elementwise("dp4a.u32.u32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:  # the interpreter: the same sum by shifts and masks
            s = c
            for i in tl.static_range(4):
                b_i = (b >> (8 * i)) & 0xFF
                if SIGNED_B:
                    b_i = (b_i ^ 0x80) - 0x80
                s += ((a >> (8 * i)) & 0xFF) * b_i
            return s

    @triton.jit
    def _w4a4_gemv_lanes_kernel(
        a_ptr, w_ptr, sa_ptr, za_ptr, sw_ptr, wsum_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, N, KW, k_steps, stride_am, stride_wn, stride_ym,
        M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, SPLIT_K: tl.constexpr,
        STATIC_STEPS: tl.constexpr, OUT_F32: tl.constexpr, EVEN_K: tl.constexpr, ASM: tl.constexpr = False,
        PDL: tl.constexpr = False,
    ):
        """Decode GEMV with dp4a, every tensor in the weight tile's own layout: the packed operands
        read as int32 words (8 codes each, 16-byte loads), each token's activation words loaded
        through a pointer tile that repeats them down the rows (L1 serves the repeats), so no
        layout conversion and no shared memory in the loop.  Each token keeps a [BLOCK_N, BLOCK_KW]
        int32 accumulator (a tuple, unrolled over M_PAD); lanes are reduced once, after the loop.
        The weight nibbles become 16 w as signed bytes once per word (module notes) and serve
        every token; dp4a.u32.s32 multiplies them with the unsigned activation codes.  The next
        step's weight words are loaded before this step's arithmetic (by hand: Triton pipelines
        only loads that feed a dot).  EVEN_K: every step is whole (no K mask, which keeps the
        loads vectorised when KW's divisibility is not known)."""
        pid = tl.program_id(0)
        k0 = tl.program_id(1) * k_steps * BLOCK_KW  # this split's first word
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = k0 + tl.arange(0, BLOCK_KW)
        mask_n = offs_n < N
        kend = tl.minimum(k0 + k_steps * BLOCK_KW, KW)
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_KW]
        a_ptrs = a_ptr + tl.broadcast_to(offs_k[None, :], (BLOCK_N, BLOCK_KW))  # token 0's words, every row
        accs = ()
        for m in tl.static_range(M_PAD):
            accs = accs + (tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.int32),)
        if EVEN_K:
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0)
        else:
            w = tl.load(w_ptrs, mask=mask_n[:, None] & (offs_k < kend)[None, :], other=0)
        # PDL: the first weight words (no other kernel writes them) are on their way while the grid
        # before this one finishes; the activations are read only after it has
        wait_for_prior_grid(PDL)
        for i in range(0, STATIC_STEPS if STATIC_STEPS > 0 else k_steps):
            if EVEN_K:
                w_next = tl.load(w_ptrs + BLOCK_KW, mask=mask_n[:, None] & (i + 1 < k_steps), other=0)
            else:
                kmask = i * BLOCK_KW + offs_k < kend
                w_next = tl.load(w_ptrs + BLOCK_KW,
                                 mask=mask_n[:, None] & ((i + 1) * BLOCK_KW + offs_k < kend)[None, :], other=0)
            w_lo = (w << 4) & -0x0F0F0F10  # 16 w a byte (-0x0F0F0F10 is 0xF0F0F0F0 as an int32): the sums are
            w_hi = w & -0x0F0F0F10  # 16x, shifted back after the loop
            new = ()
            for m in tl.static_range(M_PAD):
                if EVEN_K:
                    a = tl.load(a_ptrs + m * stride_am, mask=m < M, other=0)
                else:
                    a = tl.load(a_ptrs + m * stride_am, mask=(m < M) & kmask[None, :], other=0)
                acc = _dp4a(a & 0x0F0F0F0F, w_lo, accs[m], ASM, SIGNED_B=True)
                new = new + (_dp4a((a >> 4) & 0x0F0F0F0F, w_hi, acc, ASM, SIGNED_B=True),)
            accs = new
            w = w_next
            w_ptrs += BLOCK_KW
            a_ptrs += BLOCK_KW
        offs_m = tl.arange(0, M_PAD)
        mask_m = offs_m < M
        acc2 = tl.zeros((M_PAD, BLOCK_N), dtype=tl.int32)
        for m in tl.static_range(M_PAD):
            acc2 = tl.where(offs_m[:, None] == m, tl.sum(accs[m], axis=1)[None, :], acc2)
        acc2 = acc2 >> 4
        _gemv_finish(acc2, ws_ptr, cnt_ptr, pid, N, SPLIT_K, za_ptr, wsum_ptr, sa_ptr, sw_ptr, y_ptr, stride_ym,
                     offs_m, offs_n, mask_m, mask_n, OUT_F32)

    @triton.jit
    def _w4a4_gemv_kernel(
        a_ptr, w_ptr, sa_ptr, za_ptr, sw_ptr, wsum_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, N, KH, k_steps, stride_am, stride_wn, stride_ym,
        M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr, SPLIT_K: tl.constexpr,
        STATIC_STEPS: tl.constexpr, OUT_F32: tl.constexpr, DP4A: tl.constexpr = False, ASM: tl.constexpr = False,
    ):
        """Decode (M <= M_PAD <= 8) on the CUDA cores: weight rows read k-contiguous (16-byte
        loads), int32 products reduced along k per step, the next step's tiles loaded before
        this step's arithmetic (by hand: Triton pipelines only loads that feed a dot).  No
        tensor-core operand layouts, no shared-memory round trip.  DP4A: the operands are the
        packed bytes read as int32 words (KH, BLOCK_KH and the strides count words), four
        products per dp4a (module notes)."""
        pid = tl.program_id(0)
        k0 = tl.program_id(1) * k_steps * BLOCK_KH  # this split's first packed column
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = k0 + tl.arange(0, BLOCK_KH)
        offs_m = tl.arange(0, M_PAD)
        mask_n = offs_n < N
        mask_m = offs_m < M
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_KH]
        a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]  # [M_PAD, BLOCK_KH]
        acc2 = tl.zeros((M_PAD, BLOCK_N), dtype=tl.int32)
        asum = tl.zeros((M_PAD,), dtype=tl.int32)  # DP4A: sum of the activation codes
        kend = tl.minimum(k0 + k_steps * BLOCK_KH, KH)
        w = tl.load(w_ptrs, mask=mask_n[:, None] & (offs_k < kend)[None, :], other=0)
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k < kend)[None, :], other=0)
        for i in range(0, STATIC_STEPS if STATIC_STEPS > 0 else k_steps):
            w_ptrs += BLOCK_KH
            a_ptrs += BLOCK_KH
            kmask = (i + 1) * BLOCK_KH + offs_k < kend
            w_next = tl.load(w_ptrs, mask=mask_n[:, None] & kmask[None, :], other=0)
            a_next = tl.load(a_ptrs, mask=mask_m[:, None] & kmask[None, :], other=0)
            if DP4A:
                # offset weight codes w + 8 (bit 3 flipped) of the even / odd k; activations as they are
                w_lo = tl.broadcast_to(((w & 0x0F0F0F0F) ^ 0x08080808)[None, :, :], (M_PAD, BLOCK_N, BLOCK_KH))
                w_hi = tl.broadcast_to((((w >> 4) & 0x0F0F0F0F) ^ 0x08080808)[None, :, :], (M_PAD, BLOCK_N, BLOCK_KH))
                a_lo = a & 0x0F0F0F0F
                a_hi = (a >> 4) & 0x0F0F0F0F
                d = _dp4a(tl.broadcast_to(a_lo[:, None, :], (M_PAD, BLOCK_N, BLOCK_KH)), w_lo,
                          tl.zeros((M_PAD, BLOCK_N, BLOCK_KH), dtype=tl.int32), ASM)
                d = _dp4a(tl.broadcast_to(a_hi[:, None, :], (M_PAD, BLOCK_N, BLOCK_KH)), w_hi, d, ASM)
                acc2 += tl.sum(d, axis=2)
                ones = tl.full((M_PAD, BLOCK_KH), 0x01010101, tl.int32)
                asum += tl.sum(_dp4a(a_hi, ones, _dp4a(a_lo, ones, tl.zeros_like(a_lo), ASM), ASM), axis=1)
            else:
                w8 = w.to(tl.int8, bitcast=True)
                w_lo = ((w8 << 4) >> 4).to(tl.int32)
                w_hi = (w8 >> 4).to(tl.int32)
                a_lo = (a & 0xF).to(tl.int32)
                a_hi = (a >> 4).to(tl.int32)
                acc2 += tl.sum(a_lo[:, None, :] * w_lo[None, :, :] + a_hi[:, None, :] * w_hi[None, :, :], axis=2)
            w = w_next
            a = a_next
        if DP4A:
            acc2 -= 8 * asum[:, None]  # sum a (w + 8) - 8 sum a = sum a w, exactly
        _gemv_finish(acc2, ws_ptr, cnt_ptr, pid, N, SPLIT_K, za_ptr, wsum_ptr, sa_ptr, sw_ptr, y_ptr, stride_ym,
                     offs_m, offs_n, mask_m, mask_n, OUT_F32)


_SPLITK_BUFFERS: dict = {}
_SPLITK_RETIRED: list = []  # grown-out buffers, still referenced by the CUDA graphs captured with them


def _splitk_buffers(m: int, n: int, tiles: int, device, split_k: int):
    """Zeroed int32 workspace [>= m * n] and tile counters, kept per device and grown on demand.

    The kernels leave both zeroed, so they are allocated (and cleared) once.  A grown pair replaces
    the old one, which is kept alive: a CUDA graph captured earlier still points at it (freeing it
    would let a replay write into memory that belongs to something else).  Not safe for concurrent
    launches on several streams."""
    if split_k == 1:  # unused by the kernel; any int32 tensor will do (made once: a fill kernel per call
        # cost 0.1 ms of a 7B decode step, session 19's profile)
        key = ("dummy", str(device))
        if key not in _SPLITK_BUFFERS:
            _SPLITK_BUFFERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
        return _SPLITK_BUFFERS[key], _SPLITK_BUFFERS[key]
    key = str(device)
    ws, cnt = _SPLITK_BUFFERS.get(key, (None, None))
    if ws is None or ws.numel() < m * n or cnt.numel() < tiles:
        if ws is not None:
            _SPLITK_RETIRED.append((ws, cnt))
        ws = torch.zeros(max(m * n, 0 if ws is None else ws.numel()), dtype=torch.int32, device=device)
        cnt = torch.zeros(max(tiles, 0 if cnt is None else cnt.numel()), dtype=torch.int32, device=device)
        _SPLITK_BUFFERS[key] = (ws, cnt)
    return ws, cnt


# (device, M, N, K) -> whether cuBLAS's FP8 GEMM gave exact integer sums there (scaled_mm_exact)
_SCALED_MM_EXACT: dict = {}


def scaled_mm_exact(m: int, n: int, k: int, device) -> bool:
    """Whether ``torch._scaled_mm`` on e4m3 codes sums exactly at this shape on this device.

    Two probes at the very shape: every product +120 (|a| = 15, |w| = 8: the largest partial sums
    the W4A4 codes can build, where reduced-precision accumulation would drop bits first), and
    random codes against their float64 dot. Cached per (device, M, N, K); off CUDA (the CPU's
    implementation accumulates in fp32) it is exact by construction and not probed."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    key = (str(device), m, n, k)
    if key not in _SCALED_MM_EXACT:
        if torch.cuda.is_current_stream_capturing():  # no probe inside a CUDA graph: Triton's fp8 for now
            return False
        one = torch.ones((), device=device)
        g = torch.Generator(device).manual_seed(0)
        worst_a = torch.full((m, k), -15.0, device=device).to(torch.float8_e4m3fn)
        worst_w = torch.full((n, k), -8.0, device=device).to(torch.float8_e4m3fn)
        try:
            ok = bool((torch._scaled_mm(worst_a, worst_w.t(), one, one, out_dtype=torch.float32,
                                        use_fast_accum=False) == 120.0 * k).all())
            a = torch.randint(-15, 16, (m, k), device=device, generator=g).to(torch.float32)
            w = torch.randint(-8, 8, (n, k), device=device, generator=g).to(torch.float32)
            got = torch._scaled_mm(a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn).t(), one, one,
                                   out_dtype=torch.float32, use_fast_accum=False)
            ok = ok and torch.equal(got.double(), a.double() @ w.double().T)
        except RuntimeError:  # a shape or device cuBLAS's FP8 GEMM does not take: the fallback
            ok = False
        _SCALED_MM_EXACT[key] = ok
        if not ok:
            import warnings

            warnings.warn(f"cuBLAS FP8 GEMM is not exact at M={m}, N={n}, K={k} on {device}: this shape runs on "
                          "the Triton fp8 kernel instead (w4a4_gemm.scaled_mm_exact)", RuntimeWarning, stacklevel=3)
    return _SCALED_MM_EXACT[key]


def _scaled_mm_into(a8: torch.Tensor, a_scale: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
    """out = s_a s_w (a8 @ w8^T) on cuBLAS's FP8 path (bf16: its rowwise epilogue; fp32: the exact
    integer sums, then the Triton kernels' epilogue order)."""
    if out.dtype == torch.bfloat16:
        return torch._scaled_mm(a8, w8.t(), scale_a=a_scale.reshape(-1, 1), scale_b=w_scale.reshape(1, -1),
                                out_dtype=torch.bfloat16, use_fast_accum=False, out=out)
    one = torch.ones((), device=a8.device)
    acc = torch._scaled_mm(a8, w8.t(), one, one, out_dtype=torch.float32, use_fast_accum=False)
    return torch.mul(acc.mul_(a_scale.reshape(-1, 1)), w_scale.reshape(1, -1), out=out)


def w4a4_matmul(
    a_codes: torch.Tensor,
    a_scale: torch.Tensor,
    a_zero: torch.Tensor,
    weight: PackedWeight,
    backend: str = "auto",
    config: GemmConfig | None = None,
    out: torch.Tensor | None = None,
    w_planar: torch.Tensor | None = None,
) -> torch.Tensor:
    """[M, N] = dequant(a) @ dequant(w)^T, computed exactly in integers (see module docstring);
    bf16, or fp32 when ``out`` is an fp32 tensor (the epilogue's value before the bf16 rounding).

    a_codes: uint8 [M, K/2] (asymmetric codes, pack_int4 layout) with a_zero fp32 [M], or the
    planar centered operand of `planar_centered` (int8 for the int8 backend, e4m3 for fp8) with
    a_zero None; a_scale: fp32 [M].  w_planar: `planar_weight(weight, dtype)` to read 1-byte weight
    codes instead of the packed ones (tensor-core backends).
    backend: "int8" (int8 tensor cores, int32 accumulation), "int8s" (the same with the operands
    swapped: planar activations only), "fp8" (e4m3, fp32 per-block promotion), "gemv"
    (CUDA cores, int32; M <= 8; config.block_m unused), "scaled_mm" (cuBLAS FP8: planar e4m3
    activations and `w_planar` e4m3; a shape `scaled_mm_exact` rejects runs on "fp8") or "auto"
    (gemv for M <= GEMV_MAX_TOKENS, else int8).
    """
    if backend not in ("auto", "int8", "int8s", "fp8", "gemv", "scaled_mm"):
        raise ValueError(f"backend must be 'auto', 'int8', 'int8s', 'fp8', 'gemv' or 'scaled_mm', got {backend!r}")
    if backend == "scaled_mm":
        n, k, m = weight.codes.shape[0], weight.k, a_codes.shape[0]
        if (a_codes.dtype != torch.float8_e4m3fn or a_zero is not None or a_codes.shape[1] != k
                or w_planar is None or w_planar.dtype != torch.float8_e4m3fn or w_planar.shape != (n, k)):
            raise TypeError(f"the scaled_mm backend takes planar e4m3 activations [M, {k}] with a_zero=None and "
                            f"w_planar = planar_weight(weight, torch.float8_e4m3fn) [{n}, {k}]")
        if out is None:
            out = torch.empty(m, n, dtype=torch.bfloat16, device=a_codes.device)
        # cuBLAS's FP8 GEMM wants K and N in multiples of 16; elsewhere, and where it is not exact: Triton
        if m and k % 16 == 0 and n % 16 == 0 and scaled_mm_exact(m, n, k, a_codes.device):
            return _scaled_mm_into(a_codes, a_scale, w_planar, weight.scale, out)
        backend = "fp8"
    require_triton()
    if weight.codes.dtype != torch.uint8:
        raise TypeError("weight.codes must be packed uint8")
    a8 = a_codes.dtype != torch.uint8
    n, kh = weight.codes.shape
    m = a_codes.shape[0]
    if a8 or w_planar is not None:
        if backend == "auto":
            backend = "fp8" if a_codes.dtype == torch.float8_e4m3fn else "int8"
        want = torch.float8_e4m3fn if backend == "fp8" else torch.int8
        if backend == "gemv":
            raise ValueError("planar 8-bit operands are for the int8 / int8s / fp8 backends")
        if backend == "int8s" and w_planar is not None:
            raise ValueError("the int8s backend reads the packed weight (w_planar must be None)")
        if a8 and (a_codes.dtype != want or a_zero is not None or a_codes.shape[1] != 2 * kh):
            raise TypeError(f"the {backend} backend takes planar {want} activations [M, {2 * kh}] and a_zero=None, "
                            f"got {a_codes.dtype} {tuple(a_codes.shape)}")
        if w_planar is not None and (w_planar.dtype != want or w_planar.shape != (n, 2 * kh)):
            raise TypeError(f"w_planar must be {want} [{n}, {2 * kh}], got {w_planar.dtype} {tuple(w_planar.shape)}")
    elif a_codes.shape[1] != kh:
        raise ValueError(f"packed K mismatch: activations {a_codes.shape[1]}, weight {kh}")
    if not a8 and a_zero is None:
        raise ValueError("packed activations need their zero points")
    if backend == "int8s" and not a8:
        raise TypeError("the int8s backend takes planar centered int8 activations (planar_centered)")
    if backend == "auto":  # the CUDA-core dp4a GEMV up to GEMV_MAX_TOKENS tokens, else int8 tensor cores
        backend = "gemv" if m <= GEMV_MAX_TOKENS else "int8"
    cfg = config or default_config(m, n, 2 * kh, backend)
    if (backend == "int8s" or cfg.lanes) and 2 * kh > 1 << 20:  # their int32 sums hold 16 w a (module notes)
        raise ValueError(f"the {backend} backend's exact int32 sums (16 w a) allow K <= 2^20, got K = {2 * kh}")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if config is None and cfg.lanes:
        # a K step no longer than K itself (the defaults were measured at K >= 4096; below, the rest of
        # a 4096-wide step would be masked lanes); the interpreter runs programs one after another, each
        # op in numpy, so there also a few wide programs instead of the GPU's many narrow ones (the same
        # integers; the GPU configs are tested explicitly): 30x faster on the CPU test models
        cfg = dataclasses.replace(cfg, block_n=max(cfg.block_n, 64) if interpret else cfg.block_n,
                                  block_k=min(cfg.block_k, max(64, 1 << (2 * kh - 1).bit_length())))
    if out is None:
        out = torch.empty(m, n, dtype=torch.bfloat16, device=a_codes.device)
    if out.dtype not in (torch.bfloat16, torch.float32) or out.shape != (m, n) or out.stride(1) != 1:
        raise ValueError(f"out must be a row-major bf16 or fp32 [{m}, {n}] tensor")
    if m == 0:
        return out
    if backend == "int8s":  # config: block_m = tokens per tile (MMA N), block_n = weight rows (MMA M)
        if cfg.asm_unpack and cfg.slices * cfg.block_n * (cfg.block_k // 2) < 4 * 32 * cfg.num_warps:
            raise ValueError(f"asm_unpack packs four weight bytes per thread register: slices * block_n * block_k / 2 "
                             f"must be >= 128 * num_warps, got {cfg.slices} x {cfg.block_n} x {cfg.block_k // 2} with "
                             f"{cfg.num_warps} warps")
        tiles = triton.cdiv(n, cfg.block_n) * triton.cdiv(m, cfg.block_m)
        shared = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUP_N=cfg.group_m,
                      OUT_F32=out.dtype == torch.float32, ASM=cfg.asm_unpack and not interpret,
                      **pdl_kwargs(m, a_codes.device), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                      enable_fp_fusion=False)
        if cfg.slices > 1:
            if cfg.split_k > 1 or cfg.slices & (cfg.slices - 1):
                raise ValueError(f"K slices in one program (slices={cfg.slices}) must be a power of two and take "
                                 f"no split-K (split_k={cfg.split_k})")
            steps = triton.cdiv(kh, cfg.slices * cfg.block_k // 2)
            _w4a4_swap_sliced_kernel[(tiles,)](
                a_codes, weight.codes, a_scale, weight.scale, out, m, n, kh, steps,
                a_codes.stride(0), weight.codes.stride(0), out.stride(0), SLICE_KH=cfg.block_k // 2,
                SLICES=cfg.slices, STATIC_STEPS=steps if interpret else 0, **shared)
            return out
        per_split = triton.cdiv(triton.cdiv(kh, cfg.block_k // 2), cfg.split_k)
        ws, cnt = _splitk_buffers(m, n, tiles, a_codes.device, cfg.split_k)
        _w4a4_swap_kernel[(tiles, cfg.split_k)](
            a_codes, weight.codes, a_scale, weight.scale, out, ws, cnt, m, n, kh, per_split,
            a_codes.stride(0), weight.codes.stride(0), out.stride(0), BLOCK_KH=cfg.block_k // 2,
            SPLIT_K=cfg.split_k, STATIC_STEPS=per_split if interpret else 0, **shared)
        return out
    if backend == "gemv":
        m_pad = max(1, 1 << (m - 1).bit_length())
        if m_pad > 8:
            raise ValueError(f"the gemv backend is for M <= 8, got M={m}")
        ws, cnt = _splitk_buffers(m, n, triton.cdiv(n, cfg.block_n), a_codes.device, cfg.split_k)
        a_op, w_op, per = a_codes, weight.codes, 2  # per: codes per element of the operands
        if cfg.dp4a:  # the same bytes as int32 words
            if kh % 4 or cfg.block_k % 8:
                raise ValueError(f"the dp4a gemv needs K and block_k multiples of 8, got K={2 * kh}, "
                                 f"block_k={cfg.block_k}")
            a_op, w_op, per = a_codes.contiguous().view(torch.int32), weight.codes.contiguous().view(torch.int32), 8
        kw = 2 * kh // per
        steps = triton.cdiv(triton.cdiv(kw, cfg.block_k // per), cfg.split_k)  # per split
        if cfg.dp4a and cfg.lanes:
            bkw = cfg.block_k // per
            _w4a4_gemv_lanes_kernel[(triton.cdiv(n, cfg.block_n), cfg.split_k)](
                a_op, w_op, a_scale, a_zero, weight.scale, weight.rowsum, out, ws, cnt,
                m, n, kw, steps, a_op.stride(0), w_op.stride(0), out.stride(0),
                M_PAD=m_pad, BLOCK_N=cfg.block_n, BLOCK_KW=bkw, SPLIT_K=cfg.split_k,
                STATIC_STEPS=steps if interpret else 0, OUT_F32=out.dtype == torch.float32,
                EVEN_K=steps * cfg.split_k * bkw == kw, ASM=not interpret, **pdl_kwargs(m, a_codes.device),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
            )
            return out
        _w4a4_gemv_kernel[(triton.cdiv(n, cfg.block_n), cfg.split_k)](
            a_op, w_op, a_scale, a_zero, weight.scale, weight.rowsum, out, ws, cnt,
            m, n, kw, steps, a_op.stride(0), w_op.stride(0), out.stride(0),
            M_PAD=m_pad, BLOCK_N=cfg.block_n, BLOCK_KH=cfg.block_k // per, SPLIT_K=cfg.split_k,
            STATIC_STEPS=steps if interpret else 0, OUT_F32=out.dtype == torch.float32,
            DP4A=cfg.dp4a, ASM=cfg.dp4a and not interpret,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
        )
        return out
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
    per_split = triton.cdiv(triton.cdiv(kh, cfg.block_k // 2), cfg.split_k)
    ws, cnt = _splitk_buffers(m, n, grid[0], a_codes.device, cfg.split_k)
    w_op = weight.codes if w_planar is None else w_planar
    if backend == "fp8":  # e4m3 operands travel as their bytes (bitcast in the kernel)
        a_codes, w_op = a_codes.view(torch.uint8), w_op.view(torch.uint8)
    _w4a4_kernel[grid](
        a_codes, w_op, a_scale, a_scale if a8 else a_zero, weight.scale, weight.rowsum, out, ws, cnt,
        m, n, kh, per_split, a_codes.stride(0), w_op.stride(0), out.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_KH=cfg.block_k // 2,
        GROUP_M=cfg.group_m, SPLIT_K=cfg.split_k, FP8=backend == "fp8",
        STATIC_STEPS=per_split if interpret else 0, OUT_F32=out.dtype == torch.float32,
        A8=a8, W8=w_planar is not None, PROMOTE=cfg.promote if backend == "fp8" else 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
    )
    return out


def w4a4_matmul_reference(a_codes, a_scale, a_zero, weight: PackedWeight) -> torch.Tensor:
    """Same formula in torch: int64 integer dot, then the fp32 epilogue in the kernel's order."""
    k = weight.k
    # float64 products / sums of these integers are exact (|sum| < 2^53) and run on any device
    a = unpack_int4(a_codes, k, signed=False).to(torch.float64)
    w = unpack_int4(weight.codes, k, signed=True).to(torch.float64)
    acc = a @ w.T - a_zero.to(torch.float64)[:, None] * weight.rowsum.to(torch.float64)[None, :]
    return ((acc.to(torch.float32) * a_scale[:, None].float()) * weight.scale[None, :]).to(torch.bfloat16)
