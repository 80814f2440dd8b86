"""Q/K channel balance for the 4-bit K cache: a diagonal scaling fitted from calibration statistics.

q . k does not change when q_proj's output channels are multiplied by s and k_proj's divided by s,
and RoPE commutes with the scaling when s is equal on the two channels of each rotary pair (the
placement table's "qk" scaling, which OSTQuant trains end to end). Here it is computed in closed
form. After R3's Hadamard the K quantizer's error is close to isotropic, with a size set by |k|, so
the error it adds to a score q . k has a variance of about E|q * s|^2 E|k / s|^2 / head_dim. Per
rotary pair p, with a_p, b_p the root mean squares of q and of k over the calibration tokens (q over
the KV head's query heads), s_p = (b_p / a_p)^(1/2) minimises it to (sum_p a_p b_p)^2, against
(sum_p a_p^2)(sum_p b_p^2) unscaled: it gives each pair the same energy in q and in k (QServe's
SmoothAttention does this by maxima, without a Hadamard). Nothing runs online; the scaling is folded
into q_proj's and k_proj's rows (and biases), so it costs nothing at inference and the export carries it.

On Qwen2.5-Coder-0.5B that factor is 0.12-0.91 per layer (0.61 over the model); on SmolLM2-135M
0.82-0.98: its q and k already put their energy in the same pairs (docs/RESULTS.md §35). At the full
protocol (32 x 2048 calibration, full held-out text, 3 seeds; §36) it lowers the DuQuant recipe's Qwen
perplexity by 0.6 % / 0.7 % (wiki / c4) on average, and SmolLM2's not at all.

The proxy's minimum assumes an isotropic error and weighs every score alike; a softmax does not (on
Qwen seed 0 half strength did better than full, RESULTS §35). So the strength is chosen per layer:
s_p^alpha for alpha on ALPHAS, keeping the one whose 4-bit K cache (R3's Hadamard and the run's K
quantizer applied as the run will) changes the layer's attention output, softmax(q k^T) v, least on
calibration windows. alpha 0 (no scaling) is on the grid, so a layer the balance would not help keeps its
K cache as it was.

With the K bias kept out of the K quantizer (the default), k's statistics leave it out too: the
quantizer never sees it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import ModelAdapter, adapter_for
from ..hadamard import hadamard_matrix
from ..layerwise import forward_plan, iterate_blocks
from ..modules import rotate_half
from ..quant.primitives import QuantSpec, fake_quantize
from ..transforms.placements import expand_rope_pairs

# the statistics are second moments per channel: a few windows settle them (more add time, not accuracy)
MAX_WINDOWS = 8
SCORE_WINDOWS = 2  # windows on which each layer's strengths are scored (full attention matrices)
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class QKStatistics:
    q_rms: torch.Tensor  # [n_layers, kv_heads, head_dim / 2] root mean square of q per rotary pair
    k_rms: torch.Tensor  # ... of k (its bias left out when the K quantizer leaves it out)
    alpha: torch.Tensor | None = None  # [n_layers] the strength chosen per layer (None: not scored)
    errors: torch.Tensor | None = None  # [n_layers, len(ALPHAS)] attention-output error at each strength


def _pair_rms(mean_sq: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[..., head_dim] mean squares -> [..., head_dim / 2] root mean square of each rotary pair."""
    h = head_dim // 2
    return (mean_sq[..., :h] + mean_sq[..., h:]).sqrt()


