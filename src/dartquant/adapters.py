"""Architecture adapters: where a family keeps its linears and norms, as plain data.

Every transform (norm fusion, rotations, quantization, calibration capture) asks the adapter
for modules by role (q/k/v/o, gate/up/down, the two norms of a block, embedding, final norm,
lm_head) instead of testing `model_type` in every function. A family that is not listed here
is a clear error: silently treating an unknown model as Llama would give wrong results (other
norm placements, GeLU MLPs, LayerNorm with bias, ...) that look plausible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


ATTN_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")
LINEAR_ROLES = ATTN_ROLES + MLP_ROLES
# Stream readers of a mixture-of-experts block that are not quantized (a few hundred rows each;
# routing decisions are sensitive): the router and Qwen2-MoE's shared-expert gate.
ROUTER_ROLES = ("router", "shared_gate")


def role_of(key: str) -> str:
    """The role of a LayerModules.linears() key: "experts.3.down" -> "down", "q" -> "q"."""
    return key.rsplit(".", 1)[-1]


class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter."""


class UnsupportedTransformError(ValueError):
    """A transform that this architecture cannot carry exactly (see ModelAdapter.refuses)."""


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
    # mixtures of experts: the widths of the experts' (and shared expert's) MLPs, which their
    # down_projs read; group sizes and R4's Hadamard must fit every one of them
    moe_widths: tuple[int, ...] = ()

    @property
    def mlp_widths(self) -> tuple[int, ...]:
        """Every width a down_proj reads (config.intermediate_size counted even where every layer
        is sparse: it refuses at most a group size that would only fail on unused dense layers)."""
        return tuple(sorted({self.intermediate, *self.moe_widths}))

    @property
    def kv_groups(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class LayerModules:
    """The modules of one decoder block, by role.

    A dense block has one gate/up/down. A mixture-of-experts block has none of its own: its
    gated MLPs are `experts` (routed) and `shared` (Qwen2-MoE's always-on expert), and two
    modules read the stream without being quantized: `router` and `shared_gate`. `modules(role)`
    lists every module of a role either way, which is what folding iterates over.
    """

    attn: nn.Module
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    gate: nn.Module | None
    up: nn.Module | None
    down: nn.Module | None
    input_norm: nn.Module
    post_attn_norm: nn.Module  # the norm that feeds the MLP (Gemma's pre_feedforward_layernorm)
    mlp: nn.Module | None = None
    experts: tuple[dict, ...] = ()  # MoE: {"gate", "up", "down"} per routed expert
    shared: dict | None = None  # MoE: the shared expert's {"gate", "up", "down"}
    router: nn.Module | None = None
    shared_gate: nn.Module | None = None
    q_norm: nn.Module | None = None  # QK-norm (Qwen3, Gemma 3): per-head RMSNorm before RoPE
    k_norm: nn.Module | None = None
    branch_norms: tuple[nn.Module, ...] = ()  # Gemma 3's sandwich norms on the branch outputs

    @property
    def is_moe(self) -> bool:
        return bool(self.experts)

    def keyed(self, role: str) -> list[tuple[str, nn.Module]]:
        """(key, module) of every module of `role`; the key names it for set_linear."""
        if role in ATTN_ROLES or role in ("input_norm", "post_attn_norm"):
            return [(role, getattr(self, role))]
        if role in ROUTER_ROLES:
            m = getattr(self, role)
            return [] if m is None else [(role, m)]
        if role not in MLP_ROLES:
            raise ValueError(f"unknown role {role!r}")
        if not self.is_moe:
            return [(role, getattr(self, role))]
        out = [(f"experts.{e}.{role}", ex[role]) for e, ex in enumerate(self.experts)]
        if self.shared is not None:
            out.append((f"shared.{role}", self.shared[role]))
        return out

    def modules(self, role: str) -> list[nn.Module]:
        return [m for _, m in self.keyed(role)]

    def linears(self) -> dict[str, nn.Module]:
        """Key -> quantized linear, in forward order (keys: a role, or "experts.<e>.<role>", "shared.<role>")."""
        return {key: m for role in LINEAR_ROLES for key, m in self.keyed(role)}


@dataclass(frozen=True)
class MoELayout:
    """Where a mixture-of-experts block keeps its parts (transformers 5.x: experts are fused 3-D
    parameters `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I], which `transforms.fuse`
    splits into one gated MLP of nn.Linear per expert, so that every per-linear tool works)."""

    router: str = "gate"  # a module with .weight [E, hidden], top_k and softmax routing
    experts: str = "experts"
    n_experts: str = "num_experts"  # config attribute
    expert_intermediate: str = "moe_intermediate_size"  # config attribute
    shared: str | None = None  # shared-expert MLP (Qwen2-MoE)
    shared_gate: str | None = None  # Linear(hidden, 1): sigmoid gate of the shared expert
    scores_in_logit_dtype: bool = True  # routing weights cast back to the logits' dtype (Qwen) or kept fp32 (Mixtral)


@dataclass(frozen=True)
class ModelAdapter:
    """Module paths of one family of pre-norm decoder-only transformers with RMSNorm and a gated MLP."""

    family: str
    model_types: tuple[str, ...]
    examples: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
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
    rotary: str = "model.rotary_emb"  # the shared rotary embedding (position embeddings of every block)
    qk_norms: tuple[str, str] | None = None  # (q_norm, k_norm) inside attention: per-head RMSNorm before RoPE
    branch_norms: tuple[str, ...] = ()  # norms between a branch and the residual add (Gemma's sandwich)
    norm_offset: float = 0.0  # RMSNorm gain is (offset + weight): Gemma stores w with gain 1 + w
    norm_scale_in_float32: bool = False  # Gemma multiplies by the gain before casting back (Llama after)
    rotary_per_layer_type: bool = False  # the rotary module takes the layer type (Gemma 3: local / global RoPE)
    moe: MoELayout | None = None
    # transform name -> why this family cannot carry it exactly; rotate_ refuses such a set whole.
    refuses: tuple[tuple[str, str], ...] = ()

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
            moe_widths=self._moe_widths(config),
        )

    def _moe_widths(self, config) -> tuple[int, ...]:
        if self.moe is None:
            return ()
        widths = [getattr(config, self.moe.expert_intermediate)]
        if self.moe.shared is not None:
            widths.append(getattr(config, "shared_expert_intermediate_size"))
        return tuple(w for w in widths if w)

    def refusal(self, name: str) -> str | None:
        """Why transform `name` is not exact on this family, or None if it is."""
        return dict(self.refuses).get(name)

    # ---- module access --------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def embedding(self, model: nn.Module) -> nn.Embedding:
        return model.get_submodule(self.embed)

    def norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.final_norm)

    def head(self, model: nn.Module) -> nn.Linear:
        return model.get_submodule(self.lm_head)

    def is_moe_block(self, block: nn.Module) -> bool:
        return self.moe is not None and hasattr(block.get_submodule(self.mlp), self.moe.router)

    def layer(self, block: nn.Module) -> LayerModules:
        attn = block.get_submodule(self.attn)
        mlp = block.get_submodule(self.mlp)
        qk = {}
        if self.qk_norms is not None:
            qk = dict(q_norm=attn.get_submodule(self.qk_norms[0]), k_norm=attn.get_submodule(self.qk_norms[1]))
        common = dict(
            attn=attn, mlp=mlp,
            q=attn.get_submodule(self.q), k=attn.get_submodule(self.k),
            v=attn.get_submodule(self.v), o=attn.get_submodule(self.o),
            input_norm=block.get_submodule(self.input_norm),
            post_attn_norm=block.get_submodule(self.post_attn_norm),
            branch_norms=tuple(block.get_submodule(n) for n in self.branch_norms), **qk)
        if not self.is_moe_block(block):
            return LayerModules(gate=mlp.get_submodule(self.gate), up=mlp.get_submodule(self.up),
                                down=mlp.get_submodule(self.down), **common)
        lay = self.moe
        experts = mlp.get_submodule(lay.experts)
        if not isinstance(experts, nn.ModuleList):
            raise TypeError(f"{type(experts).__name__}: fused experts; split them first "
                            "(transforms.fuse.split_experts_, which fuse_norms_ calls)")
        shared = None
        if lay.shared is not None:
            s = mlp.get_submodule(lay.shared)
            shared = {r: s.get_submodule(getattr(self, r)) for r in MLP_ROLES}
        return LayerModules(
            gate=None, up=None, down=None,
            experts=tuple({r: ex.get_submodule(getattr(self, r)) for r in MLP_ROLES} for ex in experts),
            shared=shared, router=mlp.get_submodule(lay.router),
            shared_gate=mlp.get_submodule(lay.shared_gate) if lay.shared_gate else None, **common)

    def attention_kind(self, block: nn.Module) -> tuple[str | None, int | None]:
        """(rotary layer type or None, sliding window or None) of one decoder block."""
        attn = block.get_submodule(self.attn)
        layer_type = getattr(attn, "layer_type", None) if self.rotary_per_layer_type else None
        return layer_type, getattr(attn, "sliding_window", None)

    def layers_of(self, model: nn.Module) -> list[LayerModules]:
        return [self.layer(b) for b in self.decoder_layers(model)]

    def rotary_embedding(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.rotary)

    def rebuild_rotary_(self, model: nn.Module) -> None:
        """Re-create the non-persistent buffers a load on the meta device leaves empty: the rotary
        embedding's inv_freq (from the config) and, for scaled embeddings (Gemma: sqrt(hidden)),
        the embedding scale."""
        parent, _, name = self.rotary.rpartition(".")
        old = self.rotary_embedding(model)
        setattr(model.get_submodule(parent) if parent else model, name, type(old)(config=model.config))
        embed = self.embedding(model)
        if hasattr(embed, "scalar_embed_scale") and getattr(embed, "embed_scale", None) is not None:
            embed.embed_scale = torch.tensor(embed.scalar_embed_scale, device=embed.weight.device)

    def set_linear(self, block: nn.Module, key: str, module: nn.Module) -> None:
        """Replace the linear named `key` (a role "q" ... "down", or a MoE key "experts.<e>.<role>",
        "shared.<role>" as in LayerModules.linears) inside one decoder block."""
        *where, role = key.split(".")
        if role not in LINEAR_ROLES or (where and (self.moe is None or where[0] not in ("experts", "shared"))):
            raise ValueError(f"unknown linear {key!r}; roles are {LINEAR_ROLES} (MoE: experts.<e>.<role>, shared.<role>)")
        if role in ATTN_ROLES:
            parent = block.get_submodule(self.attn)
        elif not where:
            parent = block.get_submodule(self.mlp)
        elif where[0] == "experts":
            parent = block.get_submodule(f"{self.mlp}.{self.moe.experts}")[int(where[1])]
        else:
            parent = block.get_submodule(f"{self.mlp}.{self.moe.shared}")
        setattr(parent, getattr(self, role), module)


