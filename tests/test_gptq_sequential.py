"""True-sequential GPTQ (`gptq_true_sequential`): each linear's Hessian is collected from inputs
computed with the earlier linears of its block already quantized, i.e. exactly the inputs that
linear sees in the finished quantized model; by default (one pass per block) o_proj and the MLP
see the full-precision attention instead."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from dartquant.adapters import adapter_for
from dartquant.config import RunConfig
from dartquant.layerwise import iterate_blocks
from dartquant.quant.act_clip import stream_of
from dartquant.quant import weights
from dartquant.quant.weights import SEQUENTIAL_STEPS, _steps
from tiny import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(0, 89, (2, 16), generator=torch.Generator().manual_seed(0))


def gptq_inputs(model, scheme, monkeypatch) -> dict[str, list[torch.Tensor]]:
    """{linear key: [its inputs, per block and sequence]} as GPTQ's Hessian observers saw them."""
    seen = defaultdict(list)
    real = weights._SharedHessians

    class Recording(real):
        def observer(self, role, in_features, device, quantizer=None):
            inner = super().observer(role, in_features, device, quantizer)

            def observe(x):
                seen[role].append(x.detach().clone())
                inner(x)
            return observe

    monkeypatch.setattr(weights, "_SharedHessians", Recording)
    weights.quantize_weights_(model, scheme, IDS, progress=False)
    return seen


@torch.no_grad()
def final_inputs(model) -> dict[str, list[torch.Tensor]]:
    """The same, seen by each linear of the finished (quantized) model, block by block."""
    adapter, seen = adapter_for(model), defaultdict(list)
    for _, block, forward in iterate_blocks(model, adapter, IDS, "cpu", False):
        linears = adapter.layer(block).linears()
        for key, q in linears.items():
            q.input_observer = lambda x, key=key: seen[key].append(x.detach().clone())
        forward(update=True)
        for q in linears.values():
            q.input_observer = None
    return seen


@pytest.mark.parametrize("name", ["qwen2-bias-gqa", "qwen2moe-shared"])
def test_true_sequential_linears_see_the_quantized_earlier_linears(name, monkeypatch):
    runs = {}
    for ts in (True, False):
        model = make_tiny_model(name, dtype=torch.float64)
        scheme = RunConfig.from_flat(w_quantizer="gptq", gptq_true_sequential=ts).scheme
        assert scheme.gptq_true_sequential is ts
        during = gptq_inputs(model, scheme, monkeypatch)
        after = final_inputs(model)
        assert sorted(during) == sorted(after)
        same = {k: len(during[k]) == len(after[k]) and all(torch.equal(a, b) for a, b in zip(during[k], after[k]))
                for k in during}
        runs[ts] = same
    # true sequential: every linear's Hessian came from its inputs in the quantized model
    assert all(runs[True].values()), runs[True]
    # one pass: q/k/v read the block input (the same), o_proj read the full-precision attention
    assert runs[False]["q"] and runs[False]["k"] and runs[False]["v"]
    assert not runs[False]["o"]


def test_true_sequential_steps_cover_every_linear_once_in_forward_order():
    keys = ["q", "k", "v", "o", "experts.0.gate", "experts.0.up", "experts.0.down", "shared.gate", "shared.up",
            "shared.down"]
    steps = _steps(keys, True)
    assert steps == [["q", "k", "v"], ["o"], ["experts.0.gate", "experts.0.up", "shared.gate", "shared.up"],
                     ["experts.0.down", "shared.down"]]
    assert _steps(keys, False) == [keys]
    assert [r for s in SEQUENTIAL_STEPS for r in s] == ["q", "k", "v", "o", "gate", "up", "down"]


def test_true_sequential_is_off_by_default_and_typed():
    assert RunConfig.from_flat(w_quantizer="gptq").scheme.gptq_true_sequential is False
    with pytest.raises(ValueError, match="gptq_true_sequential"):
        RunConfig.from_flat(gptq_true_sequential="maybe")


@pytest.mark.parametrize("true_sequential", [False, True])
def test_gptq_over_batched_windows_equals_one_window_per_call(true_sequential, monkeypatch):
    """On a GPU, layerwise.forward_plan runs several windows per block call: the Hessians (a
    token average) and the next block's inputs must not change, only roundoff (none in float64
    at this size: the codes are equal)."""
    ids = torch.randint(0, 89, (5, 16), generator=torch.Generator().manual_seed(1))
    scheme = RunConfig.from_flat(w_quantizer="gptq", gptq_true_sequential=true_sequential).scheme
    out = {}
    for batch in (1, 2):
        monkeypatch.setattr(weights, "forward_plan", lambda *a, batch=batch: (batch, False))
        model = make_tiny_model("qwen2-bias-gqa", dtype=torch.float64)
        out[batch] = weights.quantize_weights_(model, scheme, ids, progress=False)
    assert sorted(out[1]) == sorted(out[2]) and len(out[1]) == 14  # 7 linears x 2 layers
    for name, qt in out[1].items():
        assert torch.equal(qt.codes, out[2][name].codes), name
        torch.testing.assert_close(qt.scale, out[2][name].scale, rtol=1e-12, atol=0)


