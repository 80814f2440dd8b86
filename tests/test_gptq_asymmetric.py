"""Asymmetric GPTQ (`gptq_asymmetric`): each linear's Hessian from its activation-quantized inputs x~,
its target weight W* = W C H^-1 (C = x^T x~), so that GPTQ minimizes ||x~ W_q^T - x W^T||."""

from __future__ import annotations

import pytest
import torch

from dartquant.config import RunConfig
from dartquant.quant.act import ActQuantizer
from dartquant.quant.gptq import GPTQ
from dartquant.quant.primitives import QuantSpec, fake_quantize
from dartquant.quant.weights import _SharedHessians

A4 = QuantSpec(bits=4, symmetric=False, clip_ratio=0.9)


def _inputs(seed=0, tokens=2048, n=48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, n, dtype=torch.float64)
    x[:, 3] *= 10  # an outlier channel: the 4-bit error is far from white
    return x


def test_target_is_the_least_squares_weight_on_the_quantized_inputs():
    x = _inputs()
    xq = fake_quantize(x, A4)
    w = torch.randn(40, x.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64) / 8
    solver = GPTQ(x.shape[1], dtype=torch.float64)
    for part in (slice(0, 700), slice(700, None)):  # the running averages over two batches
        solver.add_batch(xq[part], reference=x[part])
    target = solver.asymmetric_target(w.float(), reldamp=0.0).double()
    lstsq = torch.linalg.lstsq(xq, x @ w.T).solution.T
    assert torch.allclose(target, lstsq, rtol=0, atol=1e-5)

    def err(wq):
        return (xq @ wq.T - x @ w.T).norm()

    # the least-squares weight is the best any real weight can do on these inputs
    assert err(target) < err(w)
    # the default per-channel damping moves it by about its own size (1e-3), outlier channel or not
    damped = solver.asymmetric_target(w.float()).double()
    assert (damped - target).norm() < 3e-3 * target.norm()


def test_observer_takes_the_quantized_input_and_the_cross_term():
    x = _inputs(seed=2).float()
    hessians = _SharedHessians()
    observe = hessians.observer("q", x.shape[1], "cpu", ActQuantizer(A4))
    observe(x[:1000])
    observe(x[1000:])
    solver = hessians.of_role["q"]
    xq = fake_quantize(x, A4)
    n = x.shape[0]
    assert torch.allclose(solver.H, 2 / n * xq.T @ xq, rtol=1e-4, atol=1e-4)
    assert torch.allclose(solver.C, 2 / n * x.T @ xq, rtol=1e-4, atol=1e-4)
    plain = _SharedHessians()
    plain.observer("q", x.shape[1], "cpu")(x)
    assert plain.of_role["q"].C is None


def test_reference_on_every_batch_or_none():
    solver = GPTQ(8)
    solver.add_batch(torch.randn(4, 8))
    with pytest.raises(ValueError, match="every batch or with none"):
        solver.add_batch(torch.randn(4, 8), reference=torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="reference"):
        solver.asymmetric_target(torch.randn(3, 8))


def test_refused_with_quantized_hessian_inputs():
    with pytest.raises(ValueError, match="gptq_act_quant"):
        RunConfig.from_flat(w_quantizer="gptq", gptq_asymmetric=True, gptq_act_quant=True).scheme.validate()
    with pytest.raises(ValueError, match="only applies with gptq_asymmetric"):
        RunConfig.from_flat(w_quantizer="gptq", gptq_asymmetric_qkv=False).scheme.validate()


@pytest.mark.usefixtures("one_thread")
def test_qkv_left_out_keeps_plain_gptq_for_them_only():
    """`gptq_asymmetric_qkv: false`: the first block's q/k/v (same inputs either way) get plain GPTQ's
    codes bitwise, its o/gate/up/down the asymmetric ones; with it true q/k/v change too."""
    from dartquant.adapters import adapter_for
    from dartquant.quant import weights
    from dartquant.quant.act import install_quantizers_
    from tiny import make_tiny_model

    ids = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(0))

    def run(**flags):
        scheme = RunConfig.from_flat(w_quantizer="gptq", **flags).scheme
        model = make_tiny_model("qwen2-bias-gqa", dtype=torch.float32)
        install_quantizers_(model, scheme, adapter_for(model))
        return weights.quantize_weights_(model, scheme, ids, progress=False)

    plain = run()
    no_qkv = run(gptq_asymmetric=True, gptq_asymmetric_qkv=False)
    every = run(gptq_asymmetric=True)
    first = [n for n in plain if ".layers.0." in n]
    qkv = [n for n in first if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")]
    assert len(qkv) == 3 and len(first) == 7, first
    for name in first:
        same_as_plain = torch.equal(no_qkv[name].codes, plain[name].codes)
        assert same_as_plain == (name in qkv), name
    assert not any(torch.equal(every[n].codes, plain[n].codes) for n in qkv)


def test_clip_search_runs_first_and_gptq_fits_the_ratios_it_chose(monkeypatch):
    """Under asymmetric GPTQ a block's clip search runs before its GPTQ (weights.clip_search_first):
    the codes are bitwise those of asymmetric GPTQ with the chosen ratios installed from the start.
    With the search after GPTQ (the default order), they are not: the weights were fitted to 0.9."""
    from dartquant.adapters import adapter_for
    from dartquant.quant import weights
    from dartquant.quant.act import install_quantizers_
    from dartquant.quant.act_clip import ClipSearchRecord, apply_act_clips_
    from tiny import make_tiny_model

    ids = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(0))

    def run(clips=None, **flags):
        scheme = RunConfig.from_flat(w_quantizer="gptq", gptq_asymmetric=True, **flags).scheme
        model = make_tiny_model("qwen2-bias-gqa", dtype=torch.float32)
        install_quantizers_(model, scheme, adapter_for(model))
        apply_act_clips_(model, clips)
        record = ClipSearchRecord()
        return weights.quantize_weights_(model, scheme, ids, progress=False, clip_search=record), record.act_clips()

    searched, clips = run(a_clip_search=True)
    assert any(c != 0.9 for c in clips.values()), "every ratio stayed 0.9: nothing was tested"
    preset, _ = run(clips)
    assert searched.keys() == preset.keys()
    assert all(torch.equal(searched[n].codes, preset[n].codes) for n in searched)
    monkeypatch.setattr(weights, "clip_search_first", lambda scheme: False)
    after, _ = run(a_clip_search=True)
    assert not all(torch.equal(after[n].codes, preset[n].codes) for n in after)


