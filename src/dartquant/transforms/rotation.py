"""Rotation sets and the one function that applies them.

Every method (QuaRot, DartQuant, SpinQuant, ...) only *produces* a `RotationSet`; `rotate_`
folds it into the model. Names follow SpinQuant:

* R1 [hidden, hidden], one global matrix on the residual stream:
  embedding E <- E R1; readers of the stream (q/k/v/gate/up/lm_head) W <- W R1;
  writers (o_proj, down_proj) W <- R1^T W and b <- R1^T b.
* R2 [n_layers, kv_heads, head_dim, head_dim], per layer and KV head, between v_proj's output
  and o_proj's input. Under GQA the matrix of a KV head also serves every query head of its
  group on the o_proj side.
* R3 (online Hadamard on Q and K after RoPE) and R4 (online Hadamard on the down_proj input,
  its inverse folded into down_proj) are fixed: the set only records whether they are on.
* Optional diagonal scalings (OSTQuant's equivalent transformations), applied after R1/R2 in
  the rotated basis, each a positive vector per layer:
  - "attn_norm" / "mlp_norm" [n_layers, hidden]: the gain of input_layernorm /
    post_attention_layernorm becomes s, the linears that read it get W <- W diag(1/s);
  - "v" [n_layers, kv_heads * head_dim]: v_proj rows (and bias) times s, o_proj's input
    columns of every query head divided by its KV head's s (attention is linear in V);
  - "up" [n_layers, intermediate]: up_proj rows (and bias) times s, down_proj's input columns
    divided by s (SwiGLU is linear in up's output), before R4's Hadamard;
  - "qk" [n_layers, kv_heads * head_dim]: k_proj rows (and bias) divided by s, q_proj rows of
    every query head times its KV head's s, so q.k is unchanged. RoPE rotates channel j of a
    head together with channel j + head_dim/2 (rotate_half), so the two must share a scale:
    then RoPE commutes with the scaling. This smooths K for the KV-cache quantizer.

`rotate_` fails whole: `validate` checks everything the set needs (shapes, orthogonality,
scalings, a Hadamard construction for R3's head_dim and R4's intermediate size, norms it can
fuse) and R4's matrix is built before the first weight is touched, so an error leaves the model
exactly as it was.

Saved as safetensors: tensors "R1", "R2" and "S.<name>" for scalings, and the flags and provenance (method, seed) as
JSON in the header's metadata. Loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..adapters import Geometry, ModelAdapter, adapter_for
from ..hadamard import hadamard_factorization, hadamard_matrix, random_hadamard_matrix
from .fuse import fuse_norms_, norms_fused
from .online import install_online_


@dataclass
class RotationSet:
    r1: torch.Tensor | None = None
    r2: torch.Tensor | None = None
    r3: bool = False
    r4: bool = False
    meta: dict = field(default_factory=dict)
    scales: dict = field(default_factory=dict)  # name -> [n_layers, n] positive (see module doc)

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def quarot(cls, geometry: Geometry, seed: int = 0, r3: bool = True, r4: bool = True) -> RotationSet:
        """QuaRot: random (sign-flipped) Hadamard R1 from `seed`; plain Hadamard R2 for every head."""
        r2 = hadamard_matrix(geometry.head_dim).expand(
            geometry.n_layers, geometry.n_kv_heads, geometry.head_dim, geometry.head_dim).clone()
        return cls(random_hadamard_matrix(geometry.hidden, seed), r2, r3, r4,
                   {"method": "quarot", "seed": seed, "r1": "random_hadamard", "r2": "hadamard"})

    @classmethod
    def random_hadamard_r2(cls, geometry: Geometry, seed: int) -> torch.Tensor:
        """Independent random Hadamard R2 per layer and KV head (init for learned R2)."""
        mats = [random_hadamard_matrix(geometry.head_dim, seed * 100_003 + 7919 * i + 1)
                for i in range(geometry.n_layers * geometry.n_kv_heads)]
        return torch.stack(mats).view(geometry.n_layers, geometry.n_kv_heads, geometry.head_dim, geometry.head_dim)

    # ---- checks -------------------------------------------------------------------------
    def validate(self, geometry: Geometry) -> None:
        """Everything applying the set needs, checked against the model's geometry (from its config:
        no weights needed): shapes, orthogonality (to float32 precision), scalings, and Hadamard
        constructions for the online R3 (head_dim) and R4 (intermediate size)."""
        for name, on, n in (("R3", self.r3, geometry.head_dim), ("R4", self.r4, geometry.intermediate)):
            if on:
                hadamard_factorization(n)  # HadamardError with the reason, before anything is touched
        expect = {"R1": (geometry.hidden, geometry.hidden),
                  "R2": (geometry.n_layers, geometry.n_kv_heads, geometry.head_dim, geometry.head_dim)}
        for name, mat in (("R1", self.r1), ("R2", self.r2)):
            if mat is None:
                continue
            if tuple(mat.shape) != expect[name]:
                raise ValueError(f"{name} has shape {tuple(mat.shape)} but this model needs {expect[name]}: "
                                 "the rotations were made for another model")
            m = mat.double()
            err = (m @ m.transpose(-1, -2) - torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)).abs().max().item()
            if not err <= 1e-4:  # also refuses NaN
                raise ValueError(f"{name} is not orthogonal (max |R R^T - I| = {err:.2e})")
        sizes = scale_sizes(geometry)
        for name, s in self.scales.items():
            if name not in sizes:
                raise ValueError(f"unknown scaling {name!r}; known: {', '.join(sizes)}")
            if tuple(s.shape) != (geometry.n_layers, sizes[name]):
                raise ValueError(f"scaling {name} has shape {tuple(s.shape)} but this model needs "
                                 f"{(geometry.n_layers, sizes[name])}: it was made for another model")
            if not bool(torch.all(torch.isfinite(s)) and torch.all(s > 0)):
                raise ValueError(f"scaling {name} must be finite and positive")
            if name == "qk":
                if geometry.head_dim % 2:
                    raise ValueError(f"scaling qk needs an even head_dim (RoPE pairs), not {geometry.head_dim}")
                pairs = s.double().view(geometry.n_layers, geometry.n_kv_heads, 2, geometry.head_dim // 2)
                if not torch.allclose(pairs[:, :, 0], pairs[:, :, 1], rtol=1e-6, atol=0.0):
                    raise ValueError("scaling qk must give channels j and j + head_dim/2 of each head the same "
                                     "value (RoPE rotates them together); make it with expand_rope_pairs")

    # ---- I/O ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Atomic write: a temporary file renamed into place."""
        path = Path(path)
        tensors = {k: v.contiguous() for k, v in (("R1", self.r1), ("R2", self.r2)) if v is not None}
        tensors.update({f"S.{k}": v.contiguous() for k, v in self.scales.items()})
        meta = {"dartquant": json.dumps({"r3": self.r3, "r4": self.r4, "meta": self.meta})}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RotationSet:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"rotation file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                info = json.loads((f.metadata() or {}).get("dartquant", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ValueError(f"{path} is not a readable rotation file (safetensors): {e}") from e
        scales = {k[2:]: v for k, v in tensors.items() if k.startswith("S.")}
        return cls(tensors.get("R1"), tensors.get("R2"), bool(info.get("r3")), bool(info.get("r4")),
                   info.get("meta", {}), scales)


