"""Families beyond Llama: what each one can carry exactly, what it refuses, and MoE calibration.

The float64 invariance of every exact transform on every family runs in test_transforms.py and
test_e2e.py (they parametrize over tiny.TINY_CONFIGS); here: the swapped-in exact modules equal
transformers' in float32, the refusals are justified (the refused fold really breaks the
function) and happen before the model is touched, and MoE calibration (GPTQ per expert, capture
over experts) sees the tokens it should.
"""

from __future__ import annotations

import pytest
import torch

from dartquant.adapters import UnsupportedTransformError, adapter_for
from dartquant.hadamard import random_hadamard_matrix
from dartquant.modules import OnlineHadamard, RMSNorm
from dartquant.quant.scheme import QuantScheme
from dartquant.transforms import RotationSet, exact_norms_, fuse_norms_, rotate_
from dartquant.transforms.placements import SPECS
from dartquant.transforms.rotation import _fold_

from tiny import TINY_CONFIGS, make_tiny_model, rel_err

MOE = ["mixtral-moe", "qwen2moe-shared", "qwen3moe-narrow"]


def _ids(vocab=89, n=2, t=19, seed=1):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _fold_all_(model, name, t):
    """Fold one transform by the table, bypassing rotate_'s refusal (to show why it refuses)."""
    adapter = adapter_for(model)
    spec = SPECS[name]
    for p in spec.placements:
        if p.role == "embed":
            _fold_(adapter.embedding(model), t, spec, p, adapter.geometry(model.config))
        elif p.role == "lm_head":
            _fold_(adapter.head(model), t, spec, p, adapter.geometry(model.config))
        else:
            for i, layer in enumerate(adapter.layers_of(model)):
                for m in layer.modules(p.role):
                    _fold_(m, t[i] if spec.per_layer else t, spec, p, adapter.geometry(model.config))


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@torch.no_grad()
def test_exact_modules_compute_what_transformers_computes_in_float32(name):
    """The norm / router / split-expert swap changes nothing a float32 user would see."""
    model = make_tiny_model(name, dtype=torch.float32)
    ids = _ids()
    ref = model(ids).logits
    exact_norms_(model)
    assert rel_err(ref, model(ids).logits) < 2e-6


def test_gemma_norm_is_bitwise_transformers_norm():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    hf = Gemma3RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(48))
    ours = RMSNorm.replacing(hf, offset=1.0, scale_in_float32=True)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 7, 48).to(dtype) * 5
        assert torch.equal(hf(x), ours(x))


@torch.no_grad()
def test_gemma3_global_r1_is_exact_only_without_sandwich_gains():
    """Why Gemma 3 refuses R1: folded by the table it breaks the function, and it is exact again
    once the sandwich norms' gains are uniform (so those gains are the only obstacle)."""
    ids = _ids(97)
    r1 = random_hadamard_matrix(48, 3)
    errs = {}
    for uniform in (False, True):
        model = make_tiny_model("gemma3-sandwich")
        if uniform:
            for layer in adapter_for(model).layers_of(model):
                for norm in layer.branch_norms:
                    norm.weight.fill_(0.7)  # gain 1.7 on every channel
        exact_norms_(model)
        ref = model(ids).logits
        fuse_norms_(model)
        _fold_all_(model, "R1", r1)
        errs[uniform] = rel_err(ref, model(ids).logits)
    assert errs[False] > 1e-3 and errs[True] < 1e-9, errs


@pytest.mark.parametrize("name, rotations, match", [
    ("gemma3-sandwich", lambda geo: RotationSet.quarot(geo, seed=0), "sandwich norms"),
    ("qwen3-qknorm-bias", lambda geo: RotationSet(scales={"qk": torch.ones(geo.n_layers, geo.n_kv_heads * geo.head_dim)}),
     "QK-norm"),
    ("mixtral-moe", lambda geo: RotationSet(scales={"up": torch.ones(geo.n_layers, geo.intermediate)}), "experts"),
])
def test_refused_transforms_fail_whole_before_touching_the_model(name, rotations, match):
    model = make_tiny_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedTransformError, match=match):
        rotate_(model, rotations(adapter_for(model).geometry(model.config)))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@torch.no_grad()
