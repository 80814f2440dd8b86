"""Every transform must leave the function unchanged: float64 logits to 1e-9 relative."""

from __future__ import annotations

import pytest
import torch

from dartquant.adapters import adapter_for
from dartquant.transforms import RotationSet, exact_norms_, fuse_norms_, rotate_
from dartquant.transforms.fuse import norms_fused

from tiny import make_tiny_model, rel_err, supported_part

TOL = 1e-9


def random_orthogonal(n: int, seed: int, batch: tuple[int, ...] = ()) -> torch.Tensor:
    """Haar-ish random orthogonal matrices: not symmetric, so R vs R^T mistakes show."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(*batch, n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def reference(model, ids):
    """Original logits, with transformers' RMSNorm (which normalizes in float32 even for float64
    inputs, capping precision at ~1e-7) swapped for dartquant's float64-exact one."""
    exact_norms_(model)
    return logits(model, ids)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def ids():
    return torch.randint(0, 89, (2, 19), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["random_orthogonal", "hadamard"])
def test_each_step_preserves_logits(tiny_name, ids, kind):
    model = make_tiny_model(tiny_name)
    adapter = adapter_for(model)
    geo = adapter.geometry(model.config)
    ref = reference(model, ids)

    fuse_norms_(model)
    assert norms_fused(model)
    assert rel_err(ref, logits(model, ids)) < TOL, "norm fusion changed the function"

    if kind == "hadamard":
        full = RotationSet.quarot(geo, seed=3)
        r1, r2 = full.r1, full.r2
    else:
        r1 = random_orthogonal(geo.hidden, 11)
        r2 = random_orthogonal(geo.head_dim, 12, (geo.n_layers, geo.n_kv_heads))
    steps = [("R1", RotationSet(r1=r1)), ("R2", RotationSet(r2=r2)),
             ("R3", RotationSet(r3=True)), ("R4", RotationSet(r4=True))]
    for name, step in steps:
        rotate_(model, supported_part(step, adapter), adapter)  # refusals: test_architectures.py
        err = rel_err(ref, logits(model, ids))
        assert err < TOL, f"+{name}: relative logit error {err:.2e}"


def test_all_at_once_and_weights_really_change(tiny_name, ids):
    model = make_tiny_model(tiny_name)
    ref = reference(model, ids)  # (after the swap to exact modules: MoE experts have their own names then)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = adapter_for(model)
    rotate_(model, supported_part(RotationSet.quarot(adapter.geometry(model.config), seed=0), adapter))
    assert rel_err(ref, logits(model, ids)) < TOL
    changed = [k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert any("v_proj" in k for k in changed) and any("down_proj" in k for k in changed)
    if not adapter.refusal("R1"):
        assert any("q_proj" in k for k in changed) and any("embed_tokens" in k for k in changed)


def test_wrong_rotation_is_detected(ids):
    """The invariance check itself must be able to fail: a non-matching R2 breaks the model."""
    model = make_tiny_model("llama-tied-gqa")
    adapter = adapter_for(model)
    geo = adapter.geometry(model.config)
    ref = reference(model, ids)
    rotate_(model, RotationSet(r2=random_orthogonal(geo.head_dim, 5, (geo.n_layers, geo.n_kv_heads))))
    # Now corrupt: rotate only v_proj of layer 0 without the matching o_proj.
    from dartquant.transforms.placements import SPECS
    from dartquant.transforms.rotation import _fold_

    spec = SPECS["R2"]
    v_side = next(p for p in spec.placements if p.role == "v")
    with torch.no_grad():
        _fold_(adapter.layers_of(model)[0].v, random_orthogonal(geo.head_dim, 6, (geo.n_kv_heads,)), spec, v_side, geo)
    assert rel_err(ref, logits(model, ids)) > 1e-3


def test_rotation_set_roundtrip_and_validation(tmp_path):
    model = make_tiny_model("qwen2-bias-gqa")
    geo = adapter_for(model).geometry(model.config)
    rs = RotationSet.quarot(geo, seed=7)
    path = tmp_path / "rot.safetensors"
    rs.save(path)
    back = RotationSet.load(path)
    assert torch.equal(back.r1, rs.r1) and torch.equal(back.r2, rs.r2)
    assert back.r3 and back.r4 and back.meta["seed"] == 7
    other = make_tiny_model("llama-tied-gqa")
    with pytest.raises(ValueError, match="another model"):
        back.validate(adapter_for(other).geometry(other.config))
    bad = RotationSet(r1=torch.ones(geo.hidden, geo.hidden))
    with pytest.raises(ValueError, match="not orthogonal"):
        bad.validate(geo)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable rotation file"):
        RotationSet.load(tmp_path / "junk.safetensors")


def test_quarot_seed_changes_r1():
    model = make_tiny_model("llama-tied-gqa")
    geo = adapter_for(model).geometry(model.config)
    a, b = RotationSet.quarot(geo, seed=0), RotationSet.quarot(geo, seed=1)
    assert not torch.equal(a.r1, b.r1)
    assert torch.equal(a.r1, RotationSet.quarot(geo, seed=0).r1)


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config

    from dartquant.adapters import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="llama"):
        adapter_for(GPT2Config())


