"""Installing the online modules (R3, R4, DuQuant's block rotations) into a model, the spec
written to `dartquant.json` so that a saved folder gets them back when loaded, and what they
cost per token (`online_cost`).

The spec is format version 1 without block rotations, 2 with them and 3 with the online input
Hadamards that stand in for R1 (`r1_online`): a dartquant that does not know a transform then
refuses the folder (it checks the version) instead of loading a model that computes something else. The block matrices are not in the spec but in the folder's
rotations.safetensors (written with every rotated run), which `rotation.install_from_spec_` reads
(there, because it needs RotationSet, whose module imports this one).
"""

from __future__ import annotations

from torch import nn

from ..adapters import ModelAdapter, adapter_for
from .fuse import split_experts_
from ..modules import AttentionTransform, OnlineBlockRotation, OnlineHadamard, as_qlinear, register_attention
from .placements import SPECS

SPEC_VERSION = 1
BLOCKS_SPEC_VERSION = 2  # the spec of a model with online block rotations
R1_ONLINE_SPEC_VERSION = 3  # ... with online Hadamards on the q/k/v and gate/up inputs
READABLE_SPEC_VERSIONS = (SPEC_VERSION, BLOCKS_SPEC_VERSION, R1_ONLINE_SPEC_VERSION)
R1_ONLINE = ("H_attn", "H_mlp")  # the placement-table rows of r1_online


def install_online_(model: nn.Module, adapter: ModelAdapter | None = None, *, r3: bool, r4: bool,
                    r1_online: bool = False, blocks: dict | None = None) -> None:
    """Put OnlineHadamard modules where R3 (Q, K after RoPE), R4 (down_proj input) and, with
    `r1_online`, the branch-input Hadamards H_attn (q/k/v input) and H_mlp (gate/up input) act.

    Only installs modules; the matching offline folding (R4's H into down_proj) is rotate_'s job.
    Attention always gets an AttentionTransform so that KV quantizers have a place to live.
    `blocks`: {placement-table name of a "block" transform: block_rotation.BlockSet of all
    layers}; each layer gets one OnlineBlockRotation shared by the readers of that input.
    """
    adapter = adapter or adapter_for(model)
    geo = adapter.geometry(model.config)
    split_experts_(model, adapter)  # a MoE's per-expert down_proj needs its own module
    for i, block in enumerate(adapter.decoder_layers(model)):
        layer = adapter.layer(block)
        existing = getattr(layer.attn, "dq_attention", None)
        if existing is None:
            layer.attn.dq_attention = AttentionTransform(geo.head_dim, rotate_qk=r3)
        elif r3 and existing.qk_rotation is None:
            existing.qk_rotation = OnlineHadamard(geo.head_dim)
        if r1_online:
            if adapter.moe is not None:
                raise ValueError(f"r1_online is not supported for mixtures of experts ({adapter.family}): the "
                                 "router reads the MLP input too")
            for name in R1_ONLINE:
                _install_shared_hadamard_(adapter, block, layer, name, geo.hidden)
        if r4:  # every down_proj: the dense one, or each expert's (sized by its own input)
            for key, linear in layer.keyed("down"):
                down = as_qlinear(linear)
                if down.input_rotation is None:
                    down.input_rotation = OnlineHadamard(down.in_features)
                adapter.set_linear(block, key, down)
        for name, value in (blocks or {}).items():
            _install_blocks_(adapter, block, layer, name, value[i])
    model.set_attn_implementation(register_attention())


def _install_shared_hadamard_(adapter: ModelAdapter, block: nn.Module, layer, name: str, n: int) -> None:
    """One OnlineHadamard before every reader of transform `name` (shared: the input is transformed once)."""
    readers = [(key, as_qlinear(linear)) for p in SPECS[name].placements for key, linear in layer.keyed(p.role)]
    current = {id(q.input_rotation): q.input_rotation for _, q in readers}
    if len(current) == 1 and isinstance(next(iter(current.values())), OnlineHadamard):
        return  # already installed (idempotent)
    if any(r is not None for r in current.values()):
        raise ValueError(f"{readers[0][0]} already has an online transform; {name} cannot stack on it")
    module = OnlineHadamard(n)
    for key, q in readers:
        q.input_rotation = module
        adapter.set_linear(block, key, q)


def _install_blocks_(adapter: ModelAdapter, block: nn.Module, layer, name: str, value) -> None:
    """One OnlineBlockRotation (in the readers' dtype) before every reader of transform `name`."""
    spec = SPECS[name]
    readers = [(key, linear) for p in spec.placements for key, linear in layer.keyed(p.role)]
    w = readers[0][1].weight
    mats = value.to(w.device, w.dtype)
    module = OnlineBlockRotation(w.shape[1], mats.r1, mats.perm, mats.r2)
    for key, linear in readers:
        q = as_qlinear(linear)
        if q.input_rotation is not None and not isinstance(q.input_rotation, OnlineBlockRotation):
            raise ValueError(f"{key} already has an online {type(q.input_rotation).__name__}; {name} cannot stack on it")
        q.input_rotation = module
        adapter.set_linear(block, key, q)


def _block_readers(layer) -> dict[str, OnlineBlockRotation]:
    """The block rotations installed in one layer, by placement-table name."""
    found = {}
    for name, spec in SPECS.items():
        if spec.kind != "block":
            continue
        for p in spec.placements:
            for m in layer.modules(p.role):
                if isinstance(getattr(m, "input_rotation", None), OnlineBlockRotation):
                    found[name] = m.input_rotation
    return found


