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
from ..modules import AttentionTransform, QLinear, as_qlinear, register_attention, sequence_positions
from .scheme import QuantScheme
from .primitives import QuantSpec, fake_quantize


class ActQuantizer(nn.Module):
    """x -> fake_quantize(x, spec) (dynamic: scales from each token / group at run time).

    `sink_rows` ([B, S] bool, set by its block's pre-hook under QuantScheme.a_sink_tokens): the rows
    of an input [B, S, D] that pass through unquantized."""

    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec
        self.enabled = True
        self.sink_rows: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        y = fake_quantize(x, self.spec)
        if self.sink_rows is not None:
            if tuple(self.sink_rows.shape) != tuple(x.shape[:-1]):
                raise RuntimeError(f"a_sink_tokens: a block input of rows {tuple(self.sink_rows.shape)} reached a "
                                   f"linear input of rows {tuple(x.shape[:-1])}")
            y = torch.where(self.sink_rows.unsqueeze(-1), x, y)
        return y

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
        _install_sink_hook_(block, adapter.layer(block), scheme.a_sink_tokens)  # the layer's QLinears
    if scheme.quantize_lm_head:  # off by default: the papers keep lm_head in 16 bits
        head = as_qlinear(adapter.head(model))
        spec = scheme.act_spec("lm_head", geo.head_dim)
        head.input_quantizer = ActQuantizer(spec) if spec.bits < 16 else None
        parent, _, name = adapter.lm_head.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, head)
    model.set_attn_implementation(register_attention())


def _install_sink_hook_(block: nn.Module, layer, n: int) -> None:
    """Under a_sink_tokens = n > 0: before each call of `block`, tell its linears' input quantizers
    which rows are positions < n (from the call's position_ids; none given: 0..S-1, a whole
    sequence), and forget them after. Replaces the hook of an earlier install."""
    for handle in getattr(block, "_dq_sink_hooks", ()):
        handle.remove()
    block._dq_sink_hooks = ()
    if not n:
        return
    if layer.is_moe:
        raise ValueError("a_sink_tokens is not supported for mixture-of-experts blocks (their experts see "
                         "routed tokens, not positions): drop it")

    def quantizers():  # looked up at each call: a quantizer installed later (a clip search's) is seen
        return [m.input_quantizer for m in block.modules()
                if isinstance(m, QLinear) and isinstance(m.input_quantizer, ActQuantizer)]

    def mark(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        b, s = hidden.shape[:2]
        rows = (sequence_positions(kwargs.get("position_ids"), s, hidden.device) < n).expand(b, s)
        for q in quantizers():
            q.sink_rows = rows

    def forget(module, args, kwargs, output):
        for q in quantizers():
            q.sink_rows = None

    block._dq_sink_hooks = (block.register_forward_pre_hook(mark, with_kwargs=True),
                            block.register_forward_hook(forget, with_kwargs=True))


def set_act_quant_enabled_(model: nn.Module, enabled: bool) -> None:
    """Switch all activation/KV quantizers on or off (e.g. while GPTQ collects Hessians)."""
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            m.enabled = enabled
