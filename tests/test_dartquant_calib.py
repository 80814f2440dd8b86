"""DartQuant end to end on tiny models: index splits, the held-out criterion, the run outputs."""

from __future__ import annotations

import json

import pytest
import torch

from dartquant.adapters import adapter_for
from dartquant.calib.capture import capture_activations
from dartquant.calib.dartquant import (
    calibrate_dartquant,
    fit_r2,
    r1_heldout_quant,
    r2_heldout_quant,
    split_indices,
)
from dartquant.calib.train import RotationTrainConfig, train_rotation
from dartquant.config import RunConfig
from dartquant.quant.primitives import QuantSpec, fake_quantize, sqnr_db
from dartquant.transforms import RotationSet, fuse_norms_
from tiny import make_tiny_model, module_inputs


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one thread


SPEC = QuantSpec(bits=4, symmetric=False, clip_ratio=0.9)


def test_split_indices_disjoint_whole_tokens():
    tr, ev = split_indices(50, seed=3, groups=1)
    assert tr.numel() == 45 and ev.numel() == 5
    assert sorted(torch.cat([tr, ev]).tolist()) == list(range(50))
    # groups: every held-out token brings all its rows; the token sets equal the groups=1 split
    tr3, ev3 = split_indices(50, seed=3, groups=3)
    assert sorted(torch.cat([tr3, ev3]).tolist()) == list(range(150))
    assert torch.equal(ev3.view(-1, 3)[:, 0] // 3, ev) and torch.equal(ev3.view(-1, 3) % 3, torch.arange(3).expand(5, 3))
    with pytest.raises(ValueError):
        split_indices(1, 0)


def test_train_with_index_equals_train_on_copy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 600, 8, generator=g).half()
    init = torch.linalg.qr(torch.randn(3, 8, 8, generator=g))[0]
    tr, ev = split_indices(600, seed=1)
    cfg = RotationTrainConfig(lr=0.1, epochs=2, batch_tokens=128)
    ra, ha = train_rotation(x, init, cfg, progress=False, index=tr, eval_index=ev)
    rb, hb = train_rotation(x.index_select(-2, tr), init, cfg, progress=False, eval_x=x.index_select(-2, ev))
    assert torch.equal(ra, rb)
    assert ha["loss"] == hb["loss"] and ha["eval_loss_final"] == hb["eval_loss_final"]
    with pytest.raises(ValueError):
        train_rotation(x, init, cfg, progress=False, index=torch.tensor([600]))


@pytest.fixture(scope="module")
def captured():
    model = make_tiny_model("llama-tied-gqa", dtype=torch.float32)  # 2 KV heads, 2 query heads each
    fuse_norms_(model)
    ids = torch.randint(0, 101, (3, 40), generator=torch.Generator().manual_seed(0))
    acts = capture_activations(model, ids, fraction=0.25, max_r1_tokens=None, seed=5, progress=False)
    return model, ids, acts


def test_r2_buffer_rows_rebuild_full_o_proj_inputs(captured):
    model, ids, acts = captured
    geo = adapter_for(model).geometry(model.config)
    assert geo.kv_groups > 1
    ref = module_inputs(model, ids)
    t = acts.r2.shape[2] // geo.kv_groups
    for i in range(geo.n_layers):
        full = acts.r2[i].view(geo.n_kv_heads, t, geo.kv_groups, geo.head_dim).permute(1, 0, 2, 3).reshape(t, -1)
        d = torch.cdist(full.double(), ref[(i, "o")].double()).min(dim=1).values
        assert (d < 1e-2 * ref[(i, "o")].abs().max()).all()  # each rebuilt row is a real o_proj input


def test_r2_criterion_matches_direct_computation(captured):
    model, _, acts = captured
    geo = adapter_for(model).geometry(model.config)
    t = acts.r2.shape[2] // geo.kv_groups
    _, held = split_indices(t, seed=0, groups=geo.kv_groups)
    r2 = RotationSet.random_hadamard_r2(geo, 0)
    got = r2_heldout_quant(acts.r2, r2, held, geo, SPEC)
    held_tok = held.view(-1, geo.kv_groups)[:, 0] // geo.kv_groups
    sq, mse = [], []
    for i in range(geo.n_layers):
        full = acts.r2[i].float().view(geo.n_kv_heads, t, geo.kv_groups, geo.head_dim)
        o = torch.einsum("htgd,hde->thge", full, r2[i].float()).reshape(t, -1)[held_tok]
        fq = fake_quantize(o, SPEC)
        sq.append(sqnr_db(o, fq))
        mse.append((o - fq).pow(2).sum(-1).mean().item())
    assert got["sqnr_db_layers"] == pytest.approx(sq, abs=1e-3)
    assert got["sqnr_db"] == pytest.approx(sum(sq) / len(sq), abs=1e-3)
    assert got["mse"] == pytest.approx(sum(mse) / len(mse), rel=1e-4)
    # identity vs Hadamard differ (the criterion sees the rotation); scale-free: x10 gives the same SQNR
    eye = torch.eye(geo.head_dim).expand_as(r2)
    assert r2_heldout_quant(acts.r2, eye, held, geo, SPEC)["sqnr_db"] != pytest.approx(got["sqnr_db"])
    assert r2_heldout_quant(acts.r2.float() * 10, r2, held, geo, SPEC)["sqnr_db"] == pytest.approx(got["sqnr_db"], abs=1e-4)


