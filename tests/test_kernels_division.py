"""The activation kernels' division by the row scale as a reciprocal and two FMAs (`act_quant._quotient`).

Compiled, `y / scale` is, per row, the power of two sigma that brings the scale to s1 in [1, 2) and
rho = RN(1 / s1), and per element ``y1 = y * sigma``, ``q0 = RN(y1 * rho)``, ``r = fma(q0, -s1, y1)``,
``fma(r, rho, q0)``: the same bits as the IEEE division torch computes (Markstein's theorem), at four
instructions instead of a ~10-instruction subroutine.  The
interpreter's own fma rounds twice (``x * y + z`` in numpy), so here it gets an exact one: first the
algorithm against numpy's division on every bf16 value, then the kernels run it against the torch
reference.  On the GPU: benchmarks/kernel_bench.py checks every timed width against torch.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton / the kernels are imported

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from tiny import outlier_activations  # noqa: E402

from dartquant.kernels import act_quant  # noqa: E402
from dartquant.kernels.act_quant import (  # noqa: E402
    hadamard_quantize_pack,
    hadamard_quantize_pack_reference,
    rmsnorm_quantize_pack,
    rmsnorm_quantize_pack_reference,
)

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="these tests run the kernels through Triton's interpreter")


def fma32(a, b, c):
    """fp32 fused multiply-add with one rounding, in numpy: the product is exact in float64, the sum's
    float64 rounding error is recovered (TwoSum), and a float64 sum that lands on a float32 midpoint is
    rounded towards the side the error lies on (no double rounding)."""
    a, b, c = np.broadcast_arrays(*(np.asarray(t, dtype=np.float32) for t in (a, b, c)))
    p = a.astype(np.float64) * b.astype(np.float64)
    c64 = c.astype(np.float64)
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)
    with np.errstate(over="ignore", invalid="ignore"):
        r = s.astype(np.float32)
        d = r.astype(np.float64) - s  # exact: r is s rounded to float32
        other = np.nextafter(r, np.where(d > 0, -np.inf, np.inf).astype(np.float32))
        tie = (d != 0) & ((other.astype(np.float64) - s) == -d)
    return np.where(tie & (err != 0) & (np.sign(err) == -np.sign(d)), other, r)


def test_exact_fma_rounds_once():
    # (1 + 2^-12)^2 + 2^-70 = 1 + 2^-11 + 2^-24 + 2^-70: float64 rounds it to the float32 midpoint
    # 1 + 2^-11 + 2^-24, which then rounds to even (down); rounded once it goes up
    a, c = np.float32(1 + 2.0 ** -12), np.float32(2.0 ** -70)
    assert np.float32(np.float64(a) * np.float64(a) + np.float64(c)) == np.float32(1 + 2.0 ** -11)
    assert fma32(a, a, c) == np.float32(1 + 2.0 ** -11 + 2.0 ** -23)
    assert fma32(a, a, -c) == np.float32(1 + 2.0 ** -11)
    assert fma32(a, a, np.float32(-1.0)) == np.float32(2.0 ** -11 + 2.0 ** -24)  # the product's low bits kept
    g = np.random.default_rng(0)
    a, b, c = (g.standard_normal(100000).astype(np.float32) for _ in range(3))
    # against exact rationals on a sample
    from fractions import Fraction
    got = fma32(a, b, c)
    for i in range(0, 100000, 997):
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        lo = np.float32(float(exact))  # float() rounds the rational to nearest float64 first ...
        cands = [lo, np.nextafter(lo, np.float32(-np.inf)), np.nextafter(lo, np.float32(np.inf))]
        best = min(cands, key=lambda v: (abs(Fraction(float(v)) - exact), int(np.float32(v).view(np.int32)) & 1))
        assert got[i] == best, i


def _markstein(y, scale):
    """`act_quant._quotient`'s FMA_DIV arithmetic in numpy (scale > 0, finite)."""
    y, scale = np.broadcast_arrays(np.asarray(y, np.float32), np.asarray(scale, np.float32))
    e = np.clip((scale.view(np.int32) >> 23) & 0xFF, 1, 253)
    sigma = ((254 - e) << 23).astype(np.int32).view(np.float32)
    s1 = scale * sigma
    rho = np.float32(1.0) / s1  # numpy's float32 division: IEEE, correctly rounded
    y1 = y * sigma
    q0 = (y1 * rho).astype(np.float32)
    return fma32(fma32(q0, -s1, y1), rho, q0)


