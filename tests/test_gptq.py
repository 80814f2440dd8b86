"""GPTQ (dartquant.quant.gptq) against round-to-nearest and against a textbook reference.

The reference below is the unblocked OBS form of GPTQ, in float64: an explicit inverse Hessian,
one column at a time, with the inverse updated by Gaussian elimination after each column. The
library instead uses the Cholesky factor of the inverse and lazy block updates; in exact
arithmetic both give the same codes, so agreement checks the blocking, the factorization,
act_order's permutation, and when group qparams are taken.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import dartquant.quant.gptq as gptq_mod
from dartquant.quant import GPTQ, QuantizedTensor, QuantSpec, compute_qparams, fake_quantize

D_IN, D_OUT, N = 256, 96, 4096


pytestmark = pytest.mark.usefixtures("one_thread")


def _calibration(seed: int = 0, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """Correlated inputs x = z A (non-white covariance A^T A) with a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D_IN, D_IN, generator=g) / D_IN**0.5
    X = torch.randn(N, D_IN, generator=g) @ A
    X[:, [3, 50, 200]] *= 20.0
    for j in dead:
        X[:, j] = 0.0
    return X


@pytest.fixture(scope="module")
def data():
    X = _calibration()
    W = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(1))
    gptq = GPTQ(D_IN)
    for chunk in X.split(1000):  # uneven chunks exercise the running average
        gptq.add_batch(chunk)
    return X, W, gptq


