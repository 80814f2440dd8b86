"""Installing the online modules (R3, R4 and, later, quantizers) into a model, and the spec
written to `dartquant.json` so that a saved folder gets them back when loaded."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..adapters import ModelAdapter, adapter_for
from .fuse import split_experts_
from ..modules import AttentionTransform, OnlineHadamard, as_qlinear, register_attention

SPEC_VERSION = 1


def install_online_(model: nn.Module, adapter: ModelAdapter | None = None, *, r3: bool, r4: bool) -> None:
    """Put OnlineHadamard modules where R3 (Q, K after RoPE) and R4 (down_proj input) act.

    Only installs modules; the matching offline folding (R4's H into down_proj) is rotate_'s job.
    Attention always gets an AttentionTransform so that KV quantizers have a place to live.
    """
    adapter = adapter or adapter_for(model)
    geo = adapter.geometry(model.config)
    split_experts_(model, adapter)  # a MoE's per-expert down_proj needs its own module
    for block in adapter.decoder_layers(model):
        layer = adapter.layer(block)
        existing = getattr(layer.attn, "dq_attention", None)
        if existing is None:
            layer.attn.dq_attention = AttentionTransform(geo.head_dim, rotate_qk=r3)
        elif r3 and existing.qk_rotation is None:
            existing.qk_rotation = OnlineHadamard(geo.head_dim)
        if r4:  # every down_proj: the dense one, or each expert's (sized by its own input)
            for key, linear in layer.keyed("down"):
                down = as_qlinear(linear)
                if down.input_rotation is None:
                    down.input_rotation = OnlineHadamard(down.in_features)
                adapter.set_linear(block, key, down)
    model.set_attn_implementation(register_attention())


def online_spec(model: nn.Module, adapter: ModelAdapter | None = None) -> dict:
    """What `dartquant.json` records about the online transforms of `model` (read off its modules)."""
    layers = (adapter or adapter_for(model)).layers_of(model)
    r3 = any(getattr(getattr(l.attn, "dq_attention", None), "qk_rotation", None) is not None for l in layers)
    r4 = any(getattr(d, "input_rotation", None) is not None for l in layers for d in l.modules("down"))
    return {"version": SPEC_VERSION, "online": {"r3": r3, "r4": r4}}


def install_from_spec_(model: nn.Module, spec: dict, folder: Path | None = None) -> None:
    """Re-create the online modules described by a `dartquant.json` dict."""
    version = spec.get("version")
    if version != SPEC_VERSION:
        raise ValueError(f"{folder}: dartquant.json has format version {version!r}; this dartquant reads "
                         f"version {SPEC_VERSION}. Re-create the folder with this version.")
    online = spec.get("online", {})
    install_online_(model, r3=bool(online.get("r3")), r4=bool(online.get("r4")))