def test_reciprocal_and_two_fmas_is_the_division_on_every_bf16_value():
    """Every finite bf16 value (the rotated activations of a bf16 model) divided by 1500 scales from
    subnormal to 2^127 (mantissas random, all ones, all zeros), where |y| <= 150 * scale (a row's values
    lie within 15 / clip of its scale, clip >= 0.1); and random fp32 dividends (fp32 models).
    Quotients below 2^-20 are left out: there a subnormal y's remainder can round, and the code does not
    depend on them (|y / scale| < 2^-20 rounds, with the zero point, as 0 does)."""
    bits = np.arange(0, 1 << 16, dtype=np.uint32)
    y = (bits << 16).view(np.float32)
    y = y[np.isfinite(y)]
    g = np.random.default_rng(1)
    exps = g.integers(-149, 128, 1500)
    mant = g.random(1500).astype(np.float64) + 1.0
    mant[:100], mant[100:200] = 2.0 - 2.0 ** -23, 1.0
    scales = np.ldexp(mant, exps).astype(np.float32)
    scales = scales[np.isfinite(scales) & (scales > 0)]
    checked = 0
    for s in scales:
        with np.errstate(over="ignore"):
            want = y / s
        keep = np.isfinite(want) & (np.abs(want) >= 2.0 ** -20) & (np.abs(y) <= 150 * np.float64(s))
        got = _markstein(y[keep], s)
        assert np.array_equal(got.view(np.int32), want[keep].view(np.int32)), s
        checked += int(keep.sum())
    assert checked > 1e6
    yf = (g.standard_normal(2_000_000) * np.exp(g.uniform(-20, 20, 2_000_000))).astype(np.float32)
    sf = np.exp(g.uniform(-15, 15, 2_000_000)).astype(np.float32)
    want = yf / sf
    keep = np.abs(want) >= 2.0 ** -20
    assert np.array_equal(_markstein(yf[keep], sf[keep]).view(np.int32), want[keep].view(np.int32))


@pytest.fixture
def exact_fma_division(monkeypatch):
    """The kernels with FMA_DIV, and the interpreter's fma rounding once."""
    from triton.runtime import interpreter

    real = interpreter.InterpreterBuilder.create_fma

    def create_fma(self, x, y, z):
        if z.dtype.scalar.primitive_bitwidth == 32 and z.data.dtype == np.float32:
            return interpreter.TensorHandle(fma32(x.data, y.data, z.data), z.dtype.scalar)
        return real(self, x, y, z)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_fma", create_fma)
    monkeypatch.setattr(act_quant, "FMA_DIVISION", True)


_activations = outlier_activations


def _both(fn, monkeypatch):
    """fn() with the FMA division, and with the IEEE one: the same kernel otherwise."""
    got = fn()
    monkeypatch.setattr(act_quant, "FMA_DIVISION", False)
    want = fn()
    monkeypatch.setattr(act_quant, "FMA_DIVISION", True)
    return got, want


def _equal(a, b):
    return torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)


@pytest.mark.parametrize("n,variant", [(256, "3d"), (256, "2d"), (1216, "blocks"), (1216, "split"), (576, None)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernels_with_the_fma_division_are_bit_exact(exact_fma_division, monkeypatch, n, variant, dtype):
    """Every activation kernel with the FMA division writes what it writes with the IEEE one (None:
    quantize-only), and for 16-bit inputs what torch computes; with a row of tiny values (its scale
    far below the normal range of the unscaled remainder) and without."""
    x = _activations(5, n, seed=n, dtype=dtype)
    for tiny in (True, False):
        if tiny:
            x[3] *= 2.0 ** -100
        else:
            x[3] = x[4] * 0.5
        if variant is None:
            run = lambda: hadamard_quantize_pack(x, 0.9, rotate=False)  # noqa: E731
            ref = hadamard_quantize_pack_reference(x, 0.9, rotate=False)
        else:
            run = lambda: hadamard_quantize_pack(x, 0.9, variant=variant, rows_per_program=2)  # noqa: E731
            ref = hadamard_quantize_pack_reference(x, 0.9)
        got, want = _both(run, monkeypatch)
        assert _equal(got, want)
        if dtype != torch.float32 or variant is None:  # fp32 Hadamard: torch's summation order may flip a code
            assert _equal(got, ref)


def test_rmsnorm_quantize_with_the_fma_division(exact_fma_division, monkeypatch):
    x = _activations(6, 576, seed=5) * 3
    gain = (torch.rand(576, generator=torch.Generator().manual_seed(1)) + 0.5).to(torch.bfloat16)
    for planar in (None, torch.float8_e4m3fn):
        got, want = _both(lambda: rmsnorm_quantize_pack(x, gain, 1e-5, 0.9, planar=planar), monkeypatch)
        assert _equal(got, want)


def test_the_kernels_take_the_fma_path(exact_fma_division, monkeypatch):
    """The tests above can fail: an fma that is off by one unit moves the codes."""
    from triton.runtime import interpreter

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_fma",
                        lambda self, x, y, z: interpreter.TensorHandle(fma32(x.data, y.data, z.data) + 1,
                                                                       z.dtype.scalar))
    for x in (_activations(4, 256, seed=0), _activations(4, 256, seed=0) * 2.0 ** -100):
        ref = hadamard_quantize_pack_reference(x, 0.9, rotate=False)
        assert not torch.equal(hadamard_quantize_pack(x, 0.9, rotate=False).codes, ref.codes)
