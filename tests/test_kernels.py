"""The W4A4 Triton kernels against their torch references, on the CPU through Triton's interpreter.

Small shapes only (the interpreter runs every program in numpy).  The GPU side of the same
checks, at the real sizes, is benchmarks/kernel_bench.py.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton / the kernels are imported

import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from tiny import outlier_activations  # noqa: E402

from dartquant.hadamard import HadamardError, fast_hadamard_transform  # noqa: E402
from dartquant.kernels.act_quant import (  # noqa: E402
    _butterfly,
    hadamard_quantize_pack,
    hadamard_quantize_pack_reference,
    layout_2d,
    layout_blocks,
    rmsnorm_quantize_pack,
    rmsnorm_quantize_pack_reference,
    stage_sizes,
)
from dartquant.kernels.w4a4_gemm import (  # noqa: E402
    _SPLITK_BUFFERS,
    GemmConfig,
    planar_centered,
    planar_weight,
    prepare_weight,
    w4a4_matmul,
    w4a4_matmul_reference,
)
from dartquant.quant.primitives import QuantizedTensor, QuantSpec, fake_quantize, unpack_int4  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="these tests run the kernels through Triton's interpreter")


_activations = outlier_activations


def _dequant(p):
    codes = unpack_int4(p.codes, p.n, signed=False).float()
    return (codes - p.zero[:, None]) * p.scale[:, None]


def test_stage_sizes():
    for m in range(4, 16):
        parts = stage_sizes(1 << m)
        assert 1 << m == torch.tensor(parts).prod().item()
        assert all(16 <= f <= 128 for f in parts) and len(parts) <= 3
    with pytest.raises(ValueError):
        stage_sizes(8)


# widths: powers of two and K * 2^m with the bases of the supported models (12, 28, 76, 140, 172);
# 3072 = 12 * 256: the blocks kernel's dense left factor H_12 (x) S_2 (as 14336 = 28 * 512 on a GPU)
@pytest.mark.parametrize("n", [64, 256, 192, 896, 1216, 2240, 2752, 3072])
@pytest.mark.parametrize("variant,groups,butterfly", [("3d", 1, None), ("2d", 1, None), ("blocks", 1, False),
                                                      ("blocks", 2, False), ("blocks", 1, True), ("blocks", 2, True),
                                                      ("split", 1, None), ("split", 1, True)])
def test_act_codes_bit_exact(n, variant, groups, butterfly):
    if (variant == "2d" and layout_2d(n) is None) or (variant in ("blocks", "split") and layout_blocks(n) is None):
        pytest.skip(f"no {variant} layout for this width")
    x = _activations(5, n, seed=n)  # 5 tokens: the last tile of 4 (x 2 groups) is partly masked
    got = hadamard_quantize_pack(x, clip_ratio=0.9, variant=variant, rows_per_program=4, groups=groups,
                                 butterfly=butterfly)
    ref = hadamard_quantize_pack_reference(x, clip_ratio=0.9)
    assert torch.equal(got.codes, ref.codes)
    assert torch.equal(got.scale, ref.scale)
    assert torch.equal(got.zero, ref.zero)


@pytest.mark.parametrize("n,right", [(3072, 64), (3072, 256), (1024, 16), (1024, 64), (7168, 256)])
@pytest.mark.parametrize("tokens,groups", [(1, 1), (4, 2)])
def test_act_wide_right_factor_bit_exact(n, right, tokens, groups):
    """The blocks kernel with a right factor wider than layout_blocks' own C (`right_width`, KERNELS.md 1h):
    7168 = 28 * 256 as H_28 alone on the left (as 14336 = 28 * 512 on a GPU), 3072 = 12 * 256 as H_12, 1024 as
    S_16 (x) S_64; the reference's codes, scales and zero points."""
    x = _activations(5, n, seed=n + right)
    got = hadamard_quantize_pack(x, clip_ratio=0.9, variant="blocks", butterfly=True, right_width=right,
                                 rows_per_program=tokens, groups=groups)
    ref = hadamard_quantize_pack_reference(x, clip_ratio=0.9)
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.scale, ref.scale) and torch.equal(got.zero, ref.zero)


def test_act_wide_right_factor_refusals():
    assert layout_blocks(14336, 512) == (28, 16, 16, 512) and layout_blocks(28672, 1024) == (28, 16, 16, 1024)
    assert layout_blocks(4096, 256) == (16, 16, 0, 256)
    for n, right in [(4096, 512), (14336, 1024), (14336, 8), (14336, 96), (11008, 128)]:
        assert layout_blocks(n, right) is None, (n, right)  # fewer than 16 left rows, not a power of two, > P
    x = _activations(2, 3072, seed=1)
    with pytest.raises(ValueError, match="right_width needs the blocks variant"):
        hadamard_quantize_pack(x, variant="blocks", butterfly=False, right_width=256)
    with pytest.raises(ValueError, match="right_width=512"):
        hadamard_quantize_pack(x, variant="blocks", butterfly=True, right_width=512)


@pytest.mark.parametrize("n,tokens,groups", [(1536, 1, 1), (4864, 1, 2), (11008, 2, 1)])
def test_act_register_cap_and_late_left(n, tokens, groups):
    """`max_registers` and `late_left` (KERNELS.md 1i) change what is live, not the math: the reference's codes,
    scales and zero points in the interpreter, with the left factor's two blocks (KB > 0: 4864 = 76 x 64,
    11008 = 172 x 64) and over two tile groups; other variants and caps ptxas cannot take are refused."""
    x = _activations(3, n, seed=2)
    got = hadamard_quantize_pack(x, clip_ratio=0.9, variant="blocks", butterfly=True, max_registers=128,
                                 late_left=True, rows_per_program=tokens, groups=groups)
    ref = hadamard_quantize_pack_reference(x, clip_ratio=0.9)
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.scale, ref.scale) and torch.equal(got.zero, ref.zero)
    for kwargs, match in ((dict(variant="3d", max_registers=128), "max_registers"),
                          (dict(variant="blocks", max_registers=16), "max_registers"),
                          (dict(variant="3d", late_left=True), "late_left")):
        with pytest.raises(ValueError, match=match):
            hadamard_quantize_pack(x, **kwargs)


@triton.jit
def _butterfly_kernel(x_ptr, y_ptr, ROWS: tl.constexpr, C: tl.constexpr, LOG_C: tl.constexpr):
    offs = tl.arange(0, ROWS)[:, None] * C + tl.arange(0, C)[None, :]
    tl.store(y_ptr + offs, _butterfly(tl.load(x_ptr + offs), ROWS, C, LOG_C))


