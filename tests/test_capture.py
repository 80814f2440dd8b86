"""Activation capture keeps exactly the tokens it claims, from the right module inputs."""

from __future__ import annotations

import torch

from dartquant.adapters import adapter_for
from dartquant.calib.capture import capture_activations
from dartquant.transforms import fuse_norms_
from tiny import make_tiny_model, module_inputs




def rows_found(rows: torch.Tensor, pool: torch.Tensor) -> bool:
    d = torch.cdist(rows.double(), pool.double())
    return bool((d.min(dim=1).values < 1e-2 * pool.abs().max()).all())


def test_capture_samples_real_inputs_exactly_as_many_as_claimed():
    model = make_tiny_model("qwen2-bias-gqa", dtype=torch.float32)
    fuse_norms_(model)
    ids = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(0))
    ref = module_inputs(model, ids)
    geo = adapter_for(model).geometry(model.config)
    acts = capture_activations(model, ids, fraction=0.25, max_r1_tokens=None, seed=5, progress=False)
    k = 10  # 25% of 40 tokens, per sequence
    assert acts.fraction_r1 == acts.fraction_r2 == 0.25
    assert acts.r1.shape == (geo.n_layers * 2 * 3 * k, geo.hidden)
    assert acts.r2.shape == (geo.n_layers, geo.n_kv_heads, 3 * k * geo.kv_groups, geo.head_dim)
    per = 3 * k
    for i in range(geo.n_layers):
        assert rows_found(acts.r1[2 * i * per: (2 * i + 1) * per], ref[(i, "q")])
        assert rows_found(acts.r1[(2 * i + 1) * per: (2 * i + 2) * per], ref[(i, "up")])
        # o_proj inputs, split per KV head: every head_dim slice is a slice of a real o input
        o_heads = ref[(i, "o")].view(-1, geo.n_kv_heads, geo.kv_groups * geo.head_dim)
        for h in range(geo.n_kv_heads):
            real = o_heads[:, h].reshape(-1, geo.head_dim)
            assert rows_found(acts.r2[i, h], real)
    # no duplicates within one sequence's sample of one linear (sampling without replacement);
    # layer 1, since layer 0's q input depends on the token id only (repeated ids repeat rows)
    first = acts.r1[2 * per: 2 * per + k]
    assert torch.unique(first, dim=0).shape[0] == k


def test_capture_is_seeded_and_budgeted():
    model = make_tiny_model("llama-tied-gqa", dtype=torch.float32)
    fuse_norms_(model)
    ids = torch.randint(0, 101, (2, 50), generator=torch.Generator().manual_seed(1))
    a = capture_activations(model, ids, fraction=0.2, seed=3, progress=False)
    b = capture_activations(model, ids, fraction=0.2, seed=3, progress=False)
    c = capture_activations(model, ids, fraction=0.2, seed=4, progress=False)
    assert torch.equal(a.r1, b.r1) and torch.equal(a.r2, b.r2) and not torch.equal(a.r1, c.r1)
    small = capture_activations(model, ids, fraction=0.2, max_r1_tokens=40, seed=3, progress=False)
    assert small.r1.shape[0] <= 40 and small.fraction_r2 == 0.2
    assert a.r1.dtype == torch.float16