# ---- folding ------------------------------------------------------------------------------
def _rotate_input_(linear: nn.Module, r: torch.Tensor) -> None:
    """Reader of a rotated stream: W <- W R."""
    w = linear.weight
    w.data.copy_((w.data.double() @ r).to(w.dtype))


def _rotate_output_(linear: nn.Module, r: torch.Tensor) -> None:
    """Writer into a rotated stream: W <- R^T W, b <- R^T b."""
    w = linear.weight
    w.data.copy_((r.T @ w.data.double()).to(w.dtype))
    if linear.bias is not None:
        linear.bias.data.copy_((linear.bias.data.double() @ r).to(linear.bias.dtype))


def _rotate_v_output_(v: nn.Module, r2: torch.Tensor, head_dim: int) -> None:
    """Per KV head h: W_v[h] <- R2_h^T W_v[h], b_v[h] <- b_v[h] R2_h.   r2: [kv_heads, d, d]"""
    w = v.weight  # [kv_heads * d, hidden]
    wh = w.data.double().view(r2.shape[0], head_dim, -1)
    w.data.copy_(torch.einsum("hij,hik->hjk", r2, wh).reshape(w.shape).to(w.dtype))
    if v.bias is not None:
        bh = v.bias.data.double().view(r2.shape[0], head_dim)
        v.bias.data.copy_(torch.einsum("hi,hij->hj", bh, r2).reshape(-1).to(v.bias.dtype))


def _rotate_o_input_(o: nn.Module, r2: torch.Tensor, head_dim: int, groups: int) -> None:
    """Query head q (of KV head q // groups): W_o[:, q] <- W_o[:, q] R2_{q // groups}."""
    w = o.weight  # [hidden, n_heads * d]
    per_q = r2.repeat_interleave(groups, dim=0)  # [n_heads, d, d]
    wh = w.data.double().view(w.shape[0], per_q.shape[0], head_dim)
    w.data.copy_(torch.einsum("ohi,hij->ohj", wh, per_q).reshape(w.shape).to(w.dtype))


def scale_sizes(geometry: Geometry) -> dict[str, int]:
    """The length, per layer, of each diagonal scaling a RotationSet may hold (module doc)."""
    return {"attn_norm": geometry.hidden, "mlp_norm": geometry.hidden, "v": geometry.n_kv_heads * geometry.head_dim,
            "up": geometry.intermediate, "qk": geometry.n_kv_heads * geometry.head_dim}


