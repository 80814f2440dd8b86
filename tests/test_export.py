"""`dartquant export`: a run folder becomes a compressed-tensors folder that transformers loads
without dartquant and that computes the run's function.

The reference is the run's own model (`zoo.load_model(RUN)`) with what the export drops turned
off: the KV-cache quantizers (`--drop-kv-quant`; R3 cancels in Q K^T once K is unquantized).
Runs use activation clip 1.0 where the logits are compared, since the format has no clip
ratio (the clip-0.9 difference is measured in docs/EXPORT.md, not hidden in a tolerance).
Measured max |logit difference| / max |logit| on the tiny Llama: 4.6e-7 (float32 round-off);
the tests allow 1e-5.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("compressed_tensors")

from dartquant.export import ExportError, check_exportable, export_run, recover_codes  # noqa: E402
from dartquant.config import RunConfig  # noqa: E402
from dartquant.pipeline import run_quantize  # noqa: E402
from dartquant.zoo import load_model  # noqa: E402
from tiny import save_tiny_folder  # noqa: E402

REL_TOL = 1e-5

# Loads an export with transformers + compressed-tensors only (the lines docs/EXPORT.md gives),
# writes the logits of fixed token ids, and says which modules were imported.
LOADER = r"""
import json, sys
from pathlib import Path
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from compressed_tensors.transform import TransformBase, TransformConfig, apply_transform_config

