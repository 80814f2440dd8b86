"""Tests of the local rotation calibration core: losses, QR-Orth, Cayley SGD, training loop."""

from __future__ import annotations

import math

import pytest
import torch

from dartquant.calib import (
    LOSSES,
    CayleyOrth,
    CayleySGD,
    QROrth,
    RotationTrainConfig,
    kurtosis_loss,
    orthogonality_error,
    qr_orthogonal,
    quant_error_loss,
    train_rotation,
    variance_loss,
    whip_loss,
)
from dartquant.calib.losses import fake_quant_per_token


# ---------------------------------------------------------------- helpers


# The tensors here are tiny: with 2 intra-op threads on a busy 2-core machine, OpenMP
# synchronization made this module ~15x slower (88 s vs 5 s measured). conftest's fixture.
pytestmark = pytest.mark.usefixtures("one_thread")


def sylvester_hadamard(n: int, dtype=torch.float64) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix (n a power of 2)."""
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    assert h.shape[0] == n
    return h / math.sqrt(n)


def random_hadamard(n: int, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).to(dtype)
    return signs[:, None] * sylvester_hadamard(n, dtype)


def random_orthogonal(n: int, gen: torch.Generator, dtype=torch.float64, batch=()) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(*batch, n, n, generator=gen, dtype=torch.float64))
    return q.to(dtype)


def laplace(shape, gen: torch.Generator) -> torch.Tensor:
    # inverse CDF sampling with an explicit generator (torch.distributions has none)
    u = torch.rand(shape, generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12) - 0.5
    return (-torch.sign(u) * torch.log1p(-2 * u.abs())).float()


def outlier_data(tokens: int, n: int, seed: int, n_outliers: int = 4, scale: float = 10.0) -> torch.Tensor:
    """Laplacian activations with a few heavy outlier channels."""
    g = torch.Generator().manual_seed(seed)
    x = laplace((tokens, n), g)
    x[:, :n_outliers] *= scale
    return x


def kurtosis(o: torch.Tensor) -> float:
    return kurtosis_loss(o).item()


# ---------------------------------------------------------------- losses


def test_whip_hand_value_and_reductions():
    o = torch.tensor([[0.0, 1.0], [-2.0, math.log(2.0)]], dtype=torch.float64)
    tok = torch.tensor([1.0 + math.exp(-1.0), math.exp(-2.0) + 0.5], dtype=torch.float64)
    assert whip_loss(o).item() == pytest.approx(tok.mean().item(), abs=1e-15)
    assert torch.allclose(whip_loss(o, reduction="none"), tok)
    # groups: mean over tokens per group, mean over everything for "mean"
    og = torch.stack([o, 2 * o])
    g = whip_loss(og, reduction="groups")
    assert g.shape == (2,)
    assert g[0].item() == pytest.approx(tok.mean().item())
    assert g[1].item() == pytest.approx(whip_loss(2 * o).item())
    assert whip_loss(og).item() == pytest.approx(g.mean().item())
    with pytest.raises(ValueError):
        whip_loss(o, reduction="sum")


def test_whip_gradient_wrt_o_is_analytic():
    g = torch.Generator().manual_seed(1)
    o = torch.randn(7, 5, generator=g, dtype=torch.float64).requires_grad_()
    whip_loss(o).backward()
    ref = -torch.sign(o.detach()) * torch.exp(-o.detach().abs()) / 7
    assert torch.allclose(o.grad, ref, atol=1e-14)


def test_whip_with_qr_gradcheck():
    g = torch.Generator().manual_seed(2)
    n = 6
    x = torch.randn(10, n, generator=g, dtype=torch.float64)
    z = (torch.randn(n, n, generator=g, dtype=torch.float64) + 2 * torch.eye(n, dtype=torch.float64))
    # |o| is not differentiable at 0: make sure no entry is within reach of
    # the finite-difference steps (eps=1e-6 in Z moves o by ~1e-6)
    assert (x @ qr_orthogonal(z)).abs().min() > 1e-4
    z.requires_grad_()
    assert torch.autograd.gradcheck(lambda z_: whip_loss(x @ qr_orthogonal(z_)), (z,), eps=1e-6, atol=1e-7)

    # batched (per-group rotations) too, with the sign fix off and on
    xb = torch.randn(2, 8, 4, generator=g, dtype=torch.float64)
    zb = torch.randn(2, 4, 4, generator=g, dtype=torch.float64) + 2 * torch.eye(4, dtype=torch.float64)
    for sf in (True, False):
        assert (xb @ qr_orthogonal(zb, sf)).abs().min() > 1e-4
        zz = zb.clone().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda z_: whip_loss(xb @ qr_orthogonal(z_, sf), reduction="groups").sum(), (zz,), eps=1e-6, atol=1e-7
        )


@pytest.mark.parametrize("loss", [variance_loss, kurtosis_loss])
def test_smooth_losses_gradcheck(loss):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    z = (torch.randn(5, 5, generator=g, dtype=torch.float64) + 2 * torch.eye(5, dtype=torch.float64))
    assert (x @ qr_orthogonal(z)).abs().min() > 1e-4
    z.requires_grad_()
    assert torch.autograd.gradcheck(lambda z_: loss(x @ qr_orthogonal(z_)), (z,), eps=1e-6, atol=1e-7)


def test_other_loss_values():
    # 16 equally spaced values including 0: exactly representable in 4 bits
    o = (torch.arange(16, dtype=torch.float64) - 5.0)[None]
    assert quant_error_loss(o).item() == pytest.approx(0.0, abs=1e-20)
    # random data: elementwise error at most half a step
    g = torch.Generator().manual_seed(4)
    o = torch.randn(50, 32, generator=g, dtype=torch.float64)
    step = (o.amax(-1, keepdim=True).clamp(min=0) - o.amin(-1, keepdim=True).clamp(max=0)) / 15
    err = (o - fake_quant_per_token(o)).abs()
    assert (err <= step / 2 + 1e-12).all()
    assert err.max() > 0.1 * step.min()  # not identically zero
    assert quant_error_loss(o).item() == pytest.approx((err**2).sum(-1).mean().item())
    # variance of magnitudes and Pearson kurtosis on a hand example
    o = torch.tensor([[1.0, -1.0, 1.0, -1.0], [2.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert variance_loss(o, reduction="none").tolist() == pytest.approx([0.0, 0.75])
    # token 2: mu = 0.5, centered (1.5, -.5, -.5, -.5): m2 = 0.75, m4 = (5.0625 + 3*0.0625)/4
    assert kurtosis_loss(o, reduction="none").tolist() == pytest.approx([1.0, (5.25 / 4) / 0.75**2])
    # kurtosis is scale invariant, whip is not
    assert kurtosis_loss(10 * o).item() == pytest.approx(kurtosis_loss(o).item())
    assert whip_loss(10 * o).item() != pytest.approx(whip_loss(o).item())
    assert set(LOSSES) == {"whip", "quant", "variance", "kurtosis"}


def test_quant_loss_ste_gradient_flows_through_range_only():
    g = torch.Generator().manual_seed(5)
    o = torch.randn(4, 16, generator=g, dtype=torch.float64).requires_grad_()
    quant_error_loss(o).backward()
    grad = o.grad.clone()
    # with STE the direct path cancels: only the per-token min/max get gradient
    is_ext = (o == o.amax(-1, keepdim=True)) | (o == o.amin(-1, keepdim=True))
    assert grad[~is_ext].abs().max() < 1e-12
    assert grad[is_ext].abs().max() > 1e-6
    # without STE the interior entries get the a.e.-exact gradient 2*err/T
    o.grad = None
    quant_error_loss(o, ste=False).backward()
    err = (o - fake_quant_per_token(o, ste=False)).detach()
    assert torch.allclose(o.grad[~is_ext], (2 * err / 4)[~is_ext], atol=1e-12)


def test_quant_loss_with_the_runs_clip():
    """dq_loss_run_clip: the loss's quantizer clips like the run's (a_clip), and counts the clipped error."""
    from dartquant.calib.dartquant import train_config
    from dartquant.config import RunConfig
    from dartquant.quant.primitives import QuantSpec, fake_quantize

    g = torch.Generator().manual_seed(6)
    o = torch.randn(20, 64, generator=g, dtype=torch.float64)
    # the same quantizer as the run's activation quantizer at clip 0.9
    spec = QuantSpec(bits=4, symmetric=False, clip_ratio=0.9)
    err = o - fake_quantize(o, spec)
    assert quant_error_loss(o, clip_ratio=0.9).item() == pytest.approx((err**2).sum(-1).mean().item(), rel=1e-9)
    assert quant_error_loss(o, clip_ratio=0.9).item() != pytest.approx(quant_error_loss(o).item())
    cfg = RunConfig(model="x", method="dartquant")
    run_spec = cfg.scheme.act_spec("q", 64)
    assert train_config(cfg, "r1", run_spec).quant_clip == 1.0  # default: the published loss, unclipped
    cfg.section("dartquant").loss_run_clip = True
    assert train_config(cfg, "r1", run_spec).quant_clip == run_spec.clip_ratio == 0.9


# ---------------------------------------------------------------- QR-Orth


def test_qr_orth_starts_at_init():
    gen = torch.Generator().manual_seed(0)
    h = random_hadamard(64, gen)
    assert (QROrth(h)() - h).abs().max() < 1e-12
    # without the sign fix LAPACK flips columns of a Hadamard init
    assert (QROrth(h, sign_fix=False)() - h).abs().max() > 0.1
    # batched, and float32
    hb = torch.stack([random_hadamard(32, gen) for _ in range(3)])
    assert (QROrth(hb)() - hb).abs().max() < 1e-12
    h32 = h.float()
    assert (QROrth(h32)() - h32).abs().max() < 1e-5
    o = random_orthogonal(16, gen)
    assert (QROrth(o)() - o).abs().max() < 1e-12


@pytest.mark.parametrize("opt_name,lr", [("sgd", 20.0), ("adam", 0.3)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_qr_orth_stays_orthogonal(opt_name, lr, dtype, tol):
    gen = torch.Generator().manual_seed(1)
    n = 32
    x = torch.randn(256, n, generator=gen, dtype=torch.float64).to(dtype) * 3
    init = random_orthogonal(n, gen, dtype, batch=(2,))
    m = QROrth(init)
    opt = (torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam(m.parameters(), lr=lr))
    worst = 0.0
    for i in range(200):
        loss = whip_loss(x @ m(), reduction="groups").sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i % 10 == 9:
            worst = max(worst, orthogonality_error(m()))
    assert torch.isfinite(m.Z).all()
    assert worst < tol
    # the latent moved far away from the orthogonal group: orthogonality of Q is not trivial
    assert (m.Z.detach() - init).abs().max() > 0.3
    assert orthogonality_error(m.Z) > 0.1


# ---------------------------------------------------------------- Cayley SGD


def _skew_expm(n, gen, scale):
    a = torch.randn(n, n, generator=gen, dtype=torch.float64) * scale
    return torch.linalg.matrix_exp(a - a.T)


def test_cayley_sgd_orthogonal_and_descends():
    gen = torch.Generator().manual_seed(2)
    n = 24
    r0 = random_orthogonal(n, gen)
    target = r0 @ _skew_expm(n, gen, 0.1)  # reachable (same connected component)
    m = CayleyOrth(r0)
    opt = CayleySGD(m.parameters(), lr=0.05, momentum=0.9)
    d0 = (m() - target).norm().item()
    worst = 0.0
    for i in range(300):
        loss = ((m() - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i % 10 == 9:
            worst = max(worst, orthogonality_error(m()))
    assert worst < 1e-6
    assert (m() - target).norm().item() < 1e-3 * d0

    # plain Euclidean SGD on the same problem leaves the group (the test can tell)
    p = torch.nn.Parameter(r0.clone())
    sgd = torch.optim.SGD([p], lr=0.05, momentum=0.9)
    for _ in range(5):
        loss = ((p - 1.0) ** 2).sum()
        sgd.zero_grad()
        loss.backward()
        sgd.step()
    assert orthogonality_error(p) > 1e-3


def test_cayley_sgd_whip_many_steps_float64():
    gen = torch.Generator().manual_seed(3)
    n = 32
    x = torch.randn(512, n, generator=gen, dtype=torch.float64) * 3
    x[:, :2] *= 8
    m = CayleyOrth(random_orthogonal(n, gen))
    opt = CayleySGD(m.parameters(), lr=0.02, momentum=0.9)
    l0 = whip_loss(x @ m()).item()
    for _ in range(300):
        loss = whip_loss(x @ m())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert orthogonality_error(m()) < 1e-6
    assert whip_loss(x @ m()).item() < l0 - 0.5


def test_cayley_sgd_matches_reference_update():
    # two steps of the documented update, written out by hand:
    #   B1 = -skew(G1 R0^T);  R1 = (I - lr B1/2)^{-1} (I + lr B1/2) R0
    #   B2 = beta B1 - skew(G2 R1^T);  R2 = Cay(lr B2) R1
    gen = torch.Generator().manual_seed(5)
    n, lr, beta = 6, 0.3, 0.7
    target = torch.randn(n, n, generator=gen, dtype=torch.float64)
    r0 = random_orthogonal(n, gen)
    eye = torch.eye(n, dtype=torch.float64)

    def grad(r):  # of 0.5 * ||R - target||^2
        return r - target

    def skew(a):
        return 0.5 * (a - a.T)

    def cay(w, r):
        return torch.linalg.solve(eye - 0.5 * w, (eye + 0.5 * w) @ r)

    b1 = -skew(grad(r0) @ r0.T)
    r1 = cay(lr * b1, r0)
    b2 = beta * b1 - skew(grad(r1) @ r1.T)
    r2 = cay(lr * b2, r1)

    m = CayleyOrth(r0)
    opt = CayleySGD(m.parameters(), lr=lr, momentum=beta)
    out = []
    for _ in range(2):
        loss = 0.5 * ((m() - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(m().detach().clone())
    assert torch.allclose(out[0], r1, atol=1e-12)
    assert torch.allclose(out[1], r2, atol=1e-12)
    assert (r2 - r1).abs().max() > 1e-3  # steps are not negligible


def test_cayley_sgd_batched_equals_separate_and_iterative():
    gen = torch.Generator().manual_seed(4)
    n, G = 12, 3
    x = torch.randn(G, 64, n, generator=gen, dtype=torch.float64) * 2
    init = random_orthogonal(n, gen, batch=(G,))

    def run(xx, ii, **kw):
        m = CayleyOrth(ii)
        opt = CayleySGD(m.parameters(), lr=0.1, momentum=0.9, **kw)
        for _ in range(50):
            loss = whip_loss(xx @ m(), reduction="groups").sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return m().detach()

    rb = run(x, init)
    for g in range(G):
        assert torch.allclose(rb[g], run(x[g], init[g]), atol=1e-12)
    # iterative Cayley with re-orthogonalization stays orthogonal and descends
    ri = run(x, init, method="iterative", reorth_every=1)
    assert orthogonality_error(ri) < 1e-6
    assert whip_loss(x @ ri).item() < whip_loss(x @ init).item()


# ---------------------------------------------------------------- training loop


N, T_TRAIN, T_EVAL = 64, 16384, 4096


@pytest.fixture(scope="module")
def synth():
    x = outlier_data(T_TRAIN + T_EVAL, N, seed=0)
    init = random_orthogonal(N, torch.Generator().manual_seed(10), torch.float32)
    return x[:T_TRAIN], x[T_TRAIN:], init


def test_train_whip_improves_over_init_and_identity(synth):
    x, xe, init = synth
    cfg = RotationTrainConfig(loss="whip", param="qr", optimizer="sgd", lr=0.1, epochs=5, batch_tokens=1024)
    r, h = train_rotation(x, init, cfg, progress=False, eval_x=xe)
    assert r.dtype == torch.float32 and r.shape == (N, N) and r.device.type == "cpu"
    assert orthogonality_error(r) < 1e-5
    assert h["orth_error"] < 1e-5
    assert h["steps"] == 5 * (T_TRAIN // 1024) == len(h["loss"])
    assert len(h["epoch_loss"]) == 5
    assert h["seconds"] > 0 and h["seconds_per_step"] == pytest.approx(h["seconds"] / h["steps"])
    # held-out whip loss goes down clearly
    assert h["eval_loss_init"] == pytest.approx(whip_loss(xe @ init).item(), rel=1e-5)
    assert h["eval_loss_final"] == pytest.approx(whip_loss(xe @ r).item(), rel=1e-5)
    assert h["eval_loss_final"] < h["eval_loss_init"] - 0.5
    assert h["epoch_loss"][-1] < h["epoch_loss"][0]
    # cosine schedule: starts at lr, decreases monotonically towards 0
    assert h["lr"][0] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(h["lr"], h["lr"][1:]))
    assert h["lr"][-1] < 1e-3
    # range and tails of rotated held-out data: better than identity and than the init
    o_id, o_init, o_r = xe, xe @ init, xe @ r
    assert o_r.abs().max() < 0.5 * o_id.abs().max()
    assert o_r.abs().max() < 0.9 * o_init.abs().max()
    assert kurtosis(o_r) < 0.2 * kurtosis(o_id)
    assert kurtosis(o_r) < kurtosis(o_init) - 0.2


def test_train_deterministic(synth):
    x, xe, init = synth
    x = x[:4096, :32]
    init = random_orthogonal(32, torch.Generator().manual_seed(11), torch.float32)
    cfg = RotationTrainConfig(lr=0.1, epochs=2, batch_tokens=512, seed=3)
    r1, h1 = train_rotation(x, init, cfg, progress=False)
    r2, h2 = train_rotation(x, init, cfg, progress=False)
    assert torch.equal(r1, r2)
    assert h1["loss"] == h2["loss"]
    # another seed = another permutation = another result
    r3, _ = train_rotation(x, init, RotationTrainConfig(lr=0.1, epochs=2, batch_tokens=512, seed=4), progress=False)
    assert not torch.equal(r1, r3)


def test_train_half_storage_and_cayley_and_adam(synth):
    x, xe, init = synth
    x, xe = x[:4096, :32], xe[:1024, :32]
    init = random_orthogonal(32, torch.Generator().manual_seed(12), torch.float32)
    for cfg in (
        RotationTrainConfig(param="cayley", lr=0.1, epochs=3, batch_tokens=512),
        RotationTrainConfig(param="qr", optimizer="adam", lr=1e-2, epochs=3, batch_tokens=512),
        RotationTrainConfig(param="qr", lr=0.1, epochs=3, batch_tokens=512, schedule="constant"),
    ):
        for store in (torch.float16, torch.bfloat16):
            r, h = train_rotation(x.to(store), init, cfg, progress=False, eval_x=xe.to(store))
            assert r.dtype == torch.float32 and orthogonality_error(r) < 1e-5
            assert h["eval_loss_final"] < h["eval_loss_init"] - 0.2, (cfg, store)
    assert h["optimizer"] == "sgd"
    assert h["lr"] == [0.1] * h["steps"]  # constant schedule
    _, hc = train_rotation(x, init, RotationTrainConfig(param="cayley", optimizer="adam", epochs=1), progress=False)
    assert hc["optimizer"] == "cayley_sgd"  # cayley forces CayleySGD


@pytest.mark.parametrize(
    "cfg",
    [
        RotationTrainConfig(param="qr", optimizer="sgd", lr=0.1, epochs=2, batch_tokens=256),
        RotationTrainConfig(param="qr", optimizer="adam", lr=1e-2, epochs=2, batch_tokens=256),
        RotationTrainConfig(param="cayley", lr=0.1, epochs=2, batch_tokens=256),
    ],
    ids=["qr-sgd", "qr-adam", "cayley"],
)
def test_batched_groups_equal_separate(cfg):
    # Shared permutation (depends on seed and token count only) + sum of
    # per-group losses + per-element / per-matrix optimizers => batched
    # training equals separate training up to roundoff.
    G, n, t = 3, 16, 2048
    x = torch.stack([outlier_data(t, n, seed=20 + g, n_outliers=g + 1) for g in range(G)])
    xe = torch.stack([outlier_data(512, n, seed=30 + g, n_outliers=g + 1) for g in range(G)])
    init = random_orthogonal(n, torch.Generator().manual_seed(13), torch.float32, batch=(G,))
    rb, hb = train_rotation(x, init, cfg, progress=False, eval_x=xe)
    assert rb.shape == (G, n, n) and orthogonality_error(rb) < 1e-5
    assert len(hb["group_epoch_loss"]) == 2 and len(hb["group_epoch_loss"][0]) == G
    for g in range(G):
        rg, hg = train_rotation(x[g], init[g], cfg, progress=False, eval_x=xe[g])
        assert torch.allclose(rb[g], rg, atol=1e-5), (g, (rb[g] - rg).abs().max())
        assert hb["group_epoch_loss"][-1][g] == pytest.approx(hg["epoch_loss"][-1], rel=1e-4)
        assert hb["eval_group_loss_final"][g] == pytest.approx(hg["eval_loss_final"], rel=1e-4)
        assert hb["eval_group_loss_final"][g] < hb["eval_group_loss_init"][g]
    assert hb["eval_loss_final"] == pytest.approx(sum(hb["eval_group_loss_final"]) / G)


@pytest.mark.parametrize("loss,lr", [("whip", 0.1), ("quant", 0.1), ("variance", 0.1), ("kurtosis", 0.1)])
def test_all_losses_decrease(loss, lr):
    x = outlier_data(8192 + 2048, 32, seed=5)
    init = random_orthogonal(32, torch.Generator().manual_seed(14), torch.float32)
    cfg = RotationTrainConfig(loss=loss, lr=lr, epochs=4, batch_tokens=512)
    r, h = train_rotation(x[:8192], init, cfg, progress=False, eval_x=x[8192:])
    assert orthogonality_error(r) < 1e-5
    fn = LOSSES[loss]
    assert h["eval_loss_final"] == pytest.approx(fn(x[8192:] @ r).item(), rel=1e-4)
    assert h["eval_loss_final"] < 0.95 * h["eval_loss_init"], h
    assert h["epoch_loss"][-1] < h["epoch_loss"][0]


def test_rms_normalize_is_scale_invariant():
    x = outlier_data(2048, 16, seed=6)
    init = random_orthogonal(16, torch.Generator().manual_seed(15), torch.float32)
    kw = dict(lr=0.1, epochs=2, batch_tokens=256)
    r1, _ = train_rotation(x, init, RotationTrainConfig(normalize="rms", **kw), progress=False)
    r2, _ = train_rotation(x * 0.05, init, RotationTrainConfig(normalize="rms", **kw), progress=False)
    assert torch.allclose(r1, r2, atol=1e-4)
    # without normalization whip sees the scale
    r3, _ = train_rotation(x, init, RotationTrainConfig(normalize="none", **kw), progress=False)
    r4, _ = train_rotation(x * 0.05, init, RotationTrainConfig(normalize="none", **kw), progress=False)
    assert (r3 - r4).abs().max() > 1e-2


def test_max_steps_and_validation():
    x = outlier_data(1024, 8, seed=7)
    init = random_orthogonal(8, torch.Generator().manual_seed(16), torch.float32)
    r, h = train_rotation(x, init, RotationTrainConfig(epochs=10, batch_tokens=100), progress=False, max_steps=7)
    assert h["steps"] == 7 and len(h["loss"]) == 7 and len(h["epoch_loss"]) == 1
    # partial last minibatch: 1024 tokens / 100 -> 11 steps per epoch
    _, h = train_rotation(x, init, RotationTrainConfig(epochs=2, batch_tokens=100), progress=False)
    assert h["steps"] == 22
    with pytest.raises(ValueError):
        train_rotation(x, init[:4, :4], RotationTrainConfig(), progress=False)
    with pytest.raises(ValueError):
        train_rotation(x, init, RotationTrainConfig(loss="nope"), progress=False)
    with pytest.raises(ValueError):
        train_rotation(x, init, RotationTrainConfig(param="nope"), progress=False)
    with pytest.raises(ValueError):
        train_rotation(x[None], init, RotationTrainConfig(), progress=False)  # groups need [G, n, n]


@pytest.mark.parametrize("param", ["qr", "cayley"])
def test_group_chunking_gives_the_same_training(param):
    """R2-style grouped training processed in chunks of groups (bounded memory) follows the same
    trajectory as processing all groups at once: same losses, same rotations."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 300, 16, generator=g) * torch.linspace(0.2, 3.0, 16)
    init = torch.stack([torch.linalg.qr(torch.randn(16, 16, generator=g))[0] for _ in range(6)])
    held = torch.arange(250, 300)
    base = dict(lr=0.05, epochs=2, batch_tokens=64, param=param)
    out = {}
    for name, mib in (("whole", 256.0), ("chunked", 8 / 1024)):  # 8 KiB: 2 groups per chunk
        cfg = RotationTrainConfig(**base, group_chunk_mib=mib)
        out[name] = train_rotation(x, init, cfg, progress=False, index=torch.arange(250), eval_index=held)
    (r_whole, h_whole), (r_chunk, h_chunk) = out["whole"], out["chunked"]
    assert h_whole["group_chunks"] == 1 and h_chunk["group_chunks"] == 3
    assert torch.allclose(r_whole, r_chunk, atol=1e-5)
    assert h_whole["loss"] == pytest.approx(h_chunk["loss"], rel=1e-5)
    assert h_whole["eval_loss_final"] == pytest.approx(h_chunk["eval_loss_final"], rel=1e-5)
