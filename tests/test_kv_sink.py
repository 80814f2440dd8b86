"""`kv_sink_tokens` / `a_sink_tokens`: the K/V, and the decoder linears' inputs, of the first positions
of every sequence kept out of the 4-bit quantizers (the attention sink)."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from dartquant.adapters import adapter_for
from dartquant.config import RunConfig
from dartquant.kernels.kv_cache import kv4_scheme_problems
from dartquant.quant.act import ActQuantizer, install_quantizers_
from dartquant.quant.scheme import QuantScheme
from tiny import make_tiny_model, save_tiny_folder


def _kv_only(model, sink: int):
    install_quantizers_(model, RunConfig.from_flat(a_bits=16, kv_bits=4, kv_sink_tokens=sink).scheme)
    return model


@pytest.mark.parametrize("family", ["llama-tied-gqa", "qwen2-bias-gqa"])
def test_sink_positions_unquantized_the_rest_unchanged(family):
    """The transform's K/V at positions < sink are its unquantized inputs (the K bias path included);
    every later position is bit-for-bit what the plain 4-bit quantizer gives."""
    model = _kv_only(make_tiny_model(family), sink=0)
    t = adapter_for(model).layers_of(model)[0].attn.dq_attention
    g = torch.Generator().manual_seed(0)
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    q, k, v = (torch.randn(2, h, 9, t.head_dim, generator=g, dtype=torch.float64) * 3
               for h in (heads, kv_heads, kv_heads))
    _, k0, v0 = t(q, k, v)
    t.sink_tokens = 2
    _, k2, v2 = t(q, k, v)
    assert not torch.equal(k0[..., :2, :], k[..., :2, :])  # the quantizer does change them
    assert torch.equal(k2[..., :2, :], k[..., :2, :]) and torch.equal(v2[..., :2, :], v[..., :2, :])
    assert torch.equal(k2[..., 2:, :], k0[..., 2:, :]) and torch.equal(v2[..., 2:, :], v0[..., 2:, :])
    # positions given by the caller (a decode step at position 5) are quantized as usual
    _, k5, _ = t(q[..., :1, :], k[..., :1, :], v[..., :1, :], position_ids=torch.tensor([[5]]))
    assert not torch.equal(k5, k[..., :1, :])


def test_sink_improves_a_model_with_a_massive_first_token_and_decode_matches_prefill():
    """A tiny model's first position made massive (its K/V large) loses less with the sink kept, and
    the cached decode path sees the same positions as one full forward."""
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(3))
    fp_model = make_tiny_model("llama-tied-gqa")
    with torch.no_grad():
        fp_model.get_input_embeddings().weight[ids[0, 0]] *= 60  # a massive first token, as real models' sinks are
    fp = fp_model(ids).logits

    def quantized(sink):
        m = make_tiny_model("llama-tied-gqa")
        m.load_state_dict(fp_model.state_dict())
        return _kv_only(m, sink)

    errs = {s: (quantized(s)(ids).logits - fp).abs().mean().item() for s in (0, 1)}
    assert errs[1] < errs[0]
    m = quantized(1)
    full = m(ids).logits[0, -1]
    out = m(ids[:, :-1], use_cache=True)
    cache_kw = "cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"
    step = m(ids[:, -1:], **{cache_kw: out.past_key_values}, use_cache=True).logits[0, -1]
    assert torch.allclose(step, full, rtol=0, atol=1e-9)


def test_sink_setting_is_checked_saved_and_refused_by_the_cache_kernels(tmp_path):
    with pytest.raises(ValueError, match="kv_sink_tokens must be >= 0"):
        QuantScheme(kv_sink_tokens=-1).validate()
    with pytest.raises(ValueError, match="kv_bits 16"):
        QuantScheme(kv_bits=16, kv_sink_tokens=1).validate()
    assert any("kv_sink_tokens=1" in p for p in kv4_scheme_problems(QuantScheme(kv_sink_tokens=1), head_dim=64))
    assert kv4_scheme_problems(QuantScheme(), head_dim=64) == []

    from dartquant.pipeline import run_quantize
    from dartquant.zoo import TRANSFORM_FILE, load_model

    folder = save_tiny_folder(tmp_path / "m", "llama-tied-gqa")
    cfg = RunConfig.from_flat(model=str(folder), w_quantizer="rtn", calib_samples=2, calib_seqlen=32, eval_seqlen=32,
                              eval_max_windows=1, guard_windows=0, kv_sink_tokens=1)
    run_quantize(cfg, tmp_path / "run", progress=False, eval_fp=False)
    assert json.loads((tmp_path / "run" / TRANSFORM_FILE).read_text())["scheme"]["kv_sink_tokens"] == 1
    model, _ = load_model(tmp_path / "run")
    assert all(l.attn.dq_attention.sink_tokens == 1 for l in adapter_for(model).layers_of(model))


def _acts_only(model, sink: int):
    install_quantizers_(model, RunConfig.from_flat(a_bits=4, kv_bits=16, a_sink_tokens=sink).scheme)
    return model


class _Rows(torch.nn.Module):
    """Records what a quantizer returns."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.out = inner, []

    def forward(self, x):
        y = self.inner(x)
        self.out.append((x.detach().clone(), y.detach().clone()))
        return y


