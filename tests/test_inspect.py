"""`dartquant inspect`: the metrics, the exactness of rotating captured samples, the outputs and errors."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from dartquant.adapters import adapter_for
from dartquant.data import calib_windows
from dartquant.hadamard import random_hadamard_matrix
from dartquant.diagnostics import activation_stats, add_inspect_command, o_rows, run_inspect, token_kurtosis
from dartquant.quant.primitives import QuantSpec, fake_quantize, sqnr_db
from dartquant.runs import OutputExistsError
from dartquant.transforms import RotationSet, fuse_norms_, rotate_
from dartquant.zoo import load_model
from tiny import TINY_CONFIGS, save_tiny_folder, module_inputs

SAMPLES, SEQLEN = 2, 24


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("tiny") / "model", "llama-tied-gqa")


def random_orthogonal(*shape: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


@pytest.fixture(scope="module")
def learned_set():
    """Stands in for a DartQuant result: random R1 and a different random R2 for every layer and KV head."""
    g = tiny_geometry("llama-tied-gqa")
    return RotationSet(random_orthogonal(g.hidden, g.hidden, seed=1),
                       random_orthogonal(g.n_layers, g.n_kv_heads, g.head_dim, g.head_dim, seed=2),
                       meta={"method": "dartquant"})


@pytest.fixture(scope="module")
def report(tiny_folder, learned_set, tmp_path_factory):
    base = tmp_path_factory.mktemp("inspect")
    learned_set.save(base / "learned.safetensors")
    out = base / "out"
    return out, run_inspect(str(tiny_folder), out, rotations=[base / "learned.safetensors"], seed=3,
                            samples=SAMPLES, seqlen=SEQLEN, progress=False)


def tiny_geometry(name: str):
    from transformers import AutoConfig

    config = AutoConfig.for_model(**TINY_CONFIGS[name])
    return adapter_for(config).geometry(config)


# ---- metrics on synthetic data ------------------------------------------------------------------
def numpy_kurtosis(x: np.ndarray) -> float:
    """Reference: Pearson kurtosis of each row (population moments), averaged over rows."""
    d = x - x.mean(axis=1, keepdims=True)
    return float(np.mean((d**4).mean(axis=1) / (d**2).mean(axis=1) ** 2))


def test_token_kurtosis_matches_reference_and_known_values():
    x = torch.randn(300, 40, generator=torch.Generator().manual_seed(0)) ** 3
    assert token_kurtosis(x) == pytest.approx(numpy_kurtosis(x.double().numpy()), rel=1e-10)
    assert token_kurtosis(torch.tensor([[1.0, -1.0, 1.0, -1.0]])) == pytest.approx(1.0)  # two-point: minimum
    spike = torch.zeros(1, 64)
    spike[0, 5] = 7.0  # one channel out of n: (n^2 - 3n + 3) / (n - 1)
    assert token_kurtosis(spike) == pytest.approx((64**2 - 3 * 64 + 3) / 63)
    assert token_kurtosis(torch.zeros(3, 8)) != token_kurtosis(torch.zeros(3, 8))  # all-constant rows: nan


def test_hadamard_spreads_a_planted_outlier_channel():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 64, generator=g)
    x[:, 17] *= 50.0
    before = activation_stats(x)
    after = activation_stats(x @ random_hadamard_matrix(64, 0, dtype=torch.float32))
    assert before["max_abs"] > 100 and after["max_abs"] < before["max_abs"] / 4
    assert before["kurtosis"] > 30 and after["kurtosis"] < 4
    assert after["sqnr_db"] > before["sqnr_db"] + 3
    # no outlier: the rotation changes little (Gaussian rows stay Gaussian)
    plain = torch.randn(512, 64, generator=g)
    rotated = activation_stats(plain @ random_hadamard_matrix(64, 0, dtype=torch.float32))
    assert rotated["kurtosis"] == pytest.approx(activation_stats(plain)["kurtosis"], abs=0.5)


def test_sqnr_uses_4bit_asymmetric_per_token_clip_09():
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.1, 10, 50)[:, None]
    spec = QuantSpec(bits=4, symmetric=False, clip_ratio=0.9)
    assert activation_stats(x)["sqnr_db"] == sqnr_db(x, fake_quantize(x, spec))
    per_tensor = sqnr_db(x, fake_quantize(x, QuantSpec(bits=4, symmetric=False, clip_ratio=0.9, group_size=-1)))
    assert activation_stats(x)["sqnr_db"] > per_tensor + 3  # rows of very different scale: per token matters


def test_o_rows_inverts_the_capture_layout():
    tokens, kv, groups, d = 5, 2, 3, 4
    rows = torch.arange(tokens * kv * groups * d, dtype=torch.float32).view(tokens, kv * groups * d)
    # capture.py: [tokens, heads * d] -> [kv, tokens * groups, d]
    heads = rows.view(tokens, kv, groups, d).permute(1, 0, 2, 3).reshape(kv, tokens * groups, d)
    assert torch.equal(o_rows(heads, groups), rows)


# ---- the whole command on a tiny model ------------------------------------------------------------


def assert_stats_match(got: dict, x: torch.Tensor):
    """All three metrics are invariant to the order of tokens, so sampled-in-any-order == reference."""
    ref = activation_stats(x)
    assert got["max_abs"] == pytest.approx(ref["max_abs"], rel=1e-4)
    assert got["kurtosis"] == pytest.approx(ref["kurtosis"], rel=1e-4)
    assert got["sqnr_db"] == pytest.approx(ref["sqnr_db"], abs=0.05)
    assert got["max_abs"] == pytest.approx(x.abs().max().item(), rel=1e-4)
    assert got["kurtosis"] == pytest.approx(numpy_kurtosis(x.double().numpy()), rel=1e-4)


@pytest.mark.parametrize("view", ["none", "hadamard", "dartquant"])
def test_view_stats_equal_the_inputs_of_the_really_rotated_model(report, tiny_folder, learned_set, view):
    """Stats from rotated captured samples == stats of the q/up/o inputs of the model with the rotation folded in."""
    _, rep = report
    model, tok = load_model(str(tiny_folder))
    fuse_norms_(model)
    if view == "hadamard":
        rotate_(model, RotationSet.quarot(adapter_for(model).geometry(model.config), 3, r3=False, r4=False))
    elif view == "dartquant":
        rotate_(model, learned_set)
    ids = calib_windows(tok, "wiki", SAMPLES, SEQLEN, 3)
    ref = module_inputs(model, ids)
    stats = rep["views"][view]
    for i in range(TINY_CONFIGS["llama-tied-gqa"]["num_hidden_layers"]):
        assert_stats_match(stats["r1_q"][i], ref[(i, "q")])
        assert_stats_match(stats["r1_up"][i], ref[(i, "up")])
        assert_stats_match(stats["r2"][i], ref[(i, "o")])


def test_outputs_are_written_and_finite(report):
    out, rep = report
    for name in ("inspect.json", "summary.md", "layers.png", "hist_q.png", "hist_o.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert len([p for p in out.iterdir() if p.name != ".dartquant-run"]) == 5  # + the run-folder marker
    saved = json.loads((out / "inspect.json").read_text())
    assert list(saved["views"]) == ["none", "hadamard", "dartquant"]
    assert saved["settings"]["rotations"] == {"dartquant": str(out.parent / "learned.safetensors")}
    assert saved["settings"]["tokens_per_layer"] == {"r1": SAMPLES * SEQLEN, "r2": SAMPLES * SEQLEN}
    for parts in saved["views"].values():
        assert set(parts) == {"r1_q", "r1_up", "r2"}
        for rows in parts.values():
            assert [r["layer"] for r in rows] == [0, 1]
            for r in rows:
                assert all(isinstance(r[m], float) and math.isfinite(r[m]) for m in ("max_abs", "kurtosis", "sqnr_db"))
    # rotations change the numbers (the identity and Hadamard views are not the same data)
    assert saved["views"]["none"]["r1_q"][0]["kurtosis"] != saved["views"]["hadamard"]["r1_q"][0]["kurtosis"]
    summary = (out / "summary.md").read_text()
    assert all(f"| {v} |" in summary for v in ("none", "hadamard", "dartquant")) and "q max" in summary


def test_cli_with_a_rotation_file(tiny_folder, tmp_path, capsys):
    geo = tiny_geometry("llama-tied-gqa")
    rot_file = tmp_path / "rotations.safetensors"
    RotationSet(random_orthogonal(geo.hidden, geo.hidden, seed=0), None, meta={"method": "dartquant"}).save(rot_file)
    parser = argparse.ArgumentParser()
    add_inspect_command(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "out"
    args = parser.parse_args(["inspect", "--model", str(tiny_folder), "--rotations", str(rot_file), "--samples", "1",
                              "--seqlen", "16", "--split", "eval", "--out", str(out), "--quiet"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "| dartquant |" in printed and "| hadamard |" in printed
    saved = json.loads((out / "inspect.json").read_text())
    assert list(saved["views"]) == ["none", "hadamard", "dartquant"]
    assert saved["settings"]["split"] == "eval" and saved["settings"]["tokens_per_layer"]["r1"] == 16
    # this set has no R2: its o_proj inputs are those of the identity view
    assert saved["views"]["dartquant"]["r2"] == saved["views"]["none"]["r2"]
    assert saved["views"]["dartquant"]["r1_q"] != saved["views"]["none"]["r1_q"]


def test_bad_inputs_fail_clearly_and_write_nothing(tiny_folder, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        run_inspect(str(tiny_folder), out, rotations=[tmp_path / "missing.safetensors"], progress=False)
    wrong = tmp_path / "wrong.safetensors"
    RotationSet.quarot(tiny_geometry("qwen2-bias-gqa"), 0).save(wrong)  # hidden 40, not 48
    with pytest.raises(ValueError, match="another model"):
        run_inspect(str(tiny_folder), out, rotations=[wrong], samples=1, seqlen=16, progress=False)
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        run_inspect(str(tiny_folder), out, samples=1, seqlen=16, progress=False)
    assert (out / "keep.txt").read_text() == "x"


def test_view_labels_come_from_the_method_then_the_file_and_are_unique(tmp_path):
    from dartquant.diagnostics import load_views

    paths = []
    for folder, meta in (("a", {"method": "dartquant"}), ("b", {"method": "dartquant"}), ("c", {"method": "dartquant"}),
                         ("d", {})):
        (tmp_path / folder).mkdir()
        paths.append(tmp_path / folder / ("r.safetensors" if meta else "mine.safetensors"))
        RotationSet(random_orthogonal(4, 4, seed=0), None, meta=meta).save(paths[-1])
    labels = [label for label, _, _ in load_views(paths)]
    assert labels == ["dartquant", "dartquant (r)", "dartquant (r) #2", "mine"]


def test_an_already_rotated_folder_is_refused(tmp_path):
    from dartquant.diagnostics import _check_unrotated

    (tmp_path / "dartquant.json").write_text(json.dumps({"version": 1, "rotations": {"method": "fuse-only"}}))
    _check_unrotated(tmp_path)  # norms fused only: its activations are the unrotated ones
    (tmp_path / "dartquant.json").write_text(json.dumps({"version": 1, "rotations": {"method": "quarot"}}))
    with pytest.raises(ValueError, match="already rotated"):
        _check_unrotated(tmp_path)


@pytest.mark.parametrize("name", ["mixtral-moe", "qwen2moe-shared"])
def test_inspect_on_mixtures_of_experts(tmp_path, name):
    """MoE: the MLP stream is captured at the experts' entry (every token, before routing), so
    r1_up has one row per layer like a dense model's, finite."""
    folder = save_tiny_folder(tmp_path / "model", name)
    run_inspect(str(folder), tmp_path / "out", seed=0, samples=2, seqlen=32, progress=False)
    saved = json.loads((tmp_path / "out" / "inspect.json").read_text())
    n_layers = TINY_CONFIGS[name]["num_hidden_layers"]
    for parts in saved["views"].values():
        for rows in parts.values():
            assert [r["layer"] for r in rows] == list(range(n_layers))
            assert all(math.isfinite(r[m]) for r in rows for m in ("max_abs", "kurtosis", "sqnr_db"))
