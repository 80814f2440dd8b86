"""`qk_balance`: a diagonal Q/K scaling from calibration statistics (calib/qk_balance.py) that gives q and
k the same energy per RoPE channel pair, folded into q_proj / k_proj, so the 4-bit K cache loses less."""

from __future__ import annotations

import pytest
import torch

from dartquant.adapters import UnsupportedTransformError, adapter_for
from dartquant.calib.qk_balance import ALPHAS, balance_scales, k_error_factor, qk_balance, qk_statistics
from dartquant.config import RunConfig
from dartquant.pipeline import run_quantize
from dartquant.quant.act import install_quantizers_
from dartquant.transforms.placements import expand_rope_pairs
from dartquant.transforms import RotationSet, fuse_norms_, rotate_, untie_embeddings_
from tiny import make_tiny_model, rel_err, save_tiny_folder


def _ids(vocab: int, n: int = 4, seqlen: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _prepared(model):
    """As the pipeline leaves a model before any transform: embeddings untied, norms fused."""
    untie_embeddings_(model)
    fuse_norms_(model)
    return model


def _balanced(model, ids, **kw):
    scales, meta = qk_balance(model, ids, **kw)
    rotate_(model, RotationSet(scales={"qk": scales}), adapter_for(model))
    return meta


@pytest.mark.parametrize("family", ["llama-tied-gqa", "qwen2-bias-gqa", "mistral-mha", "mixtral-moe"])
def test_balance_preserves_the_function_in_float64(family):
    model = _prepared(make_tiny_model(family))
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        before = model(ids).logits
        meta = _balanced(model, ids)
        after = model(ids).logits
    assert rel_err(after, before) < 1e-12
    assert 0 < meta["qk_balance_k_error_factor"] <= 1


@pytest.mark.parametrize("family", ["llama-tied-gqa", "qwen2-bias-gqa"])
def test_balance_gives_q_and_k_the_same_pair_profile(family):
    """After the fold, k's pair RMS over q's is one constant per head (the geometric-mean normalisation),
    so measuring again asks for no further scaling, and the expected K error factor becomes 1."""
    model = _prepared(make_tiny_model(family))
    ids = _ids(model.config.vocab_size)
    st = qk_statistics(model, ids)
    q0, k0 = st.q_rms, st.k_rms
    assert (k_error_factor(q0, k0) < 0.99).all()  # random weights are unbalanced
    _balanced(model, ids)
    st = qk_statistics(model, ids)
    q1, k1 = st.q_rms, st.k_rms
    ratio = k1 / q1
    assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-6)  # s is stored in float32
    assert torch.allclose(k_error_factor(q1, k1), torch.ones_like(k_error_factor(q1, k1)), rtol=1e-6)
    assert torch.allclose(balance_scales(q1, k1).double(), torch.ones(1, dtype=torch.float64), rtol=1e-6)


def test_balance_undoes_an_imbalance_the_k_cache_pays_for():
    """A function-preserving imbalance (k's first RoPE pairs x30, q's /30) makes the 4-bit K cache round the
    other pairs away; the balance computed from the data removes most of that error."""
    ref = _prepared(make_tiny_model("llama-tied-gqa"))
    ids = _ids(ref.config.vocab_size, n=6, seqlen=32, seed=1)
    with torch.no_grad():
        fp = ref(ids).logits
    g = adapter_for(ref).geometry(ref.config)
    t = torch.ones(g.n_kv_heads, g.head_dim // 2, dtype=torch.float64)
    t[:, :2] = 30.0
    skew = RotationSet(scales={"qk": 1 / expand_rope_pairs(t.reshape(1, -1), g.n_kv_heads, g.head_dim)
                               .expand(g.n_layers, -1).contiguous()})

    def kv4_error(balance: bool) -> float:
        m = _prepared(make_tiny_model("llama-tied-gqa"))
        rotate_(m, skew, adapter_for(m))  # q x (1/t), k x t: the same function
        if balance:  # each layer's strength scored against the K quantizer the model gets
            meta = _balanced(m, ids, kv_spec=RunConfig.from_flat().scheme.kv_spec(g.head_dim), r3=False)
            assert max(meta["qk_balance_alpha"]) > 0 and meta["qk_balance_attention_error_ratio"] < 0.5
        install_quantizers_(m, RunConfig.from_flat(a_bits=16, kv_bits=4).scheme)
        with torch.no_grad():
            return rel_err(m(ids).logits, fp)

    skewed, balanced = kv4_error(False), kv4_error(True)
    assert balanced < 0.5 * skewed


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("tiny") / "model")


