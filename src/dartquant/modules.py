"""The runtime modules that a rotated / quantized model contains, visible in `print(model)`.

* `OnlineHadamard`: x -> x @ H with a fast Walsh-Hadamard transform (R3 on Q/K, R4 on the
  down_proj input). Online rotations are modules, not monkeypatched functions.
* `OnlineBlockRotation`: x -> x R1 P R2 with block-diagonal R1 / R2 and a permutation P
  (DuQuant's online transform, block_rotation.py); one instance serves every linear that reads
  the same input (q/k/v, gate/up).
* `QLinear`: a linear layer with an optional input rotation and an optional input
  (activation) quantizer in front. Its parameters keep nn.Linear's names (`weight`, `bias`),
  so a rotated model still saves as an ordinary Hugging Face checkpoint.
* `AttentionTransform`: what happens to Q, K, V after RoPE and before the attention product:
  R3 (a Hadamard on head_dim for Q and K, which cancels in Q K^T) and the K/V cache quantizers.
  It hangs off each attention module as `attn.dq_attention`, and runs through an attention
  function registered with transformers' public `AttentionInterface` under the name
  "dartquant"; that function then calls transformers' own SDPA attention, so masks, GQA and
  caches keep working as transformers implements them. With a cache, K/V are quantized when
  read, which equals quantizing them when written since the quantizers act per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .hadamard import fast_hadamard_transform, hadamard_factorization

ATTN_IMPLEMENTATION = "dartquant"


class RMSNorm(nn.Module):
    """RMSNorm that keeps float64 inputs in float64; gain = offset + weight.

    transformers' RMSNorms normalize in float32 (Gemma's also multiplies its gain 1 + w in
    float32), which caps a float64 model at ~1e-7 relative precision and would hide real errors
    of a transform. For float32, float16 and bfloat16 inputs this computes exactly what the
    replaced module computes: Llama-style (cast, then times the gain) or, with
    `scale_in_float32`, Gemma-style (times the gain in float32, then cast).
    """

    def __init__(self, weight: nn.Parameter, eps: float, offset: float = 0.0, scale_in_float32: bool = False):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps
        self.offset = offset
        self.scale_in_float32 = scale_in_float32

    @classmethod
    def replacing(cls, norm: nn.Module, offset: float = 0.0, scale_in_float32: bool = False) -> "RMSNorm":
        if isinstance(norm, cls):
            return norm
        eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)
        if eps is None or getattr(norm, "bias", None) is not None:
            raise TypeError(f"{type(norm).__name__} is not an RMSNorm (no epsilon, or it has a bias)")
        return cls(norm.weight, eps, offset, scale_in_float32)

    def gain(self) -> torch.Tensor:
        return self.weight + self.offset if self.offset else self.weight

    def set_gain_(self, gain: torch.Tensor) -> None:
        """weight <- gain - offset (in the weight's dtype)."""
        self.weight.data.copy_((gain - self.offset).to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x if dtype == torch.float64 else x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        if dtype == torch.float64:
            return h * self.gain().to(dtype)
        if self.scale_in_float32:
            return (h * (self.offset + self.weight.float())).to(dtype)
        return self.gain() * h.to(dtype)

    def extra_repr(self) -> str:
        off = f", gain=offset {self.offset} + weight" if self.offset else ""
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}{off}"


class TopKRouter(nn.Module):
    """A MoE router (softmax over experts, top-k, optionally renormalized) that keeps float64 in
    float64; in other dtypes it computes what transformers' Mixtral / Qwen-MoE routers compute
    (softmax in float32; Qwen casts the scores back to the logits' dtype, Mixtral does not)."""

    def __init__(self, weight: nn.Parameter, top_k: int, norm_topk: bool, scores_in_logit_dtype: bool):
        super().__init__()
        self.weight = weight  # [n_experts, hidden]: reads the residual stream (R1 folds in like q_proj)
        self.top_k, self.norm_topk, self.scores_in_logit_dtype = top_k, norm_topk, scores_in_logit_dtype

    @classmethod
    def replacing(cls, router: nn.Module, scores_in_logit_dtype: bool) -> "TopKRouter":
        if isinstance(router, cls):
            return router
        return cls(router.weight, router.top_k, bool(getattr(router, "norm_topk_prob", True)), scores_in_logit_dtype)

    def forward(self, hidden: torch.Tensor):  # [tokens, hidden] -> logits, scores [T, k], indices [T, k]
        hidden = hidden.reshape(-1, self.weight.shape[1])
        logits = F.linear(hidden, self.weight)
        exact = torch.float64 if logits.dtype == torch.float64 else torch.float32
        probs = torch.softmax(logits, dim=-1, dtype=exact)
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            top = top / top.sum(dim=-1, keepdim=True)
        if self.scores_in_logit_dtype:
            top = top.to(logits.dtype)
        return logits, top, idx

    def extra_repr(self) -> str:
        return f"experts={self.weight.shape[0]}, top_k={self.top_k}, norm_topk={self.norm_topk}"


class GatedMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), with ordinary linears (each rotatable, quantizable,
    observable on its own)."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, act_fn: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class RoutedExperts(nn.ModuleList):
    """transformers' fused experts (3-D gate_up_proj / down_proj) as a list of GatedMLP, with the
    same forward: each expert sees only the tokens routed to it (so GPTQ's Hessian of an expert's
    linear is built from its tokens) and its output is weighted by the routing score.

    `input_observer`, if set, is called with every token of the MLP stream (all tokens, before
    routing): that is what calibration captures for R1 in a MoE block."""

    def __init__(self, experts):
        super().__init__(experts)
        self.input_observer = None

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.input_observer is not None:
            self.input_observer(hidden)
        out = torch.zeros_like(hidden)  # [tokens, hidden]
        for e, expert in enumerate(self):
            token_idx, slot = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            y = expert(hidden[token_idx]) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


