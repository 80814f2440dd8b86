"""Rotation sets and the one function that applies them.

Every method (QuaRot, DartQuant, SpinQuant, ...) only *produces* a `RotationSet`; `rotate_`
folds it into the model, following the placement table of `placements.py` (which modules each
transform touches, on which side, per head or not). A set holds, by SpinQuant's names:

* R1 [hidden, hidden], one global matrix on the residual stream;
* R2 [n_layers, kv_heads, head_dim, head_dim], per layer and KV head, between v_proj's output
  and o_proj's input (under GQA a KV head's matrix also serves its query heads);
* R3 / R4: fixed Hadamards (on Q/K after RoPE; on the down_proj input), recorded as flags;
* optional diagonal scalings (OSTQuant's equivalent transformations), each a positive
  [n_layers, n] tensor: "attn_norm", "mlp_norm" [hidden], "v", "qk" [kv_heads * head_dim],
  "up" [intermediate]. The "qk" one must give channels j and j + head_dim/2 of a head the same
  value: RoPE rotates them together, and then it commutes with the scaling.
* optional DuQuant matrices (`blocks`, calib/duquant.py): "DQ_o" [n_layers, kv_heads, head_dim,
  head_dim] folded like R2 (after the scalings), and for each block transform of the placement
  table ("DQ_attn", "DQ_mlp", "DQ_down") "<name>.r1" / ".r2" [n_layers, n_blocks, B, B] and
  "<name>.perm" [n_layers, n] (block_rotation.py): folded into the readers' weights and installed
  online before their input quantizers.

`rotate_` fails whole: `validate` checks everything the set needs (shapes, orthogonality,
scalings, a Hadamard construction for R3's head_dim and R4's intermediate size, norms it can
fuse) and R4's matrix is built before the first weight is touched, so an error leaves the model
exactly as it was.

Saved as safetensors: tensors "R1", "R2", "S.<name>" for scalings, "B.<key>" for DuQuant's, and the flags and provenance (method, seed) as
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

from ..adapters import Geometry, ModelAdapter, adapter_for, check_transforms
from ..block_rotation import BlockSet, check_blocks
from ..hadamard import hadamard_factorization, hadamard_matrix, random_hadamard_matrix
from .fuse import fuse_norms_, norms_fused
from .online import READABLE_SPEC_VERSIONS, install_online_
from .placements import (BLOCKS, MODEL_ROLES, NORM_ROLES, SPECS, TRANSFORMS, Placement, TransformSpec, apply_placement,
                         expand_rope_pairs, per_query_head, scale_sizes, touches_bias)

__all__ = ["RotationSet", "rotate_", "fold_layer_", "fold_outer_", "fold_values", "check_foldable", "scale_sizes",
           "expand_rope_pairs", "per_query_head"]


@dataclass
class RotationSet:
    r1: torch.Tensor | None = None
    r2: torch.Tensor | None = None
    r3: bool = False
    r4: bool = False
    meta: dict = field(default_factory=dict)
    scales: dict = field(default_factory=dict)  # name -> [n_layers, n] positive (see module doc)
    blocks: dict = field(default_factory=dict)  # DuQuant: "DQ_o", "<name>.r1/.perm/.r2" (module doc)
    # R1's job done online where R1 cannot be folded (placements H_attn, H_mlp): a Hadamard on the
    # q/k/v input and one on the gate/up input of every layer, folded into the readers
    r1_online: bool = False

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def quarot(cls, geometry: Geometry, seed: int = 0, r3: bool = True, r4: bool = True,
               r1: bool = True, r1_online: bool = False) -> RotationSet:
        """QuaRot: random (sign-flipped) Hadamard R1 from `seed` (none with r1=False; with
        r1_online, Hadamards on the branch inputs instead); plain Hadamard R2 for every head."""
        r2 = hadamard_matrix(geometry.head_dim).expand(
            geometry.n_layers, geometry.n_kv_heads, geometry.head_dim, geometry.head_dim).clone()
        r1_kind = "random_hadamard" if r1 else ("online_hadamard" if r1_online else "none")
        return cls(random_hadamard_matrix(geometry.hidden, seed) if r1 else None, r2, r3, r4,
                   {"method": "quarot", "seed": seed, "r1": r1_kind, "r2": "hadamard"}, r1_online=r1_online)

    @classmethod
    def random_hadamard_r2(cls, geometry: Geometry, seed: int) -> torch.Tensor:
        """Independent random Hadamard R2 per layer and KV head (init for learned R2)."""
        mats = [random_hadamard_matrix(geometry.head_dim, seed * 100_003 + 7919 * i + 1)
                for i in range(geometry.n_layers * geometry.n_kv_heads)]
        return torch.stack(mats).view(geometry.n_layers, geometry.n_kv_heads, geometry.head_dim, geometry.head_dim)

    def value(self, name: str, geometry: Geometry, device=None) -> torch.Tensor | None:
        """The float64 tensor that folds transform `name` (placements.TRANSFORMS), or None if absent."""
        if name == "R1":
            t = self.r1
        elif name == "R2":
            t = self.r2
        elif name == "R4":
            return hadamard_matrix(geometry.intermediate, dtype=torch.float64, device=device) if self.r4 else None
        elif name == "R3":
            return None  # online only: nothing to fold
        elif name in ("H_attn", "H_mlp"):
            return hadamard_matrix(geometry.hidden, dtype=torch.float64, device=device) if self.r1_online else None
        elif name in BLOCKS:
            if f"{name}.r1" not in self.blocks:
                return None
            return BlockSet(self.blocks[f"{name}.r1"], self.blocks.get(f"{name}.perm"),
                            self.blocks.get(f"{name}.r2")).to(device, torch.float64)
        elif name in self.blocks:
            t = self.blocks[name]
        else:
            t = self.scales.get(name)
        return None if t is None else t.to(device, torch.float64)

    # ---- checks -------------------------------------------------------------------------
    def validate(self, geometry: Geometry) -> None:
        """Everything applying the set needs, checked against the model's geometry (from its config:
        no weights needed): shapes, orthogonality (to float32 precision), scalings, and Hadamard
        constructions for the online R3 (head_dim) and R4 (intermediate size)."""
        for name, on, sizes in (("R3", self.r3, [geometry.head_dim]), ("R4", self.r4, geometry.mlp_widths),
                                ("online R1", self.r1_online, [geometry.hidden])):
            for n in sizes if on else ():
                hadamard_factorization(n)  # HadamardError with the reason, before anything is touched
        if self.r1_online and self.r1 is not None:
            raise ValueError("r1_online replaces R1 (both rotate the q/k/v and gate/up inputs): use one")
        if self.r1_online and any(n.startswith(("DQ_attn", "DQ_mlp")) for n in self.blocks):
            raise ValueError("r1_online and DuQuant's DQ_attn / DQ_mlp both transform the q/k/v and gate/up "
                             "inputs online: use one")
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
        self._validate_blocks(geometry)

    def block_sizes(self, geometry: Geometry) -> dict[str, int]:
        """Channels of each block transform's input."""
        return {"DQ_attn": geometry.hidden, "DQ_mlp": geometry.hidden, "DQ_down": geometry.intermediate}

    def _validate_blocks(self, geometry: Geometry) -> None:
        sizes = self.block_sizes(geometry)
        known = {"DQ_o"} | {f"{n}.{part}" for n in sizes for part in ("r1", "perm", "r2")}
        unknown = sorted(set(self.blocks) - known)
        if unknown:
            raise ValueError(f"unknown DuQuant matrices {unknown}; known: {', '.join(sorted(known))}")
        if "DQ_o" in self.blocks:
            expect = (geometry.n_layers, geometry.n_kv_heads, geometry.head_dim, geometry.head_dim)
            m = self.blocks["DQ_o"].double()
            if tuple(m.shape) != expect:
                raise ValueError(f"DQ_o has shape {tuple(m.shape)} but this model needs {expect}: "
                                 "the rotations were made for another model")
            err = (m @ m.transpose(-1, -2) - torch.eye(m.shape[-1], dtype=m.dtype)).abs().max().item()
            if not err <= 1e-4:
                raise ValueError(f"DQ_o is not orthogonal (max |R R^T - I| = {err:.2e})")
        for name, n in sizes.items():
            parts = {k: self.blocks.get(f"{name}.{k}") for k in ("r1", "perm", "r2")}
            if parts["r1"] is None:
                if any(v is not None for v in parts.values()):
                    raise ValueError(f"{name}: a permutation or second rotation without {name}.r1")
                continue
            if name == "DQ_down" and self.r4:
                raise ValueError("DQ_down and R4 both transform the down_proj input online: use one (r4: false)")
            if parts["r1"].shape[0] != geometry.n_layers or any(
                    v is not None and v.shape[0] != geometry.n_layers for v in parts.values()):
                raise ValueError(f"{name} has {parts['r1'].shape[0]} layers but this model has {geometry.n_layers}")
            for i in range(geometry.n_layers):
                check_blocks(f"{name}[{i}]", n, parts["r1"][i], None if parts["perm"] is None else parts["perm"][i],
                             None if parts["r2"] is None else parts["r2"][i])

    # ---- I/O ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Atomic write: a temporary file renamed into place."""
        path = Path(path)
        tensors = {k: v.contiguous() for k, v in (("R1", self.r1), ("R2", self.r2)) if v is not None}
        tensors.update({f"S.{k}": v.contiguous() for k, v in self.scales.items()})
        tensors.update({f"B.{k}": v.contiguous() for k, v in self.blocks.items()})
        meta = {"dartquant": json.dumps({"r3": self.r3, "r4": self.r4, "r1_online": self.r1_online, "meta": self.meta})}
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
        blocks = {k[2:]: v for k, v in tensors.items() if k.startswith("B.")}
        return cls(tensors.get("R1"), tensors.get("R2"), bool(info.get("r3")), bool(info.get("r4")),
                   info.get("meta", {}), scales, blocks, r1_online=bool(info.get("r1_online")))


