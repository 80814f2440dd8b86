"""A 4-bit K/V cache on the kernels: codes in a static cache, and a decode attention that reads them.

    model.set_attn_implementation(register_kv4_attention())
    cache = Kv4StaticCache(model.config, max_cache_len=...)   # in place of transformers' StaticCache

What it computes is the fake-quant model's attention (`modules.AttentionTransform` with 4-bit K and
V quantizers): K after RoPE, rotated by R3 (a Hadamard of the head dim) when the run has it, and V,
each quantized per token and head (asymmetric 4-bit, the run's clip ratio), then attention over the
dequantized values in the model dtype. Here the codes are what the cache holds:

* `kv4_store`: one launch per layer and step writes the new tokens' K and V codes (two per byte,
  `pack_int4` order) and fp32 scale / zero into the cache, at the position the layer's token count
  (a device tensor, as transformers' static layers keep it) says: CUDA graphs replay it correctly.
  K's rotation and the quantization are `act_quant`'s own code (same expressions), so the codes are
  those of the fake-quant path up to a flip where a rotated value sits on a rounding boundary
  (the fp32 summation order of the Hadamard; without R3 they are identical).
* `kv4_decode_attention` (one query token per sequence): flash decoding. A program takes one
  sequence, one KV head (its GQA group of query heads as the rows of the dots, padded to 16; or,
  without GQA at small batch, one row on the CUDA cores) and one slice of the cache, in steps of
  8 to 64 positions with a fixed trip count (Triton pipelines it; the tail is masked). On the
  dots and CUDA-core paths K is dequantized as the fake path holds it ((code - zero) * scale in
  fp32, rounded to the model dtype); P V is computed as (p_j * scale_j) (code_j - zero_j), the
  integers exact and the weight rounded to the model dtype as flash attention rounds P. So those
  differ from SDPA over the fake path's values only by fp32 summation order and that one rounding
  (tests: within 2^-7 in bf16, 1e-5 in fp32). The slots path (MHA, the default there) takes the
  scales and zero points out of the per-element work and reads the codes as int32 words
  (`_slots_loop_words`; `_slots_loop_factored` byte by byte), so it attends over the exact
  (code - zero) * scale, unrounded: within 2^-7 of SDPA over that exact K, within 3e-2 of the
  largest output from the fake path where logits are large (docs/KERNELS.md 4g-4i). So does the dots
  path (GQA) on words (`_gqa_loop_words`, bf16 / fp32 queries, head dims from 64: each nibble masked
  where it sits is a bf16 number for the tensor cores; 4i). A second
  launch merges the slices where there are several. The model's attention has the store's launch
  apply R3 to the query (`kv4_store(..., query=)`); the kernel can apply it itself (`rotate_q`).
* Several query tokens: without a cache (`ppl`, `bench`'s prefill) or into an empty one (a generation's
  prompt: transformers passes no mask, or a causal one), `kv4_fake_quant` gives the fake-quant K / V and
  the rotated Q in one launch (storing the codes too where there is a cache), then SDPA over the prompt alone;
  after earlier tokens, the store kernel writes the codes, and the positions written so far are dequantized
  in torch and attended by SDPA with the model's mask (every position of the static cache where the count
  cannot be read on the host: inside a CUDA graph capture or torch.compile).

* The rotary embedding in the same launch (`fuse_rope_`, families of transformers' Llama attention
  template): the attention's forward hands q and k over before RoPE and the store / fake-quant launch
  applies it, rounding as transformers does (bit for bit), instead of ~10 elementwise kernels a layer.
  Checked by running at install; any cache but this one runs the original forward.
* The launch takes 16 rows a program with R3 as fp32 butterflies (`STORE_CONFIG`): a tensor-core dot would load
  the D x D Sylvester matrix into every program (32 KB for 4 KB of data at D = 128). Under GQA its grid gives each
  role (K, V, Q) only its own row blocks (a 2-D grid would leave most K / V programs without a row).

A left-padded batch: the prompt's mask gives each sequence's first real position (`Kv4StaticLayer.starts`),
and the decode kernel starts there. The pads are read and checked on the host at the prompt; under torch.compile or
a graph capture of the prompt (no host reads) they are written into `starts` on the device, unchecked.
Limits (refused by `check_kv4_support`; a mask that hides more than a left padding, at the prompt): all
sequences share one token count (a batch's prompts are written at the same positions), no K bias kept out of
the quantizer (Qwen2's `kv_exclude_k_bias`), full attention layers only, head dims whose Hadamard
`act_quant.stage_sizes` accepts (16..2^14).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import types

import torch

from ..hadamard import hadamard_factorization
from .act_quant import _factor_tensors, stage_sizes

try:
    import triton
    import triton.language as tl

    from .act_quant import (_asym4_qparams, _butterfly, _codes, _pow2_stage, _prescale, _round_model,
                            _unscale_round)
except ImportError:  # pragma: no cover - exercised only without triton
    triton = tl = None

ATTN_IMPLEMENTATION = "dartquant_kv4"
log = logging.getLogger(__name__)


if triton is not None:

    @triton.jit
    def _rotate_rows(x, s1_ptr, s2_ptr, inv_sqrt_d, R: tl.constexpr, D: tl.constexpr, F1: tl.constexpr,
                     F2: tl.constexpr, SPLIT_FIRST: tl.constexpr, ROUND_BF16: tl.constexpr, ROUND_FP16: tl.constexpr,
                     LOG_D: tl.constexpr = 0):
        """x [R, D] fp32 -> x @ hadamard_matrix(D) rounded to the model dtype (act_quant's 3d kernel
        with K = 1: power-of-two prescale, one or two Sylvester stages on tensor cores; or, LOG_D > 0,
        log2(D) fp32 butterfly stages in registers, no matrix loaded: `_butterfly`)."""
        if LOG_D > 0:
            y = _round_model(_butterfly(x, R, D, LOG_D) * inv_sqrt_d, ROUND_BF16, ROUND_FP16)
        else:
            pre, post = _prescale(tl.max(tl.abs(x), axis=1))
            y = x * pre[:, None]
            y = _pow2_stage(y, s2_ptr, R, D, F2, SPLIT_FIRST)
            if F1 > 1:
                y = _pow2_stage(y, s1_ptr, R, D, F1, True)
            y = _unscale_round(y, post[:, None], inv_sqrt_d, ROUND_BF16, ROUND_FP16)
        return y

    @triton.jit
    def _rope_rows(x, src, live, cos_ptr, sin_ptr, b, s, sc_b, sc_s, D: tl.constexpr, ROUND_BF16: tl.constexpr,
                   ROUND_FP16: tl.constexpr):
        """x [R, D] (rows loaded from `src`) -> transformers' apply_rotary_pos_emb, op for op and rounded as it
        rounds: x * cos + rotate_half(x) * sin, each product and the sum in the model dtype. rotate_half's
        partner column (d + D/2 mod D) is loaded again rather than shuffled in registers."""
        d = tl.arange(0, D)
        xp = tl.load(src[:, None] + ((d + D // 2) % D)[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        xp = tl.where(d[None, :] < D // 2, -xp, xp)
        at = (b.to(tl.int64) * sc_b + s * sc_s)[:, None] + d[None, :]
        c = tl.load(cos_ptr + at, mask=live[:, None], other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + at, mask=live[:, None], other=0.0).to(tl.float32)
        return _round_model(_round_model(x * c, ROUND_BF16, ROUND_FP16) + _round_model(xp * sn, ROUND_BF16, ROUND_FP16),
                            ROUND_BF16, ROUND_FP16)

    @triton.jit
    def _kv4_store_kernel(
        k_ptr, v_ptr, q_ptr, count_ptr, s1_ptr, s2_ptr, cos_ptr, sin_ptr,
        kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, kd_ptr, vd_ptr, qd_ptr,
        ROWS, ROWS_Q, S_NEW, HKV, HQ, SMAX, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sq_b, sq_h, sq_s, sc_b, sc_s,
        clip_ratio, inv_sqrt_d,
        D: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, BLOCK_M: tl.constexpr, ROTATE_K: tl.constexpr,
        WRITE_CODES: tl.constexpr, WRITE_VALUES: tl.constexpr, SPLIT_FIRST: tl.constexpr,
        ROUND_BF16: tl.constexpr, ROUND_FP16: tl.constexpr, RECIP: tl.constexpr, USE_RINT: tl.constexpr,
        LOG_D: tl.constexpr, ROPE: tl.constexpr, COMPACT: tl.constexpr = False,
    ):
        """Program (row block, 0 = K / 1 = V / 2 = Q): rows are (sequence, head, new token) flattened.
        COMPACT: one grid axis holding K's, then V's, then Q's row blocks, each role as many as it has rows (a 2-D
        grid gives every role the largest role's count: with GQA, K / V programs with no row at all).
        K / V: 4-bit codes into the cache at the count's positions (WRITE_CODES) and / or the
        dequantized values, in the model dtype, to [rows, D] (WRITE_VALUES: what SDPA reads when
        several query tokens attend); Q: R3 applied (ROTATE_K), to [rows, D]. ROPE: K and Q come before the
        rotary embedding, applied here first (cos / sin [B or 1, S_NEW, D] at strides sc_b, sc_s)."""
        if COMPACT:
            nk = tl.cdiv(ROWS, BLOCK_M)
            pid = tl.program_id(0)
            role = (pid >= nk).to(tl.int32) + (pid >= 2 * nk).to(tl.int32)
            pid -= role * nk
        else:
            pid = tl.program_id(0)
            role = tl.program_id(1)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        s = rows % S_NEW
        heads = HKV
        if role == 2:
            heads = HQ
        bh = rows // S_NEW  # sequence * heads + head
        b = bh // heads
        h = bh % heads
        d = tl.arange(0, D)
        if role == 0:
            live = rows < ROWS
            src = k_ptr + (b.to(tl.int64) * sk_b + h * sk_h + s * sk_s)
        elif role == 1:
            live = rows < ROWS
            src = v_ptr + (b.to(tl.int64) * sv_b + h * sv_h + s * sv_s)
        else:
            live = rows < ROWS_Q
            src = q_ptr + (b.to(tl.int64) * sq_b + h * sq_h + s * sq_s)
        x = tl.load(src[:, None] + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        if ROPE:
            if role != 1:
                x = _rope_rows(x, src, live, cos_ptr, sin_ptr, b, s, sc_b, sc_s, D, ROUND_BF16, ROUND_FP16)
        if ROTATE_K:
            if role != 1:
                x = _rotate_rows(x, s1_ptr, s2_ptr, inv_sqrt_d, BLOCK_M, D, F1, F2, SPLIT_FIRST, ROUND_BF16,
                                 ROUND_FP16, LOG_D)
        x = tl.where(live[:, None], x, 0.0)
        if role == 2:
            tl.store(qd_ptr + rows.to(tl.int64)[:, None] * D + d[None, :], x.to(qd_ptr.dtype.element_ty),
                     mask=live[:, None])
        else:
            scale, zero = _asym4_qparams(tl.min(x, axis=1), tl.max(x, axis=1), clip_ratio, RECIP)
            q = _codes(x, tl.broadcast_to(scale[:, None], x.shape), zero[:, None], USE_RINT)
            if WRITE_VALUES:  # the fake path's dequantized value: (code - zero) * scale, in the model dtype
                val = _round_model((q.to(tl.float32) - zero[:, None]) * scale[:, None], ROUND_BF16, ROUND_FP16)
                vptr = rows.to(tl.int64)[:, None] * D + d[None, :]
                if role == 0:
                    tl.store(kd_ptr + vptr, val.to(kd_ptr.dtype.element_ty), mask=live[:, None])
                else:
                    tl.store(vd_ptr + vptr, val.to(vd_ptr.dtype.element_ty), mask=live[:, None])
            if WRITE_CODES:
                pos = tl.load(count_ptr) - S_NEW + s  # the layer's count already includes the new tokens
                ok = live & (pos < SMAX) & (pos >= 0)
                q_lo, q_hi = tl.split(tl.reshape(q, (BLOCK_M, D // 2, 2)))
                slot = bh.to(tl.int64) * SMAX + pos
                half = tl.arange(0, D // 2)
                packed = q_lo | (q_hi << 4)
                if role == 0:
                    tl.store(kc_ptr + slot[:, None] * (D // 2) + half[None, :], packed, mask=ok[:, None])
                    tl.store(ks_ptr + slot, scale, mask=ok)
                    tl.store(kz_ptr + slot, zero, mask=ok)
                else:
                    tl.store(vc_ptr + slot[:, None] * (D // 2) + half[None, :], packed, mask=ok[:, None])
                    tl.store(vs_ptr + slot, scale, mask=ok)
                    tl.store(vz_ptr + slot, zero, mask=ok)

    @triton.jit
    def _centered_halves(c_ptr, z_ptr, slot, ok, D: tl.constexpr, BS: tl.constexpr):
        """code - zero (integers in [-15, 15], exact in fp32 and bf16) of BS cached positions, as two
        [BS, D / 2] tiles: the even dims (low nibbles) and the odd ones (high nibbles), never
        interleaved in registers (run 34: 0.90x run 33's attention time at Llama-2-7B batch 64).
        Each nibble is made a float by its bits, 2^23 + code (an OR into 0x4B000000's mantissa), and
        2^23 + zero is taken off in one subtraction, both exact (zero points are integers in [0, 15], as
        `_asym4_qparams` makes them): no int -> float conversion per element (session 42: 0.96-0.99x the
        conversion's time at batch 64, outputs bit-identical; docs/KERNELS.md 4g)."""
        half = tl.arange(0, D // 2)
        c = tl.load(c_ptr + slot[:, None] * (D // 2) + half[None, :], mask=ok[:, None], other=0).to(tl.int32)
        zz = tl.load(z_ptr + slot, mask=ok, other=0.0)[:, None] + 8388608.0
        lo = ((c & 15) | 0x4B000000).to(tl.float32, bitcast=True) - zz
        hi = ((c >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - zz
        return lo, hi

    @triton.jit
    def _k_as_held(kc_ptr, ks_ptr, kz_ptr, slot, ok, D: tl.constexpr, BS: tl.constexpr, ROUND_BF16: tl.constexpr,
                   ROUND_FP16: tl.constexpr):
        """K of BS cached positions as the fake path holds it: (code - zero) * scale in fp32, rounded to the
        model dtype; the even dims and the odd ones (`_centered_halves`)."""
        ks = tl.load(ks_ptr + slot, mask=ok, other=0.0)[:, None]
        ke, ko = _centered_halves(kc_ptr, kz_ptr, slot, ok, D, BS)
        return _round_model(ke * ks, ROUND_BF16, ROUND_FP16), _round_model(ko * ks, ROUND_BF16, ROUND_FP16)

    @triton.jit
    def _mm(a, b, LOW: tl.constexpr):
        """a @ b, fp32 out; operands already hold model-dtype values: LOW 1 bf16 / 2 fp16 tensor
        cores (exact products), 0 plain fp32 (fp32 models, and the interpreter, which has no bf16 dot)."""
        if LOW == 1:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
        elif LOW == 2:
            return tl.dot(a.to(tl.float16), b.to(tl.float16), out_dtype=tl.float32)
        else:
            return tl.dot(a, b, input_precision="ieee", out_dtype=tl.float32)

    @triton.jit
    def _slot_softmax_step(s, ok, m_s, l_s):
        """One step of the slots' online softmax: scores s [BS] (masked where not ok) into the running max m_s
        and sum l_s. Returns (new max, the factor that rescales what was accumulated, the weights p, new sum)."""
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_s, s)
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a slot with no position yet: nothing
        alpha = tl.exp(m_s - safe)
        p = tl.exp(s - safe)
        return m_new, alpha, p, l_s * alpha + p

    @triton.jit
    def _slots_loop(qve, qvo, lo, hi, bh, SMAX, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, sm_scale,
                    CHUNK: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, ROUND_BF16: tl.constexpr,
                    ROUND_FP16: tl.constexpr):
        """One query row (no GQA) over positions lo..hi with no reduction across positions inside the loop:
        slot i of the BS-wide step keeps its own online softmax (max, sum, P V) over positions lo + i,
        lo + i + BS, ...; the BS slots are merged once at the end (log-sum-exp).  Per step only the score's
        sum over the head dims crosses threads; the tensor-core path pads the row to 16 and converts each
        tile into dot operands.  K and P V are rounded as the dot path rounds them.
        Returns the merged (max [1], sum [1], even-dim P V [1, D / 2], odd-dim [1, D / 2])."""
        m_s = tl.full((BS,), float("-inf"), tl.float32)
        l_s = tl.zeros((BS,), tl.float32)
        acc_e = tl.zeros((BS, D // 2), tl.float32)
        acc_o = tl.zeros((BS, D // 2), tl.float32)
        for it in range(0, CHUNK // BS):
            j = lo + it * BS + tl.arange(0, BS)
            ok = j < hi
            slot = bh.to(tl.int64) * SMAX + j
            ke, ko = _k_as_held(kc_ptr, ks_ptr, kz_ptr, slot, ok, D, BS, ROUND_BF16, ROUND_FP16)
            s = tl.sum(ke * qve[None, :] + ko * qvo[None, :], axis=1) * sm_scale
            m_new, alpha, p, l_s = _slot_softmax_step(s, ok, m_s, l_s)
            ve, vo = _centered_halves(vc_ptr, vz_ptr, slot, ok, D, BS)
            pv = _round_model(p * tl.load(vs_ptr + slot, mask=ok, other=0.0), ROUND_BF16, ROUND_FP16)
            acc_e = acc_e * alpha[:, None] + pv[:, None] * ve
            acc_o = acc_o * alpha[:, None] + pv[:, None] * vo
            m_s = m_new
        m = tl.max(m_s, axis=0)  # finite: the caller's slice holds a position
        w = tl.exp(m_s - m)
        zero = tl.zeros((1,), tl.float32)
        return (zero + m, zero + tl.sum(l_s * w, axis=0), tl.sum(acc_e * w[:, None], axis=0)[None, :],
                tl.sum(acc_o * w[:, None], axis=0)[None, :])

    @triton.jit
    def _unit_halves(c_ptr, slot, ok, D: tl.constexpr):
        """1 + code / 16 of BS cached positions (exact in fp32), the even dims and the odd ones: each nibble
        ORed into the mantissa of 1.0 by its bits, a shift and a mask, no int -> float conversion and no
        zero point (the factored loop takes the zeros out per position)."""
        half = tl.arange(0, D // 2)
        c = tl.load(c_ptr + slot[:, None] * (D // 2) + half[None, :], mask=ok[:, None], other=0).to(tl.int32)
        lo = ((c << 19) & 0x780000) | 0x3F800000  # the low nibble to mantissa bits 19-22
        hi = ((c << 15) & 0x780000) | 0x3F800000  # the high nibble there
        return lo.to(tl.float32, bitcast=True), hi.to(tl.float32, bitcast=True)

    @triton.jit
    def _slots_loop_factored(qve, qvo, lo, hi, bh, SMAX, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, sm_scale,
                             CHUNK: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, ROUND_BF16: tl.constexpr,
                             ROUND_FP16: tl.constexpr):
        """`_slots_loop` with the scales and zero points taken out of the per-element work. With x = 1 + c / 16
        (`_unit_halves`) and q's sum Sq over the head dims:
            q . k_j = ks_j * (q . (c_j - z_j)) = ks_j * (16 * (q . x_j) - (16 + z_j) * Sq)
            sum_j pv_j (c_j - z_j) = 16 * (sum_j pv_j x_j - sum_j pv_j) - sum_j pv_j z_j
        so an element costs a shift, a mask and one FMA for K and for V (and V's rescale), not a conversion,
        a subtraction, a scale and a rounding. K is then the exact (c - z) * scale, not its rounding to the
        model dtype as the fake path holds it (2^-9 relative per element in bf16; with large logits the
        outputs move up to ~1.5e-2 of the largest, docs/KERNELS.md 4g); P V's weights are rounded as before.
        The subtractions 16 * (...) - ... cancel at most a few bits of fp32 (x in [1, 2)). Same returns as
        `_slots_loop`. (`_slots_loop_words` is this loop on words, the choice where the head dim allows.)"""
        sq = tl.sum(qve, axis=0) + tl.sum(qvo, axis=0)
        m_s = tl.full((BS,), float("-inf"), tl.float32)
        l_s = tl.zeros((BS,), tl.float32)
        pv_s = tl.zeros((BS,), tl.float32)  # sum of the V weights, per slot
        pvz_s = tl.zeros((BS,), tl.float32)  # sum of the V weights times V's zero points
        acc_e = tl.zeros((BS, D // 2), tl.float32)
        acc_o = tl.zeros((BS, D // 2), tl.float32)
        for it in range(0, CHUNK // BS):
            j = lo + it * BS + tl.arange(0, BS)
            ok = j < hi
            slot = bh.to(tl.int64) * SMAX + j
            xe, xo = _unit_halves(kc_ptr, slot, ok, D)
            t = tl.sum(xe * qve[None, :] + xo * qvo[None, :], axis=1)
            ks = tl.load(ks_ptr + slot, mask=ok, other=0.0)
            kz = tl.load(kz_ptr + slot, mask=ok, other=0.0)
            s = ks * (16.0 * t - (16.0 + kz) * sq) * sm_scale
            m_new, alpha, p, l_s = _slot_softmax_step(s, ok, m_s, l_s)
            ve, vo = _unit_halves(vc_ptr, slot, ok, D)
            pv = _round_model(p * tl.load(vs_ptr + slot, mask=ok, other=0.0), ROUND_BF16, ROUND_FP16)
            pv_s = pv_s * alpha + pv
            pvz_s = pvz_s * alpha + pv * tl.load(vz_ptr + slot, mask=ok, other=0.0)
            acc_e = acc_e * alpha[:, None] + pv[:, None] * ve
            acc_o = acc_o * alpha[:, None] + pv[:, None] * vo
            m_s = m_new
        m = tl.max(m_s, axis=0)  # finite: the caller's slice holds a position
        w = tl.exp(m_s - m)
        spv = tl.sum(pv_s * w, axis=0)
        spvz = tl.sum(pvz_s * w, axis=0)
        zero = tl.zeros((1,), tl.float32)
        out_e = 16.0 * (tl.sum(acc_e * w[:, None], axis=0) - spv) - spvz
        out_o = 16.0 * (tl.sum(acc_o * w[:, None], axis=0) - spv) - spvz
        return zero + m, zero + tl.sum(l_s * w, axis=0), out_e[None, :], out_o[None, :]

    @triton.jit
    def _load_words(c_ptr, slot, ok, D: tl.constexpr):
        """BS cached positions' codes as int32 words [BS, D / 8]: dim 8 i + k is nibble k of word i (little-endian)."""
        wi = tl.arange(0, D // 8)
        return tl.load(c_ptr + slot[:, None] * (D // 8) + wi[None, :], mask=ok[:, None], other=0)

    @triton.jit
    def _word_codes(w):
        """Words [BS, D / 8] -> 8 tiles: each nibble c masked where it sits and the word read as a float, a
        subnormal c * 2^(p_k - 149) exactly (p_k: the nibble's lowest bit, see `_eighths`); nibbles 5-7 shifted
        down 12 bits first, off the exponent. One mask a nibble and one shift a word: no byte extraction, no
        int -> float conversion. (fp32 subnormals: the kernels are compiled without flush-to-zero.)"""
        u = w >> 12
        return ((w & 0xF).to(tl.float32, bitcast=True), (w & 0xF0).to(tl.float32, bitcast=True),
                (w & 0xF00).to(tl.float32, bitcast=True), (w & 0xF000).to(tl.float32, bitcast=True),
                (w & 0xF0000).to(tl.float32, bitcast=True), (u & 0xF00).to(tl.float32, bitcast=True),
                (u & 0xF000).to(tl.float32, bitcast=True), (u & 0xF0000).to(tl.float32, bitcast=True))

    @triton.jit
    def _eighths(q, GP: tl.constexpr, D: tl.constexpr):
        """The one real row of q [GP, D] as 8 vectors [D / 8], q_k[i] = q[8 i + k], each times its nibble's
        2^(85 - p_k) (`_word_codes`): q'_k . x_k = q_k . c_k * 2^-64, exact products, normal floats."""
        z0, z1 = tl.split(tl.reshape(q, (GP, D // 8, 2, 2, 2)))  # d = 8 i + 4 a + 2 b + c: c, then b, then a
        b00, b01 = tl.split(z0)
        b10, b11 = tl.split(z1)
        q0, q4 = tl.split(b00)
        q2, q6 = tl.split(b01)
        q1, q5 = tl.split(b10)
        q3, q7 = tl.split(b11)
        return (tl.sum(q0, axis=0) * 3.8685626227668134e+25, tl.sum(q1, axis=0) * 2.4178516392292583e+24,
                tl.sum(q2, axis=0) * 1.5111572745182865e+23, tl.sum(q3, axis=0) * 9.444732965739290e+21,
                tl.sum(q4, axis=0) * 5.902958103587057e+20, tl.sum(q5, axis=0) * 1.5111572745182865e+23,
                tl.sum(q6, axis=0) * 9.444732965739290e+21, tl.sum(q7, axis=0) * 5.902958103587057e+20)

    @triton.jit
    def _interleave4(a, b, c, d):
        """[n] x 4 -> [4 n]: a[0], b[0], c[0], d[0], a[1], ..."""
        return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), (4 * a.shape[0],))

    @triton.jit
    def _slots_loop_words(q, lo, hi, bh, SMAX, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, sm_scale,
                          CHUNK: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                          ROUND_BF16: tl.constexpr, ROUND_FP16: tl.constexpr):
        """`_slots_loop_factored` on codes read as int32 words, each nibble a subnormal float by a mask
        (`_word_codes`): an element of K or V costs about 1.1 integer ops and one FMA, where the byte path's
        extraction, shift and two masks cost about 3.5. With q's eighths and V's weights scaled by 2^(85 - p_k):
            q . (c_j - z_j) = 2^64 * sum_k q'_k . x_jk - z_j * Sq
            sum_j w_j (c_jd - z_j) = 2^64 * sum_j w'_jd x_jd - sum_j w_j z_j
        Every product is exact and no sum carries an offset to cancel (the factored loop's 1 + c / 16 does), so
        this is at least as close to the exact attention as `_slots_loop_factored`. Weights below ~2^-62 of
        their slot's running maximum lose bits to subnormals (they weigh nothing next to it).
        Returns `_slots_loop`'s (max, sum, even-dim P V, odd-dim P V)."""
        q0, q1, q2, q3, q4, q5, q6, q7 = _eighths(q, GP, D)
        sq = tl.sum(tl.sum(q, axis=0), axis=0)
        m_s = tl.full((BS,), float("-inf"), tl.float32)
        l_s = tl.zeros((BS,), tl.float32)
        pvz_s = tl.zeros((BS,), tl.float32)  # sum of the V weights times V's zero points, per slot
        a0 = tl.zeros((BS, D // 8), tl.float32)
        a1 = tl.zeros((BS, D // 8), tl.float32)
        a2 = tl.zeros((BS, D // 8), tl.float32)
        a3 = tl.zeros((BS, D // 8), tl.float32)
        a4 = tl.zeros((BS, D // 8), tl.float32)
        a5 = tl.zeros((BS, D // 8), tl.float32)
        a6 = tl.zeros((BS, D // 8), tl.float32)
        a7 = tl.zeros((BS, D // 8), tl.float32)
        for it in range(0, CHUNK // BS):
            j = lo + it * BS + tl.arange(0, BS)
            ok = j < hi
            slot = bh.to(tl.int64) * SMAX + j
            x0, x1, x2, x3, x4, x5, x6, x7 = _word_codes(_load_words(kc_ptr, slot, ok, D))
            t = tl.sum(x0 * q0[None, :] + x1 * q1[None, :] + x2 * q2[None, :] + x3 * q3[None, :] + x4 * q4[None, :]
                       + x5 * q5[None, :] + x6 * q6[None, :] + x7 * q7[None, :], axis=1)
            ks = tl.load(ks_ptr + slot, mask=ok, other=0.0)
            kz = tl.load(kz_ptr + slot, mask=ok, other=0.0)
            s = tl.where(ok, ks * (t * 1.8446744073709552e+19 - kz * sq) * sm_scale, float("-inf"))
            m_s, alpha, p, l_s = _slot_softmax_step(s, ok, m_s, l_s)
            pv = _round_model(p * tl.load(vs_ptr + slot, mask=ok, other=0.0), ROUND_BF16, ROUND_FP16)
            pvz_s = pvz_s * alpha + pv * tl.load(vz_ptr + slot, mask=ok, other=0.0)
            w0 = (pv * 3.8685626227668134e+25)[:, None]  # 2^(85 - p_k): p_k = 0, 4, 8, 12, 16
            w1 = (pv * 2.4178516392292583e+24)[:, None]
            w2 = (pv * 1.5111572745182865e+23)[:, None]
            w3 = (pv * 9.444732965739290e+21)[:, None]
            w4 = (pv * 5.902958103587057e+20)[:, None]
            v0, v1, v2, v3, v4, v5, v6, v7 = _word_codes(_load_words(vc_ptr, slot, ok, D))
            al = alpha[:, None]
            a0 = a0 * al + w0 * v0
            a1 = a1 * al + w1 * v1
            a2 = a2 * al + w2 * v2
            a3 = a3 * al + w3 * v3
            a4 = a4 * al + w4 * v4
            a5 = a5 * al + w2 * v5  # nibbles 5-7 shifted down 12 bits: p = 8, 12, 16
            a6 = a6 * al + w3 * v6
            a7 = a7 * al + w4 * v7
        m = tl.max(m_s, axis=0)  # finite: the caller's slice holds a position
        w = tl.exp(m_s - m)
        wt = w[:, None]
        spvz = tl.sum(pvz_s * w, axis=0)
        zero = tl.zeros((1,), tl.float32)  # the even dims (nibbles 0, 2, 4, 6 of each word) in order, then the odd
        return (zero + m, zero + tl.sum(l_s * w, axis=0),
                _interleave4(tl.sum(a0 * wt, axis=0), tl.sum(a2 * wt, axis=0), tl.sum(a4 * wt, axis=0),
                             tl.sum(a6 * wt, axis=0))[None, :] * 1.8446744073709552e+19 - spvz,
                _interleave4(tl.sum(a1 * wt, axis=0), tl.sum(a3 * wt, axis=0), tl.sum(a5 * wt, axis=0),
                             tl.sum(a7 * wt, axis=0))[None, :] * 1.8446744073709552e+19 - spvz)

    @triton.jit
    def _pair_values(t, LOW: tl.constexpr):
        """int32 [R, C], each word two 16-bit bf16 patterns -> [R, 2 C] (the low half first): bf16 (LOW 1), else
        the same values in fp32 (a bf16 pattern is the top half of the fp32 one)."""
        if LOW == 1:
            lo = t.to(tl.int16).to(tl.bfloat16, bitcast=True)
            hi = (t >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        else:
            lo = (t << 16).to(tl.float32, bitcast=True)
            hi = (t & -65536).to(tl.float32, bitcast=True)
        return tl.reshape(tl.join(lo, hi), (t.shape[0], 2 * t.shape[1]))

    @triton.jit
    def _pair_codes(w, LOW: tl.constexpr):
        """Words [BS, D / 8] (dim 8 i + k: nibble k of word i) -> 4 tiles [BS, D / 4], tile j's column 2 i + h
        holding dim 8 i + 4 h + j as the bf16 number its bits make where the nibble sits: c * 2^-133 (nibbles
        0, 4 and, shifted down a byte, 2, 6) or c * 2^-129 (1, 5 / 3, 7), exact (subnormal, or the first
        normal binade, whose spacing is the subnormals'). One mask a tile and one shift a word."""
        u = w >> 8
        return (_pair_values(w & 0x000F000F, LOW), _pair_values(w & 0x00F000F0, LOW),
                _pair_values(u & 0x000F000F, LOW), _pair_values(u & 0x00F000F0, LOW))

    @triton.jit
    def _pair_columns(x, GP: tl.constexpr, D: tl.constexpr):
        """x [GP, D] -> 4 tiles [GP, D / 4] in `_pair_codes`' column order (tile j, column 2 i + h: dim 8 i + 4 h + j)."""
        z0, z1 = tl.split(tl.reshape(x, (GP, D // 8, 2, 2, 2)))  # d = 8 i + 4 h + 2 j1 + j0: j0, then j1
        x0, x2 = tl.split(z0)
        x1, x3 = tl.split(z1)
        return (tl.reshape(x0, (GP, D // 4)), tl.reshape(x1, (GP, D // 4)), tl.reshape(x2, (GP, D // 4)),
                tl.reshape(x3, (GP, D // 4)))

    @triton.jit
    def _dims_from_pairs(a0, a1, a2, a3, GP: tl.constexpr, D: tl.constexpr):
        """`_pair_columns` undone for an output: 4 tiles [GP, D / 4] -> (even dims, odd dims) [GP, D / 2]."""
        ev = tl.join(tl.reshape(a0, (GP, D // 8, 2)), tl.reshape(a2, (GP, D // 8, 2)))  # [GP, D / 8, h, j1]
        od = tl.join(tl.reshape(a1, (GP, D // 8, 2)), tl.reshape(a3, (GP, D // 8, 2)))
        return tl.reshape(ev, (GP, D // 2)), tl.reshape(od, (GP, D // 2))

    @triton.jit
    def _gqa_loop_words(q, lo, hi, bh, SMAX, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, sm_scale,
                        CHUNK: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, LOW: tl.constexpr,
                        ROUND_BF16: tl.constexpr, ROUND_FP16: tl.constexpr):
        """The GQA group's rows on the tensor cores with the codes read as words (session 44): each nibble masked
        where it sits is a bf16 number, c * 2^-133 or c * 2^-129 (`_pair_codes`), so a code costs about 0.6
        integer ops and no conversion, scale, zero point or rounding. With q's columns and P's weights scaled by
        2^64 / 2^60 (exact powers of two) every product is (q c) * 2^-69 or (w c) * 2^-69, a normal fp32:
            q . (c_j - z_j) = 2^69 * sum_t q'_t . x_jt - z_j * Sq
            sum_j w_j (c_jd - z_j) = 2^69 * sum_j w'_jd x_jd - sum_j w_j z_j
        K is the exact (c - z) * scale (as on the slots path, `exact_k`), P's weights rounded to the model dtype
        as before. q must hold model-dtype values (bf16: the scaled copies are exact). Returns (max, sum, even-dim
        P V, odd-dim P V) per row, as the dots loop."""
        q0, q1, q2, q3 = _pair_columns(q, GP, D)
        q0 = q0 * 1.8446744073709552e+19  # 2^64 against c * 2^-133
        q1 = q1 * 1.152921504606847e+18  # 2^60 against c * 2^-129
        q2 = q2 * 1.8446744073709552e+19
        q3 = q3 * 1.152921504606847e+18
        sq = tl.sum(q, axis=1)
        m_i = tl.full((GP,), float("-inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        pvz = tl.zeros((GP,), tl.float32)  # sum of the V weights times V's zero points
        a0 = tl.zeros((GP, D // 4), tl.float32)
        a1 = tl.zeros((GP, D // 4), tl.float32)
        a2 = tl.zeros((GP, D // 4), tl.float32)
        a3 = tl.zeros((GP, D // 4), tl.float32)
        for it in range(0, CHUNK // BS):
            j = lo + it * BS + tl.arange(0, BS)
            ok = j < hi
            slot = bh.to(tl.int64) * SMAX + j
            x0, x1, x2, x3 = _pair_codes(_load_words(kc_ptr, slot, ok, D), LOW)
            t = _mm(q0, tl.trans(x0), LOW) + _mm(q1, tl.trans(x1), LOW)
            t += _mm(q2, tl.trans(x2), LOW) + _mm(q3, tl.trans(x3), LOW)
            ks = tl.load(ks_ptr + slot, mask=ok, other=0.0)
            kz = tl.load(kz_ptr + slot, mask=ok, other=0.0)
            s = ks[None, :] * (t * 5.902958103587057e+20 - kz[None, :] * sq[:, None]) * sm_scale  # 2^69
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            pv = _round_model(p * tl.load(vs_ptr + slot, mask=ok, other=0.0)[None, :], ROUND_BF16, ROUND_FP16)
            pvz = pvz * alpha + tl.sum(pv * tl.load(vz_ptr + slot, mask=ok, other=0.0)[None, :], axis=1)
            we = pv * 1.8446744073709552e+19
            wo = pv * 1.152921504606847e+18
            v0, v1, v2, v3 = _pair_codes(_load_words(vc_ptr, slot, ok, D), LOW)
            al = alpha[:, None]
            a0 = a0 * al + _mm(we, v0, LOW)
            a1 = a1 * al + _mm(wo, v1, LOW)
            a2 = a2 * al + _mm(we, v2, LOW)
            a3 = a3 * al + _mm(wo, v3, LOW)
            m_i = m_new
        acc_e, acc_o = _dims_from_pairs(a0, a1, a2, a3, GP, D)
        return (m_i, l_i, acc_e * 5.902958103587057e+20 - pvz[:, None],
                acc_o * 5.902958103587057e+20 - pvz[:, None])

    @triton.jit
    def _kv4_decode_kernel(
        q_ptr, count_ptr, start_ptr, s1_ptr, s2_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, po_ptr, pm_ptr,
        out_ptr, HKV, SMAX, NSPLIT, sq_b, sq_h, so_b, so_h, sm_scale, inv_sqrt_d,
        CHUNK: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, GR: tl.constexpr, D: tl.constexpr,
        BS: tl.constexpr, CC: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, ROTATE_Q: tl.constexpr,
        SPLIT_FIRST: tl.constexpr, ROUND_BF16: tl.constexpr, ROUND_FP16: tl.constexpr, LOW: tl.constexpr,
        SLOTS: tl.constexpr = False, EXACT_K: tl.constexpr = False, WORDS: tl.constexpr = False,
        DIRECT: tl.constexpr = False, STARTS: tl.constexpr = False,
    ):
        """Program (sequence x KV head, slice): partial softmax(q K^T) V over its slice of the cache.
        GP: the GQA group padded to 16 (the rows of the dots); GR: rows of the running state (CC: one
        query row without GQA, dot products on the CUDA cores, no padded rows: measured slower; SLOTS:
        one query row, `_slots_loop`). STARTS: each sequence's first position to attend (int32 [B] at
        start_ptr: a left-padded batch's pad tokens come before it)."""
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        b = bh // HKV
        hk = bh % HKV
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        qrow = g < G
        q = tl.load(q_ptr + b.to(tl.int64) * sq_b + (hk * G + g)[:, None] * sq_h + d[None, :], mask=qrow[:, None],
                    other=0.0).to(tl.float32)
        if ROTATE_Q:
            q = _rotate_rows(q, s1_ptr, s2_ptr, inv_sqrt_d, GP, D, F1, F2, SPLIT_FIRST, ROUND_BF16, ROUND_FP16)
        # even and odd dims apart (a byte holds dims 2i and 2i + 1): the loop never interleaves nibbles
        qe, qo = tl.split(tl.reshape(q, (GP, D // 2, 2)))
        if CC or SLOTS:
            qve = tl.sum(qe, axis=0)  # the one real row
            qvo = tl.sum(qo, axis=0)
        n = tl.load(count_ptr)
        lo = sp * CHUNK
        hi = tl.minimum(lo + CHUNK, n)
        if STARTS:  # the slice's positions before the sequence's first are its padding: skipped
            lo = tl.maximum(lo, tl.load(start_ptr + b))
        m_i = tl.full((GR,), float("-inf"), tl.float32)
        l_i = tl.zeros((GR,), tl.float32)
        acc_e = tl.zeros((GR, D // 2), tl.float32)
        acc_o = tl.zeros((GR, D // 2), tl.float32)
        if lo < hi:  # a slice past the cache's end does nothing
            if SLOTS and WORDS:  # kc_ptr / vc_ptr: the codes as int32 words
                m_i, l_i, acc_e, acc_o = _slots_loop_words(q, lo, hi, bh, SMAX, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr,
                                                           vz_ptr, sm_scale, CHUNK, GP, D, BS, ROUND_BF16, ROUND_FP16)
            elif WORDS:  # the GQA group on the tensor cores, codes as words
                m_i, l_i, acc_e, acc_o = _gqa_loop_words(q, lo, hi, bh, SMAX, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr,
                                                         vz_ptr, sm_scale, CHUNK, GP, D, BS, LOW, ROUND_BF16,
                                                         ROUND_FP16)
            elif SLOTS and EXACT_K:
                m_i, l_i, acc_e, acc_o = _slots_loop_factored(qve, qvo, lo, hi, bh, SMAX, kc_ptr, ks_ptr, kz_ptr,
                                                              vc_ptr, vs_ptr, vz_ptr, sm_scale, CHUNK, D, BS,
                                                              ROUND_BF16, ROUND_FP16)
            elif SLOTS:
                m_i, l_i, acc_e, acc_o = _slots_loop(qve, qvo, lo, hi, bh, SMAX, kc_ptr, ks_ptr, kz_ptr, vc_ptr,
                                                     vs_ptr, vz_ptr, sm_scale, CHUNK, D, BS, ROUND_BF16, ROUND_FP16)
            else:
                # a fixed trip count (pipelined; the interpreter has no tensor bounds), the tail masked
                for it in range(0, CHUNK // BS):
                    j = lo + it * BS + tl.arange(0, BS)
                    ok = j < hi
                    slot = bh.to(tl.int64) * SMAX + j
                    ke, ko = _k_as_held(kc_ptr, ks_ptr, kz_ptr, slot, ok, D, BS, ROUND_BF16, ROUND_FP16)
                    if CC:  # one query row: a dot product per position on the CUDA cores
                        s = tl.sum(ke * qve[None, :] + ko * qvo[None, :], axis=1)[None, :] * sm_scale
                    else:
                        s = (_mm(qe, tl.trans(ke), LOW) + _mm(qo, tl.trans(ko), LOW)) * sm_scale
                    s = tl.where(ok[None, :], s, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(s, axis=1))
                    alpha = tl.exp(m_i - m_new)
                    p = tl.exp(s - m_new[:, None])
                    l_i = l_i * alpha + tl.sum(p, axis=1)
                    # P V = (p_j * scale_j) (code_j - zero_j): the weights rounded to the model dtype, as P is
                    ve, vo = _centered_halves(vc_ptr, vz_ptr, slot, ok, D, BS)
                    vs = tl.load(vs_ptr + slot, mask=ok, other=0.0)
                    pv = _round_model(p * vs[None, :], ROUND_BF16, ROUND_FP16)
                    if CC:
                        w = tl.sum(pv, axis=0)[:, None]
                        acc_e = acc_e * alpha[:, None] + tl.sum(w * ve, axis=0)[None, :]
                        acc_o = acc_o * alpha[:, None] + tl.sum(w * vo, axis=0)[None, :]
                    else:
                        acc_e = acc_e * alpha[:, None] + _mm(pv, ve, LOW)
                        acc_o = acc_o * alpha[:, None] + _mm(pv, vo, LOW)
                    m_i = m_new
        r = tl.arange(0, GR)
        e = tl.arange(0, D // 2)
        if DIRECT:  # one slice: the output itself, no merge launch (session 43: a launch a layer at batch 64)
            dst = out_ptr + b.to(tl.int64) * so_b + (hk * G + r)[:, None] * so_h + 2 * e[None, :]
            live = (r < G)[:, None]
            tl.store(dst, (acc_e / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=live)
            tl.store(dst + 1, (acc_o / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=live)
        else:  # partial rows: the even dims, then the odd ones (the merge puts them back in place)
            part = (bh * NSPLIT + sp).to(tl.int64)
            tl.store(po_ptr + (part * GR + r)[:, None] * D + e[None, :], acc_e)
            tl.store(po_ptr + (part * GR + r)[:, None] * D + (D // 2 + e)[None, :], acc_o)
            tl.store(pm_ptr + (part * GR + r) * 2, m_i)
            tl.store(pm_ptr + (part * GR + r) * 2 + 1, l_i)

    @triton.jit
    def _kv4_merge_kernel(po_ptr, pm_ptr, out_ptr, HKV, so_b, so_h, NSPLIT: tl.constexpr,
                          G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr):
        """Program (sequence x KV head): the slices' partial results, merged (log-sum-exp)."""
        bh = tl.program_id(0)
        b = bh // HKV
        hk = bh % HKV
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        m_i = tl.full((GP,), float("-inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, D), tl.float32)
        for sp in range(0, NSPLIT):
            part = (bh * NSPLIT + sp).to(tl.int64)
            m = tl.load(pm_ptr + (part * GP + g) * 2)
            m_new = tl.maximum(m_i, m)
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a slice past the cache's end: nothing
            a_old = tl.exp(m_i - safe)
            a_new = tl.exp(m - safe)
            l_i = l_i * a_old + tl.load(pm_ptr + (part * GP + g) * 2 + 1) * a_new
            acc = acc * a_old[:, None] + tl.load(po_ptr + (part * GP + g)[:, None] * D + d[None, :]) * a_new[:, None]
            m_i = m_new
        out = acc / l_i[:, None]
        dim = tl.where(d < D // 2, 2 * d, 2 * (d - D // 2) + 1)  # the partials hold even dims, then odd
        tl.store(out_ptr + b.to(tl.int64) * so_b + (hk * G + g)[:, None] * so_h + dim[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=(g < G)[:, None])


# ---- the cache ---------------------------------------------------------------------------------
class Kv4Codes:
    """One layer's 4-bit K and V: codes uint8 [B, Hkv, S_max, D / 2], scale / zero fp32 [B, Hkv, S_max]."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, device):
        if head_dim % 2:
            raise ValueError(f"head dim {head_dim}: the 4-bit cache packs two codes per byte (even head dims)")
        self.shape = (batch, heads, max_len, head_dim)
        kw = dict(device=device)
        self.k_codes = torch.zeros(batch, heads, max_len, head_dim // 2, dtype=torch.uint8, **kw)
        self.v_codes = torch.zeros_like(self.k_codes)
        self.k_scale = torch.zeros(batch, heads, max_len, dtype=torch.float32, **kw)
        self.k_zero, self.v_scale, self.v_zero = (torch.zeros_like(self.k_scale) for _ in range(3))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k_codes, self.v_codes, self.k_scale, self.k_zero,
                                                            self.v_scale, self.v_zero))

    def dequantize(self, dtype, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) [B, Hkv, length or S_max, D] in `dtype`: (code - zero) * scale in fp32, then the cast (the
        fake-quant path's expressions; slots never written hold 0)."""
        def one(codes, scale, zero):
            codes, scale, zero = codes[:, :, :length], scale[:, :, :length], zero[:, :, :length]
            q = torch.stack((codes & 15, codes >> 4), dim=-1).reshape(*codes.shape[:-1], -1).float()
            return ((q - zero[..., None]) * scale[..., None]).to(dtype)
        return one(self.k_codes, self.k_scale, self.k_zero), one(self.v_codes, self.v_scale, self.v_zero)


class PendingKV4:
    """What a `Kv4StaticLayer.update` returns as "keys": the new K / V states, not yet stored (the
    attention function knows the layer's quantizer settings and stores them, `kv4_store`)."""

    def __init__(self, layer, key_states: torch.Tensor, value_states: torch.Tensor):
        self.layer, self.key_states, self.value_states = layer, key_states, value_states


@functools.lru_cache(maxsize=1)
def _layer_classes():
    from transformers.cache_utils import StaticCache, StaticLayer

    class Kv4StaticLayer(StaticLayer):
        """transformers' static layer with 4-bit codes in place of the K / V tensors."""

        def lazy_initialization(self, key_states, value_states):
            self.device = key_states.device
            self.batch_size, self.num_heads = key_states.shape[:2]
            self.k_head_dim = self.v_head_dim = key_states.shape[-1]
            if value_states.shape[-1] != key_states.shape[-1]:
                raise ValueError("the 4-bit cache needs K and V of the same head dim")
            self.codes = Kv4Codes(self.batch_size, self.num_heads, self.max_cache_len, self.k_head_dim, self.device)
            self.cumulative_length = self.cumulative_length.to(self.device)
            # each sequence's first real position (a left-padded batch); updated in place, so a captured decode
            # graph reads the current padding
            self.starts = torch.zeros(self.batch_size, dtype=torch.int32, device=self.device)
            self.padded = False
            self.is_initialized = True

        def set_padding(self, pads, fresh: bool, checked: bool = True) -> None:
            """A prompt's left padding (int32 [B] or None): recorded by the prompt into an empty cache (`fresh`); a
            later prompt must show the same. Not `checked` (torch.compile, a graph capture: no host reads): every
            prompt's pads written in place, zeros included."""
            if not checked:
                self.starts.copy_(pads)
                self.padded = True
            elif fresh:
                self.padded = pads is not None
                if pads is None:
                    self.starts.zero_()
                else:
                    self.starts.copy_(pads)
            elif pads is not None and not (self.padded and torch.equal(pads, self.starts)):
                raise ValueError("a later prompt's mask pads the batch differently from its first prompt: the 4-bit "
                                 "cache keeps each sequence's left padding from the first prompt only")

        def reset(self) -> None:  # transformers' reset zeroes `keys` / `values`, which this layer has not
            if self.is_initialized:
                for t in vars(self.codes).values():
                    if isinstance(t, torch.Tensor):
                        t.zero_()
                self.starts.zero_()
                self.padded = False
            self.cumulative_length.zero_()

        def reorder_cache(self, beam_idx) -> None:
            raise NotImplementedError("the 4-bit cache does not reorder for beam search; use greedy or sampling")

        def offload(self) -> None:
            raise NotImplementedError("the 4-bit cache is not offloaded (it is 0.28x of a bf16 cache)")

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.cumulative_length.add_(key_states.shape[-2])  # the store kernel writes before this count
            return PendingKV4(self, key_states, value_states), value_states

    class Kv4StaticCache(StaticCache):
        """A StaticCache whose layers hold 4-bit codes (`Kv4StaticLayer`); use with the attention
        implementation `register_kv4_attention()` returns."""

        def __init__(self, config, max_cache_len: int, **kwargs):
            super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
            for i, layer in enumerate(self.layers):
                if type(layer) is not StaticLayer:
                    raise ValueError(f"layer {i} is {type(layer).__name__}: the 4-bit cache holds full-attention "
                                     "layers only")
                self.layers[i] = Kv4StaticLayer(max_cache_len=max_cache_len)

    return Kv4StaticLayer, Kv4StaticCache


def Kv4StaticCache(config, max_cache_len: int, **kwargs):  # noqa: N802 - a class, built lazily (transformers)
    return _layer_classes()[1](config, max_cache_len, **kwargs)


# ---- launches ------------------------------------------------------------------------------------
def _stages(head_dim: int, device):
    k, p = hadamard_factorization(head_dim)
    if k != 1:
        raise ValueError(f"head dim {head_dim}: R3 in the kernels needs a power of two")
    st = stage_sizes(p)
    if len(st) > 2:
        raise ValueError(f"head dim {head_dim} is too large for the 4-bit cache kernels")
    sylv = _factor_tensors(head_dim, device)[1]
    f1, f2 = (1, st[0]) if len(st) == 1 else st
    s1, s2 = (sylv[0], sylv[0]) if len(st) == 1 else sylv
    return f1, f2, s1, s2


def _dtype_flags(dtype):
    return dict(ROUND_BF16=dtype == torch.bfloat16, ROUND_FP16=dtype == torch.float16)


# (rows a program, warps, R3 as fp32 butterflies) of the store / fake-quant launch, at every size: the fastest of the
# 10 configs timed at a 2048-token prompt (52 against 91 µs a layer at the Llama-2-7B shape, where each program of the
# tensor-core dot had loaded the 32 KB Sylvester matrix for 4 KB of data) and of 5 at decode batches 1-64 (0.74-0.84x
# the dot's time); session 45, H100, docs/KERNELS.md 4j. An optional 4th field forces the grid's shape (compact or not;
# by default compact under GQA, `_store_launch`).
STORE_CONFIG = (16, 4, True)


def _rope_tables(rope, b: int, s: int, d: int, dtype):
    """(cos, sin) as [B, S, D] views (a batch of 1 broadcast at stride 0), or ValueError."""
    cos, sin = rope
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, b) or cos.shape[1:] != (s, d):
        raise ValueError(f"rotary cos / sin {tuple(cos.shape)} / {tuple(sin.shape)}: [B or 1, S, D] = [{b}, {s}, {d}] "
                         "expected")
    if cos.dtype != dtype or sin.dtype != dtype:
        raise ValueError(f"rotary cos / sin in {cos.dtype} for a {dtype} model: transformers rounds them to the model "
                         "dtype")
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos.expand(b, s, d), sin.expand(b, s, d)


def _store_launch(key, value, clip_ratio, rotate, codes=None, count=None, query=None, values=False,
                  config: tuple | None = None, rope=None):
    b, h, s, d = key.shape
    if value.shape != key.shape:
        raise ValueError(f"K {tuple(key.shape)} and V {tuple(value.shape)} differ")
    key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (key, value))
    kd = torch.empty(b, h, s, d, dtype=key.dtype, device=key.device) if values else None
    vd = torch.empty_like(kd) if values else None
    cos, sin = _rope_tables(rope, b, s, d, key.dtype) if rope is not None else (key, key)
    rows_q, hq, qd = 0, 1, None
    if query is not None:
        if not (rotate or rope is not None) or query.shape[0] != b or query.shape[2:] != (s, d):
            raise ValueError("the query goes through this launch only for R3 or the rotary embedding, with K's "
                             "batch / tokens / head dim")
        query = query if query.stride(-1) == 1 else query.contiguous()
        hq = query.shape[1]
        rows_q = b * hq * s
        qd = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    rows = b * h * s
    if rows == 0:
        return kd, vd, qd
    f1, f2, s1, s2 = _stages(d, key.device)
    block_m, warps, butterfly, *rest = config or STORE_CONFIG
    # one grid axis with each role's own row blocks where the query has more rows than K / V (GQA): a 2-D grid would
    # give K and V the query's block count, most of them fully masked (8B prompt: 28 against 66 µs a layer; session
    # 46, docs/KERNELS.md 4k); an explicit 4th config field decides it for the sweeps
    compact = bool(rest[0]) if rest else rows_q > rows
    c = codes
    cache = (c.k_codes, c.k_scale, c.k_zero, c.v_codes, c.v_scale, c.v_zero) if c is not None else (key,) * 6
    qsrc = query if query is not None else key
    nk, nq = triton.cdiv(rows, block_m), triton.cdiv(rows_q, block_m)
    grid = (2 * nk + nq,) if compact else (max(nk, nq), 3 if query is not None else 2)
    _kv4_store_kernel[grid](
        key, value, qsrc, count if count is not None else key, s1, s2, cos, sin, *cache,
        kd if values else key, vd if values else key, qd if qd is not None else key,
        rows, rows_q, s, h, hq, c.shape[2] if c is not None else 1, *key.stride()[:3], *value.stride()[:3],
        *qsrc.stride()[:3], *(cos.stride()[:2] if rope is not None else (0, 0)), float(clip_ratio), 1.0 / math.sqrt(d),
        D=d, F1=f1, F2=f2, BLOCK_M=block_m, ROTATE_K=rotate, WRITE_CODES=codes is not None, WRITE_VALUES=values,
        SPLIT_FIRST=key.dtype == torch.float32, RECIP=key.is_cuda,
        USE_RINT=os.environ.get("TRITON_INTERPRET") != "1", LOG_D=d.bit_length() - 1 if butterfly else 0,
        ROPE=rope is not None, COMPACT=compact, enable_fp_fusion=False, num_warps=warps,
        **_dtype_flags(key.dtype),
    )
    return kd, vd, qd


def kv4_store(codes: Kv4Codes, count: torch.Tensor, key: torch.Tensor, value: torch.Tensor, clip_ratio: float,
              rotate_k: bool, query: torch.Tensor | None = None,
              config: tuple | None = None, rope=None) -> torch.Tensor | None:
    """Quantize key / value [B, Hkv, S, D] into `codes` at positions count - S .. count - 1 (count: the
    layer's token count, a device tensor that already includes these S tokens; positions past the
    cache's end are not written). With `query` [B, H, S, D] and `rotate_k`: returns the query with R3
    applied, in the same launch (the decode attention then takes it with rotate_q=False: session 43, the
    in-kernel rotation was 13 % of its time at batch 64; docs/KERNELS.md 4h). With `rope` (cos, sin), K and the
    query arrive before the rotary embedding and get it here first, as transformers would (`fuse_rope_`)."""
    return _store_launch(key, value, clip_ratio, rotate_k, codes=codes, count=count, query=query, config=config,
                         rope=rope)[2]


def kv4_fake_quant(key: torch.Tensor, value: torch.Tensor, clip_ratio: float, rotate: bool,
                   query: torch.Tensor | None = None, config: tuple | None = None, rope=None,
                   codes: Kv4Codes | None = None, count: torch.Tensor | None = None):
    """(K, V, Q) as the fake-quant path attends them, in one launch: K (R3 applied if `rotate`) and V quantized
    per token and head and dequantized in the model dtype; Q with R3 applied (None without a query, or with
    neither R3 nor `rope`). With `rope` (cos, sin): K and the query before the rotary embedding, applied here
    first. With `codes` / `count` (as `kv4_store` takes them), the same launch also stores the codes: a prompt
    into an empty cache attends over these values, equal to the stored codes dequantized."""
    if (codes is None) != (count is None):
        raise ValueError("kv4_fake_quant stores codes only with both `codes` and `count`")
    q = query if rotate or rope is not None else None
    return _store_launch(key, value, clip_ratio, rotate, codes=codes, count=count, query=q, values=True,
                         config=config, rope=rope)


def _splits(bh: int, max_len: int, device, block_s: int) -> int:
    blocks = triton.cdiv(max_len, block_s)
    if device.type != "cuda":
        return min(blocks, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(blocks, triton.cdiv(2 * sms, bh)))


def decode_path(programs: int, group: int, slots: bool | None, cuda_cores: bool | None,
                block_s: int | None) -> tuple[bool, bool, int]:
    """(slots, cuda_cores, block_s) of the decode attention for `programs` (sequence, KV head) pairs and a GQA
    group of `group` query rows; None: the measured choice. Refuses a one-row path under GQA."""
    if slots is None:  # session 38 (docs/KERNELS.md 4f, H100): without GQA the slots beat the dots and the CUDA
        slots = group == 1 and cuda_cores is None  # cores at batch 2-64 and at 2049 positions, tie at batch 1 / 513
    if block_s is None:  # run 34, sessions 38 and 43: smaller steps once there are many programs
        block_s = 32 if programs >= (256 if slots else 64) else 64
        if slots and programs >= 1024:  # session 43, the words loop: 8 a step (on 1 warp) at 2048 programs, 32 at 256
            block_s = 8
    if cuda_cores is None:  # run 33 (docs/KERNELS.md 4e): the CUDA cores for one sequence without GQA, else dots
        cuda_cores = group == 1 and programs <= 32 and not slots
    if slots:
        if group != 1:
            raise ValueError("the slots path takes one query row per KV head (no GQA)")
        if cuda_cores:
            raise ValueError("slots and cuda_cores are two paths: ask for one")
    if cuda_cores and group != 1:
        raise ValueError("the CUDA-core path takes one query row per KV head (no GQA)")
    return slots, cuda_cores, block_s


def dots_words_step(programs: int) -> tuple[int, int]:
    """(positions a step, warps) of the dots on words for `programs` (sequence, KV head) pairs: session 44 on an
    H100 (docs/KERNELS.md 4i; Llama-3-8B's groups of 4, timed at 8, 64 and 512 programs): 64 on 4 warps below
    256, 32 on 2 warps from 256."""
    return (32, 2) if programs >= 256 else (64, 4)


def kv4_decode_attention(query: torch.Tensor, codes: Kv4Codes, count: torch.Tensor, scaling: float,
                         rotate_q: bool, block_s: int | None = None, num_warps: int | None = None,
                         cuda_cores: bool | None = None, slots: bool | None = None,
                         exact_k: bool = True, words: bool | None = None,
                         fp_fusion: bool | None = None, starts: torch.Tensor | None = None) -> torch.Tensor:
    """query [B, H, 1, D] (after RoPE) -> attention output [B, 1, H, D] over the first `count` cached
    positions, from each sequence's `starts` (int32 [B], a left-padded batch's first real position; None: 0).
    ``rotate_q``: apply R3 to the query here (the model's
    attention rotates it in `kv4_store`'s launch instead: session 43, 13 % of this kernel's time at batch 64).
    ``block_s`` cache positions per step (None: the measured choice), ``num_warps``;
    ``cuda_cores``: one query row per KV head (no GQA) as dot products on the CUDA cores instead of
    tensor-core dots with the row padded to 16 (None: the measured choice, see the code);
    ``slots``: one query row per KV head, each of the step's ``block_s`` positions its own online softmax,
    merged once at the end (`_slots_loop`; no GQA). None: the measured choice, slots for every MHA decode
    unless ``cuda_cores`` is given (docs/KERNELS.md 4f); ``exact_k`` (default since session 42,
    docs/KERNELS.md 4g; the slots path, and the dots with ``words``): K's and V's scales and zeros out of the
    per-element work, so K is the exact (code - zero) * scale rather than its rounding to the model dtype;
    False: K as the fake path holds it (`_slots_loop`, or the dots on bytes). ``words`` (with exact_k, head
    dims divisible by 8; None: wherever it applies): the codes read as int32 words, on the slots path each
    nibble an fp32 by one mask (`_slots_loop_words`, session 43, 4h; False: `_slots_loop_factored`, byte by
    byte), on the dots (GQA) each nibble a bf16 number by one mask, head dims from 64, bf16 or fp32 queries
    (`_gqa_loop_words`, session 44, 4i; False: the dots on bytes with K as held). ``fp_fusion``: let the
    compiler contract a * b + c into FMAs (None: on the words loops, where it was timed, off elsewhere: the
    rounding of each step as written).
    ``num_warps`` None: on the slots path 2 (session 42), 1 at 8 positions a step (session 43); on the dots on
    words `dots_words_step`'s (session 44); else 4."""
    b, h, sq, d = query.shape
    _, hkv, smax, _ = codes.shape
    if sq != 1 or h % hkv:
        raise ValueError(f"decode attention takes one query token and whole GQA groups, got {tuple(query.shape)}")
    g = h // hkv
    gp = max(16, 1 << (g - 1).bit_length())
    if query.stride(-1) != 1:
        query = query.contiguous()
    chosen = block_s is None
    slots, cuda_cores, block_s = decode_path(b * hkv, g, slots, cuda_cores, block_s)
    # the dots path on words: bf16 numbers from the codes' bits (fp16 has no room for them), 16-deep dots
    dots_words = not (slots or cuda_cores) and d % 8 == 0 and d >= 64 and query.dtype != torch.float16
    if words is None:
        words = bool(exact_k and d % 8 == 0 and (slots or dots_words))
    if words and not exact_k:
        raise ValueError("words attends over the exact K (exact_k=True)")
    if words and d % 8:
        raise ValueError(f"head dim {d}: words reads 8 codes a word (head dims divisible by 8)")
    if words and not (slots or dots_words):
        raise ValueError("words runs on the slots path or on the dots with a head dim of at least 64 in bf16 / fp32 "
                         "(not the CUDA-core path, not fp16)")
    fp_fusion = words if fp_fusion is None else fp_fusion
    if words and not slots and chosen:
        block_s, warps = dots_words_step(b * hkv)
        num_warps = num_warps or warps
    if not num_warps:
        num_warps = (1 if block_s <= 8 else 2) if slots else 4  # session 43: 8 a step on 1 warp
    ns = _splits(b * hkv, smax, query.device, block_s)
    chunk = triton.cdiv(triton.cdiv(smax, ns), block_s) * block_s
    if query.is_cuda and not (cuda_cores or slots) and d < 32:
        raise ValueError(f"head dim {d}: the decode kernel's tensor-core dots need a head dim of at least 32")
    gr = 1 if cuda_cores or slots else gp
    out = torch.empty(b, 1, h, d, dtype=query.dtype, device=query.device)
    direct = ns == 1  # one slice a program: the kernel writes the output, no partials and no merge
    po = out if direct else torch.empty(b * hkv * ns * gr, d, dtype=torch.float32, device=query.device)
    pm = out if direct else torch.empty(b * hkv * ns * gr, 2, dtype=torch.float32, device=query.device)
    f1, f2, s1, s2 = _stages(d, query.device)
    low = 0 if query.dtype == torch.float32 or not query.is_cuda else (1 if query.dtype == torch.bfloat16 else 2)
    kc, vc = (codes.k_codes.view(torch.int32), codes.v_codes.view(torch.int32)) if words else (codes.k_codes,
                                                                                                  codes.v_codes)
    if starts is not None and (starts.shape != (b,) or starts.dtype != torch.int32):
        raise ValueError(f"starts: int32 [{b}] expected, got {starts.dtype} {tuple(starts.shape)}")
    _kv4_decode_kernel[(b * hkv, ns)](
        query, count, count if starts is None else starts, s1, s2, kc, codes.k_scale, codes.k_zero, vc,
        codes.v_scale, codes.v_zero, po, pm, out, hkv, smax, ns, query.stride(0), query.stride(1), out.stride(0),
        out.stride(2), float(scaling), 1.0 / math.sqrt(d),
        CHUNK=chunk, G=g, GP=gp, GR=gr, D=d, BS=block_s, CC=cuda_cores, F1=f1, F2=f2, ROTATE_Q=rotate_q,
        SPLIT_FIRST=query.dtype == torch.float32, LOW=low, SLOTS=slots, EXACT_K=exact_k, WORDS=words, DIRECT=direct,
        STARTS=starts is not None, num_warps=num_warps, enable_fp_fusion=fp_fusion,
        **_dtype_flags(query.dtype),
    )
    if not direct:
        _kv4_merge_kernel[(b * hkv,)](po, pm, out, hkv, out.stride(0), out.stride(2), NSPLIT=ns, G=g, GP=gr, D=d,
                                      num_warps=4)
    return out


# ---- the attention implementation ------------------------------------------------------------------
def _transform_settings(module):
    """(clip ratio, rotate q / k) of a layer's `AttentionTransform`, or ValueError."""
    t = getattr(module, "dq_attention", None)
    kq, vq = getattr(t, "k_quantizer", None), getattr(t, "v_quantizer", None)
    if kq is None or vq is None:
        raise ValueError("the 4-bit cache kernels need the run's K and V quantizers (kv_bits 4)")
    return kq.spec.clip_ratio, t.qk_rotation is not None


def _held_and_padding(layer, attention_mask) -> tuple[int | None, torch.Tensor | None]:
    """(positions the layer's cache holds, this prompt's included; each sequence's leading pad positions or None
    without padding), read on the host, where a prompt comes with a mask over the whole static cache. (None, None)
    without a mask or for a mask of another shape. While a CUDA graph captures or torch.compile traces (no host read
    there): (None, the pads as a device tensor, zeros included), unchecked. ValueError where the mask hides other
    positions than a left padding from the prompt's last token (the decode kernels skip only a prefix of each
    sequence). Two device-to-host reads a layer, prompts only."""
    if attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[-1] != layer.codes.shape[2]:
        return None, None
    if not _host_may_read(attention_mask):
        # the unwritten positions are hidden too, so the leading hidden ones are still the padding
        return None, _leading_hidden(_seen(attention_mask[:, 0, -1])).to(torch.int32)
    held = min(int(layer.cumulative_length), layer.codes.shape[2])
    seen = _seen(attention_mask[:, 0, -1, :held])  # the prompt's last token sees every held position but the padding
    pads = _leading_hidden(seen)
    prefix_only, padded = torch.stack(((seen.sum(-1) == held - pads).all(), pads.any())).tolist()  # one read
    if not prefix_only:
        raise ValueError("the 4-bit cache kernels skip only a left padding when decoding; this mask hides other "
                         "positions (right padding, or a custom mask): pad on the left, or use transformers' own cache")
    return held, (pads.to(torch.int32) if padded else None)


def _host_may_read(t: torch.Tensor) -> bool:
    """False while torch.compile traces or a CUDA graph captures: a host read would break the graph there."""
    return not (torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing()))


def _seen(mask_row: torch.Tensor) -> torch.Tensor:
    """What a mask row [B, S] shows, as bool (a bool mask: True; an additive one: 0)."""
    return mask_row if mask_row.dtype == torch.bool else mask_row == 0


def _leading_hidden(seen: torch.Tensor) -> torch.Tensor:
    """Positions before each sequence's first seen one."""
    return (seen.int().cumsum(-1) == 0).sum(-1)


def _kv4_attention(module, query, key, value, attention_mask, rope=None, **kwargs):
    """The "dartquant_kv4" attention. `rope` (cos, sin): query and key arrive before the rotary embedding, which
    the store's launch applies (`_rope_kv4_forward`); without it they arrive as transformers' forward leaves them."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    clip, rotate = _transform_settings(module)
    scaling = kwargs.get("scaling")
    scaling = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    store = {}
    if isinstance(key, PendingKV4):
        layer = key.layer
        one, s_new = query.shape[2] == 1, query.shape[2]
        held, pads = (None, None) if one else _held_and_padding(layer, attention_mask)
        # a prompt into an empty cache attends over its own values, which go the no-cache way below (the codes stored
        # in the same launch). Transformers hands it no mask when no token is padding (its SDPA shortcut, q_offset 0);
        # else (padding, torch.compile, older versions) the mask's first columns
        empty = not one and (attention_mask is None or held == s_new)
        if not one:  # a left-padded batch: the decode kernels start each sequence after its pads; pads without a
            # count are the traced / captured case (_held_and_padding), not checked on the host
            layer.set_padding(pads, fresh=empty, checked=not (held is None and pads is not None))
        if empty:
            store = dict(codes=layer.codes, count=layer.cumulative_length)
            key, value = key.key_states, key.value_states
            attention_mask = None if attention_mask is None else attention_mask[..., :s_new]
        else:
            through = rope is not None or (one and rotate)  # the query's R3 / RoPE in the store's launch
            q = kv4_store(layer.codes, layer.cumulative_length, key.key_states, key.value_states, clip, rotate,
                          query=query if through else None, rope=rope)
            query = q if through else query
            if one:
                return kv4_decode_attention(query, layer.codes, layer.cumulative_length, scaling, False,
                                            starts=layer.starts if layer.padded else None), None
            # a prompt after earlier tokens: the positions written so far (where the count can be read on the host),
            # else every position of the static cache, dequantized; the mask hides the unwritten ones
            k, v = layer.codes.dequantize(query.dtype, held)
            attention_mask = attention_mask if held is None else attention_mask[..., :held]
            if rotate and not through:
                query = module.dq_attention.qk_rotation(query)
            return sdpa_attention_forward(module, query, k, v, attention_mask, **kwargs)
    # a prompt that attends only to itself (no cache, or an empty one): the fake-quant K / V and the rotated Q in
    # one launch, with the codes stored too when there is a cache
    same = query.shape[2] == key.shape[2]
    if rope is not None and not same:
        raise ValueError("the rotary embedding in the K / V launch needs as many query tokens as key tokens")
    k, v, q = kv4_fake_quant(key, value, clip, rotate, query if same else None, rope=rope, **store)
    if q is not None:
        query = q
    elif rotate:
        query = module.dq_attention.qk_rotation(query)
    return sdpa_attention_forward(module, query, k, v, attention_mask, **kwargs)


# ---- the rotary embedding in the K / V launch -----------------------------------------------------------
ROPE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # adapters.ADAPTERS whose attention forward is transformers'
# Llama template: q / k / v projections (Qwen3: then its per-head q_norm / k_norm), apply_rotary_pos_emb (rotate_half),
# cache.update, the attention function, o_proj


def _rope_kv4_forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    """transformers' Llama-template attention forward with its rotary embedding moved into the 4-bit K / V launch
    (`_kv4_attention(..., rope=)`): the ~10 elementwise kernels a layer that apply it to q and k (7.6 ms of a 2048-token
    Llama-2-7B prompt on an H100, docs/KERNELS.md 4j) become loads in a launch that reads q and k anyway. Any cache
    other than the 4-bit one (it would store keys before the embedding) runs the original forward."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    layers = getattr(cache, "layers", ())
    four_bit = self.layer_idx < len(layers) and isinstance(layers[self.layer_idx], _layer_classes()[0])
    if position_embeddings is None or (cache is not None and not four_bit):
        return self.dq_unfused_forward(hidden_states, position_embeddings=position_embeddings,
                                       attention_mask=attention_mask, **kwargs)
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    q, k, v = (proj(hidden_states).view(shape) for proj in (self.q_proj, self.k_proj, self.v_proj))
    if self.dq_rope_qk_norms:  # Qwen3: the per-head norms before RoPE, as its forward has them
        q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx)
    rest = {n: x for n, x in kwargs.items() if n not in ("cache", "past_key_values")}
    out, weights = _kv4_attention(self, q, k, v, attention_mask, rope=position_embeddings, dropout=0.0,
                                  scaling=self.scaling, **rest)
    return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def _rope_fused(module) -> bool:
    """Whether `fuse_rope_` installed its forward on this module (the original is kept beside it)."""
    return "dq_unfused_forward" in vars(module)


def rope_fused_layers(model) -> int:
    """How many attentions of `model` run the rotary embedding in the K / V launch."""
    return sum(_rope_fused(m) for m in model.modules())


def _unfuse_rope(attns) -> None:
    for a in attns:
        if _rope_fused(a):
            del a.forward, a.dq_unfused_forward, a.dq_rope_qk_norms


@torch.no_grad()
def fuse_rope_(model, tokens: int = 16) -> int:
    """Install `_rope_kv4_forward` on every attention of a model on the "dartquant_kv4" attention whose family is
    in ROPE_FAMILIES, then check it by running: a forward of `tokens` tokens must give the unfused logits
    (within 1e-3 of the largest; the kernel rounds as transformers does, so they are equal unless a transformers
    version's forward differs), else it is undone (logged). Returns how many attentions run it."""
    from ..adapters import adapter_for

    adapter = adapter_for(model)
    if (adapter.family not in ROPE_FAMILIES or model.config._attn_implementation != ATTN_IMPLEMENTATION
            or adapter.qk_norms not in (None, ("q_norm", "k_norm"))):  # the forward calls them by these names
        return 0
    attns = [adapter.layer(b).attn for b in adapter.decoder_layers(model)]
    if any(_rope_fused(a) for a in attns):
        raise ValueError("fuse_rope_: the model's attentions already run the fused forward")
    device = next(model.parameters()).device
    ids = torch.arange(tokens, device=device).remainder(model.config.get_text_config().vocab_size)[None]
    want = model(ids, use_cache=False).logits.float()
    for a in attns:
        a.dq_unfused_forward = a.forward
        a.dq_rope_qk_norms = adapter.qk_norms is not None
        a.forward = types.MethodType(_rope_kv4_forward, a)
    try:
        got = model(ids, use_cache=False).logits.float()
        err = float((got - want).abs().max())
        ok = bool(torch.isfinite(want).all()) and err <= 1e-3 * float(want.abs().max())
    except Exception as e:  # a transformers whose attention forward does not fit the template
        ok, err = False, f"{type(e).__name__}: {e}"
    if not ok:
        _unfuse_rope(attns)
        log.warning("the rotary embedding in the 4-bit K / V launch undone: its logits differ from the unfused "
                    "forward's (%s)", err)
        return 0
    return len(attns)


def register_kv4_attention() -> str:
    """Register the "dartquant_kv4" attention implementation with transformers (idempotent)."""
    from ..modules import register_attention_function

    return register_attention_function(ATTN_IMPLEMENTATION, _kv4_attention)


def kv4_scheme_problems(scheme, head_dim: int | None = None) -> list[str]:
    """Settings of a QuantScheme's K/V quantizer that the cache kernels do not run (empty: fine);
    from dartquant.json (and the head dim of config.json) alone, before any weight is read."""
    bad = [f"{name}={getattr(scheme, name)!r} (the 4-bit cache kernels need {value!r})"
           for name, value in (("kv_bits", 4), ("kv_symmetric", False)) if getattr(scheme, name) != value]
    if scheme.kv_group_size not in (None, head_dim):  # one group per head is the default
        bad.append(f"kv_group_size={scheme.kv_group_size} (the 4-bit cache kernels need one scale per head)")
    if getattr(scheme, "kv_sink_tokens", 0):
        bad.append(f"kv_sink_tokens={scheme.kv_sink_tokens} (the 4-bit cache kernels quantize every position; "
                   "run with --kv fake)")
    return bad


def kv4_config_problems(config) -> list[str]:
    """What the cache kernels do not run, from config.json alone (before any weight is read): they attend over every
    cached position with plain softmax."""
    config = config.get_text_config()
    problems = []
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"}:
        problems.append(f"layer types {sorted(types)} (full attention only)")
    window = getattr(config, "sliding_window", None)  # Mistral-7B-v0.1: 4096, every layer, no layer_types
    if window is not None and "sliding_attention" not in types:
        problems.append(f"a sliding window of {window} tokens (full attention only)")
    if getattr(config, "attn_logit_softcapping", None):
        problems.append("attention logit softcapping")
    return problems


def check_kv4_support(model) -> None:
    """ValueError naming what the 4-bit cache kernels cannot run, before any work."""
    from ..adapters import adapter_for

    adapter = adapter_for(model)
    problems = kv4_config_problems(model.config)
    head_dim = adapter.geometry(model.config).head_dim
    if head_dim < 32 and next(model.parameters()).is_cuda:
        problems.append(f"head dim {head_dim} (the decode kernel's dots on the GPU need at least 32)")
    for i, block in enumerate(adapter.decoder_layers(model)):
        attn = adapter.layer(block).attn
        t = getattr(attn, "dq_attention", None)
        kq = getattr(t, "k_quantizer", None)
        vq = getattr(t, "v_quantizer", None)
        if kq is None or vq is None:
            problems.append(f"layer {i}: no 4-bit K / V quantizers (a run with kv_bits 4 is needed)")
            break
        for name, qz in (("K", kq), ("V", vq)):
            sp = qz.spec
            grouped = sp.group_size not in (None, head_dim)
            if sp.bits != 4 or sp.symmetric or getattr(sp, "mse_search", False) or grouped:
                problems.append(f"layer {i}: {name} quantizer {qz.extra_repr()} (the kernels: 4-bit asymmetric)")
        if t._k_bias_from:
            problems.append(f"layer {i}: K bias kept out of the K quantizer (kv_exclude_k_bias with a k_proj bias)")
        if getattr(t, "sink_tokens", 0):
            problems.append(f"layer {i}: the K/V of the first {t.sink_tokens} positions kept unquantized "
                            "(kv_sink_tokens)")
        if problems:
            break
    try:
        if t is not None and t.qk_rotation is not None:
            _stages(head_dim, "cpu")
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise ValueError("the 4-bit KV cache kernels cannot run this model: " + "; ".join(problems))
