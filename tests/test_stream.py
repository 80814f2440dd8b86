"""Layer streaming (stream/): a streamed run computes the same tensors as an in-memory one.

Tiny random models saved as *sharded* safetensors (Gemma 3 with tied, scaled embeddings and
sliding-window layers; Qwen2 with q/k/v bias and one KV head; a bfloat16 Llama folder), each
quantized twice with the same settings, `stream: false` and `stream: true`: the perplexities,
the guard's numbers, every stored tensor (codes, scales, norms, 16-bit embedding / head) and the
reloaded model's logits must be equal. The streamed checkpoint is sharded (a tiny shard size) and must load, export and reload.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dartquant.stream.run as stream_run
from dartquant.config import RunConfig
from dartquant.pipeline import run_quantize
from dartquant.quant.checkpoint import INDEX_FILE, WEIGHTS_FILE, read_quantized_state
from dartquant.stream import fp32_bytes, should_stream
from dartquant.zoo import ModelLoadError, load_model
from tiny import TINY_CONFIGS, make_char_tokenizer, make_tiny_model

IDS = torch.randint(1, 80, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True, scope="module")
def tokenize_once():
    """Every run here tokenizes the same corpora with the same character tokenizer: tokenize each
    text once (pure function of the text for these tests; 8 runs otherwise re-tokenize ~2 MB each)."""
    import dartquant.data as data
    import dartquant.quant.guard as guard

    real, cache = data.tokenize, {}

    def cached(tokenizer, text):
        key = (len(tokenizer), hash(text))
        if key not in cache:
            cache[key] = real(tokenizer, text)
        return cache[key].clone()

    data.tokenize, guard.tokenize = cached, cached
    yield
    data.tokenize, guard.tokenize = real, real


def save_sharded(path: Path, name: str, dtype=torch.float32) -> Path:
    """A tiny model as a Hugging Face folder with several safetensors shards and an index."""
    model = make_tiny_model(name, dtype=dtype)
    model.save_pretrained(str(path), max_shard_size="20KB")
    make_char_tokenizer(min(c["vocab_size"] for c in TINY_CONFIGS.values())).save_pretrained(str(path))
    assert (path / "model.safetensors.index.json").is_file()
    return path


def run_both(tmp: Path, folder: Path, monkeypatch, **kw) -> dict:
    monkeypatch.setattr(stream_run, "MB", 3000)  # shard_mb 1 -> ~3 kB shards: several for a tiny model
    base = dict(model=str(folder), calib_samples=3, calib_seqlen=24, eval_seqlen=24, eval_max_windows=2,
                guard_windows=1, shard_mb=1)
    base.update(kw)
    return {s: (tmp / f"run-{s}", run_quantize(RunConfig.from_flat(stream=s, **base), tmp / f"run-{s}",
                                               progress=False))
            for s in ("false", "true")}


CASES = {  # (family, dtype of the files, settings)
    # Gemma 3: tied embeddings, a scaled embedding, sliding-window and global layers, sandwich norms
    "gemma3-rtn": ("gemma3-sandwich", torch.float32, dict(method="rtn")),
    "gemma3-quarot-r1online": ("gemma3-sandwich", torch.float32, dict(method="quarot", r1=False, r1_online=True)),
    "qwen2-quarot-gptq": ("qwen2-bias-gqa", torch.float32, dict(method="quarot", w_quantizer="gptq")),
    "qwen2-quarot-gptq-asymmetric": ("qwen2-bias-gqa", torch.float32,
                                     dict(method="quarot", w_quantizer="gptq", gptq_asymmetric=True)),
    # the Q/K balance's statistics and strengths from the FP pass (K's bias kept out)
    "qwen2-quarot-rtn-qk-balance": ("qwen2-bias-gqa", torch.float32, dict(method="quarot", qk_balance=True)),
    # the first position's activations and K/V unquantized, with the clip search that sees them
    "llama-quarot-gptq-sinks": ("llama-tied-gqa", torch.float32,
                                dict(method="quarot", w_quantizer="gptq", a_sink_tokens=1, kv_sink_tokens=1,
                                     a_clip_search=True)),
    "llama-dartquant-gptq-bf16-file": ("llama-tied-gqa", torch.bfloat16,
                                       dict(method="dartquant", w_quantizer="gptq", dq_epochs=1)),
    # GPTQ and the clip search on more windows than the rotations' calibration (one draw, two prefixes)
    "llama-dartquant-gptq-quantize-samples": ("llama-tied-gqa", torch.float32,
                                              dict(method="dartquant", w_quantizer="gptq", dq_epochs=1,
                                                   a_clip_search=True, calib_quantize_samples=5)),
}


@pytest.mark.parametrize("case", CASES)
def test_streamed_run_equals_in_memory_run(case, tmp_path, monkeypatch, one_thread):
    family, dtype, kw = CASES[case]
    folder = save_sharded(tmp_path / "model", family, dtype)
    runs = run_both(tmp_path, folder, monkeypatch, **kw)
    (mem, m_mem), (st, m_st) = runs["false"], runs["true"]
    assert "stream" in m_st and "stream" not in m_mem, "the two runs took the same path"
    assert m_st["stream"]["shards"] > 1 and (st / INDEX_FILE).is_file() and not (st / WEIGHTS_FILE).exists()
    assert (mem / WEIGHTS_FILE).is_file() and not (mem / INDEX_FILE).exists()
    assert m_st["ppl"] == m_mem["ppl"] and m_st["fp"] == m_mem["fp"]
    assert m_st["quality_check"]["verdict"] == m_mem["quality_check"]["verdict"] == "ok"
    for key in ("value", "kl", "ppl_fp", "ppl_q"):
        assert m_st["quality_check"][key] == pytest.approx(m_mem["quality_check"][key], rel=1e-9), key
    assert m_st["ppl"]["wiki"] != m_st["fp"]["ppl"]["wiki"], "quantization changed nothing?"
    if kw.get("qk_balance"):  # both paths chose the same strengths from their own statistics
        assert m_st["calibration"]["qk_balance_alpha"] == m_mem["calibration"]["qk_balance_alpha"]
    # every stored tensor, bit for bit
    a, b = read_quantized_state(mem)[1], read_quantized_state(st)[1]
    assert sorted(a) == sorted(b)
    assert any(k.endswith(".codes") for k in a)
    differ = [k for k in a if not (a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))]
    assert not differ, f"tensors differ: {differ[:5]}"
    if kw["method"] != "rtn":
        assert (mem / "rotations.safetensors").read_bytes() == (st / "rotations.safetensors").read_bytes()
    # the recorded settings differ in `stream` only
    spec_m, spec_s = (json.loads((r / "dartquant.json").read_text()) for r in (mem, st))
    assert spec_m["quantization"].pop("stream") == "false" and spec_s["quantization"].pop("stream") == "true"
    assert spec_m == spec_s
    assert (mem / "config.json").read_bytes() == (st / "config.json").read_bytes()
    # the sharded checkpoint reloads to the same model, and to the reported perplexity
    ma, _ = load_model(mem)
    mb, tok = load_model(st)
    with torch.no_grad():
        assert torch.equal(ma(IDS).logits, mb(IDS).logits)
    from dartquant.eval.ppl import evaluate_ppl

    assert evaluate_ppl(mb, tok, seqlen=24, max_windows=2, progress=False)["wiki"] == m_st["ppl"]["wiki"]


def test_eval_corpora_chooses_the_perplexities_in_both_paths(tmp_path, monkeypatch, one_thread):
    """--eval-corpora c4: only c4 is scored (FP and quantized), streamed and in memory alike."""
    folder = save_sharded(tmp_path / "model", "llama-tied-gqa", torch.float32)
    runs = run_both(tmp_path, folder, monkeypatch, method="rtn", eval_corpora=["c4"])
    (_, m_mem), (_, m_st) = runs["false"], runs["true"]
    for m in (m_mem, m_st):
        assert set(m["ppl"]) == set(m["fp"]["ppl"]) == {"c4", "tokens"}
    assert m_st["ppl"] == m_mem["ppl"] and m_st["fp"] == m_mem["fp"]


def test_streamed_zero_shot_equals_in_memory(tmp_path, monkeypatch, one_thread):
    """Zero-shot on a streamed run (lm-eval's batches recorded on the skeleton, carried through
    the blocks, replayed): the same accuracies and lambada perplexity as the in-memory run, for
    the FP and the quantized model."""
    pytest.importorskip("lm_eval")
    folder = save_sharded(tmp_path / "model", "qwen2-bias-gqa")
    runs = run_both(tmp_path, folder, monkeypatch, method="quarot", w_quantizer="rtn",
                    tasks=["arc_easy", "lambada"], zeroshot_limit=3, eval_seqlen=64)  # character tokens
    (_, m_mem), (_, m_st) = runs["false"], runs["true"]
    assert "stream" in m_st and "stream" not in m_mem
    for which in (lambda m: m["zeroshot"], lambda m: m["fp"]["zeroshot"]):
        a, b = which(m_mem), which(m_st)
        assert set(a["tasks"]) == set(b["tasks"]) == {"arc_easy", "lambada"} and a["limit"] == b["limit"] == 3
        for task in a["tasks"]:
            for key, value in a["tasks"][task].items():
                assert b["tasks"][task][key] == (value if value is None else pytest.approx(value, rel=1e-9)), \
                    (task, key)
        assert b["avg"] == pytest.approx(a["avg"], rel=1e-9)
    assert m_st["zeroshot"]["tasks"]["lambada"]["perplexity"] != m_st["fp"]["zeroshot"]["tasks"]["lambada"]["perplexity"]


def test_a_replay_that_asks_for_another_batch_fails_loudly():
    from dartquant.stream.zeroshot import _Replayer

    replay = _Replayer([torch.tensor([[1, 2, 3]])], [torch.zeros(1, 3, 4)], torch.nn.Identity(),
                       torch.nn.Linear(4, 5), "cpu")
    with pytest.raises(RuntimeError, match="did not ask for"):
        replay(torch.tensor([[1, 2, 4]]))


def test_streamed_sharded_run_exports(tmp_path, monkeypatch, one_thread):
    """`dartquant export` reads a sharded streamed run like any other."""
    from dartquant.export import export_run

    folder = save_sharded(tmp_path / "model", "qwen2-bias-gqa")
    monkeypatch.setattr(stream_run, "MB", 3000)
    run = tmp_path / "run"
    run_quantize(RunConfig.from_flat(model=str(folder), method="quarot", w_quantizer="rtn", a_clip=1.0, stream="true",
                                     shard_mb=1, calib_samples=2, calib_seqlen=24, eval_seqlen=24, eval_max_windows=1,
                                     guard_windows=0), run, progress=False, eval_fp=False)
    assert (run / INDEX_FILE).is_file()
    export_run(run, tmp_path / "export", dtype="float32", drop_kv_quant=True, progress=False)
    from dartquant.adapters import adapter_for

    ref, _ = load_model(run)
    for t in (getattr(layer.attn, "dq_attention", None) for layer in adapter_for(ref).layers_of(ref)):
        t.k_quantizer = t.v_quantizer = None  # what --drop-kv-quant exports
    got, _ = load_model(tmp_path / "export")
    with torch.no_grad():
        r, g = ref(IDS).logits, got(IDS).logits
    assert ((g - r).abs().max() / r.abs().max()).item() < 1e-5


@pytest.mark.parametrize("kw,match", [
    (dict(method="spinquant"), "end to end"),
])
def test_runs_that_cannot_stream_are_refused_before_any_work(tmp_path, kw, match):
    folder = save_sharded(tmp_path / "model", "llama-tied-gqa")
    with pytest.raises(ValueError, match=match):
        run_quantize(RunConfig.from_flat(model=str(folder), stream="true", **kw), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_auto_streams_only_what_does_not_fit(tmp_path, monkeypatch):
    import dartquant.stream as stream
    from dartquant.pipeline import model_config

    folder = save_sharded(tmp_path / "model", "qwen2-bias-gqa")
    config = model_config(str(folder))
    need = fp32_bytes(config)
    n_params = sum(p.numel() for p in make_tiny_model("qwen2-bias-gqa").parameters())
    assert 0.95 * 4 * n_params <= need <= 4 * n_params  # the float32 size (q/k/v biases left out)
    cfg = RunConfig.from_flat(model=str(folder), method="quarot")
    monkeypatch.setattr(stream, "host_memory_bytes", lambda: 100 * need)
    assert not should_stream(cfg, config)
    monkeypatch.setattr(stream, "host_memory_bytes", lambda: 2 * need)
    assert should_stream(cfg, config)
    assert not should_stream(RunConfig.from_flat(model=str(folder), method="spinquant"), config)  # in memory, warned
    assert not should_stream(RunConfig.from_flat(model=str(folder), method="quarot", stream="false"), config)


def test_damaged_folders_fail_before_any_work(tmp_path):
    from dartquant.stream.source import StreamedModel

    folder = save_sharded(tmp_path / "model", "qwen2-bias-gqa")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="down_proj"):
        StreamedModel(folder)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        StreamedModel(folder)


def test_cli_stream_flag_and_eval_of_a_sharded_run(tmp_path, monkeypatch, capsys):
    """`dartquant quantize --stream true --shard-mb N`, then `dartquant eval RUN` on the shards."""
    from dartquant.cli import main

    folder = save_sharded(tmp_path / "model", "llama-tied-gqa")
    monkeypatch.setattr(stream_run, "MB", 3000)
    rc = main(["quantize", "--model", str(folder), "--method", "quarot", "--w-quantizer", "rtn", "--stream", "true",
               "--shard-mb", "1", "--calib-samples", "2", "--calib-seqlen", "24", "--eval-seqlen", "24",
               "--eval-max-windows", "2", "--guard-windows", "0", "--skip-fp-eval", "--out", str(tmp_path / "run"),
               "--json"])
    assert rc == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["stream"]["shards"] > 1 and set(metrics["seconds"]) >= {"load", "rotate", "quantize", "eval", "save"}
    assert metrics["stream"]["copies_overlapped"] is False  # a CPU run has no copies to overlap
    assert (tmp_path / "run" / INDEX_FILE).is_file()
    assert main(["eval", str(tmp_path / "run"), "--seqlen", "24", "--max-windows", "2", "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["ppl"] == metrics["ppl"]
    rc = main(["quantize", "--model", str(folder), "--method", "spinquant", "--stream", "true", "--out",
               str(tmp_path / "run2")])
    assert rc == 2 and "cannot stream" in capsys.readouterr().err and not (tmp_path / "run2").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the overlapped copies are a GPU path")
@pytest.mark.parametrize("batch", [1, 2])
def test_overlapped_block_pass_gives_the_same_bits(batch):
    """Copies overlapped through pinned staging buffers against synchronous copies: equal bits,
    with windows that reuse every staging buffer and a short last batch."""
    from dartquant.adapters import adapter_for
    from dartquant.layerwise import register_attention
    from dartquant.stream.passes import BlockRunner

    model = make_tiny_model("llama-tied-gqa").float().eval()
    model.set_attn_implementation(register_attention())
    adapter = adapter_for(model)
    block = adapter.decoder_layers(model)[0].to("cuda")
    states = torch.randn(7, 16, model.config.hidden_size)
    sync, overlapped = states.clone(), states.clone()
    BlockRunner(model, adapter, "cuda", overlap=False).run_(block, sync, batch=batch)
    runner = BlockRunner(model, adapter, "cuda")
    runner.run_(block, overlapped, batch=batch)
    assert runner.copies_overlapped  # the self-check ran and passed
    assert torch.equal(sync, overlapped) and not torch.equal(overlapped, states)