def _cfg(folder, **kw) -> RunConfig:
    base = dict(model=str(folder), w_quantizer="rtn", calib_samples=2, calib_seqlen=32, eval_seqlen=32,
                eval_max_windows=1, guard_windows=0, qk_balance=True)
    base.update(kw)
    return RunConfig.from_flat(**base)


def test_run_folds_it_records_it_and_reloads_to_the_same_numbers(tiny_folder, tmp_path):
    from safetensors import safe_open

    from dartquant.eval.ppl import evaluate_ppl
    from dartquant.zoo import load_model

    out = tmp_path / "run"
    m = run_quantize(_cfg(tiny_folder), out, progress=False, eval_fp=False)
    assert 0 < m["calibration"]["qk_balance_k_error_factor"] <= 1
    assert "qk_balance: true" in (out / "config.yaml").read_text()
    with safe_open(str(out / "rotations.safetensors"), "pt") as f:
        assert "S.qk" in f.keys()
    model, tok = load_model(out)
    assert evaluate_ppl(model, tok, seqlen=32, max_windows=1, progress=False)["wiki"] == m["ppl"]["wiki"]
    # its rotations file carries the scaling: reusing it with qk_balance again is refused before any work
    with pytest.raises(ValueError, match="carries a Q/K scaling already"):
        run_quantize(_cfg(tiny_folder, rotations=str(out / "rotations.safetensors")), tmp_path / "again",
                     progress=False)
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("kw,match", [
    (dict(kv_bits=16), "not quantized"),
    (dict(method="rtn"), "has none"),
    (dict(method="ostquant"), "trains its own Q/K scaling"),
])
def test_settings_it_cannot_serve_are_refused_before_any_work(tiny_folder, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        run_quantize(_cfg(tiny_folder, **kw), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_qk_norm_families_are_refused(tmp_path):
    folder = save_tiny_folder(tmp_path / "m", "qwen3-qknorm-bias")
    with pytest.raises(UnsupportedTransformError, match="QK-norm"):
        run_quantize(_cfg(folder), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("family,sink", [("qwen2-bias-gqa", 0), ("llama-tied-gqa", 0), ("qwen2-bias-gqa", 1)])
def test_strength_score_is_the_models_own_k_cache_error(family, sink):
    """At strength 0 the score is exactly what the model's 4-bit K cache (R3's Hadamard, K's bias kept out,
    the sink's K unquantized) changes in layer 0's attention output: what the alternatives are compared against."""
    model = _prepared(make_tiny_model(family))
    rotate_(model, RotationSet(r3=True), adapter_for(model))
    scheme = RunConfig.from_flat(a_bits=16, kv_bits=4, kv_sink_tokens=sink).scheme
    install_quantizers_(model, scheme)
    layer0 = adapter_for(model).layers_of(model)[0]
    ids = _ids(model.config.vocab_size, n=2, seqlen=20, seed=4)
    seen = []
    hook = layer0.o.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    transform = layer0.attn.dq_attention
    transform.v_quantizer = None  # the K cache's error alone
    with torch.no_grad():
        model(ids)
        kq, transform.k_quantizer = transform.k_quantizer, None
        model(ids)
        transform.k_quantizer = kq
    hook.remove()
    err_model = float(((seen[0] - seen[1]) ** 2).sum())
    st = qk_statistics(model, ids, kv_spec=scheme.kv_spec(transform.head_dim), r3=True, sink_tokens=sink)
    assert err_model > 0
    assert abs(float(st.errors[0, 0]) - err_model) <= 1e-9 * err_model
    assert st.errors.shape == (model.config.num_hidden_layers, len(ALPHAS))
    assert float(st.alpha[0]) == ALPHAS[int(st.errors[0].argmin())]
