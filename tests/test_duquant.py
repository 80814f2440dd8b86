"""DuQuant (calib/duquant.py, block_rotation.py): exact before quantization, orthogonal blocks,
the zigzag deal, save / reload exact, the method end to end, refusals before any work."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dartquant.adapters import adapter_for
from dartquant.block_rotation import apply_blocks, block_flops, check_blocks, dense_matrix
from dartquant.calib.duquant import (block_rotation, calibrate_duquant, greedy_rotation, smoothing_scales,
                                     zigzag_permutation)
from dartquant.config import RunConfig
from dartquant.modules import OnlineBlockRotation
from dartquant.transforms import RotationSet, exact_norms_, fuse_norms_, rotate_

from tiny import make_tiny_model, rel_err, save_tiny_folder

TOL = 1e-9
DENSE = ("llama-tied-gqa", "qwen2-bias-gqa", "mistral-mha", "qwen3-qknorm-bias")


def _ids(n=4, s=19, seed=1):
    return torch.randint(0, 89, (n, s), generator=torch.Generator().manual_seed(seed))


def _calibrated(name, block=16, **kw):
    """(model, reference logits, ids, rotations) for a tiny float64 model; block 16 leaves a ragged
    last block on the 40- and 56-wide inputs (qwen2), and 3 / 5 whole blocks on 48 / 80."""
    model = make_tiny_model(name)
    ids = _ids()
    exact_norms_(model)
    with torch.no_grad():
        ref = model(ids).logits
    fuse_norms_(model)
    cfg = RunConfig.from_flat(method="duquant", duq_block_size=block, duq_steps=4, **kw)
    return model, ref, ids, calibrate_duquant(model, cfg, ids, progress=False)


@pytest.mark.parametrize("name", DENSE)
@pytest.mark.parametrize("permute", [True, False])
def test_duquant_preserves_logits_in_float64(name, permute, one_thread):
    """Smoothing folded into the norms / v / up, DQ_o into v/o, block rotations online: the
    float64 logits stay those of the original model (Qwen2: biases, GQA 5:1, ragged blocks)."""
    model, ref, ids, rot = _calibrated(name, duq_permute=permute)
    assert ("DQ_attn.perm" in rot.blocks) == permute and ("DQ_down.r2" in rot.blocks) == permute
    rotate_(model, rot)
    with torch.no_grad():
        assert rel_err(ref, model(ids).logits) < TOL
    layer = adapter_for(model).layers_of(model)[0]
    # one module per shared input: q/k/v read the same transformed x (computed once by a kernel)
    assert isinstance(layer.q.input_rotation, OnlineBlockRotation)
    assert layer.q.input_rotation is layer.k.input_rotation is layer.v.input_rotation
    assert layer.gate.input_rotation is layer.up.input_rotation
    assert isinstance(layer.down.input_rotation, OnlineBlockRotation)
    assert getattr(layer.o, "input_rotation", None) is None, "o_proj's transform is folded, nothing online"


def test_block_size_larger_than_the_input_and_one_channel_blocks(one_thread):
    """block 128 > every tiny width: one ragged block (padded) per input; still exact."""
    model, ref, ids, rot = _calibrated("qwen2-bias-gqa", block=128)
    assert rot.blocks["DQ_attn.r1"].shape[-3:] == (1, 128, 128)
    rotate_(model, rot)
    with torch.no_grad():
        assert rel_err(ref, model(ids).logits) < TOL


def test_blocks_are_orthogonal_and_padded_with_the_identity():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 40, generator=g, dtype=torch.float64)
    x[:, 7] *= 30  # an outlier channel
    r = block_rotation(x, 16, 6, g)  # blocks 16, 16, 8 (ragged)
    assert r.shape == (3, 16, 16)
    eye = torch.eye(16, dtype=torch.float64)
    assert (r @ r.transpose(-1, -2) - eye).abs().max() < 1e-12
    assert torch.equal(r[2, 8:, 8:], eye[8:, 8:]) and not r[2, 8:, :8].any() and not r[2, :8, 8:].any()
    check_blocks("r", 40, r, torch.randperm(40, generator=g), r)  # passes
    with pytest.raises(ValueError, match="not orthogonal"):
        check_blocks("r", 40, 2 * r, None, None)
    with pytest.raises(ValueError, match="permutation"):
        check_blocks("r", 40, r, torch.zeros(40, dtype=torch.int64), None)
    # the dense matrix R1 P R2 is orthogonal too, and applying it equals the block form
    perm = torch.randperm(40, generator=g)
    m = dense_matrix(40, r, perm, r)
    assert (m @ m.T - torch.eye(40, dtype=torch.float64)).abs().max() < 1e-12
    assert torch.allclose(apply_blocks(x, r, perm, r), x @ m, atol=1e-12, rtol=0)


def test_greedy_rotation_lowers_the_block_maximum():
    """A token with one huge channel: the first step spreads it evenly (max / sqrt(B))."""
    g = torch.Generator().manual_seed(0)
    x = 0.01 * torch.randn(1, 64, 32, generator=g, dtype=torch.float64)
    x[0, 5, 9] = 100.0
    r = greedy_rotation(x, 3, g)
    after = (x @ r).abs().max().item()
    assert after < 100.0 / math.sqrt(32) * 1.05
    assert greedy_rotation(x, 0, g).equal(torch.eye(32, dtype=torch.float64)[None])


def test_greedy_scores_each_keep_their_own_best_of_the_same_candidates():
    """`score` changes only which product of the same seeded steps is kept: each kept product is the
    best of the candidates by its own score, and on heavy-tailed rows they differ."""
    from dartquant.calib.duquant import GREEDY_SCORES

    x = torch.randn(4, 256, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) ** 3  # heavy tails
    kept = {s: greedy_rotation(x, 12, torch.Generator().manual_seed(7), s) for s in GREEDY_SCORES}
    for s, f in GREEDY_SCORES.items():
        for other in kept.values():
            assert (f((x @ kept[s]).float()) <= f((x @ other).float()) + 1e-6).all()
    assert not torch.equal(kept["max"], kept["token_max"])


def test_zigzag_deals_outliers_evenly():
    score = torch.tensor([9.0, 1, 8, 2, 7, 3, 6, 4, 0.5, 0.4])  # 10 channels, blocks 4, 4, 2
    perm = zigzag_permutation(score, 4)
    assert sorted(perm.tolist()) == list(range(10))
    blocks = [perm[:4].tolist(), perm[4:8].tolist(), perm[8:].tolist()]
    # ranks 0, 1, 2 go to blocks 0, 1, 2; then 2 is... full at 2 channels only after ranks 2 and 3
    assert blocks[0][0] == 0 and blocks[1][0] == 2 and blocks[2][0] == 4
    assert blocks[2] == [4, 6]  # block 2 takes ranks 2 and 3 (the zigzag turns there), then is full
    top3 = {0, 2, 4}
    assert all(len(top3 & set(b)) == 1 for b in blocks), "the three largest channels share no block"


def test_smoothing_scales():
    lam = smoothing_scales(torch.tensor([4.0, 0.0]), torch.tensor([1.0, 9.0]), 0.5)
    assert lam[0].item() == pytest.approx(2.0) and lam[1].item() > 0
    assert torch.equal(smoothing_scales(torch.tensor([4.0]), torch.tensor([1.0]), 0.0), torch.ones(1, dtype=torch.float64))


def test_rotation_file_roundtrip_and_validation(tmp_path, one_thread):
    model, ref, ids, rot = _calibrated("llama-tied-gqa")
    rot.save(tmp_path / "r.safetensors")
    back = RotationSet.load(tmp_path / "r.safetensors")
    assert set(back.blocks) == set(rot.blocks) and all(torch.equal(back.blocks[k], rot.blocks[k]) for k in rot.blocks)
    geo = adapter_for(model).geometry(model.config)
    back.validate(geo)
    back.r4 = True
    with pytest.raises(ValueError, match="DQ_down and R4"):
        back.validate(geo)
    back.r4 = False
    back.blocks["DQ_mlp.r1"] = back.blocks["DQ_mlp.r1"][:1]
    with pytest.raises(ValueError, match="layers"):
        back.validate(geo)


def test_online_cost_counts_blocks_once_per_shared_input(one_thread):
    from dartquant.transforms.online import hadamard_flops, online_cost

    model, _, _, rot = _calibrated("llama-tied-gqa")  # hidden 48 = 3 x 16, MLP 80 = 5 x 16, 2 layers
    rotate_(model, rot)
    cost = online_cost(model)
    per_layer = block_flops(48, 16, 2) * 2 + block_flops(80, 16, 2)  # q/k/v once, gate/up once, down
    assert cost["blocks"]["flops"] == 2 * per_layer == 2 * (2 * 2 * 16 * 16 * (3 + 3 + 5))
    assert cost["blocks"]["params"] == 2 * (2 * 16 * 16 * (3 + 3 + 5) + 48 + 48 + 80)
    assert cost["r3"]["flops"] == 2 * (4 + 2) * hadamard_flops(12) and cost["r4"]["flops"] == 0
    assert hadamard_flops(64) == 64 * 6 + 64 and hadamard_flops(12) == 2 * 12 * 12 + 12
    # the geometry-only count (cost tables of models not at hand) agrees with the installed modules
    from dartquant.transforms.online import online_cost_from_geometry

    geo = adapter_for(model).geometry(model.config)
    assert online_cost_from_geometry(geo, r3=True, r4=False, block_size=16) == cost


# ---- through the pipeline ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("tiny") / "model", "qwen2-bias-gqa")


def _cfg(folder, **kw):
    base = dict(model=str(folder), method="duquant", calib_samples=4, calib_seqlen=32, eval_seqlen=32,
                eval_max_windows=3, duq_block_size=16, duq_steps=3)
    base.update(kw)
    return RunConfig.from_flat(**base)


@pytest.mark.parametrize("wq", ["rtn", "gptq"])
def test_duquant_run_end_to_end_and_reload_exact(tiny_folder, tmp_path, wq):
    """run_quantize with --method duquant: r4 off by default, the online cost in metrics, the
    block matrices in the run folder; load_model(RUN) computes exactly what was evaluated."""
    from dartquant.eval.ppl import evaluate_ppl
    from dartquant.pipeline import run_quantize
    from dartquant.zoo import load_model

    out = tmp_path / "run"
    cfg = _cfg(tiny_folder, w_quantizer=wq)
    assert cfg.r4 is False and cfg.r3 is True
    metrics = run_quantize(cfg, out, progress=False)
    spec = json.loads((out / "dartquant.json").read_text())
    assert spec["version"] == 2 and spec["online"] == {"r3": True, "r4": False,
                                                       "blocks": ["DQ_attn", "DQ_down", "DQ_mlp"]}
    cost = metrics["online_cost"]
    assert cost["blocks"]["flops"] > 0 and cost["r3"]["flops"] > 0 and cost["r4"]["flops"] == 0
    assert 0 < cost["overhead"] < 1
    assert math.isfinite(metrics["ppl"]["wiki"]) and metrics["ppl"]["wiki"] != metrics["fp"]["ppl"]["wiki"]
    model, tok = load_model(out)
    layer = adapter_for(model).layers_of(model)[1]
    assert isinstance(layer.down.input_rotation, OnlineBlockRotation)
    assert layer.q.input_rotation is layer.v.input_rotation
    again = evaluate_ppl(model, tok, seqlen=32, max_windows=3, progress=False)
    assert again["wiki"] == metrics["ppl"]["wiki"] and again["c4"] == metrics["ppl"]["c4"]
    if wq == "rtn":  # a folder without the matrices its dartquant.json names is refused, not misloaded
        import shutil

        shutil.copytree(out, tmp_path / "damaged")
        (tmp_path / "damaged" / "rotations.safetensors").unlink()
        with pytest.raises(FileNotFoundError, match="rotations.safetensors"):
            load_model(tmp_path / "damaged")


def test_duquant_16_bit_run_preserves_the_function(tiny_folder, tmp_path):
    from dartquant.pipeline import run_quantize

    cfg = _cfg(tiny_folder, w_bits=16, a_bits=16, kv_bits=16, unquantized_dtype="float32", w_quantizer="rtn")
    m = run_quantize(cfg, tmp_path / "run", progress=False)
    for corpus in ("wiki", "c4"):
        assert math.isclose(m["ppl"][corpus], m["fp"]["ppl"][corpus], rel_tol=1e-5)


def test_duquant_refusals_before_any_work(tiny_folder, tmp_path):
    from dartquant.pipeline import run_quantize

    with pytest.raises(ValueError, match="in place of R4"):
        run_quantize(_cfg(tiny_folder, r4=True), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="block_size"):
        run_quantize(_cfg(tiny_folder, duq_block_size=1), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="score"):
        run_quantize(_cfg(tiny_folder, duq_score="range"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_export_refuses_duquant_runs(tiny_folder, tmp_path, capsys):
    """compressed-tensors cannot carry the online block rotations as we run them: refused, clearly,
    both for an existing run and for `quantize --export` (before any work)."""
    pytest.importorskip("compressed_tensors")
    from dartquant.cli import main
    from dartquant.export import ExportError, export_run
    from dartquant.pipeline import run_quantize

    run = tmp_path / "run"
    run_quantize(_cfg(tiny_folder, w_quantizer="rtn", kv_bits=16), run, progress=False, eval_fp=False)
    with pytest.raises(ExportError, match="online block rotations"):
        export_run(run, tmp_path / "exp", progress=False)
    assert not (tmp_path / "exp").exists()
    rc = main(["quantize", "--model", str(tiny_folder), "--method", "duquant", "--calib-samples", "2",
               "--calib-seqlen", "32", "--out", str(tmp_path / "run2"), "--export", str(tmp_path / "exp2")])
    assert rc != 0 and "cannot be exported" in capsys.readouterr().err
    assert not (tmp_path / "run2").exists()


def test_cholesky_qr2_is_householder_qr_with_positive_r_and_falls_back_when_ill_conditioned():
    """The GPU's Haar draws (duquant._cholesky_qr2): the same Q as Householder QR with R's diagonal
    made positive, orthogonal to rounding; a nearly singular matrix goes to Householder QR."""
    from dartquant.calib.duquant import _cholesky_qr2, householder_q
    a = torch.randn(40, 33, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a[3, :, 0] = a[3, :, 1] * (1 + 1e-14)  # rank-deficient to rounding: Cholesky of a^T a fails or is useless
    q, hq = _cholesky_qr2(a), householder_q(a)
    assert (q.mT @ q - torch.eye(33, dtype=torch.float64)).abs().max() < 1e-13
    keep = torch.arange(40) != 3
    assert torch.allclose(q[keep], hq[keep], atol=1e-11)
    assert torch.equal(q[3], householder_q(a[3:4])[0])  # the fallback's own Q


def test_observer_sample_does_not_depend_on_windows_per_call():
    """A GPU capture forwards several windows per block call ([B, S, n]); the observer must keep the
    same max |x|, the same outlier rows and the same per-window random rows as one window per call."""
    from dartquant.calib.duquant import _Observer

    x = torch.randn(6, 11, 7, generator=torch.Generator().manual_seed(3))
    x[2, 5, 4] = 40.0  # an outlier row inside a batched call
    picks = torch.stack([torch.randperm(11, generator=torch.Generator().manual_seed(j))[:2] for j in range(6)])
    one, batched = _Observer(3, picks), _Observer(3, picks)
    for j in range(6):
        one(x[j: j + 1])
    batched(x[:4])
    batched(x[4:])
    assert torch.equal(one.amax, batched.amax)
    assert torch.equal(one.rows(), batched.rows())
    assert one.rows().shape == (3 + 6 * 2, 7)
    assert torch.equal(one.rows()[0], x[2, 5])
    assert torch.equal(one.rows()[3:5], x[0, picks[0]])


@pytest.mark.parametrize("batch", [2, 4])
def test_calibration_does_not_depend_on_windows_per_call(batch, monkeypatch, one_thread):
    """The whole calibration at several windows per block call (as on a GPU) against one per call (the CPU's):
    the same rotations, permutations and scales. The four observers of a block draw their random rows from one
    generator; until session 37 they drew them as the calls came, so a batched pass sampled other rows than a
    per-window one (permutations differed by up to 52 positions on this model)."""
    from dartquant.calib import duquant as dq

    def calibrate(windows):
        monkeypatch.setattr(dq, "forward_plan", lambda *a, **k: (windows, False))
        model = make_tiny_model("qwen2-bias-gqa")
        fuse_norms_(model)
        cfg = RunConfig.from_flat(method="duquant", duq_block_size=16, duq_steps=4, duq_sample_tokens=8,
                                  duq_outlier_tokens=3)  # 2 random rows of each 19-token window
        return dq.calibrate_duquant(model, cfg, _ids(), progress=False)

    one, many = calibrate(1), calibrate(batch)
    assert one.blocks.keys() == many.blocks.keys() and one.scales.keys() == many.scales.keys()
    for k in one.blocks:
        torch.testing.assert_close(many.blocks[k], one.blocks[k], rtol=0, atol=1e-12)
    for k in one.scales:
        torch.testing.assert_close(many.scales[k], one.scales[k], rtol=0, atol=1e-12)