def test_hessian_passes_keep_shared_inputs_together_and_fit_the_budget():
    keys = ["q", "k", "v", "o", "experts.0.gate", "experts.0.up", "experts.0.down", "experts.1.gate",
            "experts.1.up", "experts.1.down"]
    width = {k: (56 if k.endswith("down") else 40) for k in keys}
    assert weights._passes(keys, width, float("inf")) == [keys]
    one_each = weights._passes(keys, width, 1.0)  # a group larger than the budget: a pass of its own
    assert one_each == [["q", "k", "v"], ["o"], ["experts.0.gate", "experts.0.up"], ["experts.0.down"],
                        ["experts.1.gate", "experts.1.up"], ["experts.1.down"]]
    two = weights._passes(keys, width, 4.0 * (40**2 + 40**2))  # attn_in + o, then gate/up + ...
    assert [k for p in two for k in p] == keys and two[0] == ["q", "k", "v", "o"]
    assert all(sum(4.0 * width[g[0]] ** 2 for g in _groups(p)) <= 4.0 * (40**2 + 40**2) or len(_groups(p)) == 1
               for p in two)


def _groups(keys):
    out = {}
    for k in keys:  # linears reading one input tensor (stream_of is tested in test_act_clip.py)
        out.setdefault(stream_of(k), []).append(k)
    return list(out.values())


@pytest.mark.parametrize("name", ["qwen2-bias-gqa", "mixtral-moe", "qwen2moe-shared"])
@pytest.mark.parametrize("true_sequential", [False, True])
def test_hessians_in_several_passes_give_the_codes_of_one(name, true_sequential, monkeypatch):
    """A Hessian budget of one byte (one shared input per forward): more forwards, the same
    Hessians (every pass sees the block before any result is committed), so the same codes."""
    forwards, out, real = {}, {}, weights.gptq_block_
    scheme = RunConfig.from_flat(w_quantizer="gptq", gptq_true_sequential=true_sequential).scheme
    for budget in (float("inf"), 1.0):
        monkeypatch.setattr(weights, "_hessian_budget", lambda scheme, device, budget=budget: budget)
        model = make_tiny_model(name, dtype=torch.float64)
        calls = []

        def counting(block, adapter, forward, *a, calls=calls):
            def counted(update=False):
                calls.append(update)
                forward(update)
            return real(block, adapter, counted, *a)

        monkeypatch.setattr(weights, "gptq_block_", counting)
        out[budget] = weights.quantize_weights_(model, scheme, IDS, progress=False)
        forwards[budget] = calls.count(False)
    assert sorted(out[1.0]) == sorted(out[float("inf")])
    for key, qt in out[float("inf")].items():
        assert torch.equal(qt.codes, out[1.0][key].codes), key
        assert torch.equal(qt.scale, out[1.0][key].scale), key
    # a dense block's true-sequential steps already read one input each: no extra forward there
    assert forwards[1.0] > forwards[float("inf")] or (true_sequential and name == "qwen2-bias-gqa")


def test_hessian_budget_from_the_setting_or_the_device():
    scheme = RunConfig.from_flat(w_quantizer="gptq", gptq_hessian_mb=3).scheme
    assert weights._hessian_budget(scheme, torch.device("cpu")) == 3 * 2**20
    scheme = RunConfig.from_flat(w_quantizer="gptq").scheme
    assert weights._hessian_budget(scheme, torch.device("cpu")) == float("inf")  # the CPU path: one pass


def test_hessian_budget_is_typed_and_positive():
    assert RunConfig.from_flat(w_quantizer="gptq").scheme.gptq_hessian_mb is None
    with pytest.raises(ValueError, match="gptq_hessian_mb"):
        RunConfig.from_flat(gptq_hessian_mb=0).validate()
    with pytest.raises(ValueError, match="gptq_hessian_mb"):
        RunConfig.from_flat(gptq_hessian_mb="lots")


@pytest.mark.parametrize("name", ["qwen2-bias-gqa", "llama-tied-gqa", "mixtral-moe", "qwen2moe-shared"])
@pytest.mark.parametrize("true_sequential", [False, True])
def test_hessian_forwards_that_stop_early_give_the_same_codes(name, true_sequential, monkeypatch):
    """GPTQ_STOP_EARLY ends a Hessian forward's block call once the pass's linears have seen their inputs
    (weights._StopAfterInputs): the same inputs, so the same codes and scales bit for bit (float32, where a
    different order of work would show); the next block's inputs still come from whole forwards. And it does
    stop: with true-sequential GPTQ on a dense block, fewer linears run their matmul."""
    scheme = RunConfig.from_flat(w_quantizer="gptq", gptq_true_sequential=true_sequential,
                                 gptq_asymmetric=name == "llama-tied-gqa").scheme
    out, matmuls = {}, {}
    for early in (False, True):
        monkeypatch.setattr(weights, "GPTQ_STOP_EARLY", early)
        model = make_tiny_model(name, dtype=torch.float32)
        count = [0]
        real_linear = torch.nn.functional.linear

        def counting(*a, **k):
            count[0] += 1
            return real_linear(*a, **k)

        monkeypatch.setattr(torch.nn.functional, "linear", counting)
        out[early] = weights.quantize_weights_(model, scheme, IDS, progress=False)
        monkeypatch.setattr(torch.nn.functional, "linear", real_linear)
        matmuls[early] = count[0]
    assert sorted(out[True]) == sorted(out[False])
    for key, qt in out[False].items():
        assert torch.equal(qt.codes, out[True][key].codes), key
        assert torch.equal(qt.scale, out[True][key].scale), key
    if true_sequential and name in ("qwen2-bias-gqa", "llama-tied-gqa"):
        assert matmuls[True] < matmuls[False] * 0.75, matmuls