class OnlineHadamard(nn.Module):
    """x -> x @ H_n (orthonormal), applied to the last dimension at run time."""

    def __init__(self, n: int):
        super().__init__()
        hadamard_factorization(n)  # fail fast, with the reason, for sizes with no construction
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"OnlineHadamard({self.n}) got an input of last dimension {x.shape[-1]}")
        return fast_hadamard_transform(x)

    def extra_repr(self) -> str:
        k, p = hadamard_factorization(self.n)
        return f"n={self.n} ({k}x{p})"


class OnlineBlockRotation(nn.Module):
    """x -> x R1 P R2 (block_rotation.apply_blocks). The matrices are non-persistent buffers: they
    live in the run's rotations.safetensors, not in the model's state dict."""

    def __init__(self, n: int, r1: torch.Tensor, perm: torch.Tensor | None = None, r2: torch.Tensor | None = None):
        super().__init__()
        self.n = n
        self.register_buffer("r1", r1, persistent=False)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("r2", r2, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .block_rotation import apply_blocks

        if x.shape[-1] != self.n:
            raise ValueError(f"OnlineBlockRotation({self.n}) got an input of last dimension {x.shape[-1]}")
        return apply_blocks(x, self.r1, self.perm, self.r2)

    def extra_repr(self) -> str:
        nb, b, _ = self.r1.shape
        return (f"n={self.n}, blocks={nb}x{b}, permutation={self.perm is not None}, "
                f"second_rotation={self.r2 is not None}")


class QLinear(nn.Module):
    """y = (quantize(rotate(x))) W^T + b. Shares (does not copy) the wrapped linear's parameters."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.input_rotation: nn.Module | None = None
        self.input_quantizer: nn.Module | None = None
        # Called with the exact input of the matmul (GPTQ Hessians, activation capture).
        self.input_observer = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation is not None:
            x = self.input_rotation(x)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if self.input_observer is not None:
            self.input_observer(x)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def as_qlinear(module: nn.Module) -> QLinear:
    """`module` itself if it is a QLinear already, else a QLinear sharing its parameters."""
    if isinstance(module, QLinear):
        return module
    if not isinstance(module, nn.Linear):
        raise TypeError(f"expected nn.Linear or QLinear, got {type(module).__name__}")
    return QLinear(module)


def sequence_positions(position_ids, s: int, device) -> torch.Tensor:
    """[B|1, S] positions of a call's S tokens: its position_ids, or 0..S-1 where none fit (keys read
    from a cache, a block called on whole sequences): unpadded sequences."""
    if position_ids is None or position_ids.shape[-1] != s:
        return torch.arange(s, device=device).unsqueeze(0)
    return position_ids.to(device)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's pairing (transformers' rotate_half): channel j pairs with j + d/2; shared with calib/qk_balance."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class AttentionTransform(nn.Module):
    """Q/K/V after RoPE: optional R3 Hadamard on Q and K, optional K and V quantizers.

    K bias kept out of the K quantizer (`keep_k_bias_`): with a k_proj bias b, the cached key at
    position t is RoPE_t(x W + b) = RoPE_t(x W) + RoPE_t(b), and RoPE_t(b) depends on t alone.
    Qwen2 models have |b| up to 354 (Qwen2.5-Coder-1.5B, layer 0), far above the content part, so
    a per-token 4-bit K quantizer spends its whole range on a constant and rounds the content
    away (docs/RESULTS.md §7). We quantize k - R3(RoPE_t(b)) and add it back: a kernel stores the
    same codes and adds the position-only term when it dequantizes. Positions come from the
    attention call's position_ids; keys read from a cache (more keys than position_ids) are
    taken at positions 0..S-1, i.e. unpadded sequences.

    `sink_tokens` > 0 passes the K/V of positions below it through unquantized (the attention sink;
    QuantScheme.kv_sink_tokens), by the same positions.
    """

    def __init__(self, head_dim: int, rotate_qk: bool = False):
        super().__init__()
        self.head_dim = head_dim
        self.qk_rotation = OnlineHadamard(head_dim) if rotate_qk else None
        self.k_quantizer: nn.Module | None = None
        self.v_quantizer: nn.Module | None = None
        self.sink_tokens = 0  # K/V of positions below this stay unquantized (QuantScheme.kv_sink_tokens)
        self._k_bias_from: tuple = ()  # (k_proj, rotary module): plain references, not submodules

    def keep_k_bias_(self, k_linear: nn.Module | None, rotary: nn.Module | None = None) -> None:
        """Read K's bias live from `k_linear` (None: stop) and keep it out of the K quantizer."""
        self._k_bias_from = (k_linear, rotary) if k_linear is not None and k_linear.bias is not None else ()

    def _k_offset(self, k: torch.Tensor, position_ids) -> torch.Tensor:  # R3(RoPE_t(b)): [B|1, Hkv, S, D]
        k_linear, rotary = self._k_bias_from
        b = k_linear.bias.to(k.dtype).view(1, k.shape[1], 1, self.head_dim)
        cos, sin = rotary(k, sequence_positions(position_ids, k.shape[-2], k.device))
        off = b * cos.unsqueeze(1).to(k.dtype) + rotate_half(b) * sin.unsqueeze(1).to(k.dtype)
        return self.qk_rotation(off) if self.qk_rotation is not None else off

    def forward(self, q, k, v, position_ids=None):  # [B, H, S, D], [B, Hkv, S, D], [B, Hkv, S, D]
        if self.qk_rotation is not None:
            q, k = self.qk_rotation(q), self.qk_rotation(k)
        k_in, v_in = k, v
        if self.k_quantizer is not None and self._k_bias_from:
            off = self._k_offset(k, position_ids)
            k = self.k_quantizer(k - off) + off
        elif self.k_quantizer is not None:
            k = self.k_quantizer(k)
        if self.v_quantizer is not None:
            v = self.v_quantizer(v)
        if self.sink_tokens:
            keep = self._sink_mask(k, position_ids)
            k, v = torch.where(keep, k_in, k), torch.where(keep, v_in, v)
        return q, k, v

    def _sink_mask(self, k: torch.Tensor, position_ids) -> torch.Tensor:  # [B|1, 1, S, 1]: position < sink_tokens
        return (sequence_positions(position_ids, k.shape[-2], k.device) < self.sink_tokens)[:, None, :, None]


def _dartquant_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    transform = getattr(module, "dq_attention", None)
    if transform is not None:
        query, key, value = transform(query, key, value, kwargs.get("position_ids"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


_registered: set[str] = set()


def register_attention_function(name: str, fn) -> str:
    """Register attention implementation `name` (SDPA's masks) with transformers, once per name."""
    if name not in _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
        _registered.add(name)
    return name


def register_attention() -> str:
    """Register the "dartquant" attention implementation with transformers (idempotent)."""
    return register_attention_function(ATTN_IMPLEMENTATION, _dartquant_attention)
