"""DFRot: the Procrustes step is the exact minimizer it claims to be, R1 stays orthogonal, the
folded model is exact in float64, and the method runs end to end through run_quantize."""

from __future__ import annotations

import json

import pytest
import torch

from dartquant.adapters import adapter_for
from dartquant.calib.dfrot import (DFRotConfig, calibrate_dfrot, massive_tokens, principal_axes_init, procrustes,
                                   quant_pass, refine_rotation, surrogate)
from dartquant.config import RunConfig
from dartquant.hadamard import random_hadamard_matrix
from dartquant.pipeline import run_quantize
from dartquant.quant.primitives import QuantSpec, fake_quantize
from dartquant.transforms import RotationSet, exact_norms_, rotate_
from tiny import make_tiny_model, rel_err, save_tiny_folder

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one thread

SPEC = QuantSpec(bits=4, symmetric=False, clip_ratio=0.9)


def _acts(n=48, t=600, seed=0) -> torch.Tensor:
    """RMS-normalized heavy-tailed tokens with outlier channels; every 50th token massive."""
    g = torch.Generator().manual_seed(seed)
    x = torch.distributions.Laplace(0.0, 1.0).sample((t, n)) * torch.exp(0.7 * torch.randn(n, generator=g))
    x[::50, 3] = 60.0 * x[::50].abs().max()
    return (x / x.pow(2).mean(-1, keepdim=True).sqrt()).double()


def _weighted_err(x, r, q, w):
    return (w[:, None] * (x @ r - q).pow(2)).sum().item()


def test_massive_tokens_is_the_within_token_ratio():
    x = _acts()
    m = massive_tokens(x, 100.0, chunk=7)
    assert torch.equal(torch.nonzero(m).flatten(), torch.arange(0, 600, 50))
    assert torch.equal(massive_tokens(x * 1e3, 100.0), m)  # scale-free
    assert not massive_tokens(x, 1e9).any()


