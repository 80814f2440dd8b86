"""Architecture adapters: where a family keeps its linears and norms, as plain data.

Every transform (norm fusion, rotations, quantization, calibration capture) asks the adapter
for modules by role (q/k/v/o, gate/up/down, the two norms of a block, embedding, final norm,
lm_head) instead of testing `model_type` in every function. A family that is not listed here
is a clear error: silently treating an unknown model as Llama would give wrong results (other
norm placements, GeLU MLPs, LayerNorm with bias, ...) that look plausible.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


ATTN_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")
LINEAR_ROLES = ATTN_ROLES + MLP_ROLES


class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter."""


@dataclass(frozen=True)
class Geometry:
    """The shapes that rotations depend on, read from the model config."""

    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int

    @property
    def kv_groups(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class LayerModules:
    """The modules of one decoder block, by role."""

    attn: nn.Module
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    gate: nn.Module
    up: nn.Module
    down: nn.Module
    input_norm: nn.Module
    post_attn_norm: nn.Module

    def linears(self) -> dict[str, nn.Module]:
        """Role -> linear, in forward order."""
        return {role: getattr(self, role) for role in LINEAR_ROLES}


@dataclass(frozen=True)
class ModelAdapter:
    """Module paths of one family of pre-norm decoder-only transformers with RMSNorm and a gated MLP."""

    family: str
    model_types: tuple[str, ...]
    examples: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    rotary: str = "model.rotary_emb"
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"

    # ---- geometry -------------------------------------------------------------------------
    def geometry(self, config) -> Geometry:
        n_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        return Geometry(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            n_layers=config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            vocab=config.vocab_size,
        )

    # ---- module access --------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def embedding(self, model: nn.Module) -> nn.Embedding:
        return model.get_submodule(self.embed)

    def norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.final_norm)

    def head(self, model: nn.Module) -> nn.Linear:
        return model.get_submodule(self.lm_head)

    def layer(self, block: nn.Module) -> LayerModules:
        attn = block.get_submodule(self.attn)
        mlp = block.get_submodule(self.mlp)
        return LayerModules(
            attn=attn,
            q=attn.get_submodule(self.q), k=attn.get_submodule(self.k),
            v=attn.get_submodule(self.v), o=attn.get_submodule(self.o),
            gate=mlp.get_submodule(self.gate), up=mlp.get_submodule(self.up),
            down=mlp.get_submodule(self.down),
            input_norm=block.get_submodule(self.input_norm),
            post_attn_norm=block.get_submodule(self.post_attn_norm),
        )

    def layers_of(self, model: nn.Module) -> list[LayerModules]:
        return [self.layer(b) for b in self.decoder_layers(model)]

    def set_linear(self, block: nn.Module, role: str, module: nn.Module) -> None:
        """Replace the linear of `role` ("q", ..., "down") inside one decoder block."""
        if role not in LINEAR_ROLES:
            raise ValueError(f"unknown linear role {role!r}; roles are {LINEAR_ROLES}")
        parent = block.get_submodule(self.attn if role in ATTN_ROLES else self.mlp)
        setattr(parent, getattr(self, role), module)


# The supported families. Llama, Qwen2 and Mistral share module names; they differ in biases
# (Qwen2: q/k/v bias), tying (SmolLM2 and Llama-3.2-1B tie embeddings) and head geometry,
# which the transforms read from the modules and the config, not from the family.
ADAPTERS: tuple[ModelAdapter, ...] = (
    ModelAdapter("llama", ("llama",), "SmolLM2, Llama-2, Llama-3.x"),
    ModelAdapter("qwen2", ("qwen2",), "Qwen2, Qwen2.5, Qwen2.5-Coder"),
    ModelAdapter("mistral", ("mistral",), "Mistral-7B"),
)


def supported_families() -> str:
    return ", ".join(f"{a.family} ({a.examples}; model_type {'/'.join(a.model_types)})" for a in ADAPTERS)


def adapter_for(model_or_config) -> ModelAdapter:
    """The adapter for a model or config; UnsupportedModelError names the supported families."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedModelError(
        f"unsupported architecture model_type={model_type!r}. Supported families: {supported_families()}. "
        "Other architectures need an adapter in dartquant/adapters.py (their norms and MLP differ)."
    )