def load(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tc = json.loads((folder / "config.json").read_text())["quantization_config"].get("transform_config")
    applied_by_transformers = any(isinstance(m, TransformBase) for m in model.modules())
    if tc and not applied_by_transformers:  # transformers <= 5.24 does not apply transform_config
        apply_transform_config(model, TransformConfig.model_validate(tc))
        params = dict(model.named_parameters(remove_duplicate=False))
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            for key in f.keys():
                if key.endswith("_input.weight") and key in params:
                    params[key].data.copy_(f.get_tensor(key))  # shared by every module of the scheme
    return model


ids, out = torch.tensor(json.loads(sys.argv[1])), sys.argv[2]
logits = {}
with torch.no_grad():
    for i, folder in enumerate(sys.argv[3:]):
        logits[str(i)] = load(Path(folder))(ids).logits.contiguous()
save_file(logits, out)
print(json.dumps({"dartquant_imported": any(m.startswith("dartquant") for m in sys.modules)}))
"""


def load_in_plain_transformers(folders: list[Path], ids: torch.Tensor, tmp: Path) -> list[torch.Tensor]:
    """Logits of each export, computed in one subprocess that never imports dartquant."""
    from safetensors.torch import load_file

    out = tmp / "logits.safetensors"
    # only the interpreter's and site-packages' paths: nothing of this repository (its src/, and
    # benchmarks/ or lab/ whose module names could shadow packages transformers probes for)
    repo = Path(__file__).resolve().parent.parent
    ours = {repo, *(repo / d for d in ("src", "tests", "benchmarks", "lab", "scripts"))}
    env_path = [p for p in sys.path if p and Path(p).resolve() not in ours and "wt-" not in p]
    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps(ids.tolist()), str(out), *map(str, folders)],
                          capture_output=True, text=True, cwd=tmp, timeout=900,
                          env={"PYTHONPATH": ":".join(env_path), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not json.loads(proc.stdout.strip().splitlines()[-1])["dartquant_imported"]
    logits = load_file(str(out))
    return [logits[str(i)] for i in range(len(folders))]


def reference_logits(run: Path, ids: torch.Tensor, activations: bool = True) -> torch.Tensor:
    """The run's model with its KV quantizers off (what --drop-kv-quant exports), and with its
    activation quantizers off too for a --weight-only export."""
    from dartquant.adapters import adapter_for
    from dartquant.quant.act import set_act_quant_enabled_

    model, _ = load_model(run, dtype=torch.float32)
    for layer in adapter_for(model).layers_of(model):
        layer.attn.dq_attention.k_quantizer = layer.attn.dq_attention.v_quantizer = None
    set_act_quant_enabled_(model, activations)
    with torch.no_grad():
        return model(ids).logits


def quantize_tiny(tmp: Path, family: str, **kw) -> Path:
    folder = save_tiny_folder(tmp / f"{family}-model", family)
    cfg = dict(model=str(folder), calib_samples=2, calib_seqlen=32, eval_seqlen=32, eval_max_windows=1,
               w_quantizer="rtn", a_clip=1.0)
    cfg.update(kw)
    run = tmp / f"{family}-run"
    run_quantize(RunConfig.from_flat(**cfg), run, progress=False, eval_fp=False)
    return run


FAMILIES = {
    "llama-tied-gqa": {},
    "qwen2-bias-gqa": dict(w_quantizer="gptq", w_group_size=8, qk_balance=True),  # its Q/K scaling rides in the weights
    "mistral-mha": dict(a_bits=8),
}
IDS = torch.randint(1, 80, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{family: (run, export, logits of the export in plain transformers)}: one loader process."""
    tmp = tmp_path_factory.mktemp("export")
    runs = {f: quantize_tiny(tmp, f, **kw) for f, kw in FAMILIES.items()}
    outs = {}
    for family, run in runs.items():
        outs[family] = tmp / f"{family}-export"
        info = export_run(run, outs[family], dtype="float32", drop_kv_quant=True, progress=False)
        assert info["online"]["r4"] and any("KV" in n for n in info["not_expressible"])
    logits = load_in_plain_transformers(list(outs.values()), IDS, tmp)
    return {f: (runs[f], outs[f], lg) for f, lg in zip(FAMILIES, logits)}


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_plain_transformers_with_the_runs_logits(exported, family):
    run, out, got = exported[family]
    ref = reference_logits(run, IDS)
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel < REL_TOL, f"{family}: export logits differ from the run's by {rel:.2e} (relative)"
    # dartquant's own loaders accept the export too (ppl / eval go through zoo.load_model)
    model, _ = load_model(out, dtype=torch.float32)
    with torch.no_grad():
        assert ((model(IDS).logits - ref).abs().max() / ref.abs().max()).item() < REL_TOL


def test_written_configs_are_what_compressed_tensors_and_vllm_read(tmp_path):
    """Parsed by compressed-tensors' own models; the layout vLLM's WNA16 / W4A8 schemes load."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.transform import TransformConfig
    from safetensors import safe_open

    run = quantize_tiny(tmp_path, "llama-tied-gqa", kv_bits=16)
    out = tmp_path / "export"
    export_run(run, out, dtype="bfloat16", progress=False)  # kv_bits 16: no flag needed
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "transform_config"})
    tc = TransformConfig.model_validate(qc["transform_config"])
    assert parsed.format == "pack-quantized" and parsed.kv_cache_scheme is None and parsed.ignore == ["lm_head"]
    group = next(iter(parsed.config_groups.values()))
    assert (group.weights.num_bits, group.weights.symmetric, group.weights.strategy) == (4, True, "channel")
    assert group.input_activations.dynamic and group.input_activations.strategy == "token"
    (name, scheme), = tc.config_groups.items()
    assert scheme.type == "random-hadamard" and scheme.apply[0].location == "input"  # 80 is not a power of 2
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.0.mlp.up_proj.weight_packed")
        scale = f.get_tensor("model.layers.0.mlp.up_proj.weight_scale")
        matrix = f.get_tensor(f"model.layers.0.mlp.down_proj.{name}_input.weight")
    assert packed.dtype == torch.int32 and packed.shape == (80, 48 // 8)  # 8 codes per int32, vLLM's layout
    assert scale.shape == (80, 1) and scale.dtype == torch.bfloat16
    assert torch.equal(matrix.abs(), torch.ones_like(matrix))  # unnormalized +-1, divided by sqrt(n) on load
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= keys and "lm_head.weight_packed" not in keys
    assert not any(k.endswith("_q_attn.weight") for k in keys)  # no attention-side transforms
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()
    assert (out / "generation_config.json").exists()  # from the source model: runs do not keep it
    # --weight-only: no input_activations, the W4A16 layout (vLLM's WNA16 scheme)
    export_run(run, tmp_path / "w4a16", weight_only=True, progress=False)
    qc = json.loads((tmp_path / "w4a16" / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "transform_config"})
    assert all(g.input_activations is None for g in parsed.config_groups.values())


def test_power_of_two_hadamard_is_compressed_tensors_own():
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    from dartquant.hadamard import hadamard_matrix

    for n in (8, 64, 128):
        ours = (hadamard_matrix(n) * n ** 0.5).round()
        assert torch.equal(ours, deterministic_hadamard_matrix(n, dtype=torch.float64))


def test_recover_codes_round_trips_and_refuses_off_grid_weights():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (6, 32), generator=g, dtype=torch.int8)
    scale = torch.rand(6, 4, generator=g, dtype=torch.float64) + 0.01
    w = (codes.double().reshape(6, 4, 8) * scale[..., None]).reshape(6, 32).float()
    got_codes, got_scale = recover_codes(w, 4, 8)
    back = (got_codes.double().reshape(6, 4, 8) * got_scale[..., None]).reshape(6, 32)
    assert (back - w.double()).abs().max() < 1e-6 * w.abs().max()
    with pytest.raises(ExportError, match="do not lie on a 4-bit"):
        recover_codes(torch.randn(4, 16, generator=g), 4, None)


@pytest.mark.parametrize("kw,match", [
    (dict(a_bits=2), "2-bit activations"),
    (dict(w_symmetric=False), "asymmetric weights"),
    (dict(w_bits=3), "w_bits=3"),
    (dict(quantize_lm_head=True), "lm_head"),
    (dict(kv_bits=4), "--drop-kv-quant"),
])
def test_settings_the_format_cannot_say_are_refused(kw, match):
    with pytest.raises(ExportError, match=match):
        check_exportable(RunConfig.from_flat(**kw).scheme)


def test_bad_input_fails_clearly_and_leaves_nothing(tmp_path, capsys):
    from dartquant.cli import main

    plain = save_tiny_folder(tmp_path / "plain")
    assert main(["export", str(plain), "--out", str(tmp_path / "a")]) == 2
    assert "not a quantized run folder" in capsys.readouterr().err
    run = quantize_tiny(tmp_path, "llama-tied-gqa")  # kv_bits 4: the format cannot say it
    assert main(["export", str(run), "--out", str(tmp_path / "b")]) == 2
    assert "--drop-kv-quant" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("ours")
    assert main(["export", str(run), "--out", str(tmp_path / "c"), "--drop-kv-quant"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


@pytest.mark.real
def test_bundled_model_export_matches_in_plain_transformers(tmp_path):
    """SmolLM2, weight-only export in float32. (A W4A4 real model cannot be held to a logit
    tolerance: a 1e-7 relative change of its embeddings moves its logits by ~19, see
    docs/EXPORT.md; its W4A16 round-off floor is ~8e-5.)"""
    run = tmp_path / "run"
    cfg = RunConfig.from_flat(model="smollm2-135m", method="quarot", w_quantizer="rtn", calib_samples=2,
                      calib_seqlen=64, eval_seqlen=64, eval_max_windows=1, guard_windows=0)
    run_quantize(cfg, run, progress=False, eval_fp=False)
    export_run(run, tmp_path / "export", dtype="float32", drop_kv_quant=True, weight_only=True, progress=False)
    ids = torch.randint(100, 40000, (1, 32), generator=torch.Generator().manual_seed(0))
    ref = reference_logits(run, ids, activations=False)
    got, = load_in_plain_transformers([tmp_path / "export"], ids, tmp_path)
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4, f"smollm2 export logits differ from the run's by {rel:.2e} (relative)"


def test_quantize_export_flag(tmp_path, capsys):
    """`quantize --export DIR`: refused settings fail before any work; otherwise the run and its
    export are both written (the KV cache quantization is dropped from the export, as documented)."""
    from dartquant.cli import main

    folder = save_tiny_folder(tmp_path / "m")
    common = ["quantize", "--model", str(folder), "--calib-samples", "2", "--calib-seqlen", "32",
              "--eval-seqlen", "32", "--eval-max-windows", "1", "--w-quantizer", "rtn", "--guard-windows", "0"]
    assert main(common + ["--a-bits", "2", "--out", str(tmp_path / "bad"), "--export", str(tmp_path / "bad-x")]) == 2
    assert "2-bit activations" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad-x").exists()
    assert main(common + ["--out", str(tmp_path / "run"), "--export", str(tmp_path / "x"), "--json"]) == 0
    qc = json.loads((tmp_path / "x" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and (tmp_path / "run" / "metrics.json").is_file()