def test_procrustes_step_minimizes_the_weighted_error_at_fixed_q():
    """Step (b): R' = U V^T of X^T W Q is the best orthogonal R for that Q: no better than the
    current R, nor than any nearby rotation of R'; the closed-form surrogate is the direct one."""
    torch.manual_seed(0)
    x = _acts()
    w = torch.where(massive_tokens(x, 100.0), 100.0, 1.0).double()
    r0 = random_hadamard_matrix(48, 3)
    q0 = fake_quantize(x @ r0, SPEC)
    p = quant_pass(x, r0, SPEC, w, chunk=64)
    assert torch.allclose(p["m"], x.T @ (w[:, None] * q0), rtol=1e-12, atol=1e-9)
    assert p["err"] == pytest.approx(_weighted_err(x, r0, q0, w), rel=1e-12)
    r1 = procrustes(p["m"])
    assert (r1 @ r1.T - torch.eye(48, dtype=torch.float64)).abs().max() < 1e-12
    j0, j1 = _weighted_err(x, r0, q0, w), _weighted_err(x, r1, q0, w)
    assert j1 < j0
    assert surrogate(p, r1) == pytest.approx(j1, rel=1e-9) and surrogate(p, r0) == pytest.approx(j0, rel=1e-9)
    for seed in range(5):  # any small rotation away from R' is worse at this Q
        a = torch.randn(48, 48, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1e-3
        near = r1 @ torch.linalg.matrix_exp(a - a.T)
        assert _weighted_err(x, near, q0, w) > j1


def test_refine_never_raises_the_surrogate_and_keeps_the_best_iterate():
    """Alternating minimization: every Procrustes step lowers J(R, Q_k) below E(R_k) = J(R_k, Q_k).
    E itself may rise (quant() re-derives its grid), so the best iterate is the one returned."""
    x = _acts()
    w = torch.where(massive_tokens(x, 100.0), 100.0, 1.0).double()
    init = random_hadamard_matrix(48, 0)
    train = torch.arange(0, 600, 2)
    r, h = refine_rotation(x, init, SPEC, w, 15, index=train)
    e, p = h["error"], h["procrustes"]
    assert len(e) == 16 and len(p) == 15
    assert all(p[k] <= e[k] * (1 + 1e-12) for k in range(15))
    k = h["best_iteration"]
    assert e[k] == min(e) < e[0]
    assert r.dtype == torch.float64 and (r @ r.T - torch.eye(48, dtype=torch.float64)).abs().max() < 1e-12
    xs, ws = x[train], w[train]
    assert _weighted_err(xs, r, fake_quantize(xs @ r, SPEC), ws) / ws.sum().item() == pytest.approx(e[k], rel=1e-12)
    r0, h0 = refine_rotation(x, init, SPEC, w, 0, index=train)
    assert torch.equal(r0, init) and h0["best_iteration"] == 0  # 0 iterations: QuaRot's R1


def test_dfrot_config_is_checked():
    for kw in (dict(dfrot_iterations=-1), dict(dfrot_ma_ratio=1.0), dict(dfrot_ma_weight=0.5),
               dict(dfrot_token_fraction=0.0), dict(dfrot_init="pca")):
        with pytest.raises(ValueError, match="dfrot_"):
            RunConfig.from_flat(method="dfrot", **kw).validate()
    assert RunConfig.from_flat(method="dfrot").section("dfrot") == DFRotConfig()


def test_principal_axes_init_sends_the_dominant_direction_to_a_flat_row():
    g = torch.Generator().manual_seed(3)
    n = 48
    axis = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0][:, 0]
    # tokens dominated by one direction (not a coordinate axis), plus a little isotropic noise
    x = 5.0 * torch.randn(400, 1, generator=g, dtype=torch.float64) * axis + 0.2 * torch.randn(
        400, n, generator=g, dtype=torch.float64)
    h = random_hadamard_matrix(n, 0)
    r = principal_axes_init(x, h, index=torch.arange(300), chunk=64)
    assert (r @ r.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12
    flat = axis @ r  # the dominant direction after R: +-1/sqrt(n) everywhere (up to the axis' estimation error)
    assert (flat.abs() * n ** 0.5 - 1).abs().max() < 0.05
    # so the 4-bit error of the held-out tokens drops below a random Hadamard's
    held = x[300:]
    err = {name: (held @ m - fake_quantize(held @ m, SPEC)).pow(2).sum().item() for name, m in (("h", h), ("pa", r))}
    assert err["pa"] < 0.7 * err["h"]


@torch.no_grad()
@pytest.mark.parametrize("name", ["llama-tied-gqa", "qwen2-bias-gqa"])
def test_dfrot_rotations_fold_exactly_in_float64(name):
    model = make_tiny_model(name)  # float64
    exact_norms_(model)  # transformers' RMSNorm computes in float32 even for float64 inputs
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits
    cfg = RunConfig.from_flat(method="dfrot", dfrot_iterations=4, dfrot_token_fraction=0.5, dfrot_ma_ratio=5.0)
    rot = calibrate_dfrot(model, cfg, ids, progress=False)
    geo = adapter_for(model).geometry(model.config)
    quarot = RotationSet.quarot(geo, seed=0)
    assert rot.r1.dtype == torch.float64
    assert (rot.r1 @ rot.r1.T - torch.eye(geo.hidden, dtype=torch.float64)).abs().max() < 1e-12
    assert not torch.allclose(rot.r1, quarot.r1) and torch.equal(rot.r2, quarot.r2)
    # the principal-axes start, alone (no alternation), is a different R1 that folds as exactly
    pa = calibrate_dfrot(model, RunConfig.from_flat(method="dfrot", dfrot_iterations=0, dfrot_token_fraction=0.5,
                                                    dfrot_init="principal_axes"), ids, progress=False)
    assert pa.meta["r1_init"] == "principal_axes" and pa.meta["r1_best_iteration"] == 0
    assert not torch.allclose(pa.r1, quarot.r1) and not torch.allclose(pa.r1, rot.r1)
    rot.validate(geo)
    rotate_(model, rot)
    assert rel_err(ref, model(ids).logits) < 1e-9
    model = make_tiny_model(name)
    exact_norms_(model)
    rotate_(model, pa)
    assert rel_err(ref, model(ids).logits) < 1e-9


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("tiny") / "model")


def test_dfrot_runs_end_to_end_deterministically(tiny_folder, tmp_path):
    base = dict(model=str(tiny_folder), method="dfrot", calib_samples=4, calib_seqlen=32, eval_seqlen=32,
                eval_max_windows=2, dfrot_iterations=5, dfrot_token_fraction=0.5, dfrot_ma_ratio=5.0)
    a = run_quantize(RunConfig.from_flat(**base, w_quantizer="gptq"), tmp_path / "a", eval_fp=False, progress=False)
    b = run_quantize(RunConfig.from_flat(**base, w_quantizer="gptq"), tmp_path / "b", eval_fp=False, progress=False)
    assert a["ppl"] == b["ppl"] and a["calibration"] == b["calibration"]
    ra, rb = (RotationSet.load(tmp_path / d / "rotations.safetensors") for d in "ab")
    assert torch.equal(ra.r1, rb.r1)
    calib = a["calibration"]
    assert len(calib["r1_heldout_sqnr_db"]) == 2 and calib["r1_iterations"] == 5
    assert calib["r1_train_weighted_error"][1] <= calib["r1_train_weighted_error"][0]
    assert calib["r1_tokens"]["held_out"] >= 1 and calib["r1_tokens"]["train"] > calib["r1_tokens"]["held_out"]
    hist = json.loads((tmp_path / "a" / "calibration_loss.json").read_text())["R1"]
    assert hist["heldout_quant"]["all"]["final"]["sqnr_db"] == pytest.approx(calib["r1_heldout_sqnr_db"][1])
    c = run_quantize(RunConfig.from_flat(**{**base, "seed": 1}, w_quantizer="rtn"), tmp_path / "c", eval_fp=False,
                     progress=False)
    assert not torch.equal(RotationSet.load(tmp_path / "c" / "rotations.safetensors").r1, ra.r1)
    assert c["method"] == "dfrot"
