"""Norm fusion: fold every RMSNorm gain into the linears that read the normalized stream.

RMSNorm(x) = x / rms(x) * g. Reading linears compute RMSNorm(x) W^T = (x / rms(x)) (W diag(g))^T,
so W <- W diag(g) and g <- 1 leaves the function unchanged. With g = 1, RMSNorm commutes with
any orthogonal R (rms(x R) = rms(x)), which is what lets R1 rotate the residual stream.
Tied embeddings are untied first: the embedding gets E R1 while lm_head gets (W diag(g)) R1.

Families differ only through their adapter: Gemma's gain is 1 + w (fused: w <- 0); the MLP
stream of a mixture-of-experts block is read by the router and every expert's gate/up (all get
the gain); QK-norms and Gemma's sandwich norms (between a branch and the residual add) are not
fused: nothing linear follows them. Before anything else, `exact_norms_` swaps transformers'
RMSNorms and MoE routers for float64-exact equivalents and splits fused 3-D experts into one
gated MLP of nn.Linear per expert (views of the fused tensors: no copy).
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import ModelAdapter, adapter_for
from ..modules import GatedMLP, RMSNorm, RoutedExperts, TopKRouter


@torch.no_grad()
def untie_embeddings_(model: nn.Module, adapter: ModelAdapter | None = None) -> bool:
    """Give lm_head its own weight if it shares the embedding's. Returns True if it did."""
    adapter = adapter or adapter_for(model)
    head, embed = adapter.head(model), adapter.embedding(model)
    tied = head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr()
    if tied:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    model.config.tie_word_embeddings = False
    # transformers re-ties on save/load when its tie map says so; clear it for this instance.
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = {} if isinstance(model._tied_weights_keys, dict) else []
    return tied


def scale_input_columns_(linear: nn.Module, gain: torch.Tensor) -> None:
    """W <- W diag(gain), computed in float64."""
    w = linear.weight
    w.data.copy_((w.data.double() * gain.double()).to(w.dtype))


def _has_unit_gain(norm: nn.Module) -> bool:
    return bool(torch.all(norm.gain() == 1))


def split_experts_(model: nn.Module, adapter: ModelAdapter | None = None) -> None:
    """Every MoE block: fused experts -> RoutedExperts of GatedMLP (views of gate_up_proj [E, 2I, H]
    and down_proj [E, H, I]); the router -> TopKRouter. Idempotent; dense blocks untouched."""
    adapter = adapter or adapter_for(model)
    lay = adapter.moe
    if lay is None:
        return
    for block in adapter.decoder_layers(model):
        if not adapter.is_moe_block(block):
            continue
        mlp = block.get_submodule(adapter.mlp)
        setattr(mlp, lay.router, TopKRouter.replacing(mlp.get_submodule(lay.router), lay.scores_in_logit_dtype))
        fused = mlp.get_submodule(lay.experts)
        if isinstance(fused, RoutedExperts):
            continue
        extra = sorted(n for n, _ in fused.named_parameters() if n not in ("gate_up_proj", "down_proj"))
        if extra:
            raise NotImplementedError(f"{type(fused).__name__} has parameters {extra} besides gate_up_proj / "
                                      "down_proj (expert biases?): not supported")
        gate_up, down = fused.gate_up_proj.data, fused.down_proj.data  # [E, 2I, H], [E, H, I]
        n_exp, two_i, hidden = gate_up.shape
        inter = two_i // 2
        experts = []
        for e in range(n_exp):
            lin = []
            for w in (gate_up[e, :inter], gate_up[e, inter:], down[e]):
                m = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
                m.weight = nn.Parameter(w, requires_grad=False)  # a view: shares the fused storage
                lin.append(m)
            experts.append(GatedMLP(*lin, fused.act_fn))
        setattr(mlp, lay.experts, RoutedExperts(experts))


def exact_norms_(model: nn.Module, adapter: ModelAdapter | None = None) -> None:
    """Swap every RMSNorm (block norms, QK-norms, sandwich norms, final) for dartquant's (same
    parameter; float64 stays float64), and MoE routers / fused experts as split_experts_ does."""
    adapter = adapter or adapter_for(model)

    def exact(parent: nn.Module, path: str) -> None:
        owner, _, name = path.rpartition(".")
        owner_mod = parent.get_submodule(owner) if owner else parent
        setattr(owner_mod, name, RMSNorm.replacing(owner_mod.get_submodule(name), adapter.norm_offset,
                                                   adapter.norm_scale_in_float32))

    exact(model, adapter.final_norm)
    block_norms = (adapter.input_norm, adapter.post_attn_norm) + adapter.branch_norms
    if adapter.qk_norms is not None:
        block_norms += tuple(f"{adapter.attn}.{n}" for n in adapter.qk_norms)
    for block in adapter.decoder_layers(model):
        for path in block_norms:
            exact(block, path)
    split_experts_(model, adapter)


def _mlp_readers(layer) -> list[nn.Module]:
    """Everything that reads the MLP's normalized input: gate/up (of every expert), the router."""
    return layer.modules("gate") + layer.modules("up") + layer.modules("router") + layer.modules("shared_gate")


@torch.no_grad()
def fuse_norms_(model: nn.Module, adapter: ModelAdapter | None = None) -> None:
    """Fold all RMSNorm gains into the following linears; the norms end with unit gain.

    Idempotent: norms already at unit gain fold nothing.
    """
    adapter = adapter or adapter_for(model)
    untie_embeddings_(model, adapter)
    exact_norms_(model, adapter)
    for layer in adapter.layers_of(model):
        fuse_layer_norms_(layer)
    fuse_final_norm_(model, adapter)


@torch.no_grad()
def fuse_layer_norms_(layer) -> None:
    """One decoder block's two norms folded into their readers (its norms must be exact_norms_'s)."""
    for norm, readers in ((layer.input_norm, (layer.q, layer.k, layer.v)), (layer.post_attn_norm, _mlp_readers(layer))):
        _fold_norm(norm, readers)


@torch.no_grad()
def fuse_final_norm_(model: nn.Module, adapter: ModelAdapter) -> None:
    """The final norm folded into lm_head (untied first)."""
    _fold_norm(adapter.norm(model), (adapter.head(model),))


def _fold_norm(norm: nn.Module, readers) -> None:
    if getattr(norm, "bias", None) is not None:
        raise NotImplementedError("norms with a bias (LayerNorm) are not supported yet")
    if _has_unit_gain(norm):
        return
    gain = norm.gain().data
    for linear in readers:
        scale_input_columns_(linear, gain)
    norm.set_gain_(torch.ones_like(gain))


def norms_fused(model: nn.Module, adapter: ModelAdapter | None = None) -> bool:
    """True if fuse_norms_ has run: exact norms (and split experts) with unit gains."""
    adapter = adapter or adapter_for(model)
    norms = [adapter.norm(model)]
    for block in adapter.decoder_layers(model):
        norms += [block.get_submodule(adapter.input_norm), block.get_submodule(adapter.post_attn_norm)]
        if adapter.is_moe_block(block) and not isinstance(
                block.get_submodule(f"{adapter.mlp}.{adapter.moe.experts}"), RoutedExperts):
            return False
    return all(isinstance(n, RMSNorm) and _has_unit_gain(n) for n in norms)