# ---- folding ------------------------------------------------------------------------------
def present(rotations: RotationSet) -> list[str]:
    """The transforms (placement-table names) that a set carries."""
    flags = {"R1": rotations.r1 is not None, "R2": rotations.r2 is not None, "R3": rotations.r3, "R4": rotations.r4,
             "H_attn": rotations.r1_online, "H_mlp": rotations.r1_online}
    return [t.name for t in TRANSFORMS if flags.get(t.name, t.name in rotations.scales or t.name in rotations.blocks
                                                      or f"{t.name}.r1" in rotations.blocks)]


def _fold_(module: nn.Module, t: torch.Tensor, spec: TransformSpec, p: Placement, geo: Geometry) -> None:
    """One placement folded into one module, in float64, cast back to the parameter's dtype."""
    if p.role in NORM_ROLES:  # a norm's gain may be offset + weight (Gemma): fold into the gain
        module.set_gain_(apply_placement(module.gain().data.double(), t, spec, p, geo))
        return
    w = module.weight
    w.data.copy_(apply_placement(w.data.double(), t, spec, p, geo).to(w.dtype))
    if touches_bias(p) and getattr(module, "bias", None) is not None:
        b = module.bias
        b.data.copy_(apply_placement(b.data.double(), t, spec, p, geo, bias=True).to(b.dtype))


