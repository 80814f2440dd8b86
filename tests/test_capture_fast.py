"""The fast capture (indices drawn per block, batched forwards, device staging) keeps exactly the
rows the per-call sampler of earlier versions kept: same seed -> same tokens, same values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dartquant.adapters import adapter_for
from dartquant.calib.capture import ActivationCapture, capture_activations, forward_order
from dartquant.layerwise import iterate_blocks
from dartquant.transforms import fuse_norms_
from tiny import make_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from capture_speed import legacy_capture  # noqa: E402  the earlier capture, kept as the reference


@pytest.mark.parametrize("name", ["qwen2-bias-gqa", "mixtral-moe", "gemma3-sandwich"])
@pytest.mark.parametrize("batch", [1, 2, 4])
def test_fast_capture_keeps_the_per_call_samplers_rows(name, batch):
    """float64 model and buffers: a different token would differ by O(1), batching by ~1e-15."""
    model = make_tiny_model(name, dtype=torch.float64)
    fuse_norms_(model)
    ids = torch.randint(0, 89, (5, 24), generator=torch.Generator().manual_seed(2))
    ref = legacy_capture(model, ids, fraction=0.25, max_r1_tokens=None, seed=7, store_dtype=torch.float64)
    got = capture_activations(model, ids, fraction=0.25, max_r1_tokens=None, seed=7, progress=False,
                              store_dtype=torch.float64, batch=batch)
    assert got.r1.shape == ref.r1.shape and got.r2.shape == ref.r2.shape
    torch.testing.assert_close(got.r1, ref.r1, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.r2, ref.r2, rtol=0, atol=1e-12)


def test_forward_order_is_the_blocks_call_order():
    assert forward_order(["up", "o", "q"]) == ["q", "o", "up"]


@torch.no_grad()
def test_one_layer_r2_buffer_holds_each_layers_rows_after_its_block():
    model = make_tiny_model("llama-tied-gqa", dtype=torch.float64)
    fuse_norms_(model)
    ids = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(3))
    full = capture_activations(model, ids, fraction=0.3, seed=1, progress=False)
    adapter = adapter_for(model)
    cap = ActivationCapture(adapter.geometry(model.config), *ids.shape, fraction=0.3, seed=1, r2_one_layer=True)
    assert cap.r2.shape[0] == 1
    for i, block, forward in iterate_blocks(model, adapter, ids, "cpu", False):
        cap.attach(i, block, adapter)
        forward(update=True)
        cap.detach()
        assert torch.equal(cap.r2[0], full.r2[i])
    res = cap.result()
    assert res.r2 is None and torch.equal(res.r1, full.r1)
