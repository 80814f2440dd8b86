"""`kv_sink_tokens`: the K/V of the first positions of every sequence kept out of the 4-bit quantizer."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from dartquant.adapters import adapter_for
from dartquant.config import RunConfig
from dartquant.kernels.kv_cache import kv4_scheme_problems
from dartquant.quant.act import install_quantizers_
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
