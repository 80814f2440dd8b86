"""Issue 11, one test (or more) per numbered case: nothing lost, typed settings checked before
any work, transforms that fail whole, reproducible run folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dartquant.cli import main
from dartquant.config import RunConfig
from dartquant.runs import MARKER, OutputDirError, OutputExistsError, atomic_dir, check_out_dir
from dartquant.transforms import RotationSet, rotate_
from tiny import save_tiny_folder

SRC = Path(__file__).resolve().parent.parent / "src"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def no_load(monkeypatch):
    """Loading the model is the first expensive step: every check here must come before it."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was noticed")
    monkeypatch.setattr("dartquant.pipeline.load_model", refuse)
    monkeypatch.setattr("dartquant.zoo.load_model", refuse)


def tiny_args(folder, out, *extra):
    return ["quantize", "--model", str(folder), "--calib-samples", "2", "--calib-seqlen", "16", "--eval-seqlen", "16",
            "--eval-max-windows", "2", "--w-quantizer", "rtn", "--skip-fp-eval", "--json", "--out", str(out), *extra]


# ---- 1. --out . --overwrite must not delete the current directory or the input model ---------------
@pytest.mark.parametrize("command", ["rotate", "quantize"])
def test_out_dot_overwrite_deletes_nothing(tmp_path, monkeypatch, capsys, no_load, command):
    work = tmp_path / "DIR"
    model = save_tiny_folder(work / "mymodel")
    (work / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    monkeypatch.chdir(work)
    args = (["rotate", "--model", "./mymodel", "--out", ".", "--overwrite"] if command == "rotate"
            else ["quantize", "--model", "./mymodel", "--out", ".", "--overwrite"])
    assert main(args) == 2
    assert "current directory" in capsys.readouterr().err
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before and model.is_dir()
    # an ancestor of the cwd; the model folder itself; a folder containing the model
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for out, why in (("..", "current directory or one of its parents"), (str(model), "input of this run"),
                     (str(work), "input of this run")):
        assert main(["rotate", "--model", str(model), "--out", out, "--overwrite"]) == 2
        assert why in capsys.readouterr().err
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before


def test_overwrite_replaces_only_marked_run_folders(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("x")
    with pytest.raises(OutputExistsError, match="not a dartquant run folder"):
        check_out_dir(user, overwrite=True)
    assert (user / "thesis.tex").read_text() == "x"
    run = tmp_path / "run"
    with atomic_dir(check_out_dir(run)) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (run / MARKER).is_file() and (run / "a.txt").read_text() == "first"
    with pytest.raises(OutputExistsError, match="--overwrite"):
        check_out_dir(run)
    with atomic_dir(check_out_dir(run, overwrite=True)) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in run.iterdir()) == sorted([MARKER, "b.txt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "user"], "no lock / temporary left behind"


# ---- 2. two runs with the same --out: the second never deletes the first's results ------------------
def test_folder_appearing_meanwhile_is_never_replaced(tmp_path):
    out = tmp_path / "X"
    first, second = check_out_dir(out), check_out_dir(out)  # both start while X does not exist
    with pytest.raises(OutputExistsError, match="left untouched") as err:
        with atomic_dir(second) as tmp2:
            (tmp2 / "who").write_text("second")
            with atomic_dir(first) as tmp1:  # the first finishes while the second still works
                (tmp1 / "who").write_text("first")
    assert (out / "who").read_text() == "first"
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("X.conflict-")]
    assert len(kept) == 1 and (kept[0] / "who").read_text() == "second" and str(kept[0]) in str(err.value)
    # with --overwrite: only the folder seen at the start may be replaced, not a newer one
    a, b = check_out_dir(out, overwrite=True), check_out_dir(out, overwrite=True)
    with atomic_dir(a) as tmp:
        (tmp / "who").write_text("a")
    with pytest.raises(OutputExistsError, match="left untouched"):
        with atomic_dir(b) as tmp:
            (tmp / "who").write_text("b")
    assert (out / "who").read_text() == "a"


def test_two_quantize_runs_same_out(tiny_folder, tmp_path, capsys, monkeypatch):
    """The real pipeline: a run with the same --out finishes while this one quantizes."""
    import dartquant.pipeline as pipeline

    out = tmp_path / "X"
    real = pipeline.quantize_weights_

    def meanwhile(*a, **k):
        with atomic_dir(check_out_dir(out)) as tmp:
            (tmp / "other-run").write_text("finished first")
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "quantize_weights_", meanwhile)
    assert main(tiny_args(tiny_folder, out)) == 2
    assert "left untouched" in capsys.readouterr().err
    assert (out / "other-run").read_text() == "finished first"
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("X.conflict-")]
    assert len(kept) == 1 and (kept[0] / "metrics.json").is_file(), "this run's results are kept, not lost"