_QK_NORM_QK = ("qk", "the per-head QK-norm normalizes q and k after their projections, so a per-channel "
                      "Q/K scaling folded into q_proj / k_proj would be undone by it (not exact)")
_MOE_UP = ("up", "one up_proj scaling per layer cannot serve experts of their own (not supported for MoE)")
_GEMMA_R1 = ("R1", "Gemma 3's sandwich norms (post_attention_layernorm, post_feedforward_layernorm) "
                   "multiply the branch output by their gains after normalizing it and before the residual "
                   "add, so the residual stream cannot carry a global rotation exactly (R1 x would need "
                   "diag(g) R1 = R1 diag(g)); use R2 / R3 / R4 with Hadamards on the branch inputs applied online instead: --method quarot --r1 false --r1-online true (or --r1 false alone, or a set without R1)")

# The supported families. Llama, Qwen2 and Mistral share module names; they differ in biases
# (Qwen2: q/k/v bias), tying (SmolLM2 and Llama-3.2-1B tie embeddings) and head geometry,
# which the transforms read from the modules and the config, not from the family.
# Qwen3 adds QK-norm; Mixtral / Qwen2-MoE / Qwen3-MoE route tokens to experts; Gemma 3 has
# (1 + w) norms, QK-norm, GeGLU and sandwich norms (see each `refuses`).
ADAPTERS: tuple[ModelAdapter, ...] = (
    ModelAdapter("llama", ("llama",), "SmolLM2, Llama-2, Llama-3.x"),
    ModelAdapter("qwen2", ("qwen2",), "Qwen2, Qwen2.5, Qwen2.5-Coder"),
    ModelAdapter("mistral", ("mistral",), "Mistral-7B"),
    ModelAdapter("qwen3", ("qwen3",), "Qwen3 dense", qk_norms=("q_norm", "k_norm"), refuses=(_QK_NORM_QK,)),
    ModelAdapter("mixtral", ("mixtral",), "Mixtral-8x7B",
                 moe=MoELayout(n_experts="num_local_experts", expert_intermediate="intermediate_size",
                               scores_in_logit_dtype=False), refuses=(_MOE_UP,)),
    ModelAdapter("qwen2_moe", ("qwen2_moe",), "Qwen1.5-MoE, Qwen2-57B-A14B",
                 moe=MoELayout(shared="shared_expert", shared_gate="shared_expert_gate"), refuses=(_MOE_UP,)),
    ModelAdapter("qwen3_moe", ("qwen3_moe",), "Qwen3-30B-A3B", qk_norms=("q_norm", "k_norm"),
                 moe=MoELayout(), refuses=(_QK_NORM_QK, _MOE_UP)),
    ModelAdapter("gemma3", ("gemma3_text",), "Gemma 3 (text): gemma-3-270m, gemma-3-1b",
                 post_attn_norm="pre_feedforward_layernorm",
                 branch_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
                 qk_norms=("q_norm", "k_norm"), norm_offset=1.0, norm_scale_in_float32=True,
                 rotary_per_layer_type=True,
                 refuses=(_GEMMA_R1, _QK_NORM_QK)),
)


def check_transforms(adapter: ModelAdapter, names) -> None:
    """UnsupportedTransformError if any transform in `names` is not exact on this family."""
    bad = [(n, adapter.refusal(n)) for n in names if adapter.refusal(n)]
    if bad:
        raise UnsupportedTransformError(f"{adapter.family}: " + "; ".join(f"{n} is not supported: {why}" for n, why in bad))


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