def test_r1_criterion_matches_direct_computation(captured):
    _, _, acts = captured
    tr, held = split_indices(acts.r1.shape[0], seed=0)
    r = torch.linalg.qr(torch.randn(acts.r1.shape[1], acts.r1.shape[1], generator=torch.Generator().manual_seed(1)))[0]
    o = acts.r1[held].float() @ r
    got = r1_heldout_quant(acts.r1, r, held, SPEC, chunk=7)
    assert got["sqnr_db"] == pytest.approx(sqnr_db(o, fake_quantize(o, SPEC)), abs=1e-4)


def test_fit_r2_normalize_modes_share_the_criterion(captured):
    model, _, acts = captured
    geo = adapter_for(model).geometry(model.config)
    res = {}
    for mode in ("none", "rms"):
        cfg = RunConfig.from_flat(dq_r2_lr=0.1, dq_epochs=2, dq_batch_tokens=16, dq_r2_normalize=mode)
        r2, h = fit_r2(acts, geo, cfg, progress=False)
        assert r2.shape == (geo.n_layers, geo.n_kv_heads, geo.head_dim, geo.head_dim)
        res[mode] = h["heldout_quant"]
        assert h["config"]["normalize"] == mode
    # same init, same held-out tokens, same spec: identical init criterion for both modes
    assert res["none"]["init"] == res["rms"]["init"]
    assert res["none"]["spec"] == {"bits": 4, "symmetric": False, "group_size": None, "clip_ratio": 0.9}


def test_calibrate_dartquant_outputs(tmp_path):
    model = make_tiny_model("qwen2-bias-gqa", dtype=torch.float32)
    ids = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(2))
    cfg = RunConfig.from_flat(method="dartquant", dq_r1_lr=0.1, dq_r2_lr=0.1, dq_epochs=2, dq_batch_tokens=32,
                      dq_token_fraction=0.5)
    rot = calibrate_dartquant(model, cfg, ids, out_dir=tmp_path, progress=False)
    geo = adapter_for(model).geometry(model.config)
    assert rot.r1.shape == (geo.hidden, geo.hidden)
    assert rot.r2.shape == (geo.n_layers, geo.n_kv_heads, geo.head_dim, geo.head_dim)
    meta = rot.meta
    assert set(meta["stages"]) == {"capture", "r1", "r2"}
    assert all(s["seconds"] >= 0 and s["cpu_rss_peak_so_far_bytes"] > 0 for s in meta["stages"].values())
    assert len(meta["r2_heldout_sqnr_db"]) == 2 and len(meta["r1_heldout_sqnr_db"]) == 2
    json.dumps(meta)  # goes into the rotations' safetensors header
    saved = json.loads((tmp_path / "calibration_loss.json").read_text())
    for name in ("R1", "R2"):
        q = saved[name]["heldout_quant"]
        assert q["final"]["sqnr_db"] == pytest.approx(meta[f"{name.lower()}_heldout_sqnr_db"][1])
        assert q["spec"]["clip_ratio"] == 0.9
    assert (tmp_path / "calibration_loss.png").exists()
    with pytest.raises(ValueError):
        calibrate_dartquant(make_tiny_model("qwen2-bias-gqa", dtype=torch.float32), cfg, ids, progress=False,
                            buffers="nope")


def test_lr_grid_keeps_the_lowest_held_out_loss():
    """dq_lr_grid: R1 / R2 are fitted at every lr on the same capture and the fit with the lowest
    held-out loss is kept (recorded with the whole table); a bad grid is refused up front."""
    from dartquant.calib.dartquant import capture, fit_best, fit_r1

    model = make_tiny_model("llama-tied-gqa", dtype=torch.float32)
    geo = adapter_for(model).geometry(model.config)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    cfg = RunConfig.from_flat(dq_epochs=2, dq_batch_tokens=16, dq_token_fraction=0.5, dq_lr_grid=[1e-3, 1e-1, 1.0])
    acts = capture(model, cfg, ids, progress=False)
    r1, hist = fit_best(fit_r1, acts, geo, cfg, "r1", progress=False)
    sel = hist["lr_selection"]
    finals = {float(lr): v[1] for lr, v in sel["held_out_loss"].items()}
    assert sel["chosen"] == min(finals, key=finals.get) and hist["config"]["lr"] == sel["chosen"]
    again, _ = fit_r1(acts, geo, cfg.with_section("dartquant", r1_lr=sel["chosen"]), progress=False)
    assert torch.equal(r1, again)  # the kept fit is the plain fit at the chosen lr
    with pytest.raises(ValueError, match="dq_lr_grid"):
        RunConfig.from_flat(dq_lr_grid=[0.1, -1]).validate()