# ---- 3. recipe values are type-checked before any work ----------------------------------------------
@pytest.mark.parametrize("line,match", [
    ('r3: "false"', "setting r3: 'false' .*true or false"),
    ("a_clip: high", "setting a_clip: 'high' .*a number"),
    ("calib_samples: two", "setting calib_samples: 'two' .*an integer"),
    ("eval_max_windows: 1.5", "setting eval_max_windows: 1.5 .*an integer or null"),
    ('w_bits: "4"', "setting w_bits: '4' .*an integer"),
    ("a_bits_overrides: {down: eight}", "setting a_bits_overrides"),
    ("dq_lr_grid: [0.1, fast]", "setting dq_lr_grid"),
    ("tasks: arc_easy", "setting tasks: 'arc_easy' .*a list of strings"),
    ("eval_max_windows: 0", "eval_max_windows must be at least 1"),
    ("eval_corpora: [wiki, ptb]", "eval_corpora must be one or more distinct of wiki, c4"),
])
def test_recipe_values_are_typed(tiny_folder, tmp_path, capsys, no_load, line, match):
    import re

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_folder}\n{line}\n")
    assert main(["quantize", "--recipe", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_typed_values_that_are_fine(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dq_r1_lr: 1e-3\ne2e_lr: 2\nr3: false\ndq_lr_grid: [1, 1e-2]\neval_max_windows: null\n"
                      "a_bits_overrides: {down: 8}\n")
    cfg = RunConfig.from_yaml(recipe)
    dq, e2e = cfg.section("dartquant"), cfg.section("e2e")
    assert dq.r1_lr == 1e-3 and e2e.lr == 2.0 and isinstance(e2e.lr, float) and cfg.r3 is False
    assert dq.lr_grid == [1.0, 1e-2] and cfg.scheme.a_bits_overrides == {"down": 8}
    from dartquant.quant.scheme import QuantScheme

    with pytest.raises(ValueError, match="setting w_bits: 4.0"):
        QuantScheme(w_bits=4.0)  # the Python API goes through the same checker
    with pytest.raises(ValueError, match="setting r4: 1 "):
        RunConfig(r4=1)
    # a clip search weighed by GPTQ's Hessian, with a method whose weights default to RTN
    with pytest.raises(ValueError, match=r"quantized by RTN \(method rtn's default\): use --w-quantizer gptq"):
        RunConfig.from_dict({"method": "rtn", "w_mse_objective": "gptq"}).validate()
    with pytest.raises(ValueError, match=r"quantized by RTN \(--w-quantizer rtn\)"):
        RunConfig.from_dict({"method": "quarot", "w_quantizer": "rtn", "w_mse_objective": "output"}).validate()
    RunConfig.from_dict({"method": "quarot", "w_mse_objective": "gptq"}).validate()


def test_nested_and_flat_keys_are_checked_alike():
    """Recipes may nest sections (as config.yaml does) or use the flags' flat names."""
    cfg = RunConfig.from_dict({"scheme": {"w_bits": 3, "a_clip": 1}, "dartquant": {"lr-grid": [1, 2]}, "e2e_steps": 7})
    assert cfg.scheme.w_bits == 3 and isinstance(cfg.scheme.a_clip, float) and cfg.section("dartquant").lr_grid == [1.0, 2.0]
    assert cfg.section("e2e").steps == 7
    with pytest.raises(ValueError, match=r"setting scheme\.w_bits: '4' \(str\) .*an integer"):
        RunConfig.from_dict({"scheme": {"w_bits": "4"}})
    with pytest.raises(ValueError, match=r"unknown key 'scheme\.bitz'"):
        RunConfig.from_dict({"scheme": {"bitz": 4}})
    with pytest.raises(ValueError, match=r"unknown key 'w_bitz' \(did you mean w_bits"):
        RunConfig.from_dict({"w_bitz": 4})
    assert RunConfig.from_dict(RunConfig.from_dict({"dq_r1_lr": 0.5}).to_dict()).section("dartquant").r1_lr == 0.5


# ---- 4. rotate_ fails whole ------------------------------------------------------------------------
def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]


def _odd_model(**overrides):
    """A llama whose head_dim (6) or MLP width (90) has no Hadamard construction."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(model_type="llama", hidden_size=24, intermediate_size=40, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=6, vocab_size=50,
               tie_word_embeddings=False, max_position_embeddings=32)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float64).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(1 + 0.5 * torch.randn_like(p) if "norm" in n else 0.2 * torch.randn_like(p))
    return model


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m).__name__ for m in model.modules()]


@pytest.mark.parametrize("case", ["head_dim_6_r3_r4", "mlp_90_r4", "bad_scaling", "nan_r1"])
def test_rotate_fails_whole(case):
    from dartquant.adapters import adapter_for
    from dartquant.hadamard import HadamardError

    model = _odd_model(intermediate_size=90, head_dim=8) if case == "mlp_90_r4" else _odd_model()
    geo = adapter_for(model).geometry(model.config)
    r2 = torch.stack([_orthogonal(geo.head_dim, i) for i in range(geo.n_layers * geo.n_kv_heads)])
    rot = RotationSet(_orthogonal(geo.hidden, 7), r2.view(geo.n_layers, geo.n_kv_heads, geo.head_dim, geo.head_dim),
                      r3=True, r4=True)
    error = HadamardError
    if case == "bad_scaling":
        rot.r3 = rot.r4 = False
        rot.scales = {"up": torch.ones(geo.n_layers, geo.intermediate), "v": -torch.ones(geo.n_layers, 2 * 6)}
        error = ValueError
    elif case == "nan_r1":
        rot.r3 = rot.r4 = False
        rot.r1 = rot.r1.clone()
        rot.r1[0, 0] = float("nan")
        error = ValueError
    ids = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
    state, modules = _snapshot(model)
    with pytest.raises(error):
        rotate_(model, rot)
    after_state, after_modules = _snapshot(model)
    assert after_modules == modules, "no online module may be installed by a failed rotate_"
    assert all(torch.equal(state[k], after_state[k]) for k in state), "a failed rotate_ changed weights"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


# ---- 5. errors found before the expensive work ----------------------------------------------------------
def test_unwritable_out_fails_before_load(tiny_folder, tmp_path, capsys, no_load):
    (tmp_path / "afile").write_text("x")
    for argv in (tiny_args(tiny_folder, tmp_path / "afile" / "run"),
                 ["rotate", "--model", str(tiny_folder), "--out", str(tmp_path / "afile" / "run")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "cannot create the output folder" in err and "Traceback" not in err
    with pytest.raises(OutputDirError, match="not a writable folder"):
        check_out_dir(tmp_path / "afile" / "run")
    if os.geteuid() != 0:  # root writes anywhere: the permission case is only testable as a user
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OutputDirError):
            check_out_dir(locked / "run")


def test_wrong_shape_rotations_fail_before_load(tiny_folder, tmp_path, capsys, no_load):
    from dartquant.adapters import Geometry

    other = Geometry(hidden=40, intermediate=56, n_layers=2, n_heads=5, n_kv_heads=1, head_dim=8, vocab=97)
    path = tmp_path / "rot.safetensors"
    RotationSet.quarot(other).save(path)
    for argv in (tiny_args(tiny_folder, tmp_path / "run", "--rotations", str(path)),
                 ["rotate", "--model", str(tiny_folder), "--rotation", str(path), "--out", str(tmp_path / "r")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "made for another model" in err and "Traceback" not in err


def test_eval_max_windows_zero_fails_before_load(tiny_folder, tmp_path, capsys, no_load):
    assert main(tiny_args(tiny_folder, tmp_path / "run", "--eval-max-windows", "0")) == 2
    assert "eval_max_windows must be at least 1" in capsys.readouterr().err
    assert main(["eval", str(tiny_folder), "--max-windows", "0"]) == 2
    assert "eval_max_windows must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--max-windows must be at least 1"):
        main(["ppl", str(tiny_folder), "--max-windows", "0"])


def test_missing_hadamard_size_fails_before_load(tmp_path, capsys, no_load):
    """R3 on a head_dim without a Hadamard construction is known from config.json alone."""
    model = _odd_model()
    model.save_pretrained(str(tmp_path / "m"))
    assert main(tiny_args(tmp_path / "m", tmp_path / "run", "--method", "quarot")) == 2
    assert "no Hadamard matrix of order n=6" in capsys.readouterr().err


# ---- 6. smaller: stale temporaries, eval RUN, byte-identical artifacts, 16-bit embeddings ------------
def test_killed_run_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    out = tmp_path / "X"
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from dartquant.runs import atomic_dir, check_out_dir\n"
            "with atomic_dir(check_out_dir(sys.argv[2])) as tmp:\n"
            "    (tmp / 'partial').write_text('x'); print('ready', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(SRC), str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    tmps = list(tmp_path.glob(".X.tmp-*"))
    assert len(tmps) == 1
    check_out_dir(out)  # the owner is alive: its temporary folder is left alone
    assert tmps[0].exists()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert tmps[0].exists()
    check_out_dir(out)  # dead owner: removed
    assert list(tmp_path.glob(".X.tmp-*")) == [] and not out.exists()
    # a temporary folder we cannot judge (not ours: no owner file) is reported, never deleted
    foreign = tmp_path / ".X.tmp-foreign"
    foreign.mkdir()
    (foreign / "data").write_text("?")
    check_out_dir(out)
    assert (foreign / "data").exists()


def test_eval_run_reproduces_its_perplexity_and_runs_are_byte_identical(tiny_folder, tmp_path, capsys):
    """DartQuant: its calibration records timings and memory peaks; they must land in metrics.json only."""
    from safetensors import safe_open

    runs = []
    for name in ("a", "b"):
        assert main(tiny_args(tiny_folder, tmp_path / name, "--method", "dartquant", "--dq-epochs", "1",
                              "--dq-batch-tokens", "16", "--dq-token-fraction", "0.5", "--eval-max-windows", "3")) == 0
        runs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert "stages" in runs[0]["calibration_timings"]["rotations"]
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert {MARKER, "rotations.safetensors", "quantized.safetensors", "calibration_loss.json",
            "metrics.json"} <= set(files)
    for f in files:
        if f != "metrics.json":
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f"{f} differs"
            assert b'"seconds"' not in (tmp_path / "a" / f).read_bytes(), f"{f} holds timings"
    # eval RUN without flags: the run's seqlen / windows / dtype, the very same numbers
    assert main(["eval", str(tmp_path / "a"), "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["ppl"] == runs[0]["ppl"]
    # embeddings and lm_head are stored in 16 bits (and were evaluated so: reproduced above)
    with safe_open(str(tmp_path / "a" / "quantized.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F16"
        assert f.get_slice("lm_head.weight").get_dtype() == "F16"