def online_spec(model: nn.Module, adapter: ModelAdapter | None = None) -> dict:
    """What `dartquant.json` records about the online transforms of `model` (read off its modules)."""
    layers = (adapter or adapter_for(model)).layers_of(model)
    r3 = any(getattr(getattr(l.attn, "dq_attention", None), "qk_rotation", None) is not None for l in layers)
    r4 = any(isinstance(getattr(d, "input_rotation", None), OnlineHadamard) for l in layers for d in l.modules("down"))
    blocks = sorted({name for l in layers for name in _block_readers(l)})
    r1_online = any(isinstance(getattr(m, "input_rotation", None), OnlineHadamard) for l in layers for m in l.modules("q"))
    if r1_online:
        return {"version": R1_ONLINE_SPEC_VERSION, "online": {"r3": r3, "r4": r4, "r1_online": True,
                                                              **({"blocks": blocks} if blocks else {})}}
    if blocks:
        return {"version": BLOCKS_SPEC_VERSION, "online": {"r3": r3, "r4": r4, "blocks": blocks}}
    return {"version": SPEC_VERSION, "online": {"r3": r3, "r4": r4}}


# ---- what the online transforms cost ------------------------------------------------------
def hadamard_flops(n: int) -> int:
    """FLOPs per vector of our fast Hadamard of order n = k * 2^m: m butterfly stages of n
    additions, the dense k x k base as 2 k FLOPs per element (if k > 1), and the 1/sqrt(n) scale."""
    from ..hadamard import hadamard_factorization

    k, p = hadamard_factorization(n)
    return n * (p.bit_length() - 1) + (2 * k * n if k > 1 else 0) + n


def online_cost(model: nn.Module, adapter: ModelAdapter | None = None) -> dict:
    """FLOPs per token and stored parameters of every online transform of `model` (read off its
    modules; a module shared by several readers, e.g. q/k/v, counted once: a deployed kernel
    transforms the shared input once), next to the decoder linears' own FLOPs per token."""
    from ..block_rotation import block_flops

    adapter = adapter or adapter_for(model)
    geo = adapter.geometry(model.config)
    out = {"r3": {"flops": 0}, "r4": {"flops": 0}, "r1_online": {"flops": 0}, "blocks": {"flops": 0, "params": 0}}
    linear_flops = 0
    for layer in adapter.layers_of(model):
        linear_flops += sum(2 * m.weight.numel() for m in layer.linears().values())
        transform = getattr(layer.attn, "dq_attention", None)
        if getattr(transform, "qk_rotation", None) is not None:  # R3 on every Q and K head of a token
            out["r3"]["flops"] += (geo.n_heads + geo.n_kv_heads) * hadamard_flops(geo.head_dim)
        for d in layer.modules("down"):
            if isinstance(getattr(d, "input_rotation", None), OnlineHadamard):
                out["r4"]["flops"] += hadamard_flops(d.in_features)
        for role in ("q", "gate"):  # one shared module per branch input (q/k/v; gate/up)
            m = next(iter(layer.modules(role)), None)
            if isinstance(getattr(m, "input_rotation", None), OnlineHadamard):
                out["r1_online"]["flops"] += hadamard_flops(m.in_features)
        for module in _block_readers(layer).values():
            nb, b, _ = module.r1.shape
            rotations = 1 + (module.r2 is not None)
            out["blocks"]["flops"] += block_flops(module.n, b, rotations)
            out["blocks"]["params"] += rotations * nb * b * b + (module.n if module.perm is not None else 0)
    total = sum(v["flops"] for v in out.values())
    return {**out, "total_flops_per_token": total, "linear_flops_per_token": linear_flops,
            "overhead": round(total / linear_flops, 5) if linear_flops else None}


def online_cost_from_geometry(geo, *, r3: bool, r4: bool, block_size: int | None = None,
                              permute: bool = True, r1_online: bool = False) -> dict:
    """What `online_cost` reads off an installed dense model, from its geometry alone (for models
    not at hand, e.g. 7B tables): R3 / R4 Hadamards, r1_online's two input Hadamards per layer and,
    with `block_size`, DuQuant's three online block transforms per layer (q/k/v input, gate/up
    input: hidden; down input: intermediate)."""
    from ..block_rotation import block_flops, n_blocks

    rot = 1 + permute
    per_layer_r3 = (geo.n_heads + geo.n_kv_heads) * hadamard_flops(geo.head_dim) if r3 else 0
    per_layer_r4 = hadamard_flops(geo.intermediate) if r4 else 0
    flops = params = 0
    if block_size:
        for n in (geo.hidden, geo.hidden, geo.intermediate):
            flops += block_flops(n, block_size, rot)
            params += rot * n_blocks(n, block_size) * block_size ** 2 + (n if permute else 0)
    kv = geo.n_kv_heads * geo.head_dim
    linear = 2 * (geo.hidden * (geo.n_heads * geo.head_dim + 2 * kv) + geo.n_heads * geo.head_dim * geo.hidden
                  + 3 * geo.hidden * geo.intermediate)
    out = {"r3": {"flops": geo.n_layers * per_layer_r3}, "r4": {"flops": geo.n_layers * per_layer_r4},
           "r1_online": {"flops": geo.n_layers * 2 * hadamard_flops(geo.hidden) if r1_online else 0},
           "blocks": {"flops": geo.n_layers * flops, "params": geo.n_layers * params}}
    total = sum(v["flops"] for v in out.values())
    return {**out, "total_flops_per_token": total, "linear_flops_per_token": geo.n_layers * linear,
            "overhead": round(total / (geo.n_layers * linear), 5)}
