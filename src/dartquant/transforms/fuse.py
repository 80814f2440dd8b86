"""Norm fusion: fold every RMSNorm gain into the linears that read the normalized stream.

RMSNorm(x) = x / rms(x) * g. Reading linears compute RMSNorm(x) W^T = (x / rms(x)) (W diag(g))^T,
so W <- W diag(g) and g <- 1 leaves the function unchanged. With g = 1, RMSNorm commutes with
any orthogonal R (rms(x R) = rms(x)), which is what lets R1 rotate the residual stream.
Tied embeddings are untied first: the embedding gets E R1 while lm_head gets (W diag(g)) R1.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import ModelAdapter, adapter_for
from ..modules import RMSNorm


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
    return bool(torch.all(norm.weight == 1))


def exact_norms_(model: nn.Module, adapter: ModelAdapter | None = None) -> None:
    """Swap every RMSNorm for dartquant's (same parameter; float64 stays float64)."""
    adapter = adapter or adapter_for(model)
    final = adapter.final_norm.rsplit(".", 1)
    parent = model.get_submodule(final[0]) if len(final) == 2 else model
    setattr(parent, final[-1], RMSNorm.replacing(adapter.norm(model)))
    for block in adapter.decoder_layers(model):
        for name in (adapter.input_norm, adapter.post_attn_norm):
            setattr(block, name, RMSNorm.replacing(block.get_submodule(name)))


@torch.no_grad()
def fuse_norms_(model: nn.Module, adapter: ModelAdapter | None = None) -> None:
    """Fold all RMSNorm gains into the following linears; the norms end with unit gain.

    Idempotent: norms already at unit gain fold nothing.
    """
    adapter = adapter or adapter_for(model)
    untie_embeddings_(model, adapter)
    exact_norms_(model, adapter)
    for layer in adapter.layers_of(model):
        for norm, readers in ((layer.input_norm, (layer.q, layer.k, layer.v)),
                              (layer.post_attn_norm, (layer.gate, layer.up))):
            _fold_norm(norm, readers)
    _fold_norm(adapter.norm(model), (adapter.head(model),))


def _fold_norm(norm: nn.Module, readers) -> None:
    if getattr(norm, "bias", None) is not None:
        raise NotImplementedError("norms with a bias (LayerNorm) are not supported yet")
    if _has_unit_gain(norm):
        return
    gain = norm.weight.data
    for linear in readers:
        scale_input_columns_(linear, gain)
    norm.weight.data.fill_(1.0)


def norms_fused(model: nn.Module, adapter: ModelAdapter | None = None) -> bool:
    adapter = adapter or adapter_for(model)
    norms = [adapter.norm(model)]
    for layer in adapter.layers_of(model):
        norms += [layer.input_norm, layer.post_attn_norm]
    return all(_has_unit_gain(n) for n in norms)
