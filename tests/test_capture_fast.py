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


@pytest.mark.parametrize("shape, batch, resident", [
    ((576, 1536), 8, True),  # SmolLM2: 16k tokens per call, 0.6 GB of states
    ((4096, 11008), 4, True),  # Llama-2-7B: the activation budget, 4.3 GB of states
    ((8192, 28672), 1, False),  # Llama-2-70B: one window per call is large enough; 8.6 GB stay on the host
])
def test_forward_plan_batches_on_a_gpu_within_its_budgets(shape, batch, resident, monkeypatch):
    from dartquant.adapters import Geometry
    from dartquant.layerwise import forward_plan

    geo = Geometry(hidden=shape[0], intermediate=shape[1], n_layers=2, n_heads=1, n_kv_heads=1, head_dim=shape[0],
                   vocab=10)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 << 30, 140 << 30))
    assert forward_plan(geo, 128, 2048, torch.float32, "cuda") == (batch, resident)
    assert forward_plan(geo, 128, 2048, torch.float32, "cpu") == (1, False)  # the CPU path as before