def _sized(t: torch.Tensor, spec: TransformSpec, module: nn.Module) -> torch.Tensor:
    """A fixed Hadamard re-built at the size of the module it folds into (MoE experts may be
    narrower than config.intermediate_size); every other value as it is."""
    n = module.weight.shape[-1]
    if spec.kind != "hadamard" or t.shape[-1] == n:
        return t
    return hadamard_matrix(n, dtype=t.dtype, device=t.device)


def _module(model: nn.Module, adapter: ModelAdapter, role: str) -> nn.Module:
    return adapter.embedding(model) if role == "embed" else adapter.head(model)


def check_foldable(model: nn.Module, rotations: RotationSet, adapter: ModelAdapter) -> Geometry:
    """Everything rotate_ checks before touching a weight (weights not needed: a model on the
    "meta" device will do). Returns the geometry."""
    geo = adapter.geometry(model.config)
    rotations.validate(geo)
    check_transforms(adapter, present(rotations))  # what this family cannot carry exactly: refused whole
    blocks = adapter.decoder_layers(model)
    norms = [adapter.norm(model)] + [b.get_submodule(n) for b in blocks for n in (adapter.input_norm, adapter.post_attn_norm)]
    if any(getattr(norm, "bias", None) is not None for norm in norms):
        raise NotImplementedError("norms with a bias (LayerNorm) are not supported yet")
    return geo


