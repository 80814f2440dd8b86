"""Layer streaming: the whole job (FP evaluation, calibration, rotation, quantization, evaluation,
the quality guard, the checkpoint) without ever materializing the model.

A model is a Hugging Face skeleton on the "meta" device plus its safetensors (source.py);
blocks are read, folded, quantized, evaluated and written one at a time (run.py, passes.py,
shards.py). Who streams (`RunConfig.stream`):
  "true"   always; refused before any work where a run cannot stream (below);
  "false"  never (the in-memory pipeline);
  "auto"   (default) when the model would not fit comfortably: its float32 size above a third of
           the host's memory (the in-memory pipeline holds the float32 model plus a copy's worth
           of transients), and the run can stream; otherwise in memory, so small models keep the
           in-memory path and its byte-identical results.
What cannot stream: methods that train end to end through the whole network (spinquant,
ostquant: backpropagation over every block at once), logit soft-capping heads. Zero-shot tasks
stream by recording lm-eval's batches and replaying them (zeroshot.py). Mixtures of experts stream (source.py reads one tensor per
expert; GPTQ per expert with its routed tokens is quant/weights.gptq_block_, as in memory).
"""

from __future__ import annotations

import os

from ..log import log

STREAMABLE_METHODS = ("rtn", "quarot", "dartquant")  # layer-wise: a block needs only its own inputs
STREAM_MODES = ("auto", "true", "false")


def stream_refusal(cfg, config) -> str | None:
    """Why this run cannot stream, or None."""
    if cfg.rotations is None and cfg.method not in STREAMABLE_METHODS:
        return (f"method {cfg.method} trains its rotations end to end through the whole network "
                f"(backpropagation over every block at once), which is not layer-wise; streaming runs "
                f"{', '.join(STREAMABLE_METHODS)} (or any method's saved rotations via --rotations)")
    if cfg.rotations is not None:
        from ..transforms import RotationSet

        if RotationSet.load(cfg.rotations).blocks:
            return "the rotations carry DuQuant's online block transforms, which streaming does not install yet"
    if getattr(config, "final_logit_softcapping", None):
        return "the model soft-caps its logits (Gemma): the streamed head does not"
    return None


def fp32_bytes(config) -> int:
    """The float32 size of the model a config describes (embedding, untied head, blocks)."""
    from ..adapters import adapter_for

    adapter = adapter_for(config)
    g = adapter.geometry(config)
    attn = g.hidden * g.head_dim * (2 * g.n_heads + 2 * g.n_kv_heads)
    mlp = 3 * g.hidden * g.intermediate
    if adapter.moe is not None:  # every block a MoE block (an upper bound where some are dense): experts,
        n_exp = getattr(config, adapter.moe.n_experts)  # the router, a shared expert and its gate
        mlp = g.hidden * (3 * n_exp * getattr(config, adapter.moe.expert_intermediate) + n_exp)
        if adapter.moe.shared is not None:
            mlp += g.hidden * (3 * config.shared_expert_intermediate_size + 1)
    block = attn + mlp + 2 * g.hidden
    outer = g.vocab * g.hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return 4 * (g.n_layers * block + outer + g.hidden)


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def should_stream(cfg, config) -> bool:
    """The decision for this run (module docstring); raises ValueError for stream: true that cannot."""
    mode = cfg.stream
    if mode == "false":
        return False
    why = stream_refusal(cfg, config)
    if mode == "true":
        if why:
            raise ValueError(f"--stream true: this run cannot stream: {why}. Use --stream false (or auto).")
        return True
    need, have = fp32_bytes(config), host_memory_bytes()
    if need <= have / 3:
        return False
    if why:
        log.warning("the model is %.1f GB in float32 (host memory %.1f GB) but cannot stream (%s): running in "
                    "memory", need / 1e9, have / 1e9, why)
        return False
    log.info("streaming: the model is %.1f GB in float32, more than a third of the host's %.1f GB", need / 1e9,
             have / 1e9)
    return True
