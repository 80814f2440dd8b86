"""Where every transform sits: one table, and the one piece of maths that applies an entry.

Every consumer derives from `TRANSFORMS`: folding (`rotation.rotate_`), the end-to-end
parametrizations (`calib/e2e.py`), the activations captured for calibration
(`calib/capture.py`, through `probes`), the diagnostics and the export. A new transform (a
block rotation, a permutation, another smoothing pair) is one more row here, not a new
hand-written fold in four files. compressed-tensors' `TransformScheme` (targets, location,
inverse) is the model: where a rotation goes is data.

Convention. A transform T acts on a stream of row vectors, x -> x T (a diagonal t: x -> x * t).
* A module that *writes* the stream (side "output") must produce x T: a linear's weight
  W [out, in] becomes T^T W and its bias b T; an embedding's table E [vocab, hidden] becomes
  E T; a norm's gain g becomes g * t.
* A module that *reads* it (side "input") must undo T on its input: W <- W T^{-T}, i.e. W T
  for an orthogonal T and W diag(1/t) for a diagonal one.
* `inverse` applies T^{-T} instead of T (Q/K smoothing: k is divided where q is multiplied).
* A role names every module of that role in a block (adapters.LayerModules.modules): in a
  mixture-of-experts block "gate" / "up" / "down" are those of every expert (and the shared
  one), and "router" / "shared_gate" read the MLP stream too; a dense block has none of those.
  A Hadamard is sized by the module it folds into (experts may be narrower than the dense MLP).
* `heads`: "kv" = T is block-diagonal with one [d, d] block (or d-vector) per KV head, over
  the rows of v_proj / k_proj; "query" = every query head uses the block of its KV head
  (o_proj's input columns, q_proj's rows under GQA).
Folding happens in float64 (`rotation.rotate_`); the same functions, in the parameter dtype,
build the training graph of the end-to-end methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters import Geometry

MODEL_ROLES = ("embed", "lm_head")  # modules outside the decoder blocks
NORM_ROLES = ("input_norm", "post_attn_norm")


@dataclass(frozen=True)
class Placement:
    role: str  # "embed", "lm_head", a linear role ("q" ... "down") or a norm role
    side: str  # "input" (reads the transformed stream) or "output" (writes it)
    heads: str | None = None  # None, "kv" or "query" (module docstring)
    inverse: bool = False


@dataclass(frozen=True)
class TransformSpec:
    """One transform: what it is, where it is folded, what runs online, what calibrates it."""

    name: str  # key in a RotationSet: "R1", "R2", "R3", "R4" or a scaling name
    kind: str  # "orthogonal" (a stored matrix), "hadamard" (fixed, built from the size), "diagonal",
    #            "block" (block-diagonal R1, permutation, R2: block_rotation.BlockSet)
    per_layer: bool  # one value per decoder layer (else one global value)
    placements: tuple[Placement, ...]  # folded into these weights, in this order
    online: str | None = None  # an op that stays in the forward: "down_input" (R4), "qk_rope" (R3),
    #                            "linear_input" (a block transform or a Hadamard before its readers' input quantizer)
    probes: tuple[str, ...] = ()  # linears whose inputs are the activations it acts on (capture)
    doc: str = ""


def _p(role, side, heads=None, inverse=False) -> Placement:
    return Placement(role, side, heads, inverse)


# The order is the folding order (it fixes the float rounding of the folded weights).
TRANSFORMS: tuple[TransformSpec, ...] = (
    TransformSpec("R1", "orthogonal", False, (
        _p("embed", "output"), _p("lm_head", "input"),
        _p("q", "input"), _p("k", "input"), _p("v", "input"), _p("gate", "input"), _p("up", "input"),
        _p("o", "output"), _p("down", "output"), _p("router", "input"), _p("shared_gate", "input")),
        probes=("q", "up"), doc="residual stream [hidden, hidden]"),
    TransformSpec("R2", "orthogonal", True, (_p("v", "output", "kv"), _p("o", "input", "query")),
                  probes=("o",), doc="value heads [kv_heads, head_dim, head_dim] per layer"),
    TransformSpec("attn_norm", "diagonal", True, (
        _p("input_norm", "output"), _p("q", "input"), _p("k", "input"), _p("v", "input")),
        doc="OSTQuant: input_layernorm gain [hidden] per layer"),
    TransformSpec("mlp_norm", "diagonal", True, (
        _p("post_attn_norm", "output"), _p("gate", "input"), _p("up", "input"), _p("router", "input"),
        _p("shared_gate", "input")),
        doc="OSTQuant: post_attention_layernorm gain [hidden] per layer"),
    TransformSpec("v", "diagonal", True, (_p("v", "output"), _p("o", "input", "query")),
                  doc="OSTQuant: value channels [kv_heads * head_dim] per layer (attention is linear in V)"),
    TransformSpec("qk", "diagonal", True, (_p("q", "output", "query"), _p("k", "output", inverse=True)),
                  doc="OSTQuant: key channels [kv_heads * head_dim] per layer, RoPE pairs tied; q.k unchanged"),
    TransformSpec("up", "diagonal", True, (_p("up", "output"), _p("down", "input")),
                  doc="OSTQuant: up_proj channels [intermediate] per layer (SwiGLU is linear in up)"),
    # R1's job where R1 cannot be folded (Gemma 3's sandwich norms): a Hadamard on each branch's
    # normalized input, online (one module shared by the readers), its H folded into the readers.
    TransformSpec("H_attn", "hadamard", False, (_p("q", "input"), _p("k", "input"), _p("v", "input")),
                  online="linear_input", doc="Hadamard [hidden] on the q/k/v input: online x H, H folded into q/k/v"),
    TransformSpec("H_mlp", "hadamard", False, (_p("gate", "input"), _p("up", "input")),
                  online="linear_input", doc="Hadamard [hidden] on the gate/up input: online x H, H folded into gate/up"),
    TransformSpec("R4", "hadamard", False, (_p("down", "input"),), online="down_input",
                  doc="Hadamard [intermediate] on the down_proj input: online x H, H folded into down_proj"),
    TransformSpec("R3", "hadamard", False, (), online="qk_rope",
                  doc="Hadamard [head_dim] on Q and K after RoPE (cancels in Q K^T; for the K cache)"),
    # DuQuant (calib/duquant.py): after its smoothings (the attn_norm / mlp_norm / v / up rows
    # above), so that a reader's weight becomes W diag(lambda) M, the inverse of x diag(1/lambda) M.
    TransformSpec("DQ_o", "orthogonal", True, (_p("v", "output", "kv"), _p("o", "input", "query")),
                  doc="DuQuant: per-KV-head rotation of the o_proj input [kv_heads, head_dim, head_dim], folded"),
    TransformSpec("DQ_attn", "block", True, (_p("q", "input"), _p("k", "input"), _p("v", "input")),
                  online="linear_input", doc="DuQuant: online R1 P R2 (block_rotation.py) on the q/k/v input"),
    TransformSpec("DQ_mlp", "block", True, (_p("gate", "input"), _p("up", "input")),
                  online="linear_input", doc="DuQuant: online R1 P R2 on the gate/up input"),
    TransformSpec("DQ_down", "block", True, (_p("down", "input"),),
                  online="linear_input", doc="DuQuant: online R1 P R2 on the down_proj input (instead of R4)"),
)
SPECS: dict[str, TransformSpec] = {t.name: t for t in TRANSFORMS}
SCALINGS: tuple[str, ...] = tuple(t.name for t in TRANSFORMS if t.kind == "diagonal")
BLOCKS: tuple[str, ...] = tuple(t.name for t in TRANSFORMS if t.kind == "block")


def scale_sizes(geo: Geometry) -> dict[str, int]:
    """The length, per layer, of each diagonal scaling."""
    kv_channels = geo.n_kv_heads * geo.head_dim
    return {"attn_norm": geo.hidden, "mlp_norm": geo.hidden, "v": kv_channels, "qk": kv_channels,
            "up": geo.intermediate}


def placements_on(role: str, names=None) -> list[tuple[TransformSpec, Placement]]:
    """Every (transform, placement) that touches `role`, in folding order (optionally only `names`)."""
    return [(t, p) for t in TRANSFORMS if names is None or t.name in names for p in t.placements if p.role == role]


# ---- the per-head layout ------------------------------------------------------------------
def per_query_head(s: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """A per-KV-head vector [kv_heads * head_dim] repeated for every query head of its group."""
    return s.view(geo.n_kv_heads, geo.head_dim).repeat_interleave(geo.kv_groups, dim=0).reshape(-1)


def expand_rope_pairs(half: torch.Tensor, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """[..., kv_heads * head_dim/2] -> [..., kv_heads * head_dim]: channel j and j + head_dim/2 of
    each head get the same value (RoPE's rotate_half pairs them)."""
    h = half.reshape(*half.shape[:-1], n_kv_heads, head_dim // 2)
    return torch.cat([h, h], dim=-1).reshape(*half.shape[:-1], n_kv_heads * head_dim)


def kv_head_token_view(heads: torch.Tensor, kv_groups: int) -> torch.Tensor:
    """The o_proj-input samples of one layer in R2's calibration layout [kv_heads, tokens * groups, d]
    (row t * groups + g of KV head h = query head h * groups + g of token t), seen token-major as
    [tokens, kv_heads, groups, d]; `.reshape(tokens, -1)` gives o_proj's input rows back. A view:
    capture writes through it, so the buffer never needs reshuffling."""
    kv, tg, d = heads.shape
    return heads.view(kv, tg // kv_groups, kv_groups, d).permute(1, 0, 2, 3)


# ---- applying one placement -----------------------------------------------------------------
def apply_placement(w: torch.Tensor, t: torch.Tensor, spec: TransformSpec, p: Placement, geo: Geometry,
                    bias: bool = False) -> torch.Tensor:
    """The new value of one weight (or, with bias=True, a bias) under transform value `t`.

    `t`: a matrix [n, n] (global orthogonal/hadamard), [kv_heads, d, d] (per-KV-head), or a
    vector (diagonal). Pure: returns a tensor in the dtype of the inputs.
    """
    if spec.kind == "block":  # t: a block_rotation.BlockSet of one layer; orthogonal, on the input side
        if p.side != "input" or p.heads is not None or bias:
            raise ValueError(f"{spec.name}: block transforms fold into readers' weights only")
        return t.apply(w)
    if spec.kind == "diagonal":
        s = 1.0 / t if (p.side == "input") != p.inverse else t
        if p.heads == "query":
            s = per_query_head(s, geo)
        if bias or p.role in NORM_ROLES or p.side == "input":
            return w * s  # bias, norm gain or input columns
        return w * s[:, None]  # output rows
    if p.inverse:
        raise ValueError(f"{spec.name}: inverse placements are for diagonal transforms only")
    if p.heads is None:
        if bias:  # an output-side bias: b T
            return w @ t
        if p.side == "input" or p.role == "embed":  # W T (an embedding table is [vocab, hidden])
            return w @ t
        return t.T @ w
    d = geo.head_dim
    if p.heads == "kv" and p.side == "output":  # rows of KV head h: T_h^T W_h, b_h T_h
        if bias:
            return torch.einsum("hi,hij->hj", w.view(t.shape[0], d), t).reshape(w.shape)
        return torch.einsum("hij,hik->hjk", t, w.view(t.shape[0], d, -1)).reshape(w.shape)
    if p.heads == "query" and p.side == "input":  # columns of query head q: W_q T_{q // groups}
        per_q = t.repeat_interleave(geo.kv_groups, dim=0)
        return torch.einsum("ohi,hij->ohj", w.view(w.shape[0], per_q.shape[0], d), per_q).reshape(w.shape)
    raise ValueError(f"{spec.name}: no rule for a {p.heads!r}-head placement on the {p.side} side")


def touches_bias(p: Placement) -> bool:
    """Only writers' biases change (readers add their bias after the matmul)."""
    return p.side == "output" and p.role not in MODEL_ROLES + NORM_ROLES
