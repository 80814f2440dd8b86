"""R2 fitted layer by layer inside the streamed FP pass (calib.dartquant.R2Fitter) gives what the
in-memory fit over the whole buffer gives: the same matrices and the same held-out numbers, with
and without an lr grid (test_stream.py runs the whole streamed job against the in-memory one)."""

from __future__ import annotations

import pytest
import torch

from dartquant.adapters import adapter_for
from dartquant.calib.dartquant import R2Fitter, capture, fit_best, fit_r2
from dartquant.config import RunConfig
from tiny import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("grid", [[], [1e-3, 0.3]])
def test_r2_fitted_per_layer_equals_the_whole_buffer_fit(grid):
    model = make_tiny_model("qwen3-qknorm-bias", dtype=torch.float32)  # 2 KV heads of 2 query heads
    geo = adapter_for(model).geometry(model.config)
    ids = torch.randint(0, model.config.vocab_size, (3, 32), generator=torch.Generator().manual_seed(4))
    cfg = RunConfig.from_flat(dq_r2_lr=0.1, dq_epochs=2, dq_batch_tokens=16, dq_token_fraction=0.5, seed=3,
                              dq_lr_grid=grid)
    acts = capture(model, cfg, ids, progress=False)
    want, hw = fit_best(fit_r2, acts, geo, cfg, "r2", progress=False)
    fitter = R2Fitter(geo, cfg)
    for i in range(geo.n_layers):
        fitter.fit_layer_(i, acts.r2[i].clone())
    got, hg = fitter.result()
    assert torch.equal(got, want)
    assert fitter.rows_bytes == acts.r2.numel() * acts.r2.element_size()
    for key in ("eval_loss_init", "eval_loss_final", "eval_group_loss_final", "tokens", "steps", "lr"):
        assert hg[key] == hw[key], key
    assert hg["heldout_quant"] == hw["heldout_quant"]
    assert hg["loss"] == pytest.approx(hw["loss"], rel=1e-6)  # means of per-layer means: roundoff only
    assert hg.get("lr_selection") == hw.get("lr_selection")
    if grid:
        assert hg["lr_selection"]["chosen"] in grid


def test_r2_fitter_refuses_layers_out_of_order_or_missing():
    model = make_tiny_model("llama-tied-gqa", dtype=torch.float32)
    geo = adapter_for(model).geometry(model.config)
    fitter = R2Fitter(geo, RunConfig.from_flat(dq_epochs=1))
    rows = torch.randn(geo.n_kv_heads, 20 * geo.kv_groups, geo.head_dim).half()
    with pytest.raises(RuntimeError, match="out of order"):
        fitter.fit_layer_(1, rows)
    fitter.fit_layer_(0, rows)
    with pytest.raises(RuntimeError, match="not every layer"):
        fitter.result()