def test_qk_scaling_is_not_exact_under_qk_norm():
    """Why QK-norm families refuse the OSTQuant Q/K scaling: the per-head norm undoes it."""
    model = make_tiny_model("qwen3-qknorm-bias")
    geo = adapter_for(model).geometry(model.config)
    exact_norms_(model)
    ids = _ids(97)
    ref = model(ids).logits
    fuse_norms_(model)
    s = torch.exp(0.5 * torch.randn(geo.n_layers, geo.n_kv_heads, geo.head_dim // 2, dtype=torch.float64))
    _fold_all_(model, "qk", torch.cat([s, s], -1).reshape(geo.n_layers, -1))
    assert rel_err(ref, model(ids).logits) > 1e-3


@pytest.mark.parametrize("name", MOE)
@torch.no_grad()
def test_moe_rotation_reaches_router_and_every_expert(name):
    model = make_tiny_model(name)
    adapter = adapter_for(model)
    fuse_norms_(model, adapter)
    layers = adapter.layers_of(model)
    watched = [m for l in layers for role in ("gate", "up", "down", "router", "shared_gate") for m in l.modules(role)]
    before = [m.weight.clone() for m in watched]
    rotate_(model, RotationSet.quarot(adapter.geometry(model.config), seed=1), adapter)
    assert all(not torch.equal(b, m.weight) for b, m in zip(before, watched))
    cfg = TINY_CONFIGS[name]
    for layer in adapter.layers_of(model):
        for down in layer.modules("down"):  # R4 per expert, sized by the expert's own width
            assert isinstance(down.input_rotation, OnlineHadamard) and down.input_rotation.n == down.in_features
        if layer.is_moe:
            assert len(layer.experts) == cfg.get("num_experts", cfg.get("num_local_experts"))
            assert layer.experts[0]["down"].in_features == cfg.get("moe_intermediate_size", cfg["intermediate_size"])


def _exclude_expert(router, expert: int):
    """A router hook that never selects `expert` (as if no calibration token were routed to it)."""
    def hook(m, args, out):
        logits = out[0].clone()
        logits[:, expert] = float("-inf")
        probs = torch.softmax(logits.float(), dim=-1)
        top, idx = torch.topk(probs, m.top_k, dim=-1)
        return logits, (top / top.sum(-1, keepdim=True)).to(out[1].dtype), idx
    return router.register_forward_hook(hook)


def test_gptq_per_expert_sees_its_routed_tokens_and_unrouted_experts_fall_back_to_rtn(monkeypatch):
    import dartquant.quant.weights as weights
    from dartquant.quant.primitives import QuantizedTensor

    seen = []

    class Recording(weights.GPTQ):
        def quantize(self, *a, **k):
            seen.append(self.nsamples)
            return super().quantize(*a, **k)

    monkeypatch.setattr(weights, "GPTQ", Recording)
    model = make_tiny_model("mixtral-moe", dtype=torch.float32)
    adapter = adapter_for(model)
    fuse_norms_(model, adapter)
    layers = adapter.layers_of(model)
    hooks = [_exclude_expert(l.router, 3) for l in layers]
    original = layers[0].experts[3]["gate"].weight.detach().clone()
    ids = _ids(n=3, t=16)
    fallbacks = []
    scheme = QuantScheme(w_bits=4, w_quantizer="gptq")
    out = weights.quantize_weights_(model, scheme, ids, adapter, progress=False, rtn_fallbacks=fallbacks)
    for h in hooks:
        h.remove()
    n_layers, top_k = len(layers), TINY_CONFIGS["mixtral-moe"]["num_experts_per_tok"]
    assert sorted(fallbacks) == sorted(f"model.layers.{i}.mlp.experts.3.{p}"
                                       for i in range(n_layers) for p in ("gate_proj", "up_proj", "down_proj"))
    rtn = QuantizedTensor.from_float(original.float(), scheme.weight_spec()).dequantize()
    assert torch.equal(adapter.layers_of(model)[0].experts[3]["gate"].weight, rtn)
    assert len(out) == n_layers * (4 + 3 * 4)
    # layer 0: q, k, v, o, then the gates of experts 0, 1, 2 (expert 3 has no solve): each
    # expert's Hessian holds only its routed tokens, which add up to tokens * top_k
    assert seen[:4] == [ids.numel()] * 4
    assert sum(seen[4:7]) == ids.numel() * top_k and all(0 < n < ids.numel() for n in seen[4:7])


@torch.no_grad()
def test_capture_samples_the_moe_stream_before_routing():
    from dartquant.calib.capture import capture_activations, r1_rows

    model = make_tiny_model("qwen2moe-shared", dtype=torch.float32)
    adapter = adapter_for(model)
    fuse_norms_(model, adapter)
    ids = _ids(n=2, t=12)
    mlp_in = {}
    hooks = [block.mlp.register_forward_pre_hook(
        lambda m, a, i=i: mlp_in.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1]).clone()))
        for i, block in enumerate(adapter.decoder_layers(model))]
    for j in range(ids.shape[0]):
        model(ids[j: j + 1])
    for h in hooks:
        h.remove()
    cap = capture_activations(model, ids, fraction=1.0, max_r1_tokens=None, progress=False,
                              store_dtype=torch.float32)
    for i, rows in enumerate(r1_rows(cap.r1, len(mlp_in))):
        want = torch.cat(mlp_in[i])  # every token (layer 0 is a MoE block, layer 1 dense)
        got = rows["up"]
        key = lambda x: x[torch.argsort(x[:, 0])]
        assert got.shape == want.shape and torch.allclose(key(got), key(want), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["gemma3-sandwich", "qwen3-qknorm-bias", "mixtral-moe"])
