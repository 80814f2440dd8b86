"""Activation clip ratios chosen per input stream (quant/act_clip.py, `a_clip_search`).

The criterion (a linear's output error over the clip grid) is checked on inputs whose answer is
known; the search on tiny models: one ratio per stream, recorded in dartquant.json, re-installed
on load (the reloaded folder gives the perplexity the run reported), the same rows sampled however
the windows are batched, and a streamed run choosing exactly what an in-memory one chooses.
"""

from __future__ import annotations

import json

import pytest
import torch

import dartquant.stream.run as stream_run
from dartquant.config import RunConfig
from dartquant.pipeline import run_quantize
from dartquant.quant.act_clip import _RowSampler, clip_grid, stream_errors, stream_of
from dartquant.quant.checkpoint import read_quantized_state
from dartquant.quant.primitives import QuantSpec, fake_quantize
from dartquant.zoo import load_model
from test_stream import save_sharded, tokenize_once  # noqa: F401  (fixture: tokenize each corpus once)

A4 = QuantSpec(bits=4, symmetric=False, clip_ratio=0.9)


def test_grid_and_streams():
    assert clip_grid(0.9, 0.6) == [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6]
    assert 0.93 in clip_grid(0.93, 0.8) and clip_grid(0.93, 0.8)[0] == 1.0
    assert [stream_of(k) for k in ("q", "k", "v", "o", "gate", "up", "down")] == \
        ["attn_in"] * 3 + ["o", "mlp_in", "mlp_in", "down"]
    assert stream_of("experts.3.up") == stream_of("experts.3.gate") == "experts.3.mlp_in"
    assert stream_of("experts.3.up") != stream_of("experts.4.up")


def test_the_criterion_clips_gaussian_rows_and_spares_an_outlier_the_weights_read():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 256, generator=g)
    w = torch.randn(64, 256, generator=g)
    grid = clip_grid(0.9, 0.6)
    err = stream_errors(x, [w], A4, grid)
    assert grid[min(range(len(grid)), key=err.__getitem__)] < 1.0  # Gaussian tokens: clipping their tails pays
    # one massive channel per token that the weights read heavily: clipping it costs more than
    # the rounding it saves, so the search must keep the full range
    x2 = x.clone()
    x2[:, 0] = 40.0
    w2 = w.clone()
    w2[:, 0] = 30.0
    err2 = stream_errors(x2, [w2], A4, grid)
    assert grid[min(range(len(grid)), key=err2.__getitem__)] == 1.0


def test_rows_sampled_are_the_same_however_the_windows_are_batched():
    x = torch.randn(6, 10, 8)
    positions = torch.tensor([0, 7, 13, 29, 30, 59])
    kept = []
    for batch in (1, 4, 6):
        s = _RowSampler(positions, 60, 6, torch.Generator().manual_seed(0))
        for j in range(0, 6, batch):
            s(None, (x[j: j + batch],))
        kept.append(s.rows_())
    assert all(torch.equal(kept[0], k) for k in kept)
    assert torch.equal(kept[0], x.reshape(60, 8)[positions])


def test_routed_rows_sampled_are_the_same_however_the_calls_split_them():
    # MoE experts see only their routed tokens, flattened: no position to go by, so the rows are
    # chosen by a seeded hash of their values (a draw per call changed with the batching)
    x = torch.randn(3000, 24)
    kept = []
    for splits in ([3000], [1000, 2000], [7, 993, 1500, 500]):
        s = _RowSampler(torch.tensor([]), 30000, 3000, torch.Generator().manual_seed(0))
        for chunk in x.split(splits):
            s(None, (chunk,))
        kept.append(s.rows_())
    assert all(torch.equal(kept[0], k) for k in kept)
    assert 200 < kept[0].shape[0] < 400  # about 3000 * 3000 / 30000 rows
    other = _RowSampler(torch.tensor([]), 30000, 3000, torch.Generator().manual_seed(1))
    other(None, (x,))
    assert not torch.equal(other.rows_(), kept[0])  # the seed chooses the rows


