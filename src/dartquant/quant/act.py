"""Activation and KV-cache fake quantization, installed as visible modules.

Every decoder linear becomes a `QLinear` whose `input_quantizer` is an `ActQuantizer` (after
its online rotation, if any: R4 rotates the down_proj input *before* it is quantized, which is
the point of R4). K and V are quantized in the attention's `AttentionTransform`, after RoPE and
R3, per token and head in groups of head_dim by default.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import ModelAdapter, adapter_for, role_of
from ..modules import AttentionTransform, as_qlinear, register_attention
from .scheme import QuantScheme
from .primitives import QuantSpec, fake_quantize


class ActQuantizer(nn.Module):
    """x -> fake_quantize(x, spec) (dynamic: scales from each token / group at run time)."""

    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return fake_quantize(x, self.spec)

    def extra_repr(self) -> str:
        s = self.spec
        gran = {None: "per-row", -1: "per-tensor"}.get(s.group_size, f"group {s.group_size}")
        return f"{s.bits}-bit {'sym' if s.symmetric else 'asym'} {gran} clip {s.clip_ratio}"


def install_quantizers_(model: nn.Module, scheme: QuantScheme, adapter: ModelAdapter | None = None) -> None:
    """Wrap every decoder linear in QLinear with its input quantizer; add K/V quantizers."""
    adapter = adapter or adapter_for(model)
    geo = adapter.geometry(model.config)
    for block in adapter.decoder_layers(model):
        layer = adapter.layer(block)
        for role, linear in layer.linears().items():
            q = as_qlinear(linear)
            spec = scheme.act_spec(role_of(role), geo.head_dim)  # an expert's "down" is a "down"
            q.input_quantizer = ActQuantizer(spec) if spec.bits < 16 else None
            adapter.set_linear(block, role, q)
        transform = getattr(layer.attn, "dq_attention", None)
        if transform is None:
            transform = layer.attn.dq_attention = AttentionTransform(geo.head_dim, rotate_qk=False)
        kv = scheme.kv_spec(geo.head_dim)
        transform.k_quantizer = ActQuantizer(kv) if kv.bits < 16 else None
        # K's bias (after RoPE) stays out of the K quantizer: modules.AttentionTransform
        transform.keep_k_bias_(layer.attn.get_submodule(adapter.k) if scheme.kv_exclude_k_bias else None,
                               adapter.rotary_embedding(model))
        transform.v_quantizer = ActQuantizer(kv) if kv.bits < 16 else None
        transform.sink_tokens = scheme.kv_sink_tokens if kv.bits < 16 else 0
    if scheme.quantize_lm_head:  # off by default: the papers keep lm_head in 16 bits
        head = as_qlinear(adapter.head(model))
        spec = scheme.act_spec("lm_head", geo.head_dim)
        head.input_quantizer = ActQuantizer(spec) if spec.bits < 16 else None
        parent, _, name = adapter.lm_head.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, head)
    model.set_attn_implementation(register_attention())


def set_act_quant_enabled_(model: nn.Module, enabled: bool) -> None:
    """Switch all activation/KV quantizers on or off (e.g. while GPTQ collects Hessians)."""
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            m.enabled = enabled