@torch.no_grad()
def test_block_by_block_runner_equals_the_full_forward(name):
    """GPTQ and capture run one block at a time; on Gemma 3 each block needs its own RoPE base and,
    past the window (8 < 19 tokens here), the sliding-window mask."""
    from dartquant.layerwise import iterate_blocks

    model = make_tiny_model(name)
    adapter = adapter_for(model)
    exact_norms_(model, adapter)
    ids = _ids(89, n=2, t=19)
    blocks = adapter.decoder_layers(model)

    def record(store):
        return [b.register_forward_hook(lambda m, a, out, i=i: store.setdefault(i, []).append(
            (out[0] if isinstance(out, tuple) else out).clone())) for i, b in enumerate(blocks)]

    full, layerwise = {}, {}
    hooks = record(full)
    for j in range(ids.shape[0]):
        model(ids[j: j + 1])
    for h in hooks:
        h.remove()
    hooks = record(layerwise)
    for _, _, forward in iterate_blocks(model, adapter, ids, "cpu", progress=False):
        forward(update=True)
    for h in hooks:
        h.remove()
    for i in full:
        assert rel_err(torch.cat(full[i]), torch.cat(layerwise[i])) < 1e-12, f"block {i}"


@pytest.mark.parametrize("name, method, r1", [("qwen2moe-shared", "dartquant", True), ("gemma3-sandwich", "rtn", True),
                                              ("gemma3-sandwich", "quarot", False), ("qwen3-qknorm-bias", "quarot", True)])
def test_quantize_and_reload_new_families(tmp_path, name, method, r1):
    """The whole run (capture over experts for DartQuant, GPTQ per expert, Gemma's local/global
    layers block by block) and its folder reloads to the same numbers (expert layout, biases of
    quantized linears, Gemma's embedding scale)."""
    from dartquant.config import RunConfig
    from dartquant.eval.ppl import evaluate_ppl
    from dartquant.pipeline import run_quantize
    from dartquant.zoo import load_model
    from tiny import save_tiny_folder

    folder = save_tiny_folder(tmp_path / "model", name)
    cfg = RunConfig.from_flat(model=str(folder), method=method, w_quantizer="gptq", calib_samples=4,
                              calib_seqlen=32, eval_seqlen=32, eval_max_windows=3, r1=r1)
    metrics = run_quantize(cfg, tmp_path / "run", progress=False, eval_fp=False)
    if not r1:  # R2/R3/R4 without R1 (Gemma 3's sandwich norms cannot carry it)
        from dartquant.transforms import RotationSet

        rot = RotationSet.load(tmp_path / "run" / "rotations.safetensors")
        assert rot.r1 is None and rot.r2 is not None and rot.r3 and rot.r4
    model, tok = load_model(tmp_path / "run")
    assert evaluate_ppl(model, tok, seqlen=32, max_windows=3, progress=False)["wiki"] == metrics["ppl"]["wiki"]


