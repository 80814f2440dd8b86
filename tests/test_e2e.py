"""SpinQuant / OSTQuant: the training model is the deployed quantized model, exactly; scalings
fold exactly; the losses and the optimizer do what they claim; the model comes back unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils import parametrize

from dartquant.adapters import adapter_for
from dartquant.calib.e2e import (E2EConfig, Transforms, kl_top_loss, next_token_ce, ostquant_scale_sizes,
                                 resolve_amp, train_e2e, train_w_bits, training_view)
from dartquant.calib.orth import orthogonality_error
from dartquant.hadamard import random_hadamard_matrix
from dartquant.quant.act import install_quantizers_, set_act_quant_enabled_
from dartquant.config import RunConfig
from dartquant.transforms import RotationSet, exact_norms_, fuse_norms_, rotate_
from dartquant.transforms.rotation import expand_rope_pairs
from tiny import make_tiny_model, rel_err, supported_part


def _random_orth(n, seed, lead=()):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(*lead, n, n, generator=g, dtype=torch.float64))
    return q


def _random_scales(geo, seed):
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.exp(0.5 * torch.randn(geo.n_layers, n, generator=g, dtype=torch.float64))
           for k, n in ostquant_scale_sizes(geo).items()}
    out["qk"] = expand_rope_pairs(out["qk"], geo.n_kv_heads, geo.head_dim)  # RoPE pairs share a scale
    return out


def _ids(model, n=2, t=16, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_scaling_fold_preserves_function_float64(tiny_name):
    model = make_tiny_model(tiny_name)
    exact_norms_(model)  # transformers' RMSNorm computes in float32 even for float64 inputs
    ids = _ids(model)
    ref = model(ids).logits
    geo = adapter_for(model).geometry(model.config)
    rs = RotationSet(_random_orth(geo.hidden, 1), _random_orth(geo.head_dim, 2, (geo.n_layers, geo.n_kv_heads)),
                     True, True, {}, _random_scales(geo, 3))
    rotate_(model, supported_part(rs, adapter_for(model)))  # refusals: test_architectures.py
    assert rel_err(ref, model(ids).logits) < 1e-9


@torch.no_grad()
def test_scalings_round_trip_and_are_checked(tmp_path):
    model = make_tiny_model("qwen2-bias-gqa")
    geo = adapter_for(model).geometry(model.config)
    rs = RotationSet(_random_orth(geo.hidden, 1), None, False, False, {"method": "x"}, _random_scales(geo, 3))
    rs.save(tmp_path / "r.safetensors")
    back = RotationSet.load(tmp_path / "r.safetensors")
    assert set(back.scales) == set(rs.scales)
    assert all(torch.equal(back.scales[k], rs.scales[k]) for k in rs.scales)
    bad = RotationSet(None, None, scales={"v": -torch.ones(geo.n_layers, geo.n_kv_heads * geo.head_dim)})
    with pytest.raises(ValueError, match="positive"):
        bad.validate(geo)
    with pytest.raises(ValueError, match="another model"):
        RotationSet(None, None, scales={"up": torch.ones(geo.n_layers, 3)}).validate(geo)
    unpaired = rs.scales["qk"].clone()
    unpaired[0, 0] *= 1.5  # channel 0 of head 0 no longer equals channel head_dim/2: RoPE would not commute
    with pytest.raises(ValueError, match="RoPE"):
        RotationSet(None, None, scales={"qk": unpaired}).validate(geo)


def _transforms(geo, scales: bool, seed=0):
    t = Transforms(_random_orth(geo.hidden, seed + 1), _random_orth(geo.head_dim, seed + 2, (geo.n_layers,)),
                   ostquant_scale_sizes(geo) if scales else None, geo.n_layers, dtype=torch.float64)
    with torch.no_grad():
        for p in t.log_scales.values():
            p.copy_(0.3 * torch.randn_like(p))
    return t


@pytest.mark.parametrize("scales", [False, True])
@torch.no_grad()
def test_training_forward_is_the_deployed_quantized_forward(tiny_name, scales):
    """The parametrized training model at transforms T computes, in float64, what the model
    rotated by T's RotationSet and quantized computes: with quantizers off (= the original
    function) and on (= the W16A4KV4 model whose quantization error training sees)."""
    model = make_tiny_model(tiny_name)
    adapter = adapter_for(model)
    if adapter.moe or any(adapter.refusal(n) for n in ["R1", *(ostquant_scale_sizes(adapter.geometry(model.config))
                                                              if scales else [])]):
        pytest.skip(f"{adapter.family}: end-to-end training refuses it (test_architectures.py)")
    exact_norms_(model)
    ids = _ids(model)
    fp = model(ids).logits
    geo = adapter.geometry(model.config)
    fuse_norms_(model, adapter)
    qcfg = RunConfig.from_flat(a_bits=4, kv_bits=4)
    deployed = copy.deepcopy(model)
    t = _transforms(geo, scales)
    rotate_(deployed, t.rotation_set(geo, True, True, {}, dtype=torch.float64), adapter)
    install_quantizers_(deployed, qcfg.scheme, adapter)
    want_q = deployed(ids).logits
    with training_view(model, t, qcfg.scheme, r3=True, r4=True, adapter=adapter, checkpointing=False):
        model.eval()
        set_act_quant_enabled_(model, False)
        assert rel_err(fp, model(ids).logits) < 1e-9
        set_act_quant_enabled_(model, True)
        got_q = model(ids).logits
    assert rel_err(fp, want_q) > 1e-3  # the quantizers really act
    assert rel_err(want_q, got_q) < 1e-9


@pytest.mark.parametrize("method", ["spinquant", "ostquant"])
def test_train_e2e_orthogonal_changes_and_restores(method):
    torch.manual_seed(0)
    model = make_tiny_model("qwen2-bias-gqa", dtype=torch.float32)
    adapter = adapter_for(model)
    fuse_norms_(model, adapter)
    ids = _ids(model, n=8, t=24)
    with torch.no_grad():
        before = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    needs_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    qcfg = RunConfig.from_flat(a_bits=4, kv_bits=4, method=method, e2e_steps=4, e2e_batch=2, e2e_micro_batch=1,
                               e2e_lr=1.0, e2e_scale_lr=0.05, e2e_kl_topk=20).resolve()
    rs = train_e2e(model, qcfg, ids[:6], ids[6:], progress=False)
    # the model is back as it came in: same parameters, no parametrizations, no online modules
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(before, model(ids).logits)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == needs_grad
    assert not model.training and not any(hasattr(a, "dq_attention") for a in model.modules())
    geo = adapter.geometry(model.config)
    rs.validate(geo)
    assert orthogonality_error(rs.r1) < 1e-5 and orthogonality_error(rs.r2) < 1e-5
    init = random_hadamard_matrix(geo.hidden, 0)
    assert (rs.r1.double() - init).abs().max() > 1e-4  # it trained
    assert torch.equal(rs.r2[:, 0], rs.r2[:, -1])  # one R2 per layer, shared by its KV heads
    assert (set(rs.scales) == {"attn_norm", "mlp_norm", "v", "up", "qk"}) == (method == "ostquant")
    assert rs.meta["eval_loss_before"] is not None and rs.meta["eval_loss_after"] is not None


def test_bf16_autocast_training_runs_close_to_fp32():
    """e2e_amp=bf16 (the GPU default): the training forward runs under bf16 autocast, its
    loss stays close to the fp32 one, and the learned rotations are still orthogonal fp32."""
    torch.manual_seed(0)
    model = make_tiny_model("llama-tied-gqa", dtype=torch.float32)
    fuse_norms_(model)
    ids = _ids(model, n=6, t=24)
    runs = {}
    for amp in ("off", "bf16"):
        qcfg = RunConfig.from_flat(a_bits=4, kv_bits=4, method="spinquant", e2e_steps=2, e2e_batch=2, e2e_lr=1.0,
                                   e2e_amp=amp).resolve()
        runs[amp] = train_e2e(model, qcfg, ids[:4], ids[4:], progress=False)
    assert runs["bf16"].meta["amp"] == "bf16" and runs["bf16"].r1.dtype == torch.float32
    before = {k: r.meta["eval_loss_before"] for k, r in runs.items()}
    assert before["bf16"] != before["off"]  # autocast really ran
    assert before["bf16"] == pytest.approx(before["off"], rel=0.05)
    assert orthogonality_error(runs["bf16"].r1) < 1e-5
    assert resolve_amp("auto", "cuda:0") == "bf16" and resolve_amp("auto", "cpu") == "off"
    with pytest.raises(ValueError, match="e2e_amp"):
        RunConfig.from_flat(method="spinquant", e2e_amp="fp8").validate()


def test_cayley_steps_keep_rotations_orthogonal_during_training():
    """The raw Cayley parameters (not their final projection) stay orthogonal step after step."""
    model = make_tiny_model("llama-tied-gqa", dtype=torch.float32)
    adapter = adapter_for(model)
    fuse_norms_(model, adapter)
    geo = adapter.geometry(model.config)
    t = Transforms(random_hadamard_matrix(geo.hidden, 0).float(), _random_orth(geo.head_dim, 2, (geo.n_layers,)).float(),
                   None, geo.n_layers)
    from dartquant.calib.orth import CayleySGD

    opt = CayleySGD([t.r1.R, t.r2.R], lr=1.5)
    ids = _ids(model, n=2, t=16)
    with training_view(model, t, RunConfig.from_flat().scheme, r3=True, r4=True, adapter=adapter):
        for _ in range(25):
            opt.zero_grad()
            next_token_ce(model(input_ids=ids).logits, ids).backward()
            opt.step()
    assert t.r1.R.grad is not None
    assert orthogonality_error(t.r1.R) < 1e-5 and orthogonality_error(t.r2.R) < 1e-5


def test_kl_top_loss():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, 50, generator=g, dtype=torch.float64)
    assert kl_top_loss(a, a.clone(), k=10).item() == pytest.approx(0.0, abs=1e-12)
    assert kl_top_loss(a + 3.0, a, k=10).item() == pytest.approx(0.0, abs=1e-6)  # shift-invariant
    b = a + 0.5 * torch.randn(a.shape, generator=g, dtype=torch.float64)
    loss = kl_top_loss(b, a, k=10)
    assert loss.item() > 0
    # reference: KL over the teacher's top-10, both renormalized there
    idx = a.topk(10, -1).indices
    p = torch.softmax(a.gather(-1, idx), -1)
    q = torch.softmax(b.gather(-1, idx), -1)
    assert loss.item() == pytest.approx((p * (p.log() - q.log())).sum(-1).mean().item(), rel=1e-5)
    b.requires_grad_(True)
    kl_top_loss(b, a, k=10).backward()
    assert b.grad.abs().sum() > 0


def test_e2e_config_validation():
    with pytest.raises(ValueError, match="multiple"):
        E2EConfig(batch=3, micro_batch=2).validate()
    with pytest.raises(ValueError, match="one of"):
        train_e2e(None, RunConfig.from_flat(method="dartquant").resolve(), None)
    with pytest.raises(ValueError, match="e2e_steps"):
        RunConfig.from_flat(method="spinquant", e2e_steps=0).validate()
    assert train_w_bits(RunConfig.from_flat(method="spinquant").resolve()) == 16
    assert train_w_bits(RunConfig.from_flat(method="spinquant", w_quantizer="rtn").resolve()) == 4


@pytest.mark.parametrize("method", ["spinquant", "ostquant"])
def test_quantize_cli_method_saves_reusable_rotations(tmp_path, method):
    """`dartquant quantize --method spinquant|ostquant` end to end on a tiny model; the saved
    rotations (with OSTQuant's scalings) reproduce the same quantized model via --rotations."""
    import json

    from dartquant.pipeline import run_quantize
    from tiny import save_tiny_folder

    folder = save_tiny_folder(tmp_path / "model")
    base = dict(model=str(folder), method=method, calib_samples=4, calib_seqlen=32, eval_seqlen=32,
                eval_max_windows=2, e2e_steps=2, e2e_batch=2, e2e_seqlen=32, e2e_eval_samples=1, w_quantizer="rtn")
    m1 = run_quantize(RunConfig.from_flat(**base), tmp_path / "run", eval_fp=False, progress=False)
    curve = json.loads((tmp_path / "run" / f"{method}_loss.json").read_text())
    assert len(curve["curve"]) == 2 and curve["eval_loss_after"] is not None
    rs = RotationSet.load(tmp_path / "run" / "rotations.safetensors")
    assert rs.meta["method"] == method and bool(rs.scales) == (method == "ostquant")
    m2 = run_quantize(RunConfig.from_flat(**{**base, "rotations": str(tmp_path / "run" / "rotations.safetensors")}),
                      tmp_path / "again", eval_fp=False, progress=False)
    assert m2["ppl"] == m1["ppl"]