def test_exact_norm_equals_transformers_norm_in_float32():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from dartquant.modules import RMSNorm

    hf = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(torch.rand(48) + 0.5)
    ours = RMSNorm.replacing(hf)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 7, 48).to(dtype) * 5
        assert torch.equal(hf(x), ours(x))


DENSE = ["llama-tied-gqa", "qwen2-bias-gqa", "mistral-mha", "qwen3-qknorm-bias", "gemma3-sandwich"]


@pytest.mark.parametrize("name", DENSE)
def test_online_input_hadamards_preserve_logits(name, ids):
    """r1_online (R1's job where R1 cannot fold: Gemma 3): x H online before q/k/v and before
    gate/up, H folded into the readers; with R2 / R3 / R4 too. Float64 logits to 1e-9."""
    from dartquant.modules import OnlineHadamard

    model = make_tiny_model(name)
    adapter = adapter_for(model)
    ref = reference(model, ids)
    before = adapter.layers_of(model)[0].q.weight.detach().clone()
    rotate_(model, RotationSet.quarot(adapter.geometry(model.config), seed=1, r1=False, r1_online=True), adapter)
    assert rel_err(ref, logits(model, ids)) < TOL
    layer = adapter.layers_of(model)[0]
    assert not torch.allclose(layer.q.weight, before)  # H really folded
    shared = layer.q.input_rotation
    assert isinstance(shared, OnlineHadamard) and layer.k.input_rotation is shared and layer.v.input_rotation is shared
    assert layer.gate.input_rotation is layer.up.input_rotation and layer.gate.input_rotation is not shared


def test_online_input_hadamards_are_refused_with_r1_and_on_moe(ids):
    model = make_tiny_model("llama-tied-gqa")
    geo = adapter_for(model).geometry(model.config)
    with pytest.raises(ValueError, match="replaces R1"):
        rotate_(model, RotationSet.quarot(geo, seed=0, r1_online=True))
    moe = make_tiny_model("mixtral-moe")
    with pytest.raises(ValueError, match="router"):
        rotate_(moe, RotationSet.quarot(adapter_for(moe).geometry(moe.config), seed=0, r1=False, r1_online=True))


def test_online_cost_of_r1_online_read_off_the_model_equals_the_geometry():
    from dartquant.transforms.online import hadamard_flops, online_cost, online_cost_from_geometry

    model = make_tiny_model("gemma3-sandwich")
    adapter = adapter_for(model)
    geo = adapter.geometry(model.config)
    rotate_(model, RotationSet.quarot(geo, seed=0, r1=False, r1_online=True), adapter)
    cost = online_cost(model, adapter)
    assert cost["r1_online"]["flops"] == geo.n_layers * 2 * hadamard_flops(geo.hidden) > 0
    assert cost == online_cost_from_geometry(geo, r3=True, r4=True, r1_online=True)