def test_activation_overrides_reach_every_experts_linear():
    from dartquant.quant.act import install_quantizers_

    model = make_tiny_model("qwen2moe-shared", dtype=torch.float32)
    adapter = adapter_for(model)
    fuse_norms_(model, adapter)
    install_quantizers_(model, QuantScheme(a_bits=4, a_bits_overrides={"down": 8}), adapter)
    for layer in adapter.layers_of(model):
        assert all(d.input_quantizer.spec.bits == 8 for d in layer.modules("down"))
        assert all(g.input_quantizer.spec.bits == 4 for g in layer.modules("gate"))


def test_a_rotating_method_on_gemma3_is_refused_before_any_work(tmp_path):
    from dartquant.config import RunConfig
    from dartquant.pipeline import run_quantize
    from tiny import save_tiny_folder

    folder = save_tiny_folder(tmp_path / "model", "gemma3-sandwich")
    cfg = RunConfig.from_flat(model=str(folder), method="dartquant", calib_samples=4, calib_seqlen=32)
    with pytest.raises(UnsupportedTransformError, match="sandwich.*--r1 false"):
        run_quantize(cfg, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="r1: false .* supported by quarot"):  # DartQuant learns R2 with R1
        run_quantize(cfg.from_dict({**cfg.to_dict(), "r1": False}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_group_sizes_must_fit_every_experts_width():
    """Qwen2-MoE: experts 40 wide, the shared expert 56, dense layers 80. A group size of 16 divides
    the hidden size (48) and the dense width but not the experts': refused before any work."""
    from dartquant.config import RunConfig

    model = make_tiny_model("qwen2moe-shared")
    geo = adapter_for(model).geometry(model.config)
    assert geo.mlp_widths == (40, 56, 80)
    with pytest.raises(ValueError, match=r"w_group_size=16 does not divide .*\[40, 56\]"):
        RunConfig.from_flat(w_group_size=16).validate(geo)
    RunConfig.from_flat(w_group_size=8, a_group_size=8).validate(geo)
    dense = make_tiny_model("llama-tied-gqa")
    assert adapter_for(dense).geometry(dense.config).mlp_widths == (dense.config.intermediate_size,)


def test_gemma3_with_online_input_hadamards_quantizes_and_reloads(tmp_path):
    """--r1 false --r1-online true: the run's folder records the online Hadamards (format version 3)
    and reloads to the same numbers; R1 with it, and its export, are refused with a message."""
    import json

    from dartquant.config import RunConfig
    from dartquant.eval.ppl import evaluate_ppl
    from dartquant.pipeline import run_quantize
    from dartquant.zoo import load_model
    from tiny import save_tiny_folder

    folder = save_tiny_folder(tmp_path / "model", "gemma3-sandwich")
    flat = dict(model=str(folder), method="quarot", w_quantizer="gptq", calib_samples=4, calib_seqlen=32,
                eval_seqlen=32, eval_max_windows=3, r1=False)
    with pytest.raises(ValueError, match="r1_online .* with r1: false"):
        RunConfig.from_flat(**{**flat, "r1": True}, r1_online=True).validate()
    metrics = run_quantize(RunConfig.from_flat(**flat, r1_online=True), tmp_path / "run", progress=False,
                           eval_fp=False)
    spec = json.loads((tmp_path / "run" / "dartquant.json").read_text())
    assert spec["version"] == 3 and spec["online"]["r1_online"] is True
    assert metrics["online_cost"]["r1_online"]["flops"] > 0
    model, tok = load_model(tmp_path / "run")
    assert evaluate_ppl(model, tok, seqlen=32, max_windows=3, progress=False)["wiki"] == metrics["ppl"]["wiki"]
    from dartquant.export import ExportError, export_run

    with pytest.raises(ExportError, match="r1_online"):
        export_run(tmp_path / "run", tmp_path / "export")
    assert not (tmp_path / "export").exists()