def _fold_data(tokens, seed=0, n=48, out=24):
    """Inputs whose 4-bit error the weights could partly undo, and a weight to fit."""
    x = _inputs(seed=seed, tokens=tokens, n=n)
    w = torch.randn(out, n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) / 8
    return x, fake_quantize(x, A4), w


def _shrunk(x, xq, w, windows):
    solver = GPTQ(x.shape[1], dtype=torch.float64, holdout=True)
    solver.add_batch(xq.reshape(windows, -1, x.shape[1]), reference=x.reshape(windows, -1, x.shape[1]))
    return solver, solver.asymmetric_target(w.float()).double()


def test_holdout_shrinks_an_overfitted_target_and_keeps_a_well_posed_one():
    """Few tokens per input channel: the least-squares target fits the calibration rows' noise and
    does worse than W on fresh rows; the cross-validated shrinkage picks a strong ridge and does
    better there. Many tokens per channel: it keeps a light one, near the plain target."""
    fresh_x, fresh_q, _ = _fold_data(8192, seed=9)

    def err(v, w):
        return float((fresh_q @ v.T - fresh_x @ w.T).norm())

    x, xq, w = _fold_data(64)  # 64 rows for 48 channels
    plain = GPTQ(x.shape[1], dtype=torch.float64)
    plain.add_batch(xq, reference=x)
    solver, shrunk = _shrunk(x, xq, w, windows=4)
    assert solver.shrink >= 0.3, solver.shrink
    assert err(shrunk, w) < err(plain.asymmetric_target(w.float()).double(), w)
    x, xq, w = _fold_data(16384)
    solver, shrunk = _shrunk(x, xq, w, windows=8)
    assert solver.shrink <= 0.03, solver.shrink
    assert err(shrunk, w) < err(w, w)  # still undoes part of the quantizer's error


def test_holdout_windows_do_not_depend_on_the_batching():
    x, xq, _ = _fold_data(6 * 40)
    one = GPTQ(x.shape[1], dtype=torch.float64, holdout=True)
    one.add_batch(xq.reshape(6, 40, -1), reference=x.reshape(6, 40, -1))
    split = GPTQ(x.shape[1], dtype=torch.float64, holdout=True)
    for part in (slice(0, 1), slice(1, 4), slice(4, 6)):
        split.add_batch(xq.reshape(6, 40, -1)[part], reference=x.reshape(6, 40, -1)[part])
    odd = xq.reshape(6, 40, -1)[1::2].reshape(-1, x.shape[1])
    assert one._held_rows == split._held_rows == 120
    assert torch.allclose(one._held[0], odd.T @ odd) and torch.allclose(split._held[0], odd.T @ odd)
    assert torch.allclose(split._held[1], x.reshape(6, 40, -1)[1::2].reshape(-1, x.shape[1]).T @ odd)


def test_holdout_needs_asymmetric_and_two_windows():
    with pytest.raises(ValueError, match="gptq_asymmetric_holdout only applies"):
        RunConfig.from_flat(w_quantizer="gptq", gptq_asymmetric_holdout=True).scheme.validate()
    x, xq, w = _fold_data(64)
    solver = GPTQ(x.shape[1], dtype=torch.float64, holdout=True)
    solver.add_batch(xq[None], reference=x[None])  # one window: nothing to hold out
    with pytest.raises(RuntimeError, match="at least two calibration windows"):
        solver.asymmetric_target(w.float())


@pytest.mark.parametrize("holdout", [False, True])
def test_shared_input_targets_equal_one_at_a_time(holdout):
    """q / k / v (gate / up) share one input: their targets come from one set of solves, each
    linear's shrinkage still chosen on its own rows (equal to asking for each target alone)."""
    x, xq, w_few = _fold_data(64)
    w_other = torch.randn(5, x.shape[1], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    solver = GPTQ(x.shape[1], dtype=torch.float64, holdout=holdout)
    solver.add_batch(xq.reshape(4, -1, x.shape[1]), reference=x.reshape(4, -1, x.shape[1]))
    alone, shrinks = [], []
    for w in (w_few, w_other):
        alone.append(solver.asymmetric_target(w.float()))
        shrinks.append(solver.shrink)
    together = solver.asymmetric_targets([w_few.float(), w_other.float()])
    for t, a in zip(together, alone):
        assert torch.allclose(t, a, rtol=1e-6, atol=1e-6)
    if holdout:  # one value when both linears chose the same strength, else one per linear
        assert solver.shrink == (shrinks[0] if shrinks[0] == shrinks[1] else shrinks)