class QKCollector:
    """Accumulates QKStatistics one block at a time: `attach(i, layer)`, run the block over the first
    MAX_WINDOWS calibration windows, `finish()`. In memory (qk_statistics) and in the streamed FP pass."""

    def __init__(self, geo, rotary: nn.Module, *, kv_spec: QuantSpec | None = None, r3: bool = True,
                 exclude_k_bias: bool = True, sink_tokens: int = 0):
        self.geo, self.rotary, self.r3, self.exclude_k_bias = geo, rotary, r3, exclude_k_bias
        self.sink_tokens = sink_tokens  # the K of the first positions stays unquantized (kv_sink_tokens)
        self.kv_spec = kv_spec if kv_spec is not None and kv_spec.bits < 16 else None
        self.q_rms = torch.zeros(geo.n_layers, geo.n_kv_heads, geo.head_dim // 2, dtype=torch.float64)
        self.k_rms = torch.zeros_like(self.q_rms)
        self.errors = torch.zeros(geo.n_layers, len(ALPHAS), dtype=torch.float64) if self.kv_spec else None
        self._layer = None

    def attach(self, i: int, layer) -> None:
        self._i, self._layer, self._tokens = i, layer, 0
        self._sums: dict[str, torch.Tensor] = {}
        self._kept: dict[str, list[torch.Tensor]] = {"q": [], "k": [], "v": []}
        self._handles = [self._observe("q", layer.q, False), self._observe("k", layer.k, self.exclude_k_bias),
                         self._observe("v", layer.v, False)]

    def _observe(self, name: str, linear: nn.Module, minus_bias: bool):
        def hook(module, args, out):
            y = out - linear.bias if (minus_bias and linear.bias is not None) else out
            if name == "q":
                self._tokens += out.shape[0] * out.shape[1]
            if name != "v":
                flat = y.reshape(-1, y.shape[-1]).double()
                self._sums[name] = self._sums.get(name, 0) + (flat * flat).sum(0).cpu()
            room = SCORE_WINDOWS - sum(t.shape[0] for t in self._kept[name])
            if self.kv_spec is not None and room > 0:
                self._kept[name].append((out if name == "q" else y)[:room].detach())
        return linear.register_forward_hook(hook)

    def finish(self) -> None:
        for h in self._handles:
            h.remove()
        geo, i, layer = self.geo, self._i, self._layer
        q_ms = (self._sums["q"] / self._tokens).view(geo.n_kv_heads, geo.kv_groups, geo.head_dim).mean(1)
        k_ms = (self._sums["k"] / self._tokens).view(geo.n_kv_heads, geo.head_dim)
        self.q_rms[i], self.k_rms[i] = _pair_rms(q_ms, geo.head_dim), _pair_rms(k_ms, geo.head_dim)
        if self.kv_spec is not None:
            q, k, v = (torch.cat(self._kept[n]) for n in ("q", "k", "v"))
            k_bias = layer.k.bias if (self.exclude_k_bias and layer.k.bias is not None) else None
            self.errors[i] = _score_strengths(q, k, v, k_bias, self.q_rms[i], self.k_rms[i], geo, self.rotary,
                                              self.kv_spec, self.r3, self.sink_tokens)
        self._layer = self._kept = self._sums = None

    def result(self) -> QKStatistics:
        alpha = None if self.errors is None else torch.tensor(ALPHAS, dtype=torch.float64)[self.errors.argmin(1)]
        return QKStatistics(self.q_rms, self.k_rms, alpha, self.errors)


@torch.no_grad()
def qk_statistics(model: nn.Module, calib_ids: torch.Tensor, *, kv_spec: QuantSpec | None = None, r3: bool = True,
                  exclude_k_bias: bool = True, sink_tokens: int = 0, device="cpu", adapter: ModelAdapter | None = None,
                  progress: bool = False) -> QKStatistics:
    """Pair RMS of q and k per layer and KV head, from the first MAX_WINDOWS calibration windows
    through the model (norm-fused or not, rotated or not: R1, R2 and the smoothings leave q_proj's and
    k_proj's outputs unchanged); with `kv_spec`, each layer's strength scored on SCORE_WINDOWS of them."""
    adapter = adapter or adapter_for(model)
    geo = adapter.geometry(model.config)
    ids = calib_ids[:MAX_WINDOWS]
    collector = QKCollector(geo, adapter.rotary_embedding(model), kv_spec=kv_spec, r3=r3, exclude_k_bias=exclude_k_bias,
                            sink_tokens=sink_tokens)
    batch, resident = forward_plan(geo, *ids.shape, next(model.parameters()).dtype, device)
    for i, block, forward in iterate_blocks(model, adapter, ids, device, progress, desc="Q/K statistics",
                                            batch=batch, resident=resident):
        collector.attach(i, adapter.layer(block))
        try:
            forward(update=True)
        finally:
            collector.finish()
    return collector.result()


def _score_strengths(q, k, v, k_bias, q_rms, k_rms, geo, rotary, kv_spec: QuantSpec, r3: bool,
                     sink_tokens: int = 0) -> torch.Tensor:
    """The layer's attention-output error from its 4-bit K cache at each strength of ALPHAS.

    q [W, S, heads * d] (with its bias), k [W, S, kv_heads * d] (the part the K quantizer sees), v;
    `k_bias` [kv_heads * d] the part it leaves out (None: none). Keys are RoPE'd at positions 0..S-1 and
    go through R3's Hadamard if the run has it; the quantizer's error on the content part, Q(x) - x, is
    added to the whole key, as modules.AttentionTransform does. One window at a time, in float64."""
    n, d = q.shape[1], geo.head_dim
    dev = q.device
    home = next(iter(rotary.buffers())).device  # the rotary module stays where the model lives (the host)
    cos, sin = rotary(v[:1].to(home), torch.arange(n, device=home).unsqueeze(0))
    cos, sin = cos.to(dev, torch.float64).unsqueeze(1), sin.to(dev, torch.float64).unsqueeze(1)  # [1, 1, S, d]
    h3 = hadamard_matrix(d, device=dev) if r3 else None

    def rope(t):  # [1, h, S, d]
        t = t * cos + rotate_half(t) * sin
        return t @ h3 if h3 is not None else t

    def heads(t, h):  # [S, h * d] -> [1, h, S, d]
        return t.double().view(1, n, h, d).transpose(1, 2)

    # q . k does not depend on the strength: one unquantized reference per window, one scaling per strength
    scales = [balance_scales(q_rms.unsqueeze(0), k_rms.unsqueeze(0), a).double().to(dev).view(1, -1, 1, d)
              for a in ALPHAS]
    err = torch.zeros(len(ALPHAS), dtype=torch.float64)
    for w in range(q.shape[0]):
        qw, kw, vw = heads(q[w], geo.n_heads), heads(k[w], geo.n_kv_heads), heads(v[w], geo.n_kv_heads)
        full = kw if k_bias is None else kw + heads(k_bias.expand(n, -1), geo.n_kv_heads)
        ref = F.scaled_dot_product_attention(rope(qw), rope(full), vw, is_causal=True, enable_gqa=True)
        for j, s in enumerate(scales):
            qs = rope(qw * s.repeat_interleave(geo.kv_groups, 1))
            content = rope(kw / s)
            keys = rope(full / s)
            error = fake_quantize(content, kv_spec) - content
            error[..., :sink_tokens, :] = 0
            got = F.scaled_dot_product_attention(qs, keys + error, vw, is_causal=True, enable_gqa=True)
            err[j] += float(((got - ref) ** 2).sum())
    return err


def balance_scales(q_rms: torch.Tensor, k_rms: torch.Tensor, alpha=1.0) -> torch.Tensor:
    """The "qk" scaling [n_layers, kv_heads * head_dim] (q multiplied, k divided): at strength 1 it gives
    every rotary pair the same root mean square in q and in k, at alpha it is that scaling to the power
    alpha (a float, or one per layer), normalised to a geometric mean of 1 per head. A pair that is
    silent in q or in k keeps s = 1 (nothing to balance)."""
    n_layers, kv_heads, half = q_rms.shape
    live = (q_rms > 0) & (k_rms > 0)
    s = torch.where(live, (k_rms / q_rms.where(live, torch.ones_like(q_rms))).sqrt(), torch.ones_like(q_rms))
    alpha = torch.as_tensor(alpha, dtype=s.dtype, device=s.device).reshape(-1, 1, 1)
    s = s ** alpha
    s = s / s.log().mean(-1, keepdim=True).exp()
    return expand_rope_pairs(s.reshape(n_layers, kv_heads * half), kv_heads, 2 * half)


def k_error_factor(q_rms: torch.Tensor, k_rms: torch.Tensor) -> torch.Tensor:
    """Per layer and KV head: the expected score error of the K quantizer after the balance over the
    one before, (sum a b)^2 / (sum a^2 sum b^2) (1: nothing to gain)."""
    return (q_rms * k_rms).sum(-1) ** 2 / ((q_rms ** 2).sum(-1) * (k_rms ** 2).sum(-1)).clamp_min(1e-300)


def qk_balance(model: nn.Module, calib_ids: torch.Tensor, *, kv_spec: QuantSpec | None = None, r3: bool = True,
               exclude_k_bias: bool = True, sink_tokens: int = 0, device="cpu", adapter: ModelAdapter | None = None,
               progress: bool = False) -> tuple[torch.Tensor, dict]:
    """The "qk" scaling for `model` (each layer's strength scored against `kv_spec`'s K quantizer, or 1
    without it) and what it chose and expects (metadata for the run)."""
    st = qk_statistics(model, calib_ids, kv_spec=kv_spec, r3=r3, exclude_k_bias=exclude_k_bias,
                       sink_tokens=sink_tokens, device=device, adapter=adapter, progress=progress)
    return scaling_from(st, windows=min(len(calib_ids), MAX_WINDOWS))


def scaling_from(st: QKStatistics, windows: int) -> tuple[torch.Tensor, dict]:
    """The "qk" scaling [n_layers, kv_heads * head_dim] of collected statistics, and the run's metadata."""
    alpha = st.alpha if st.alpha is not None else torch.ones(st.q_rms.shape[0], dtype=torch.float64)
    factor = k_error_factor(st.q_rms, st.k_rms)
    meta = {"qk_balance_windows": int(windows),
            "qk_balance_k_error_factor": round(float(factor.mean()), 4),
            "qk_balance_alpha": [float(a) for a in alpha]}
    if st.errors is not None:  # the chosen strengths' attention-output error over no scaling's
        chosen = st.errors.gather(1, st.errors.argmin(1, keepdim=True)).squeeze(1)
        meta["qk_balance_attention_error_ratio"] = round(float(chosen.sum() / st.errors[:, 0].sum()), 4)
    return balance_scales(st.q_rms, st.k_rms, alpha).to(torch.float32), meta