def test_butterfly_is_the_sylvester_product():
    """`_butterfly`'s perfect-shuffle stages are x @ S_C in natural order (fp32, exact on small integers), so
    a wrong stage order or sign would show here before any rounding could hide it."""
    for c in (2, 16, 64):
        x = torch.randint(-8, 8, (4, c)).float()
        y = torch.empty_like(x)
        _butterfly_kernel[(1,)](x, y, ROWS=4, C=c, LOG_C=c.bit_length() - 1)
        s = torch.ones(1, 1)
        while s.shape[0] < c:
            s = torch.cat([torch.cat([s, s], 1), torch.cat([s, -s], 1)], 0)
        assert torch.equal(y, x @ s)


def test_auto_takes_the_butterfly_at_throughput_sizes():
    """auto's throughput configs (their rule: test_act_auto_variant_throughput_rule) give the reference's codes
    through the butterfly; decode sizes keep their own kernels' dot."""
    from dartquant.kernels.act_quant import _auto_variant

    for n in (1536, 3072, 4864):
        assert not _auto_variant(n, True, tokens=1).get("butterfly")
    x = _activations(12, 3072, seed=4)
    got = hadamard_quantize_pack(x, clip_ratio=0.9)
    ref = hadamard_quantize_pack_reference(x, clip_ratio=0.9)
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.scale, ref.scale)


def test_act_split_planar_and_many_tokens():
    """The split variant (a token's rows over several programs, then the quantization) writes the
    planar operand too, and any number of tokens."""
    x = _activations(9, 1216, seed=3)  # 76 * 16: 5 row blocks of 16, the last partly padding
    ref = hadamard_quantize_pack(x, 0.9, variant="blocks")
    for planar in (None, torch.int8):
        got = hadamard_quantize_pack(x, 0.9, variant="split", planar=planar)
        want = ref if planar is None else hadamard_quantize_pack(x, 0.9, variant="blocks", planar=planar)
        assert torch.equal(got.codes, want.codes) and torch.equal(got.scale, want.scale)


def test_act_is_the_fake_quant_path():
    """Dequantized codes are exactly QLinear's fake-quantized rotated input (fp32, before the cast)."""
    x = _activations(7, 1536, seed=1)
    got = hadamard_quantize_pack(x, clip_ratio=0.95)
    fq = fake_quantize(fast_hadamard_transform(x), QuantSpec(bits=4, symmetric=False, clip_ratio=0.95))
    assert torch.equal(_dequant(got).to(torch.bfloat16), fq)


