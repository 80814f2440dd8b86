"""Shared fixtures: tiny random models of every supported family, in float64.

Sizes are deliberately odd (non-powers of two that still have a Hadamard construction:
hidden 48 = 12*4, 40 = 20*2; MLP 80 = 20*4, 56 = 28*2; head_dim 12, 8), with GQA, QKV bias
(Qwen2) and tied embeddings (Llama, like SmolLM2), so that transpose or grouping mistakes
cannot hide behind symmetric matrices or equal head counts.

Beyond Llama: Qwen3 (QK-norm, with q/k/v bias), three mixtures of experts (Mixtral; Qwen2-MoE
with a shared expert, unnormalized top-k and one dense layer; Qwen3-MoE with experts narrower
than the dense MLP) and Gemma 3 (1 + w norms, sandwich norms, GeGLU, a sliding window of 8 <
the test sequences, so local and global layers really differ).
"""

from __future__ import annotations

import torch


TINY_CONFIGS = {
    "llama-tied-gqa": dict(model_type="llama", hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=12, vocab_size=101,
                           tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=64),
    "qwen2-bias-gqa": dict(model_type="qwen2", hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                           num_attention_heads=5, num_key_value_heads=1, vocab_size=97,
                           tie_word_embeddings=False, rms_norm_eps=1e-6, max_position_embeddings=64),
    "mistral-mha": dict(model_type="mistral", hidden_size=48, intermediate_size=56, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, head_dim=12, vocab_size=89,
                        tie_word_embeddings=False, rms_norm_eps=1e-5, max_position_embeddings=64),
    "qwen3-qknorm-bias": dict(model_type="qwen3", hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=12, vocab_size=97,
                              attention_bias=True, tie_word_embeddings=False, rms_norm_eps=1e-6,
                              max_position_embeddings=64),
    "mixtral-moe": dict(model_type="mixtral", hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                        num_attention_heads=5, num_key_value_heads=1, head_dim=8, vocab_size=89,
                        num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
                        rms_norm_eps=1e-5, max_position_embeddings=64),
    "qwen2moe-shared": dict(model_type="qwen2_moe", hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=89, qkv_bias=True,
                            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40,
                            shared_expert_intermediate_size=56, norm_topk_prob=False, decoder_sparse_step=1,
                            mlp_only_layers=[1], tie_word_embeddings=False, rms_norm_eps=1e-6,
                            max_position_embeddings=64),
    "qwen3moe-narrow": dict(model_type="qwen3_moe", hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=12, vocab_size=97,
                            num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True,
                            decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
                            rms_norm_eps=1e-6, max_position_embeddings=64),
    "gemma3-sandwich": dict(model_type="gemma3_text", hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=12, vocab_size=97,
                            sliding_window=8, layer_types=["sliding_attention", "sliding_attention",
                                                           "full_attention"],
                            query_pre_attn_scalar=12, tie_word_embeddings=True, rms_norm_eps=1e-6,
                            max_position_embeddings=64),
}


def supported_part(rotations, adapter):
    """`rotations` without the transforms the family refuses (adapters.ModelAdapter.refuses): the
    invariance tests run every exact transform of every family; refusals are tested on their own."""
    import dataclasses

    keep = {k: v for k, v in rotations.scales.items() if not adapter.refusal(k)}
    return dataclasses.replace(rotations, r1=None if adapter.refusal("R1") else rotations.r1,
                               r2=None if adapter.refusal("R2") else rotations.r2, scales=keep)


def make_tiny_model(name: str, seed: int = 0, dtype=torch.float64):
    """A random model whose norms have non-trivial gains and whose biases are non-zero."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_CONFIGS[name])
    config = AutoConfig.for_model(**cfg)
    torch.manual_seed(seed)
    # transformers' default MoE kernel (grouped_mm) has no float64; the eager loop is the reference
    extra = {"experts_implementation": "eager"} if "experts" in str(sorted(cfg)) else {}
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or "layernorm" in n:
                p.copy_(1 + 0.5 * torch.randn_like(p))  # gains far from 1: fusion must matter
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    if cfg.get("tie_word_embeddings"):
        model.tie_weights()
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a|."""
    return ((a - b).abs().max() / a.abs().max()).item()


def make_char_tokenizer(vocab_size: int = 89):
    """A character-level tokenizer (offline, no files): id 0 = <unk>, then printable ASCII."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 32 + vocab_size - 1)]
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>")


def save_tiny_folder(path, name: str = "llama-tied-gqa", seed: int = 0):
    """A tiny float32 model + tokenizer saved as a Hugging Face folder (a model spec for the CLI)."""
    model = make_tiny_model(name, seed=seed, dtype=torch.float32)
    model.save_pretrained(str(path))
    make_char_tokenizer(min(c["vocab_size"] for c in TINY_CONFIGS.values())).save_pretrained(str(path))
    return path


def module_inputs(model, ids) -> dict:
    """{(layer, role): all inputs of q_proj / up_proj / o_proj}, by forward hooks on the full model."""
    from dartquant.adapters import adapter_for

    seen, hooks = {}, []
    for i, layer in enumerate(adapter_for(model).layers_of(model)):
        for role in ("q", "up", "o"):
            def hook(mod, args, i=i, role=role):
                seen.setdefault((i, role), []).append(args[0].reshape(-1, args[0].shape[-1]).clone())
            hooks.append(getattr(layer, role).register_forward_pre_hook(hook))
    with torch.no_grad():
        for j in range(ids.shape[0]):
            model(ids[j: j + 1])
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def save_kernel_llama_folder(path, intermediate: int = 192):
    """The kernel tests' Llama folder: hidden 64, MLP `intermediate` (192 = 12 * 16, a Hadamard size
    the activation kernel fuses), 4 query / 2 KV heads of 16, 2 layers, untied, char tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=89, max_position_embeddings=128,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    make_char_tokenizer(89).save_pretrained(str(path))
    return path


def quantized_kernel_run(base, save_model):
    """A tiny QuaRot / RTN W4A4KV4 run folder under `base` of the model `save_model(folder)` writes."""
    from dartquant.config import RunConfig
    from dartquant.pipeline import run_quantize

    model = save_model(base / "model")
    cfg = RunConfig.from_flat(model=str(model), method="quarot", w_quantizer="rtn", calib_samples=2, calib_seqlen=16,
                              eval_seqlen=16, eval_max_windows=1, guard_windows=0)
    run_quantize(cfg, base / "run", progress=False, eval_fp=False)
    return base / "run"


def save_kernel_qwen3_folder(path):
    """A Qwen3 twin of the kernel Llama (per-head QK-norm before RoPE; no biases, as Qwen3 has): hidden 64, MLP
    192, 4 query / 2 KV heads of 16, 2 layers."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=89, max_position_embeddings=128,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # QK-norm gains away from 1, so applying them or not shows
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(str(path))
    make_char_tokenizer(89).save_pretrained(str(path))
    return path


def outlier_activations(rows: int, n: int, seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    """Random activations [rows, n] with two outlier channels (x25), as real ones have: the kernels' tests."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g)
    x[:, torch.randint(0, n, (2,), generator=g)] *= 25  # outlier channels, as real activations have
    return x.to(dtype)
