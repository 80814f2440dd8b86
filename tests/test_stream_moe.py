"""Layer streaming of mixtures of experts: a streamed run computes the same tensors as an in-memory one.

Tiny random Mixtral (files in the legacy per-expert layout `block_sparse_moe.experts.<e>.w1/w2/w3`,
which transformers 5 fuses on load and the streamed reader maps one to one) and Qwen2-MoE (a
shared expert with its sigmoid gate; one dense layer), saved as sharded safetensors and quantized
twice, `stream: false` and `stream: true`: perplexities, every stored tensor, the rotations, the
list of experts GPTQ had no token for, and the reloaded logits must be equal (the FP perplexity to
float32 rounding: see the test).

The Mixtral has an expert no token can reach: router rows (w, -w, u, -u, 0) give logits
(a, -a, b, -b, 0), whose top 2 are |a| and |b| >= 0, so expert 4 never wins (the fold keeps the
rows exact negatives: rounding is sign-symmetric). Both paths must report it and fall back to RTN.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dartquant.quant.checkpoint import read_quantized_state
from dartquant.zoo import load_model
from test_stream import IDS, run_both, tokenize_once  # noqa: F401  (tokenize_once: an autouse fixture)
from tiny import TINY_CONFIGS, make_char_tokenizer


def make_moe(name: str, **overrides) -> torch.nn.Module:
    """A tiny random MoE as tiny.make_tiny_model builds it (float32: the files a user would have)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**{**TINY_CONFIGS[name], **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, experts_implementation="eager").eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def mixtral_with_an_unreachable_expert() -> torch.nn.Module:
    model = make_moe("mixtral-moe", num_local_experts=5)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.gate.weight  # [5, hidden]
            w[1], w[3], w[4] = -w[0], -w[2], 0.0
    return model


def save(model, path: Path) -> Path:
    model.save_pretrained(str(path), max_shard_size="20KB")
    make_char_tokenizer(min(c["vocab_size"] for c in TINY_CONFIGS.values())).save_pretrained(str(path))
    return path


CASES = {
    "mixtral-quarot-gptq": (mixtral_with_an_unreachable_expert, dict(method="quarot", w_quantizer="gptq")),
    "qwen2moe-dartquant-gptq": (lambda: make_moe("qwen2moe-shared"),
                                dict(method="dartquant", w_quantizer="gptq", dq_epochs=1)),
    "qwen3moe-rtn": (lambda: make_moe("qwen3moe-narrow"), dict(method="rtn")),  # unrotated: no exact norms
    # true-sequential GPTQ: 4 forwards per block; the routed tokens are those of the experts' last one
    "mixtral-quarot-gptq-true-sequential": (mixtral_with_an_unreachable_expert,
                                            dict(method="quarot", w_quantizer="gptq", gptq_true_sequential=True)),
}


@pytest.mark.parametrize("case", CASES)
def test_streamed_moe_run_equals_in_memory_run(case, tmp_path, monkeypatch, one_thread):
    build, kw = CASES[case]
    folder = save(build(), tmp_path / "model")
    if case.startswith("mixtral"):  # the files hold one tensor per expert, under Mixtral's own names
        assert (folder / "model.safetensors.index.json").read_text().count("block_sparse_moe.experts.4.w2") == 2
    runs = run_both(tmp_path, folder, monkeypatch, **kw)
    (mem, m_mem), (st, m_st) = runs["false"], runs["true"]
    assert "stream" in m_st and "stream" not in m_mem, "the two runs took the same path"
    assert m_st["ppl"] == m_mem["ppl"]
    # The FP perplexity: in memory it is transformers' own forward (gate and up of an expert in one
    # fused [2I, H] matmul), streamed it is the split experts' (two [I, H] matmuls): float32 rounding
    # differs (~1e-7 relative); everything from the rotations on is computed by the split experts
    # in both paths and must be bitwise equal.
    for corpus, fp in m_mem["fp"]["ppl"].items():
        assert m_st["fp"]["ppl"][corpus] == pytest.approx(fp, rel=1e-5), corpus
    assert m_st["ppl"]["wiki"] != m_st["fp"]["ppl"]["wiki"], "quantization changed nothing?"
    a, b = read_quantized_state(mem)[1], read_quantized_state(st)[1]
    assert sorted(a) == sorted(b)
    assert sum(".experts." in k and k.endswith(".codes") for k in a) >= 3 * 4  # every expert linear quantized
    differ = [k for k in a if not (a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))]
    assert not differ, f"tensors differ: {differ[:5]}"
    ma, _ = load_model(mem)
    mb, _ = load_model(st)
    with torch.no_grad():
        assert torch.equal(ma(IDS).logits, mb(IDS).logits)
    assert m_st.get("gptq_rtn_fallbacks") == m_mem.get("gptq_rtn_fallbacks")
    if kw["method"] == "rtn":
        assert "moe_routed_tokens" not in m_st  # no calibration forward
        return
    assert (mem / "rotations.safetensors").read_bytes() == (st / "rotations.safetensors").read_bytes()
    routed = m_st["moe_routed_tokens"]  # tokens per expert in GPTQ's calibration forward, per MoE layer
    assert [sum(layer) for layer in routed["per_moe_layer"]] == [2 * routed["calib_tokens"]] * (
        2 if case.startswith("mixtral") else 1)  # top-2: every token twice; Qwen2-MoE's layer 1 is dense
    if case.startswith("mixtral"):  # expert 4 of each layer: never routed, RTN, reported
        assert sorted(m_st["gptq_rtn_fallbacks"]) == [f"model.layers.{i}.mlp.experts.4.{r}_proj"
                                                      for i in range(2) for r in ("down", "gate", "up")]
        assert [layer[4] for layer in routed["per_moe_layer"]] == [0, 0] and routed["min"] == 0
    else:
        assert "gptq_rtn_fallbacks" not in m_st and routed["min"] > 0


def test_moe_size_for_the_auto_decision_counts_every_expert():
    """stream: auto compares the float32 size with the host's memory: every expert counts."""
    from transformers import AutoConfig

    from dartquant.stream import fp32_bytes

    for name, extra in (("mixtral-moe", {}), ("qwen3moe-narrow", {}), ("qwen2moe-shared", {"mlp_only_layers": []})):
        model = make_moe(name, **extra)
        n_params = sum(p.numel() for p in model.parameters())
        need = fp32_bytes(AutoConfig.for_model(**{**TINY_CONFIGS[name], **extra}))
        assert 0.95 * 4 * n_params <= need <= 4 * n_params, name  # (biases left out)


def test_a_missing_expert_fails_before_any_work(tmp_path):
    import json

    from dartquant.stream.source import StreamedModel
    from dartquant.zoo import ModelLoadError

    folder = save(make_moe("mixtral-moe"), tmp_path / "model")
    StreamedModel(folder)  # complete: reads
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.experts\.2\.up_proj"):
        StreamedModel(folder)