def _out_err(X: torch.Tensor, W: torch.Tensor, Wq: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(X.double() @ (W.double() - Wq.double()).T).item()


def reference_gptq(W, H, spec, percdamp=0.01, act_order=False, static_groups=False):
    """Unblocked float64 GPTQ with an explicit inverse; returns (codes, weight) in column order."""
    W = W.double().clone()
    H = H.double().clone()
    n = W.shape[1]
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    g = spec.group_size if spec.group_size is not None and spec.group_size > 0 else None
    dynamic = g is not None and not static_groups
    if not dynamic:
        s_all, z_all = compute_qparams(W.float(), spec)
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * H.diagonal().mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    lo, hi = spec.code_range
    C, Q = torch.zeros_like(W), torch.zeros_like(W)
    for j in range(n):
        if dynamic:
            if j % g == 0:  # from the weights as updated by every earlier column
                s_g, z_g = compute_qparams(W[:, j : j + g].float(), spec)
                s, z = s_g[:, 0, 0].double(), z_g[:, 0, 0].double()
        else:
            gi = 0 if g is None else int(perm[j]) // g
            s, z = s_all[:, gi, 0].double(), z_all[:, gi, 0].double()
        w = W[:, j]
        q = torch.round(w / s + z).clamp(lo, hi)
        qw = (q - z) * s
        C[:, j], Q[:, j] = q, qw
        err = (w - qw) / Hinv[j, j]
        W[:, j:] -= torch.outer(err, Hinv[j, j:])
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    inv = torch.argsort(perm)
    return C[:, inv], Q[:, inv]


# ----------------------------------------------------------------------------- Hessian


def test_hessian_is_running_average_of_2xxT():
    torch.manual_seed(0)
    X = torch.randn(7, 33, 16)  # [batch, seq, features]: every token is a sample
    g = GPTQ(16)
    g.add_batch(X[:2])
    g.add_batch(X[2:3, :5])
    g.add_batch(X[2:3, 5:])
    g.add_batch(X[3:])
    assert g.nsamples == 7 * 33
    flat = X.reshape(-1, 16).double()
    torch.testing.assert_close(g.H.double(), 2.0 / flat.shape[0] * flat.T @ flat, rtol=1e-5, atol=1e-6)
    g.free()
    assert g.H is None and g.nsamples == 0
    with pytest.raises(RuntimeError, match="add_batch"):
        g.quantize(torch.randn(4, 16), QuantSpec())
    with pytest.raises(ValueError, match="last dimension 8"):
        g.add_batch(torch.randn(3, 8))


# ----------------------------------------------------------------------------- vs RTN


CASES = [
    # (group_size, act_order): act_order with groups uses static groups
    (None, False),
    (None, True),
    (32, False),
    (32, True),
    (64, False),
    (64, True),
    (-1, False),  # one scale for the whole weight
]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group, act_order", CASES)
def test_gptq_beats_rtn_and_container_is_exact(data, group, act_order, symmetric):
    X, W, gptq = data
    spec = QuantSpec(bits=4, symmetric=symmetric, group_size=group)
    static = act_order and group is not None
    qt, Q = gptq._quantize(W, spec, blocksize=128, percdamp=0.01, act_order=act_order, static_groups=static)

    # the container holds exactly the weight GPTQ wrote, in the original column order
    Wq = qt.dequantize()
    assert torch.equal(Wq, Q)
    assert qt.shape == W.shape and qt.codes.shape == W.shape
    assert qt.codes.dtype == (torch.int8 if symmetric else torch.uint8)
    lo, hi = spec.code_range
    assert qt.codes.min() >= lo and qt.codes.max() <= hi
    expected_scale_shape = {None: (D_OUT, 1, 1), -1: (1, 1, 1)}.get(group, (D_OUT, D_IN // (group or 1), 1))
    assert qt.scale.shape == expected_scale_shape and torch.all(qt.scale > 0)

    e_gptq = _out_err(X, W, Wq)
    e_rtn = _out_err(X, W, fake_quantize(W, spec))
    assert e_gptq <= e_rtn
    # the public entry point gives the same result
    qt2 = gptq.quantize(W, spec, act_order=act_order, static_groups=static)
    assert torch.equal(qt2.codes, qt.codes) and torch.equal(qt2.scale, qt.scale)


def test_gptq_with_mse_clip_search_beats_rtn_with_it(data):
    X, W, gptq = data
    spec = QuantSpec(bits=4, mse_search=True, mse_norm=2.4)
    qt = gptq.quantize(W, spec)
    assert torch.equal(qt.scale, compute_qparams(W, spec)[0])  # per-channel qparams from the whole row
    assert _out_err(X, W, qt.dequantize()) <= _out_err(X, W, fake_quantize(W, spec))


@pytest.mark.parametrize("symmetric", [True, False])
def test_output_objective_picks_each_rows_clip_by_its_output_error(data, symmetric):
    X, W, gptq = data
    spec = QuantSpec(bits=4, symmetric=symmetric, mse_search=True, mse_grid=20, mse_min_ratio=0.5)
    qt = gptq.quantize(W, spec, clip_objective="output")
    H = gptq.H.double()

    def row_output_error(scale, zero):  # (w - w_hat) H (w - w_hat)^T of RTN at these qparams, per row
        d = (W.double() - (torch.round(W / scale[:, 0] + zero[:, 0]).clamp(*spec.code_range) - zero[:, 0])
             * scale[:, 0].double())
        return ((d @ H) * d).sum(-1)

    by_weight = compute_qparams(W, spec)
    e_out, e_weight = row_output_error(qt.scale, qt.zero), row_output_error(*by_weight)
    # the same grid, so never worse per row; the outlier channels make the two objectives disagree
    assert torch.all(e_out <= e_weight * (1 + 1e-5))
    assert (e_out < e_weight * (1 - 1e-3)).sum() >= D_OUT // 4
    # every other candidate on the grid is no better for its row
    for r in (1.0 - i * 0.5 / 19 for i in (0, 7, 19)):
        s, z = compute_qparams(W, QuantSpec(bits=4, symmetric=symmetric, clip_ratio=r))
        assert torch.all(e_out <= row_output_error(s, z) * (1 + 1e-5))
    # the default objective is the weight norm, unchanged
    assert torch.equal(gptq.quantize(W, spec).scale, by_weight[0])
    # the end result: a smaller output error than GPTQ with the weight search, on these inputs
    assert _out_err(X, W, qt.dequantize()) < _out_err(X, W, gptq.quantize(W, spec).dequantize())
    with pytest.raises(ValueError, match="one clip ratio per row"):
        gptq.quantize(W, QuantSpec(bits=4, group_size=32, mse_search=True), clip_objective="output")
    with pytest.raises(ValueError, match="clip_objective"):
        gptq.quantize(W, spec, clip_objective="hessian")


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_objective_keeps_each_rows_best_gptq_result(data, symmetric, act_order, monkeypatch):
    X, W, gptq = data
    spec = QuantSpec(bits=4, symmetric=symmetric, mse_search=True, mse_grid=6, mse_min_ratio=0.5)
    monkeypatch.setattr(gptq_mod, "_CANDIDATE_BYTES", 4 * 4 * D_OUT * D_IN * 4)  # 4 at a time: two chunks
    qt, Q = gptq._quantize(W, spec, blocksize=128, percdamp=0.01, act_order=act_order, static_groups=False,
                           clip_objective="gptq")
    assert torch.equal(qt.dequantize(), Q)
    H = gptq.H.double()
    Hd = H + 0.01 * H.diagonal().mean() * torch.eye(D_IN, dtype=H.dtype)  # the damped H the loop minimises

    def row_error(Wq):
        d = W.double() - Wq.double()
        return ((d @ Hd) * d).sum(-1)

    e_best = row_error(Q)
    # each row's result is that of plain GPTQ at one of the candidate ratios, the best of them per row
    per_ratio = []
    for i in range(6):
        r = 1.0 - i * 0.5 / 5
        one = gptq.quantize(W, QuantSpec(bits=4, symmetric=symmetric, clip_ratio=r), act_order=act_order)
        per_ratio.append(row_error(one.dequantize()))
    per_ratio = torch.stack(per_ratio)
    torch.testing.assert_close(e_best, per_ratio.min(dim=0).values, rtol=1e-4, atol=0)
    assert len(set(per_ratio.argmin(dim=0).tolist())) > 1  # rows do choose different ratios
    # so it is never worse per row than the weight objective's choice, and better in all
    e_weight = row_error(gptq.quantize(W, spec, act_order=act_order).dequantize())
    assert torch.all(e_best <= e_weight * (1 + 1e-4)) and e_best.sum() < e_weight.sum()


def test_gptq_result_survives_a_state_dict_round_trip(data):
    _, W, gptq = data
    for spec in (QuantSpec(bits=4, group_size=32), QuantSpec(bits=4, symmetric=False), QuantSpec(bits=3, group_size=64)):
        qt = gptq.quantize(W, spec)
        back = QuantizedTensor.from_state_dict(qt.to_state_dict("w."), "w.")
        assert torch.equal(back.dequantize(), qt.dequantize())


def test_static_groups_use_the_original_weight_and_original_order(data):
    X, W, gptq = data
    spec = QuantSpec(bits=4, group_size=32)
    qt = gptq.quantize(W, spec, act_order=True, static_groups=True)
    s, z = compute_qparams(W, spec)
    assert torch.equal(qt.scale, s) and torch.equal(qt.zero, z)
    # dynamic groups see updated weights, so their scales differ from RTN's
    qd = gptq.quantize(W, spec)
    assert not torch.equal(qd.scale, s)


# ----------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize(
    "group, act_order, static, blocksize, symmetric",
    [
        (None, False, False, 128, True),
        (None, False, False, 48, False),  # 256 = 5 * 48 + 16: a ragged last block
        (None, True, False, 64, True),
        (32, False, False, 16, True),  # block widened to the group: 32
        (32, False, False, 128, False),  # 4 groups per block
        (64, False, False, 100, True),  # block rounded down to a group multiple: 64
        (64, True, True, 128, True),
        (32, False, True, 128, False),
    ],
)
@pytest.mark.parametrize("factorization", ["reference", "lean"])
def test_matches_unblocked_reference(data, group, act_order, static, blocksize, symmetric, factorization):
    X, W, gptq = data
    spec = QuantSpec(bits=4, symmetric=symmetric, group_size=group)
    qt, Q = gptq._quantize(W, spec, blocksize=blocksize, percdamp=0.01, act_order=act_order, static_groups=static,
                           factorization=factorization)
    C_ref, Q_ref = reference_gptq(W, gptq.H, spec, act_order=act_order, static_groups=static)
    # float32 (library) vs float64 (reference) round-off flips a code where w / s is within
    # ~1e-6 of a rounding tie: that happens to 0 or 1 of the 24576 codes in these cases, while
    # a wrong blocking / ordering / group timing changes a large fraction of them.
    mismatch = qt.codes.double() != C_ref
    assert mismatch.sum().item() <= 3
    clean = ~mismatch.any(dim=1)  # rows without a flip: same codes, weights equal to round-off
    assert clean.sum().item() >= D_OUT - 3
    torch.testing.assert_close(Q.double()[clean], Q_ref[clean], rtol=0, atol=1e-5)
    assert _out_err(X, W, Q) == pytest.approx(_out_err(X, W, Q_ref), rel=1e-3)


# ----------------------------------------------------------------------------- the lean factorization


@pytest.mark.parametrize("n, block", [(37, 8), (64, 64), (100, 512)])
def test_lower_triangular_inverse_in_place(n, block):
    from dartquant.quant.gptq import _invert_lower_
    g = torch.Generator().manual_seed(n)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    L = torch.linalg.cholesky(A @ A.T + n * torch.eye(n, dtype=torch.float64))  # what GPTQ inverts
    expect = torch.linalg.solve_triangular(L, torch.eye(n, dtype=torch.float64), upper=False)
    _invert_lower_(L, block)
    torch.testing.assert_close(L, expect, rtol=1e-10, atol=1e-10)
    assert torch.all(L.triu(1) == 0)


@pytest.mark.parametrize("n, block", [(37, 8), (64, 64), (100, 512), (130, 16)])
def test_blocked_cholesky_in_place(n, block):
    from dartquant.quant.gptq import _cholesky_lower_
    g = torch.Generator().manual_seed(n)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    H = A @ A.T + n * torch.eye(n, dtype=torch.float64)
    work = H.clone()
    assert _cholesky_lower_(work, block)
    torch.testing.assert_close(work, torch.linalg.cholesky(H), rtol=1e-10, atol=1e-10)
    assert torch.all(work.triu(1) == 0)
    H[n // 2, n // 2] = -1.0  # not positive definite: reported, not factored
    assert not _cholesky_lower_(H.clone(), block)


@pytest.mark.parametrize("act_order, block", [(False, 512), (True, 512), (False, 16), (True, 24)])
def test_lean_factorization_gives_the_reference_inverse_cholesky(act_order, block, monkeypatch):
    monkeypatch.setattr(gptq_mod, "_FACTOR_BLOCK", block)  # 16 / 24: several blocks, a ragged last one
    """U with U^T U = (H + damp I)^-1, U upper, in the loop's column order, dead inputs included:
    the reference's float64 result to float32 round-off."""
    X = _calibration(seed=5, dead=(7, 90))
    g = GPTQ(D_IN)
    g.add_batch(X)
    H = g.H.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else None
    Hp = H if perm is None else H[perm][:, perm]
    ref = GPTQ._inverse_cholesky(Hp, 0.01)
    lean = g._lean_inverse_cholesky(dead, perm, 0.01, H.diagonal().mean().item())
    assert lean.dtype == torch.float32 and torch.all(lean.tril(-1) == 0)
    torch.testing.assert_close(lean.double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


@pytest.mark.parametrize("factorization", ["reference", "lean"])
def test_release_hessian_drops_it_and_changes_no_code(data, factorization):
    """The Hessian's last user may drop it mid-call (the memory of a 70B down_proj): same codes."""
    X, W, _ = data
    spec = QuantSpec(bits=4, group_size=32)
    kept, dropped = GPTQ(D_IN), GPTQ(D_IN)
    kept.add_batch(X)
    dropped.add_batch(X)
    want = kept.quantize(W, spec, factorization=factorization)
    got = dropped.quantize(W, spec, factorization=factorization, release_hessian=True)
    assert kept.H is not None and dropped.H is None
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scale, want.scale)


def test_factorization_auto_is_the_reference_on_the_cpu_unless_the_environment_says(data, monkeypatch):
    _, W, gptq = data
    spec = QuantSpec(bits=4, group_size=32)

    lean_calls = []
    real = GPTQ._lean_inverse_cholesky
    monkeypatch.setattr(GPTQ, "_lean_inverse_cholesky", lambda self, *a: lean_calls.append(1) or real(self, *a))

    def run(factorization="auto") -> str:
        before = len(lean_calls)
        gptq._quantize(W, spec, blocksize=128, percdamp=0.01, act_order=False, static_groups=False,
                       factorization=factorization)
        return "lean" if len(lean_calls) > before else "reference"

    monkeypatch.delenv("DARTQUANT_GPTQ_FACTORIZATION", raising=False)
    assert (run("reference"), run("lean"), run()) == ("reference", "lean", "reference")
    monkeypatch.setenv("DARTQUANT_GPTQ_FACTORIZATION", "lean")
    assert run() == "lean"
    assert run("reference") == "reference"  # an explicit choice wins
    monkeypatch.setenv("DARTQUANT_GPTQ_FACTORIZATION", "cholesky")
    with pytest.raises(ValueError, match="DARTQUANT_GPTQ_FACTORIZATION"):
        run()


# ----------------------------------------------------------------------------- robustness


def test_dead_inputs_get_zero_weight_columns():
    dead = (5, 17, 130)
    X = _calibration(seed=3, dead=dead)
    W = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(4))
    g = GPTQ(D_IN)
    g.add_batch(X)
    for act_order in (False, True):
        spec = QuantSpec(bits=4, symmetric=False, group_size=32)
        qt = g.quantize(W, spec, act_order=act_order, static_groups=act_order)
        Wq = qt.dequantize()
        assert torch.isfinite(Wq).all()
        assert torch.all(Wq[:, list(dead)] == 0)
        assert _out_err(X, W, Wq) <= _out_err(X, W, fake_quantize(W, spec))


@pytest.mark.parametrize("factorization", ["reference", "lean"])
def test_quantize_leaves_a_float64_hessian_as_it_was(factorization):
    """A solver quantizes several linears (q/k/v share one): its Hessian, float64 included (where
    the float64 copy could be the Hessian itself), must not keep the dead-input fix of the first."""
    X = _calibration(seed=3, dead=(5, 17))
    g = GPTQ(D_IN, dtype=torch.float64)
    g.add_batch(X)
    H0 = g.H.clone()
    W = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(4))
    first = g.quantize(W, QuantSpec(bits=4), factorization=factorization)
    assert torch.equal(g.H, H0)
    assert torch.equal(g.quantize(W, QuantSpec(bits=4), factorization=factorization).codes, first.codes)


@pytest.mark.parametrize("factorization", ["reference", "lean"])
def test_cholesky_failure_retries_with_more_damping(factorization):
    g = GPTQ(4)
    # indefinite (eigenvalues 3 and -1 per 2x2 block), as float32 round-off can make a Hessian:
    # damping 0.01 and 0.1 fail, 1 leaves it singular, 10 works
    g.H = torch.tensor([[1.0, 2.0, 0, 0], [2.0, 1.0, 0, 0], [0, 0, 1.0, 2.0], [0, 0, 2.0, 1.0]])
    g._nsamples = 1
    W = torch.randn(3, 4)
    with pytest.warns(RuntimeWarning, match="Cholesky failed") as record:
        qt = g.quantize(W, QuantSpec(bits=4), factorization=factorization)
    assert torch.isfinite(qt.dequantize()).all()
    assert record[0].filename == __file__  # the warning names the caller's line

    g.H = torch.tensor([[1.0, 1e7], [1e7, 1.0]])  # beyond any retry
    g.in_features = 2
    with pytest.raises(RuntimeError, match="Cholesky"):
        g.quantize(torch.randn(3, 2), QuantSpec(bits=4), factorization=factorization)


def test_well_conditioned_hessian_does_not_warn(data):
    _, W, gptq = data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gptq.quantize(W, QuantSpec(bits=4))


def test_argument_errors(data):
    _, W, gptq = data
    with pytest.raises(ValueError, match="static_groups=True"):
        gptq.quantize(W, QuantSpec(bits=4, group_size=32), act_order=True)
    with pytest.raises(ValueError, match="shape"):
        gptq.quantize(W[:, :100], QuantSpec(bits=4))
    with pytest.raises(ValueError, match="group_size=48"):
        gptq.quantize(W, QuantSpec(bits=4, group_size=48))
    with pytest.raises(ValueError, match="bits=16"):
        gptq.quantize(W, QuantSpec(bits=16))
    with pytest.raises(ValueError, match="factorization"):
        gptq.quantize(W, QuantSpec(bits=4), factorization="cholesky")
    g = GPTQ(4)
    g.add_batch(torch.tensor([[1.0, float("nan"), 0.0, 1.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        g.quantize(torch.randn(2, 4), QuantSpec(bits=4))


def test_half_weight_and_result_dtypes(data):
    X, W, gptq = data
    qt = gptq.quantize(W.half(), QuantSpec(bits=4, group_size=64))
    assert qt.scale.dtype == torch.float32 and qt.dequantize().dtype == torch.float32
    assert _out_err(X, W, qt.dequantize()) <= _out_err(X, W, fake_quantize(W, QuantSpec(bits=4, group_size=64)))


@pytest.mark.parametrize("family", ["llama-tied-gqa", "qwen2-bias-gqa"])
def test_linears_reading_one_input_share_one_hessian_bitwise(family, monkeypatch):
    """q/k/v and gate/up read one tensor: one accumulator each (4 per dense block, not 7), and the
    codes and scales are bitwise those of one accumulator per linear."""
    from dartquant.adapters import adapter_for
    from dartquant.config import RunConfig
    from dartquant.quant import weights
    from dartquant.quant.act import install_quantizers_
    from tiny import make_tiny_model

    scheme = RunConfig.from_flat(w_quantizer="gptq").scheme
    ids = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(0))
    real = weights._SharedHessians

    def run(share: bool):
        model = make_tiny_model(family, dtype=torch.float32)
        install_quantizers_(model, scheme, adapter_for(model))
        counts = []

        class Counting(real):
            def free(self):
                counts.append(len({id(s) for s in self.of_role.values()}))
                super().free()

        class Separate(Counting):  # one accumulator per linear: never reuse the newest
            def observer(self, role, in_features, device, quantizer=None):
                inner = super().observer(role, in_features, device, quantizer)

                def observe(x):
                    self._newest = None
                    self._last = {k: v for k, v in self._last.items() if k == id(self.of_role.get(role))}
                    inner(x)
                return observe

        monkeypatch.setattr(weights, "_SharedHessians", Counting if share else Separate)
        out = weights.quantize_weights_(model, scheme, ids, progress=False)
        return out, counts

    shared, n_shared = run(True)
    separate, n_separate = run(False)
    assert set(n_shared) == {4} and set(n_separate) == {7}, (n_shared, n_separate)
    for name, qt in shared.items():
        assert torch.equal(qt.codes, separate[name].codes) and torch.equal(qt.scale, separate[name].scale)


# ----------------------------------------------------------------------------- the Triton column loop


@pytest.mark.skipif(not __import__("dartquant.quant.gptq_triton", fromlist=["x"]).triton_columns_available(),
                    reason="needs Triton (its interpreter on the CPU)")
@pytest.mark.parametrize(
    "group,act_order,static,symmetric,rows,blocksize",
    [
        (None, False, False, False, 40, 128),  # the default: per output channel, asymmetric
        (None, True, False, True, 37, 100),  # rows off the 16-row tile, last block partial (256 = 100+100+56)
        (-1, False, False, False, 33, 64),  # per tensor
        (32, True, True, False, 30, 128),  # static groups under act-order: per-column scales
    ],
)
def test_triton_column_loop_gives_the_torch_loops_bits(data, group, act_order, static, symmetric, rows, blocksize):
    """The kernel runs the same fp32 operations in the same order (gptq_triton's docstring): codes,
    the written weight and the errors pushed to later columns all equal bit for bit (here in
    Triton's interpreter; on a GPU `columns="auto"` checks it again on its first block)."""
    if __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CPU runs Triton kernels only in its interpreter (TRITON_INTERPRET=1)")
    X, W, gptq = data
    W = W[:rows].clone()
    W[:, 7] = 0.0  # an exactly-zero column: q = z, err = 0
    spec = QuantSpec(bits=4, symmetric=symmetric, group_size=group)
    kw = dict(blocksize=blocksize, percdamp=0.01, act_order=act_order, static_groups=static)
    qt_t, Q_t = gptq._quantize(W, spec, columns="torch", **kw)
    qt_k, Q_k = gptq._quantize(W, spec, columns="triton", **kw)
    assert torch.equal(qt_k.codes, qt_t.codes)
    assert torch.equal(Q_k, Q_t)
    assert torch.equal(qt_k.dequantize(), Q_k)  # the container still reproduces the loop's weight


def test_dynamic_groups_stay_on_the_torch_loop(data):
    """Dynamic groups take qparams inside the loop: even columns="triton" runs them in torch."""
    X, W, gptq = data
    spec = QuantSpec(bits=4, symmetric=False, group_size=32)
    qt_t = gptq.quantize(W, spec, columns="torch")
    qt_k = gptq.quantize(W, spec, columns="auto")
    assert torch.equal(qt_k.codes, qt_t.codes)
    with pytest.raises(ValueError, match="columns"):
        gptq.quantize(W, spec, columns="cuda")


@pytest.mark.parametrize("fault", ["wrong bits", "raises"])
def test_auto_column_loop_checks_itself_and_falls_back(data, monkeypatch, fault):
    """columns="auto" (a GPU's default) compares the kernel with the torch loop on its first block;
    a kernel that disagrees or fails is dropped with a warning, and the result is the torch loop's."""

    X, W, gptq = data
    spec = QuantSpec(bits=4, symmetric=False)
    want = gptq.quantize(W, spec, columns="torch")

    def broken(W1, Hinv1, S1, Z1, lo, hi, Q1, C1, Err1):
        if fault == "raises":
            raise RuntimeError("no kernel for this GPU")
        Q1.zero_(), C1.zero_(), Err1.zero_()

    monkeypatch.setattr(gptq_mod, "_COLUMNS_KERNEL_CHECKED", {})
    monkeypatch.setattr(gptq_mod, "_COLUMNS_KERNEL_OK", {})
    monkeypatch.setattr(gptq_mod, "gptq_columns_", broken)
    monkeypatch.setattr(gptq_mod, "triton_columns_available", lambda: True)
    monkeypatch.setattr(gptq_mod, "_use_columns_kernel",
                        lambda columns, dev: columns == "auto" and gptq_mod._COLUMNS_KERNEL_OK.get(dev.type, True))
    with pytest.warns(RuntimeWarning, match="Triton column loop"):
        got = gptq.quantize(W, spec, columns="auto")
    assert torch.equal(got.codes, want.codes)
    assert gptq_mod._COLUMNS_KERNEL_OK["cpu"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # dropped for the rest of the process: no second warning
        assert torch.equal(gptq.quantize(W, spec, columns="auto").codes, want.codes)


_COMPILE_FOR_HOPPER = """
import json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dartquant.quant import gptq_triton
sig = {name: "*fp32" for name in ("W_ptr", "Q_ptr", "C_ptr", "E_ptr", "H_ptr", "S_ptr", "Z_ptr")}
sig.update({name: "i32" for name in ("n_rows", "n_cols", "stride_w", "stride_q", "stride_e", "stride_h", "stride_s")})
sig.update(lo="fp32", hi="fp32", SYM="constexpr", BLOCK_R="constexpr", BLOCK_C="constexpr", USE_RINT="constexpr")
out = {}
for sym in (False, True):
    src = ASTSource(fn=gptq_triton._gptq_columns_kernel, signature=sig,
                    constexprs={"SYM": sym, "BLOCK_R": gptq_triton.BLOCK_R, "BLOCK_C": 128, "USE_RINT": True})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": False})
    ptx = k.asm["ptx"]
    out[str(sym)] = {op: ptx.count(op) for op in ("div.rn.f32", "cvt.rni", "fma.rn.f32")}
print(json.dumps(out))
"""


@pytest.mark.skipif(not __import__("dartquant.quant.gptq_triton", fromlist=["x"]).triton_columns_available(),
                    reason="needs Triton")
def test_triton_column_loop_compiles_for_hopper_without_fma():
    """Compiled for sm_90 on this machine (Triton's bundled ptxas, no GPU; in a child process, as
    the interpreter's kernels cannot be compiled): the kernel builds, and its PTX has IEEE divisions,
    round-to-nearest-even and no fused multiply-adds, which would round differently from the torch
    loop's separate product and difference."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], capture_output=True, text=True, env=env)
    if p.returncode and "ptxas" in p.stderr:
        pytest.skip(f"no usable ptxas in this Triton install: {p.stderr[-300:]}")
    assert p.returncode == 0, p.stderr[-2000:]
    for sym, counts in json.loads(p.stdout.strip().splitlines()[-1]).items():
        assert counts["div.rn.f32"] > 0 and counts["cvt.rni"] > 0, (sym, counts)
        assert counts["fma.rn.f32"] == 0, (sym, counts)