@pytest.mark.parametrize("family,dtype,kw", [
    ("qwen2-bias-gqa", torch.float32, dict(method="quarot", w_quantizer="gptq")),
    ("llama-tied-gqa", torch.bfloat16, dict(method="quarot", w_quantizer="rtn")),
    # the search before GPTQ (weights.clip_search_first), streamed as in memory
    ("qwen2-bias-gqa", torch.float32, dict(method="quarot", w_quantizer="gptq", gptq_asymmetric=True)),
    # and its cross-validated shrinkage: the held-out windows are the same however a path batches them
    ("qwen2-bias-gqa", torch.float32, dict(method="quarot", w_quantizer="gptq", gptq_asymmetric=True,
                                           gptq_asymmetric_holdout=True)),
])
def test_search_streamed_equals_in_memory_and_reloads(family, dtype, kw, tmp_path, monkeypatch, one_thread):
    folder = save_sharded(tmp_path / "model", family, dtype)
    monkeypatch.setattr(stream_run, "MB", 3000)
    base = dict(model=str(folder), calib_samples=3, calib_seqlen=24, eval_seqlen=24, eval_max_windows=2,
                guard_windows=1, shard_mb=1, a_clip_search=True, **kw)
    runs = {s: (tmp_path / s, run_quantize(RunConfig.from_flat(stream=s, **base), tmp_path / s, progress=False))
            for s in ("false", "true")}
    (mem, m_mem), (st, m_st) = runs["false"], runs["true"]
    search = m_mem["act_clip_search"]
    n_layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    assert search["streams"] == 4 * n_layers  # attention input, o, MLP input, down per layer
    assert search["changed"] > 0, "the search kept the default ratio everywhere: nothing was tested"
    for key in ("streams", "changed", "histogram", "chosen"):
        assert m_st["act_clip_search"][key] == search[key], key
    assert m_st["ppl"] == m_mem["ppl"]
    spec_m, spec_s = (json.loads((r / "dartquant.json").read_text()) for r in (mem, st))
    clips = spec_m["act_clips"]
    assert clips == spec_s["act_clips"] and len(clips) == 7 * n_layers
    for i in range(n_layers):  # one ratio per stream: q/k/v share one, gate/up one
        p = f"model.layers.{i}"
        assert clips[f"{p}.self_attn.q_proj"] == clips[f"{p}.self_attn.k_proj"] == clips[f"{p}.self_attn.v_proj"]
        assert clips[f"{p}.mlp.gate_proj"] == clips[f"{p}.mlp.up_proj"]
    a, b = read_quantized_state(mem)[1], read_quantized_state(st)[1]
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    # the folder reloads with the chosen ratios installed, to the perplexity the run reported
    model, tok = load_model(st)
    installed = {n: m.input_quantizer.spec.clip_ratio for n, m in model.named_modules() if n in clips}
    assert installed == clips
    from dartquant.eval.ppl import evaluate_ppl

    assert evaluate_ppl(model, tok, seqlen=24, max_windows=2, progress=False)["wiki"] == m_st["ppl"]["wiki"]


def test_search_with_unquantized_activations_is_refused_before_any_work(tmp_path):
    folder = save_sharded(tmp_path / "model", "llama-tied-gqa")
    cfg = RunConfig.from_flat(model=str(folder), method="quarot", a_bits=16, a_clip_search=True)
    with pytest.raises(ValueError, match="no activation is quantized"):
        run_quantize(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_search_on_experts_streamed_equals_in_memory(tmp_path, monkeypatch, one_thread):
    """Experts see only their routed tokens (the sampler's flattened-input branch); an expert no
    token reaches keeps the default ratio; both paths choose the same."""
    from test_stream import run_both
    from test_stream_moe import mixtral_with_an_unreachable_expert, save

    folder = save(mixtral_with_an_unreachable_expert(), tmp_path / "model")
    runs = run_both(tmp_path, folder, monkeypatch, method="quarot", w_quantizer="gptq", a_clip_search=True)
    (mem, m_mem), (st, m_st) = runs["false"], runs["true"]
    assert m_st["act_clip_search"] == {**m_mem["act_clip_search"], "seconds": m_st["act_clip_search"]["seconds"]}
    assert m_st["ppl"] == m_mem["ppl"]
    clips = json.loads((st / "dartquant.json").read_text())["act_clips"]
    assert clips == json.loads((mem / "dartquant.json").read_text())["act_clips"]
    for i in range(2):
        p = f"model.layers.{i}.mlp.experts"
        assert f"{p}.4.up_proj" not in clips  # never routed: no rows, the default stays
        assert clips[f"{p}.0.gate_proj"] == clips[f"{p}.0.up_proj"] and f"{p}.0.down_proj" in clips
    model, _ = load_model(st)
    mods = dict(model.named_modules())
    assert mods["model.layers.0.mlp.experts.4.up_proj"].input_quantizer.spec.clip_ratio == 0.9
    assert all(mods[n].input_quantizer.spec.clip_ratio == c for n, c in clips.items())


def test_export_says_the_searched_ratios_are_not_expressible():
    from dartquant.export import check_exportable

    notes = check_exportable(RunConfig.from_flat(kv_bits=16, a_clip_search=True).scheme)
    assert any("a_clip_search" in n for n in notes)


@pytest.mark.parametrize("outputs", [(24, 8, 8), (4,)])
def test_gram_and_direct_errors_agree(outputs):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 16, generator=g) * torch.linspace(0.2, 3, 16)
    ws = [torch.randn(n, 16, generator=g) for n in outputs]
    grid = clip_grid(0.9, 0.6)
    err = stream_errors(x, ws, A4, grid)  # (24, 8, 8): through the Gram matrix; (4,): directly
    for clip, e in zip(grid, err):
        d = fake_quantize(x, QuantSpec(bits=4, symmetric=False, clip_ratio=clip)) - x
        exact = sum(float((d.double() @ w.double().T).square().sum()) for w in ws)
        ref = sum(float((x.double() @ w.double().T).square().sum()) for w in ws)
        assert e == pytest.approx(exact / ref, rel=1e-4)