@pytest.mark.parametrize("family", ["llama-tied-gqa", "qwen2-bias-gqa"])
def test_activation_sink_rows_unquantized_the_rest_unchanged(family):
    """With a_sink_tokens 2, every linear input's first two rows of each sequence pass through and the
    others are quantized: position 0 of a decode step (positions given) is quantized as usual."""
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(2))
    m = _acts_only(make_tiny_model(family), sink=2)
    layers = adapter_for(m).layers_of(m)
    rec = {}
    for i, layer in enumerate(layers):
        for role, q in layer.linears().items():
            rec[i, role] = q.input_quantizer
    seen = {}

    def hook(mod, args, out):
        seen[mod] = (args[0].detach().clone(), out.detach().clone())

    handles = [q.register_forward_hook(hook) for q in rec.values()]
    m(ids)
    for h in handles:
        h.remove()
    assert len(seen) == len(rec)
    for x, y in seen.values():
        assert torch.equal(y[:, :2], x[:, :2])
        assert not torch.equal(y[:, 2:], x[:, 2:])
        ref = ActQuantizer(next(iter(rec.values())).spec)(x)
        assert torch.equal(y[:, 2:], ref[:, 2:])
    assert all(q.sink_rows is None for q in rec.values())  # forgotten after the block
    # a decode step at position 5: quantized
    x = torch.randn(1, 1, m.config.hidden_size, dtype=torch.float64)
    layer0 = layers[0]
    q = layer0.linears()["q"].input_quantizer
    out = {}

    def keep(mod, a, o):
        out["x"] = (a[0].detach().clone(), o.detach().clone())

    h = q.register_forward_hook(keep)
    block = adapter_for(m).decoder_layers(m)[0]
    pos = torch.tensor([[5]])
    block(x, position_ids=pos, position_embeddings=adapter_for(m).rotary_embedding(m)(x, pos))
    h.remove()
    assert torch.equal(out["x"][1], ActQuantizer(q.spec)(out["x"][0]))


def test_activation_sink_helps_a_massive_first_token_and_is_checked():
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(3))
    fp_model = make_tiny_model("llama-tied-gqa")
    with torch.no_grad():
        fp_model.get_input_embeddings().weight[ids[0, 0]] *= 60
    fp = fp_model(ids).logits

    def err(sink):
        m = make_tiny_model("llama-tied-gqa")
        m.load_state_dict(fp_model.state_dict())
        return (_acts_only(m, sink)(ids).logits - fp).abs().mean().item()

    assert err(1) < err(0)
    with pytest.raises(ValueError, match="a_sink_tokens must be >= 0"):
        QuantScheme(a_sink_tokens=-1).validate()
    moe = make_tiny_model("mixtral-moe")
    with pytest.raises(ValueError, match="mixture-of-experts"):
        QuantScheme(a_sink_tokens=1).validate(adapter_for(moe).geometry(moe.config))
    from dartquant.kernels.backend import _scheme_problems
    assert any("a_sink_tokens=1" in p for p in _scheme_problems(QuantScheme(a_sink_tokens=1)))
    # a second install replaces the hooks instead of stacking them
    m = _acts_only(make_tiny_model("llama-tied-gqa"), sink=1)
    _acts_only(m, sink=0)
    block = adapter_for(m).decoder_layers(m)[0]
    assert block._dq_sink_hooks == () and not block._forward_pre_hooks


def test_export_says_it_quantizes_the_sink():
    from dartquant.export import check_exportable

    notes = check_exportable(QuantScheme(a_sink_tokens=1, kv_bits=16))
    assert any("a_sink_tokens=1" in n for n in notes)
    assert not any("a_sink_tokens" in n for n in check_exportable(QuantScheme(kv_bits=16)))