def test_act_quant_only_edge_rows_and_fp32():
    x = _activations(6, 128, seed=2)
    x[1] = 0.0  # scale would be 0: becomes 1, every code the zero point
    x[2] = 3.0  # constant positive row: range widened to contain 0
    x[3] = -x[3].abs()  # all negative
    for rotate in (False, True):
        got = hadamard_quantize_pack(x, rotate=rotate, block_m=4)
        ref = hadamard_quantize_pack_reference(x, rotate=rotate)
        assert torch.equal(got.codes, ref.codes) and torch.equal(got.scale, ref.scale)
        assert torch.equal(got.zero, ref.zero)
    assert got.scale[1] == 1.0 and got.zero[1] == 0.0
    # fp32 input: no rounding to the model dtype, so the Hadamard's summation order can move a value
    # across a rounding boundary; codes may then differ by one, rarely
    xf = _activations(6, 256, seed=3, dtype=torch.float32)
    got, ref = hadamard_quantize_pack(xf), hadamard_quantize_pack_reference(xf)
    diff = (unpack_int4(got.codes, 256, False).int() - unpack_int4(ref.codes, 256, False).int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 1e-2
    torch.testing.assert_close(got.scale, ref.scale, rtol=1e-6, atol=0)


def test_act_rejects_bad_input():
    with pytest.raises(ValueError, match="even"):
        hadamard_quantize_pack(torch.randn(2, 63).bfloat16())
    with pytest.raises(HadamardError):
        hadamard_quantize_pack(torch.randn(2, 14).bfloat16())
    with pytest.raises(TypeError):
        hadamard_quantize_pack(torch.ones(2, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="clip_ratio"):
        hadamard_quantize_pack(torch.randn(2, 64).bfloat16(), clip_ratio=0.0)
    with pytest.raises(ValueError, match="2d"):
        hadamard_quantize_pack(torch.randn(2, 64).bfloat16(), variant="2d")
    with pytest.raises(ValueError, match="blocks"):
        hadamard_quantize_pack(torch.randn(2, 64).bfloat16(), variant="blocks")
    with pytest.raises(ValueError, match="power of two"):
        hadamard_quantize_pack(torch.randn(2, 256).bfloat16(), variant="blocks", rows_per_program=3)
    with pytest.raises(ValueError, match="16 gave wrong codes"):
        hadamard_quantize_pack(torch.randn(2, 256).bfloat16(), variant="blocks", num_warps=16)
    with pytest.raises(ValueError, match="split"):
        hadamard_quantize_pack(torch.randn(2, 64).bfloat16(), variant="split")
    with pytest.raises(ValueError, match="elements per thread"):  # 28 * 1024 padded to 32768 on 4 warps: 256
        hadamard_quantize_pack(torch.randn(2, 28672).bfloat16(), variant="3d", num_warps=4)
    with pytest.raises(ValueError, match="elements per thread"):  # two tokens of 256 x 128 on 4 warps: 512
        hadamard_quantize_pack(torch.randn(2, 28672).bfloat16(), variant="blocks", rows_per_program=2, num_warps=4)
    with pytest.raises(ValueError, match="16 gave wrong codes"):
        hadamard_quantize_pack(torch.randn(2, 256).bfloat16(), variant="split", num_warps=16)


def test_act_auto_variant_throughput_rule():
    """The throughput rule (docs/KERNELS.md 1f, 1g): the blocks kernel with its butterfly right factor wherever
    its layout applies from 1536 wide, the launch config by the size of its token tile [KA + KB, C]; 3d
    elsewhere; decode sizes split above 4096."""
    from dartquant.kernels.act_quant import _auto_variant

    def blocks(t, g, w):
        return dict(variant="blocks", butterfly=True, num_warps=w, rows_per_program=t, groups=g)

    want = {1536: blocks(1, 1, 2), 4096: blocks(1, 4, 4), 4864: blocks(1, 1, 4), 8192: blocks(1, 4, 4),
            8960: blocks(2, 1, 4), 11008: blocks(2, 1, 4), 14336: blocks(1, 1, 4), 16384: blocks(1, 1, 8),
            28672: blocks(1, 1, 8)}
    for n, w in want.items():
        assert _auto_variant(n, True) == w, n
        assert _auto_variant(n, True, 8)["variant"] == ("split" if n > 4096 else "blocks"), n
        # small batches (session 39): one token a program up to 128 tokens, the split kernel up to 16 above 8192
        assert _auto_variant(n, True, 16) == (dict(variant="split", num_warps=4, rows_per_program=1) if n > 8192
                                              else dict(w, rows_per_program=1, groups=1)), n
        assert _auto_variant(n, True, 128) == dict(w, rows_per_program=1, groups=1), n
        assert _auto_variant(n, True, 129) == w, n
    assert _auto_variant(1024, True)["variant"] == "3d"  # below 1536: not measured
    assert _auto_variant(4096, False)["variant"] == "3d"  # no Hadamard: the quantize-only kernel


def test_int8s_decode_tiles():
    """default_config's int8s decode tiles (runs 36-46, session 47): up to N = 6144 16 weight rows with two
    K slices on 2 warps; else 32 weight rows on 2 warps up to N = 16384 (two waves of 64-row tiles over 132
    SMs), 64 rows on 4 above; K steps of 1024 where K > N (a sliced step: two slices of half that); tiles of 8
    tokens up to 8 tokens (session 49), 16 above."""
    from dartquant.kernels.w4a4_gemm import default_config

    for (n, k), (rows, bk, warps, slices) in {
            (4096, 4096): (16, 256, 2, 2), (6144, 4096): (16, 256, 2, 2), (4096, 11008): (16, 512, 2, 2),
            (4096, 14336): (16, 512, 2, 2), (12288, 4096): (32, 512, 2, 1), (8192, 28672): (32, 1024, 2, 1),
            (22016, 4096): (64, 512, 4, 1), (28672, 8192): (64, 512, 4, 1)}.items():
        for m in (3, 8, 16):
            cfg = default_config(m, n, k, "int8s")
            assert (cfg.block_n, cfg.block_k, cfg.num_warps, cfg.slices, cfg.block_m, cfg.asm_unpack, cfg.split_k) \
                == (rows, bk, warps, slices, 8 if m <= 8 else 16, True, 1), (n, k, cfg)
    assert default_config(17, 4096, 4096, "int8s").slices == 1  # above 16 tokens: the measured prefill tiles


@pytest.mark.parametrize("n", [1536, 4864])  # auto's blocks choices: 12 * 128 (t2 g4 w4), 76 * 64 (t1 g4 w4)
def test_act_auto_variant_bit_exact(n):
    from dartquant.kernels.act_quant import _auto_variant

    assert _auto_variant(n, True)["variant"] == "blocks"
    # 3 tokens: the decode choice (above 4096 wide a token over several programs, else one token
    # per program); 11: the throughput one, one token a program (SMALL_BATCH_TOKENS)
    decode = "split" if n > 4096 else "blocks"
    assert _auto_variant(n, True, 3) == dict(variant=decode, num_warps=4, rows_per_program=1)
    assert _auto_variant(n, True, 11) == dict(_auto_variant(n, True), rows_per_program=1, groups=1)
    for tokens in (3, 11):
        x = _activations(tokens, n, seed=n)
        got, ref = hadamard_quantize_pack(x, clip_ratio=0.9), hadamard_quantize_pack_reference(x, clip_ratio=0.9)
        assert torch.equal(got.codes, ref.codes) and torch.equal(got.scale, ref.scale) and torch.equal(got.zero, ref.zero)


def test_layout_blocks():
    """The blocks kernel's tiles: R rows of C, covered by power-of-two blocks KA + KB (>= 16 each)."""
    assert layout_blocks(11008) == (172, 128, 64, 64)  # 256 padded rows in the 2d kernel
    assert layout_blocks(8960) == (140, 128, 16, 64)
    assert layout_blocks(4864) == (76, 64, 16, 64)
    assert layout_blocks(14336) == (112, 64, 64, 128)  # 28 * 512: L = H_28 (x) S_4
    assert layout_blocks(4096) == (64, 64, 0, 64) and layout_blocks(1536) == (12, 16, 0, 128)
    assert layout_blocks(64) is None and layout_blocks(28 * 8) is None  # too small for tl.dot


def _gemm_operands(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 256, (m, k // 2), dtype=torch.uint8, generator=g)
    sa = torch.rand(m, generator=g) + 0.01
    za = torch.randint(0, 16, (m,), generator=g).float()
    w = prepare_weight(torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g), torch.rand(n, generator=g) + 0.01)
    return a, sa, za, w


@pytest.mark.parametrize("backend,cfg,m", [
    ("int8", GemmConfig(16, 16, 32, 4, 2), 20),
    ("fp8", GemmConfig(16, 16, 32, 4, 2), 20),
    ("int8", GemmConfig(16, 32, 64, 4, 2, split_k=3), 5),
    ("fp8", GemmConfig(16, 16, 64, 4, 2, split_k=2), 3),
    ("gemv", GemmConfig(1, 16, 64, 4, 1), 1),
    ("gemv", GemmConfig(1, 16, 32, 4, 1, split_k=3), 4),
    ("gemv", GemmConfig(1, 16, 64, 4, 1, dp4a=True), 1),
    ("gemv", GemmConfig(1, 16, 32, 4, 1, split_k=3, dp4a=True), 5),
    ("gemv", GemmConfig(1, 16, 64, 4, 1, dp4a=True, lanes=True), 1),
    ("gemv", GemmConfig(1, 8, 32, 4, 1, split_k=3, dp4a=True, lanes=True), 8),
    ("gemv", GemmConfig(1, 32, 16, 4, 1, split_k=13, dp4a=True, lanes=True), 3),  # K = 13 whole steps: no K mask
])
def test_gemm_bit_exact(backend, cfg, m):
    n, k = 40, 208  # neither a multiple of the tiles: masks
    for seed in range(2):  # twice: split-K must leave its workspace zeroed
        a, sa, za, w = _gemm_operands(m, n, k, seed)
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
        y = w4a4_matmul(a, sa, za, w, backend, cfg, out=out)
        assert torch.equal(y, w4a4_matmul_reference(a, sa, za, w))
    for buf in _SPLITK_BUFFERS.values():
        assert not torch.as_tensor(buf[0] if isinstance(buf, tuple) else buf).any()


def test_splitk_buffers_grown_out_stay_alive():
    """A workspace replaced by a larger one is kept: a CUDA graph captured with it still writes there."""
    from dartquant.kernels.w4a4_gemm import _SPLITK_RETIRED, _splitk_buffers

    old = _splitk_buffers(1, 8, 1, "cpu", 2)
    grown = _splitk_buffers(64, 1 << 16, 4096, "cpu", 2)
    assert grown[0].numel() >= 64 << 16 and grown[0] is not old[0]
    assert any(r[0] is old[0] for r in _SPLITK_RETIRED)


@pytest.mark.parametrize("backend,cfg", [("int8", GemmConfig(16, 16, 128, 4, 2)), ("fp8", GemmConfig(16, 16, 128, 4, 2)),
                                         ("gemv", GemmConfig(1, 16, 128, 4, 1, dp4a=True)),
                                         ("gemv", GemmConfig(1, 16, 128, 4, 1, dp4a=True, lanes=True))])
def test_gemm_extreme_codes(backend, cfg):
    """a = 15, w = -8 everywhere: the raw dot is -120 K; with zero point 15 the exact result is 0."""
    m, n, k = 17 if backend != "gemv" else 7, 24, 512
    a = torch.full((m, k // 2), 0xFF, dtype=torch.uint8)
    w = prepare_weight(torch.full((n, k), -8, dtype=torch.int8), torch.ones(n))
    y = w4a4_matmul(a, torch.ones(m), torch.full((m,), 15.0), w, backend, cfg)
    assert torch.equal(y, torch.zeros_like(y))
    y = w4a4_matmul(a, torch.ones(m), torch.full((m,), 14.0), w, backend, cfg)
    assert torch.all(y.float() == -8.0 * k)


def test_dp4a_gemv_needs_k_in_whole_words():
    a, sa, za, w = _gemm_operands(1, 8, 36, 0)  # K = 36: 18 bytes, not whole 32-bit words
    with pytest.raises(ValueError, match="multiples of 8"):
        w4a4_matmul(a, sa, za, w, "gemv", GemmConfig(1, 16, 64, 4, 1, dp4a=True))


def test_w4a4_linear_equals_fake_quant_linear():
    """Kernel chain (Hadamard + quantize, GEMM) vs QLinear's float path on the same codes, float64."""
    m, n, k = 9, 48, 1536  # 1536 = 12 * 128, an online Hadamard width of the supported models
    x = _activations(m, k, seed=4)
    wq = QuantizedTensor.from_float(torch.randn(n, k, generator=torch.Generator().manual_seed(8)),
                                    QuantSpec(bits=4, symmetric=True))
    act = hadamard_quantize_pack(x, clip_ratio=0.9)
    packed = wq.to_state_dict()["codes"]  # the checkpoint's packed codes are the kernel's operand
    w = prepare_weight(wq.codes, wq.scale)
    assert torch.equal(w.codes, packed)
    y = w4a4_matmul(act.codes, act.scale, act.zero, w, "int8", GemmConfig(16, 16, 128, 4, 2))
    # the fake-quant path's linear in exact arithmetic: its dequantized input (equal to the kernel's
    # codes, test_act_is_the_fake_quant_path) times the dequantized weight, in float64
    codes = unpack_int4(act.codes, k, signed=False).double()
    xq = (codes - act.zero.double()[:, None]) * act.scale.double()[:, None]
    w64 = wq.codes.double() * wq.scale.double().reshape(-1, 1)  # exact (fp32 dequantize() rounds)
    y64 = xq @ w64.T
    # the integer part is exact, so only the fp32 epilogue and the bf16 output round: <= 2^-8 relative
    err = (y.double() - y64).abs() / y64.abs().clamp_min(1e-12)
    assert err.max() < 2.0**-8


def test_w4a4_linear_module_is_the_fake_quant_qlinear():
    from torch import nn

    from dartquant.kernels.act_quant import hadamard_quantize_pack_reference as act_ref
    from dartquant.kernels.linear import W4A4Linear, convert_qlinears_
    from dartquant.modules import OnlineHadamard, QLinear
    from dartquant.quant.act import ActQuantizer

    torch.manual_seed(5)
    n_in, n_out = 192, 40  # 192 = 12 * 16: an online Hadamard with a Paley base
    lin = nn.Linear(n_in, n_out, bias=True)
    qt = QuantizedTensor.from_float(lin.weight.detach(), QuantSpec(bits=4, symmetric=True))
    q = QLinear(lin)
    q.weight.data = qt.dequantize()
    q.input_rotation = OnlineHadamard(n_in)
    q.input_quantizer = ActQuantizer(QuantSpec(bits=4, symmetric=False, clip_ratio=0.9))
    model = nn.Sequential(nn.Identity(), q).to(torch.bfloat16)
    x = _activations(6, n_in, seed=6).reshape(2, 3, n_in)
    y_fake = model(x)  # the fake-quant path, in bf16
    assert convert_qlinears_(model, {"1": qt}) == ["1"]
    assert isinstance(model[1], W4A4Linear)
    y = model(x)
    assert y.shape == (2, 3, n_out) and y.dtype == torch.bfloat16
    # exact value of the fake-quant linear on the same (bit-exact) codes, in float64
    ref = act_ref(x.reshape(-1, n_in), 0.9)
    codes = unpack_int4(ref.codes, n_in, signed=False).double()
    xq = (codes - ref.zero.double()[:, None]) * ref.scale.double()[:, None]
    w64 = qt.codes.double() * qt.scale.double().reshape(-1, 1)
    y64 = (xq @ w64.T + lin.bias.detach().bfloat16().double()).reshape(2, 3, n_out)
    assert ((y.double() - y64).abs() <= 2.0**-7 * y64.abs() + 1e-3).all()
    # the planar centered activation operand (prefill) gives the same bits
    for operand in ("int8", "int8s", "fp8"):
        model[1].prefill_operand, model[1].planar_min_tokens = operand, 0
        assert torch.equal(model(x), y)
    # cuBLAS's FP8 GEMM (scaled_mm): the same codes and sums, its own bf16 epilogue (one ulp at most)
    model[1].prefill_operand = "scaled_mm"
    y_sm = model(x)
    assert ((y_sm.double() - y.double()).abs() <= 2.0**-8 * y.double().abs() + 1e-6 * y.double().abs().max()).all()
    assert model[1].codes_fp8 is not None and model[1].codes_fp8.dtype == torch.float8_e4m3fn
    model[1].backend = "int8s"  # the swapped GEMM (planar int8 at every size)
    assert torch.equal(model(x), y) and torch.equal(model(x[:1, :1]), y[:1, :1])
    # the default dispatch: packed operand + decode backend (the GEMV) up to 2 tokens, int8s above (session 27)
    import dartquant.kernels.linear as linear_mod

    model[1].backend, model[1].prefill_operand, model[1].planar_min_tokens = "auto", "int8s", None
    seen = []
    real = linear_mod.w4a4_matmul
    linear_mod.w4a4_matmul = lambda *a, **kw: seen.append(a[4]) or real(*a, **kw)
    try:
        x65 = _activations(65, n_in, seed=9)
        model(x65[:2]), model(x65[:3]), model(x65)
        # scaled_mm: the GEMV up to 2 tokens, int8s at decode batches (3-64 tokens), cuBLAS's FP8 above
        model[1].prefill_operand = "scaled_mm"
        y3, y_64tokens = model(x65[:3]), model(x65[:64])
        model(x65[:2]), model(x65)
    finally:
        linear_mod.w4a4_matmul = real
    assert seen == ["auto", "int8s", "int8s", "int8s", "int8s", "auto", "scaled_mm"]
    model[1].prefill_operand = "int8s"
    assert torch.equal(y3, model(x65[:3])) and torch.equal(y_64tokens, model(x65[:64]))
    # and the bf16 fake-quant model differs from it only by its own bf16 rounding
    assert (y.double() - y_fake.double()).norm() < 1e-2 * y64.norm()
    # unsupported schemes are refused before anything is replaced
    q2 = QLinear(nn.Linear(n_in, n_out))
    q2.input_quantizer = ActQuantizer(QuantSpec(bits=8, symmetric=True))
    with pytest.raises(ValueError, match="asymmetric per-token"):
        convert_qlinears_(nn.Sequential(q2), {"0": qt})


def test_act_quant_only_any_even_width():
    x = _activations(5, 576, seed=7)  # smollm2's hidden size: not a power of two
    got = hadamard_quantize_pack(x, 0.9, rotate=False)
    ref = hadamard_quantize_pack_reference(x, 0.9, rotate=False)
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.scale, ref.scale)
    assert torch.equal(got.zero, ref.zero)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [64, 576, 896])  # a power of two; SmolLM2's and Qwen 0.5B's hidden sizes
def test_rmsnorm_quantize_is_the_norm_then_the_quantizer(n, dtype):
    """The fused kernel computes modules.RMSNorm then the quantizer, up to the fp32 summation order of
    the mean of squares: the same codes (a code off by one on a rounding boundary at most, rarely)."""
    from dartquant.modules import RMSNorm

    x = _activations(37, n, seed=n, dtype=dtype) * 3
    for gain in (None, (torch.rand(n, generator=torch.Generator().manual_seed(1)) + 0.5).to(dtype)):
        norm = RMSNorm(torch.nn.Parameter(torch.ones(n, dtype=dtype) if gain is None else gain), 1e-5)
        got = rmsnorm_quantize_pack(x, gain, 1e-5, 0.9)
        ref = rmsnorm_quantize_pack_reference(x, norm, 0.9)
        a, b = unpack_int4(got.codes, n, False).int(), unpack_int4(ref.codes, n, False).int()
        assert (a - b).abs().max() <= 1 and (a != b).float().mean() < 1e-3
        torch.testing.assert_close(got.scale, ref.scale, rtol=1e-6, atol=0)
        assert (got.zero != ref.zero).sum() <= 1  # a row whose extreme value sits on a boundary (measured: none)
        # the unit gain is the same as no gain
        if gain is None:
            same = rmsnorm_quantize_pack(x, norm.weight.detach(), 1e-5, 0.9)
            assert torch.equal(same.codes, got.codes) and torch.equal(same.scale, got.scale)
        for planar in (torch.int8, torch.float8_e4m3fn):  # the planar operand: the same codes re-laid
            pl = rmsnorm_quantize_pack(x, gain, 1e-5, 0.9, planar=planar)
            assert pl.codes.dtype == planar
            assert torch.equal(pl.codes.view(torch.uint8),
                               planar_centered(got.codes, got.zero, n, planar).view(torch.uint8))


def test_rmsnorm_quantize_rejects_bad_input():
    x = _activations(3, 64, seed=0)
    with pytest.raises(ValueError, match="even"):
        rmsnorm_quantize_pack(x[:, :63], None, 1e-5)
    with pytest.raises(ValueError, match="gain"):
        rmsnorm_quantize_pack(x, torch.ones(32, dtype=x.dtype), 1e-5)
    with pytest.raises(ValueError, match="gain"):
        rmsnorm_quantize_pack(x, torch.ones(64), 1e-5)  # fp32 gain for a bf16 row
    with pytest.raises(TypeError):
        rmsnorm_quantize_pack(x.double(), None, 1e-5)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_act_planar_output_is_the_centered_codes(dtype):
    """planar=: code - zero as one byte per code, even features first: the packed codes re-laid."""
    for n, variant in ((192, "3d"), (768, "2d"), (1216, "blocks")):  # 12 * 16, 12 * 64, 76 * 16 (64 + 16 rows)
        x = _activations(19, n, seed=n)
        ref = hadamard_quantize_pack(x, 0.9, variant=variant)
        got = hadamard_quantize_pack(x, 0.9, variant=variant, planar=dtype)
        assert got.codes.dtype == dtype and got.codes.shape == (19, n)
        assert torch.equal(got.codes.view(torch.uint8), planar_centered(ref.codes, ref.zero, n, dtype).view(torch.uint8))
        assert torch.equal(got.scale, ref.scale) and torch.equal(got.zero, ref.zero)
    # the centered values themselves: code - zero, exact in both dtypes
    centered = planar_centered(ref.codes, ref.zero, n, dtype).float()
    codes = unpack_int4(ref.codes, n, signed=False).float() - ref.zero[:, None]
    assert torch.equal(centered, torch.cat((codes[:, 0::2], codes[:, 1::2]), 1))


@pytest.mark.parametrize("backend,w8,promote,split_k", [
    ("int8", False, 0, 1), ("int8", True, 0, 2), ("fp8", False, 0, 1), ("fp8", False, 16, 2), ("fp8", True, 16, 1),
    ("int8s", False, 0, 1),
])
def test_gemm_planar_operands_bit_exact(backend, w8, promote, split_k):
    """Planar centered activations (no zero-point term), packed or planar weights: the same bits."""
    m, n, k = 20, 40, 208
    dt = torch.float8_e4m3fn if backend == "fp8" else torch.int8
    cfg = GemmConfig(16, 16, 32, 4, 2, split_k=split_k, promote=promote)
    a, sa, za, w = _gemm_operands(m, n, k, seed=5)
    y = w4a4_matmul(planar_centered(a, za, k, dt), sa, None, w, backend, cfg,
                    w_planar=planar_weight(w, dt) if w8 else None)
    assert torch.equal(y, w4a4_matmul_reference(a, sa, za, w))
    # worst accumulation: centered 15 against -8 everywhere, fp32 out: exactly -120 K
    a15 = torch.full((m, k // 2), 0xFF, dtype=torch.uint8)
    w_neg = prepare_weight(torch.full((n, k), -8, dtype=torch.int8), torch.ones(n))
    out = torch.empty(m, n)
    y = w4a4_matmul(planar_centered(a15, torch.zeros(m), k, dt), torch.ones(m), None, w_neg, backend, cfg, out=out,
                    w_planar=planar_weight(w_neg, dt) if w8 else None)
    assert torch.all(y == -120.0 * k)
    with pytest.raises(TypeError, match="planar"):
        w4a4_matmul(planar_centered(a, za, k, dt), sa, za, w, backend, cfg)  # a zero point with planar codes


def test_gemm_scaled_mm_backend():
    """cuBLAS's FP8 path (here torch's CPU implementation of the same op): exact integer sums in fp32
    out, the bf16 epilogue within one ulp of the Triton kernels' order; shapes cuBLAS cannot take
    (K or N not a multiple of 16) and misused operands go to the Triton fp8 kernel or are refused."""
    e4 = torch.float8_e4m3fn
    for m, n, k in ((20, 48, 224), (3, 40, 208)):  # the second: N, K not multiples of 16 -> Triton fp8
        a, sa, za, w = _gemm_operands(m, n, k, seed=7)
        a8, w8 = planar_centered(a, za, k, e4), planar_weight(w, e4)
        ref = w4a4_matmul_reference(a, sa, za, w)
        y = w4a4_matmul(a8, sa, None, w, "scaled_mm", GemmConfig(16, 16, 32, 4, 2), w_planar=w8)
        # bf16 out: the op's own epilogue (torch's CPU version scales before it sums: not the exact
        # path, which the fp32 output below is; on CUDA kernel_bench --scaled-mm measures cuBLAS's)
        assert y.dtype == torch.bfloat16
        assert ((y.float() - ref.float()).abs() <= 2.0**-8 * ref.float().abs() + 1e-6 * ref.float().abs().max()).all()
        out = torch.empty(m, n)
        y32 = w4a4_matmul(a8, sa, None, w, "scaled_mm", GemmConfig(16, 16, 32, 4, 2), out=out, w_planar=w8)
        assert y32 is out or torch.equal(y32, out)
        assert torch.equal(out.bfloat16(), ref)  # fp32: the exact sums and the kernels' epilogue order
    m, n, k = 16, 32, 512  # the largest sums: centered 15 against -8 everywhere
    a15 = torch.full((m, k // 2), 0xFF, dtype=torch.uint8)
    w_neg = prepare_weight(torch.full((n, k), -8, dtype=torch.int8), torch.ones(n))
    y = w4a4_matmul(planar_centered(a15, torch.zeros(m), k, e4), torch.ones(m), None, w_neg, "scaled_mm",
                    out=torch.empty(m, n), w_planar=planar_weight(w_neg, e4))
    assert torch.all(y == -120.0 * k)
    with pytest.raises(TypeError, match="scaled_mm"):
        w4a4_matmul(planar_centered(a15, torch.zeros(m), k, e4), torch.ones(m), None, w_neg, "scaled_mm")


def test_gemm_swapped_operands_small_m():
    """int8s (weight as the dot's left operand, tokens in the MMA's N): decode-sized M, tiles wider
    than M, and packed activations refused."""
    n, k = 40, 208
    for m in (1, 3, 17):
        a, sa, za, w = _gemm_operands(m, n, k, seed=m)
        # split-K (K = 208: 104 packed columns): 2 splits of 2 x 32 columns, 3 splits of up to 2 x 32 (the
        # third sums nothing), 8 splits of one 16-column step (the seventh ragged, the eighth empty)
        for cfg in (GemmConfig(16, 16, 32, 4, 2), GemmConfig(16, 32, 64, 4, 2), None,
                    GemmConfig(16, 16, 64, 4, 2, split_k=2), GemmConfig(16, 32, 64, 4, 2, split_k=3),
                    GemmConfig(16, 16, 32, 4, 2, split_k=8),
                    GemmConfig(8, 32, 64, 4, 2), GemmConfig(8, 16, 32, 4, 2, split_k=3)):  # 8 tokens a tile
            y = w4a4_matmul(planar_centered(a, za, k, torch.int8), sa, None, w, "int8s", cfg)
            assert torch.equal(y, w4a4_matmul_reference(a, sa, za, w)), cfg
            out = torch.empty(m, n)  # fp32 out: the exact sums through the split-K workspace
            w4a4_matmul(planar_centered(a, za, k, torch.int8), sa, None, w, "int8s", cfg, out=out)
            assert torch.equal(out.bfloat16(), w4a4_matmul_reference(a, sa, za, w)), cfg
    for m in (1, 3, 16, 17):  # K slices in one program: slices of 32 / 64 codes, K = 208 ragged in every case;
        # 17 tokens: a second, nearly empty token tile
        a, sa, za, w = _gemm_operands(m, n, k, seed=100 + m)
        for cfg in (GemmConfig(16, 16, 32, 2, 2, slices=2), GemmConfig(16, 32, 64, 4, 3, slices=2),
                    GemmConfig(16, 16, 32, 4, 2, slices=4), GemmConfig(16, 16, 64, 8, 2, slices=8),
                    GemmConfig(8, 16, 32, 2, 2, slices=2)):  # 8 tokens a tile: 16 and 17 tokens take 2 and 3
            y = w4a4_matmul(planar_centered(a, za, k, torch.int8), sa, None, w, "int8s", cfg)
            assert torch.equal(y, w4a4_matmul_reference(a, sa, za, w)), (m, cfg)
            out = torch.empty(m, n)
            w4a4_matmul(planar_centered(a, za, k, torch.int8), sa, None, w, "int8s", cfg, out=out)
            assert torch.equal(out.bfloat16(), w4a4_matmul_reference(a, sa, za, w)), (m, cfg)
    with pytest.raises(ValueError, match="slices"):
        w4a4_matmul(planar_centered(a, za, k, torch.int8), sa, None, w, "int8s",
                    GemmConfig(16, 16, 32, 2, 2, split_k=2, slices=2))
    with pytest.raises(TypeError, match="int8s"):
        w4a4_matmul(a, sa, za, w, "int8s")
    with pytest.raises(ValueError, match="asm_unpack"):  # too small a tile for four bytes per thread register
        w4a4_matmul(planar_centered(a, za, k, torch.int8), sa, None, w, "int8s",
                    GemmConfig(16, 16, 32, 4, 2, asm_unpack=True))
    big = (1 << 20) + 32  # its int32 sums hold 16 w a: K above 2^20 refused before any launch
    a, sa, za, w = _gemm_operands(1, 1, big, seed=0)
    with pytest.raises(ValueError, match=r"K <= 2\^20"):
        w4a4_matmul(planar_centered(a, za, big, torch.int8), sa, None, w, "int8s")
    with pytest.raises(ValueError, match=r"K <= 2\^20"):  # the per-lane GEMV's sums too
        w4a4_matmul(a, sa, za, w, "gemv")


@pytest.mark.slow
def test_run_folder_on_the_kernels(tmp_path):
    """A W4A4 run folder executes with the kernels; logits match the fake-quant model's."""
    from tiny import save_tiny_folder

    from dartquant.kernels.linear import W4A4Linear, load_w4a4
    from dartquant.config import RunConfig
    from dartquant.pipeline import run_quantize
    from dartquant.zoo import load_model

    folder = save_tiny_folder(tmp_path / "model")
    out = tmp_path / "run"
    cfg = RunConfig.from_flat(model=str(folder), method="rtn", w_quantizer="rtn", calib_samples=2, calib_seqlen=16,
                              eval_seqlen=16, eval_max_windows=1)
    run_quantize(cfg, out, progress=False, eval_fp=False)
    fake, _ = load_model(out)
    model, _ = load_w4a4(out)
    assert sum(isinstance(m, W4A4Linear) for m in model.modules()) == 14  # 2 layers x 7 linears
    ids = torch.randint(0, 89, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = fake(ids).logits.double(), model(ids).logits.double()
    # float32 model: same codes, exact integer dots, fp32 epilogue; the fake path's fp32 GEMM rounding
    # can still move an activation across a 4-bit rounding boundary in the next layer, rarely
    assert (a - b).norm() < 1e-3 * a.norm()


_COMPILE_FOR_HOPPER = r"""
import json, re, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dartquant.kernels import w4a4_gemm
fn = getattr(w4a4_gemm, sys.argv[1])
consts = json.loads(sys.argv[2])
k_name = "KW" if "KW" in fn.arg_names else "KH"
ptr = {"a_ptr": "*i32", "w_ptr": "*i32", "sa_ptr": "*fp32", "za_ptr": "*fp32", "sw_ptr": "*fp32", "wsum_ptr": "*i32",
       "y_ptr": "*bf16", "ws_ptr": "*i32", "cnt_ptr": "*i32"}
ptr.update(json.loads(sys.argv[3]))
sig = {name: "constexpr" if name in consts else ptr.get(name, "i32") for name in fn.arg_names}
# what the launcher's specialisation sees at real shapes: 16-byte aligned pointers, K and strides % 16 == 0
div = [n for n in sig if n.endswith("_ptr")] + [k_name, "stride_am", "stride_wn", "stride_ym"]
attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div}
k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 4, "enable_fp_fusion": False})
ptx = k.asm["ptx"]
lines = ptx.splitlines()
first_load = next((i for i, l in enumerate(lines) if re.search(r"ld[.]global|cp[.]async", l)), -1)
wait = [i for i, l in enumerate(lines) if "griddepcontrol.wait" in l]
print(json.dumps({"dp4a": len(re.findall(r"dp4a[.]u32[.][us]32", ptx)), "cubin": len(k.asm["cubin"]),
                  "v4": len(re.findall(r"ld[.]global([.]\w+)*[.]v4", ptx)),
                  "nibble_words": ptx.count("0xF0F0F0F0"), "wgmma": len(re.findall(r"wgmma[.]mma_async", ptx)),
                  "mma_s8": len(re.findall(r"mma[.]sync[.]aligned[.]m16n8k32[.]row[.]col([.]satfinite)?[.]s32[.]s8[.]s8",
                                           ptx)),
                  "atomics": len(re.findall(r"\b(atom|red)[.]", ptx)),
                  "gdc_wait": len(wait), "gdc_wait_line": wait[0] if wait else -1, "first_load_line": first_load}))
"""


def _compile_for_hopper(kernel: str, consts: dict, pointers: dict | None = None) -> dict:
    """Compile a GEMM / GEMV kernel of w4a4_gemm for sm_90 with Triton's bundled ptxas in a child process
    (no GPU needed): counts of dp4a, wgmma, the nibble split's word ops and 16-byte global loads in its
    PTX. `pointers`: element types of pointer arguments other than the GEMVs' int32 words."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER, kernel, json.dumps(consts), json.dumps(pointers or {})],
                       capture_output=True, text=True, env=env)
    if p.returncode and "ptxas" in p.stderr:
        pytest.skip(f"no usable ptxas in this Triton install: {p.stderr[-300:]}")
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_dp4a_gemv_compiles_for_hopper():
    """The PTX path (the interpreter runs the shift-and-mask one): its PTX has the dp4a instructions."""
    got = _compile_for_hopper("_w4a4_gemv_kernel", {"M_PAD": 1, "BLOCK_N": 16, "BLOCK_KH": 64, "SPLIT_K": 8,
                                                    "STATIC_STEPS": 0, "OUT_F32": False, "DP4A": True, "ASM": True})
    assert got["dp4a"] > 0 and got["cubin"] > 0, got


def test_lanes_gemv_compiles_for_hopper():
    """The per-lane GEMV's point is its layout: every load 16 bytes wide (weights and activations
    in the weight tile's layout), 2 dp4a per word per token."""
    got = _compile_for_hopper("_w4a4_gemv_lanes_kernel", {"M_PAD": 4, "BLOCK_N": 4, "BLOCK_KW": 128, "SPLIT_K": 1,
                                                          "STATIC_STEPS": 0, "OUT_F32": False, "EVEN_K": False,
                                                          "ASM": True})
    # [4, 128] words over 128 threads: 4 words (one 16-byte load) per thread per tile; 4 tokens x 2 dp4a x 4 words
    assert got["dp4a"] == 32, got
    assert got["v4"] == 2 + 4, got  # the weight tile (first and prefetched) and 4 tokens' words: 16-byte loads


def test_swap_gemm_word_op_unpack_equals_the_shifts():
    """The PTX of `_nibbles_times16` (not run by the interpreter) replayed on int32 words in torch, for
    every byte in every lane: 16 times the signed nibbles, the same int8 as the shifts the interpreter
    runs (and so the kernels' sums shifted right by 4 are the true ones)."""
    import inspect
    import re

    from dartquant.kernels import w4a4_gemm

    src = inspect.getsource(w4a4_gemm._nibbles_times16.fn)
    asms = re.findall(r'inline_asm_elementwise\(\s*"([^"]*)"', src)
    assert len(asms) == 2, src  # the high and the low nibble's asm
    byte = torch.arange(256, dtype=torch.int64)
    signed = byte.to(torch.uint8).view(torch.int8).to(torch.int64)
    lanes = torch.tensor([0, 8, 16, 24])
    others = torch.randint(0, 256, (256, 4), generator=torch.Generator().manual_seed(0))
    for lane in range(4):  # the byte in one lane, random bytes in the other three
        words = ((others.index_fill(1, torch.tensor([lane]), 0) << lanes).sum(1)) | (byte << (8 * lane))
        for asm, nibble in zip(asms, (signed >> 4, ((signed << 4).to(torch.int8).to(torch.int64) >> 4))):
            t, ops = words, re.findall(r"(shl|and)\.b32 \S+, \S+, (\w+);", asm)
            assert [op for op, _ in ops] == (["shl", "and"] if "shl" in asm else ["and"]), asm
            for op, arg in ops:
                val = int(arg, 0)
                t = (t << val) & 0xFFFFFFFF if op == "shl" else t & val
            got = ((t >> (8 * lane)) & 0xFF).to(torch.uint8).view(torch.int8).to(torch.int64)
            assert torch.equal(got, 16 * nibble), (asm, lane)


def test_swap_gemm_unpacks_four_bytes_per_word_op_for_hopper():
    """The int8s GEMM's PTX path (the interpreter runs the int8 shifts): wgmma with the weight from
    registers, its nibbles split by word ops (an 0xF0F0F0F0 mask per four bytes and nibble half), and
    split-K compiled in."""
    consts = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_KH": 256, "GROUP_N": 8, "SPLIT_K": 4, "STATIC_STEPS": 0,
              "OUT_F32": False}
    pointers = {"a_ptr": "*i8", "w_ptr": "*u8"}
    got = _compile_for_hopper("_w4a4_swap_kernel", {**consts, "ASM": True}, pointers)
    plain = _compile_for_hopper("_w4a4_swap_kernel", {**consts, "ASM": False}, pointers)
    assert got["wgmma"] > 0 and got["cubin"] > 0, got
    assert got["nibble_words"] > 0 and plain["nibble_words"] == 0, (got, plain)
    assert got["cubin"] < plain["cubin"], (got, plain)  # the byte-wise unpack is the larger kernel


@pytest.mark.parametrize("tokens", [16, 8])  # 8: the tiles of <= 8 tokens (session 49), the MMA's own N
def test_sliced_swap_gemm_compiles_for_hopper(tokens):
    """The int8s GEMM with K slices in one program (GemmConfig.slices): the batched dot compiles to int8
    mma.sync on sm_90 with the weight nibbles split by word ops, and the slices meet without atomics."""
    consts = {"BLOCK_M": tokens, "BLOCK_N": 16, "SLICE_KH": 128, "SLICES": 2, "GROUP_N": 8, "STATIC_STEPS": 0,
              "OUT_F32": False, "ASM": True}
    got = _compile_for_hopper("_w4a4_swap_sliced_kernel", consts, {"a_ptr": "*i8", "w_ptr": "*u8"})
    assert got["nibble_words"] > 0 and got["atomics"] == 0, got
    # this config's static MMA count; m16n8k32 takes 8 tokens, so an 8-token tile has half (not padded to 16)
    assert got["mma_s8"] == {16: 16, 8: 8}[tokens], got


def test_pdl_waits_before_any_global_load_for_hopper():
    """Programmatic dependent launch (kernels.pdl_launch, opt-in): the compiled int8s GEMM waits for
    the grid before it (griddepcontrol.wait) before its first global load, and only with PDL; off, the
    instruction is not compiled in."""
    consts = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_KH": 256, "GROUP_N": 8, "SPLIT_K": 1, "STATIC_STEPS": 0,
              "OUT_F32": False, "ASM": True}
    pointers = {"a_ptr": "*i8", "w_ptr": "*u8"}
    on = _compile_for_hopper("_w4a4_swap_kernel", {**consts, "PDL": True}, pointers)
    off = _compile_for_hopper("_w4a4_swap_kernel", {**consts, "PDL": False}, pointers)
    assert on["gdc_wait"] == 1 and on["gdc_wait_line"] < on["first_load_line"], on
    assert off["gdc_wait"] == 0, off
    from dartquant import kernels

    assert not kernels.pdl_launch(8, "cpu")  # never off the GPU, nor in the interpreter


def test_merged_siblings_with_and_without_biases():
    """MergedSiblings (kernels.fusions): three linears reading one input, two with a bias (Qwen's
    q / k / v have one each; a member without adds zeros), as one GEMM: each member's output is
    the one it computes alone, at decode and prefill sizes, on every operand."""
    from torch import nn

    from dartquant.kernels.fusions import MergedSiblings
    from dartquant.kernels.linear import SharedInput, W4A4Linear
    from dartquant.modules import QLinear
    from dartquant.quant.act import ActQuantizer

    torch.manual_seed(0)
    lins = []
    for n_out, bias in ((48, True), (16, False), (32, True)):
        lin = nn.Linear(64, n_out, bias=bias)
        qt = QuantizedTensor.from_float(lin.weight.detach(), QuantSpec(bits=4, symmetric=True))
        q = QLinear(lin)
        q.input_quantizer = ActQuantizer(QuantSpec(bits=4, symmetric=False, clip_ratio=0.9))
        lins.append(W4A4Linear(q.to(torch.bfloat16), qt))
    shared = SharedInput()
    for m in lins:
        m.shared_input = shared
    for tokens in (2, 12):
        x = _activations(tokens, 64, seed=tokens)
        alone = [m(x) for m in lins]
        merged = MergedSiblings(lins)
        assert all(torch.equal(m(x), a) for m, a in zip(lins, alone))
        for m in lins:  # undo, for the next size (the views keep the values)
            m.merged = None
        assert merged.weight.codes.shape == (96, 32)
        for operand in ("int8", "int8s", "scaled_mm"):
            for m in lins:
                m.prefill_operand, m.planar_min_tokens, m.merged = operand, 0, None
            alone = [m(x) for m in lins]
            MergedSiblings(lins)
            assert all(torch.equal(m(x), a) for m, a in zip(lins, alone)), operand
            for m in lins:
                m.prefill_operand, m.planar_min_tokens, m.merged = "int8s", None, None