def fold_values(rotations: RotationSet, geo: Geometry, device=None) -> list[tuple[TransformSpec, torch.Tensor]]:
    """(spec, float64 value) of every transform the set carries, in folding order (R4's Hadamard built here)."""
    return [(spec, t) for spec in TRANSFORMS if (t := rotations.value(spec.name, geo, device)) is not None]


@torch.no_grad()
def fold_layer_(layer, index: int, values, geo: Geometry) -> None:
    """Fold every placement inside decoder block `index` (its LayerModules `layer`; norms fused).

    Per module the placements come in table order, whatever order the blocks are folded in, so
    folding block by block (stream.py) rounds exactly as folding the whole model does."""
    for spec, t in values:
        for p in spec.placements:
            if p.role in MODEL_ROLES:
                continue
            for module in layer.modules(p.role):  # MoE: every expert's (and the router)
                _fold_(module, _sized(t[index] if spec.per_layer else t, spec, module), spec, p, geo)


@torch.no_grad()
def fold_outer_(model: nn.Module, adapter: ModelAdapter, values, geo: Geometry, roles=MODEL_ROLES) -> None:
    """Fold the placements on the embedding and / or lm_head (`roles`)."""
    for spec, t in values:
        for p in spec.placements:
            if p.role in MODEL_ROLES and p.role in roles:
                _fold_(_module(model, adapter, p.role), t, spec, p, geo)


@torch.no_grad()
def rotate_(model: nn.Module, rotations: RotationSet, adapter: ModelAdapter | None = None) -> None:
    """Fold `rotations` into `model` in place (fusing norms first) and install R3/R4 online.

    Fails whole: every check (and R4's matrix) comes before the first weight changes."""
    adapter = adapter or adapter_for(model)
    geo = check_foldable(model, rotations, adapter)
    where = adapter.embedding(model).weight.device  # matrices made on another device fold here
    values = fold_values(rotations, geo, where)  # every value (R4's Hadamard included) before any weight changes
    if not norms_fused(model, adapter):
        fuse_norms_(model, adapter)
    fold_outer_(model, adapter, values, geo)
    for i, layer in enumerate(adapter.layers_of(model)):
        fold_layer_(layer, i, values, geo)
    install_online_(model, adapter, r3=rotations.r3, r4=rotations.r4, r1_online=rotations.r1_online,
                    blocks={spec.name: t for spec, t in values if spec.kind == "block"})


def install_from_spec_(model: nn.Module, spec: dict, folder: Path | None = None) -> None:
    """Re-create the online modules described by a `dartquant.json` dict."""
    version = spec.get("version")
    if version not in READABLE_SPEC_VERSIONS:
        raise ValueError(f"{folder}: dartquant.json has format version {version!r}; this dartquant reads "
                         f"versions {', '.join(map(str, READABLE_SPEC_VERSIONS))}. Re-create the folder with this version.")
    online = spec.get("online", {})
    blocks = None
    if online.get("blocks"):
        rel = (spec.get("rotations") or {}).get("file")
        if folder is None or not rel:
            raise ValueError(f"{folder}: dartquant.json names online block rotations {online['blocks']} but no "
                             "rotations file holding their matrices; the folder is damaged")
        path = Path(folder) / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"{folder}: rotations file {rel!r} must lie inside the folder")
        rotations = RotationSet.load(path)
        geo = adapter_for(model).geometry(model.config)
        rotations.validate(geo)
        blocks = {}
        for name in online["blocks"]:
            value = rotations.value(name, geo) if name in SPECS and SPECS[name].kind == "block" else None
            if value is None:
                raise ValueError(f"{path} lacks the matrices of the online block rotation {name!r}")
            blocks[name] = value
    install_online_(model, r3=bool(online.get("r3")), r4=bool(online.get("r4")),
                    r1_online=bool(online.get("r1_online")), blocks=blocks)