def expand_rope_pairs(half: torch.Tensor, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """[..., kv_heads * head_dim/2] -> [..., kv_heads * head_dim]: channel j and j + head_dim/2 of
    each head get the same value (RoPE's rotate_half pairs them)."""
    h = half.reshape(*half.shape[:-1], n_kv_heads, head_dim // 2)
    return torch.cat([h, h], dim=-1).reshape(*half.shape[:-1], n_kv_heads * head_dim)


def per_query_head(s: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """A per-KV-head-channel vector [kv_heads * head_dim] repeated for every query head of the group."""
    return s.view(geo.n_kv_heads, geo.head_dim).repeat_interleave(geo.kv_groups, dim=0).reshape(-1)


def _scale_rows_(linear: nn.Module, s: torch.Tensor) -> None:
    """W <- diag(s) W, b <- s * b (the output channels)."""
    w = linear.weight
    w.data.copy_((w.data.double() * s[:, None]).to(w.dtype))
    if linear.bias is not None:
        linear.bias.data.copy_((linear.bias.data.double() * s).to(linear.bias.dtype))


def _scale_cols_(linear: nn.Module, s: torch.Tensor) -> None:
    """W <- W diag(s) (the input channels)."""
    w = linear.weight
    w.data.copy_((w.data.double() * s).to(w.dtype))


def _apply_scales_(model: nn.Module, scales: dict, adapter: ModelAdapter, geo: Geometry) -> None:
    if not scales:
        return
    for i, layer in enumerate(adapter.layers_of(model)):
        for key, norm, readers in (("attn_norm", layer.input_norm, (layer.q, layer.k, layer.v)),
                                   ("mlp_norm", layer.post_attn_norm, (layer.gate, layer.up))):
            if key in scales:
                s = scales[key][i].double()
                norm.weight.data.copy_((norm.weight.data.double() * s).to(norm.weight.dtype))
                for lin in readers:
                    _scale_cols_(lin, 1.0 / s)
        if "v" in scales:
            s = scales["v"][i].double()
            _scale_rows_(layer.v, s)
            _scale_cols_(layer.o, 1.0 / per_query_head(s, geo))
        if "qk" in scales:
            s = scales["qk"][i].double()
            _scale_rows_(layer.q, per_query_head(s, geo))
            _scale_rows_(layer.k, 1.0 / s)
        if "up" in scales:
            s = scales["up"][i].double()
            _scale_rows_(layer.up, s)
            _scale_cols_(layer.down, 1.0 / s)


@torch.no_grad()
def rotate_(model: nn.Module, rotations: RotationSet, adapter: ModelAdapter | None = None) -> None:
    """Fold `rotations` into `model` in place (fusing norms first) and install R3/R4 online.

    Fails whole: every check (and R4's matrix) comes before the first weight changes."""
    adapter = adapter or adapter_for(model)
    geo = adapter.geometry(model.config)
    rotations.validate(geo)
    layers = adapter.layers_of(model)
    for norm in [adapter.norm(model)] + [n for l in layers for n in (l.input_norm, l.post_attn_norm)]:
        if getattr(norm, "bias", None) is not None:
            raise NotImplementedError("norms with a bias (LayerNorm) are not supported yet")
    where = adapter.embedding(model).weight.device  # matrices made on another device fold here
    h4 = hadamard_matrix(geo.intermediate, dtype=torch.float64, device=where) if rotations.r4 else None
    if not norms_fused(model, adapter):
        fuse_norms_(model, adapter)
    layers = adapter.layers_of(model)
    if rotations.r1 is not None:
        r1 = rotations.r1.to(where, torch.float64)
        emb = adapter.embedding(model).weight
        emb.data.copy_((emb.data.double() @ r1).to(emb.dtype))
        _rotate_input_(adapter.head(model), r1)
        for layer in layers:
            for lin in (layer.q, layer.k, layer.v, layer.gate, layer.up):
                _rotate_input_(lin, r1)
            for lin in (layer.o, layer.down):
                _rotate_output_(lin, r1)
    if rotations.r2 is not None:
        for i, layer in enumerate(layers):
            r2 = rotations.r2[i].to(where, torch.float64)
            _rotate_v_output_(layer.v, r2, geo.head_dim)
            _rotate_o_input_(layer.o, r2, geo.head_dim, geo.kv_groups)
    _apply_scales_(model, {k: v.to(where) for k, v in rotations.scales.items()}, adapter, geo)
    if h4 is not None:
        for layer in layers:  # online x -> x H, so W_down <- W_down H keeps x W^T
            _rotate_input_(layer.down, h4)
    install_online_(model, adapter, r3=rotations.r3, r4=rotations.r4)
