"""End-to-end rotation training: SpinQuant and OSTQuant.

Both learn R1 (global) and R2 (one per layer, shared by its KV heads, as in SpinQuant) by
backpropagating a loss of the *whole fake-quantized network*; OSTQuant also learns diagonal
scalings (equivalent transformations). R3/R4 stay fixed Hadamards.

How the training model is built: it is the deployed quantized model itself, with every weight
a function of the current transforms. On the norm-fused, unrotated model we install what a
quantized run has (online R3/R4 modules, activation and K/V quantizers) and register a
`torch.nn.utils.parametrize` parametrization on each decoder linear that computes its rotated
(and scaled) weight, e.g. q_proj: W R1 diag(1/s); down_proj: R1^T W diag(1/s) H. So the forward
is exactly the quantized model's forward at the current transforms, and gradients reach the
transforms through the straight-through activation quantizers. The embedding output and the
lm_head input (both kept in 16 bits) are rotated by hooks, x R1 and x R1^T, which is the same
function as rotating those big matrices but costs a token-sized matmul.

Memory: only the transforms require gradients, and every decoder layer runs under activation
checkpointing, so the rotated weights are recomputed in the backward pass instead of being
kept for the whole network. Micro-batches accumulate gradients for one optimizer step.

Losses:
* SpinQuant: next-token cross-entropy of the quantized model on the calibration text.
* OSTQuant: KL-Top, KL(p_fp || p_quant) over the teacher's top-k vocabulary entries, with p
  renormalized on those entries; the teacher is the same network with quantizers off (at
  any transforms that is the full-precision function), computed per micro-batch.

Optimizers: rotations by Cayley SGD on the orthogonal group (SpinQuant's choice; OSTQuant uses
a Riemannian Adam, which we do not have), the log-scales by Adam; cosine schedules to zero.
On exit the model is restored to the norm-fused unrotated state it came in; the caller folds
the returned RotationSet exactly, in float64, like any other method's.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..adapters import ModelAdapter, UnsupportedTransformError, adapter_for, check_transforms
from ..hadamard import fast_hadamard_transform, random_hadamard_matrix
from ..modules import QLinear
from ..quant.act import install_quantizers_, set_act_quant_enabled_
from ..quant.primitives import QuantSpec, fake_quantize
from ..typecheck import check_types
from ..transforms import RotationSet, fuse_norms_
from ..transforms.online import install_online_
from ..transforms.placements import (NORM_ROLES, apply_placement, expand_rope_pairs, placements_on, scale_sizes,
                                     touches_bias)
from .orth import CayleyOrth, CayleySGD

E2E_METHODS = ("spinquant", "ostquant")


# ---- losses ---------------------------------------------------------------------------------
def kl_top_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int = 1024,
                temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(p_t || p_s) on the teacher's top-k entries (each renormalized there)."""
    k = min(k, teacher_logits.shape[-1])
    with torch.no_grad():
        top_t, idx = torch.topk(teacher_logits.float(), k, dim=-1)
        log_p_t = F.log_softmax(top_t / temperature, dim=-1)
    top_s = torch.gather(student_logits.float(), -1, idx)
    log_p_s = F.log_softmax(top_s / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return kl.mean() * temperature ** 2


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


# ---- configuration ------------------------------------------------------------------------
@dataclass
class E2EConfig:
    """End-to-end training settings (the `e2e` section of a run config, flags `--e2e-*`), shared by
    SpinQuant and OSTQuant; defaults: SpinQuant's published schedule."""

    steps: int = 100
    batch: int = 8  # sequences per optimizer step
    micro_batch: int = 1  # sequences per forward/backward (gradients accumulate)
    seqlen: int = 2048
    samples: int | None = None  # distinct training sequences; None = steps x batch
    eval_samples: int = 2  # held-out calibration sequences scored before/after training
    lr: float = 1.5  # Cayley SGD on R1/R2
    momentum: float = 0.0
    scale_lr: float = 1e-2  # Adam on OSTQuant's log-scales
    kl_topk: int = 1024  # OSTQuant's KL-Top: teacher's top-k vocabulary entries
    kl_temperature: float = 1.0
    w_bits: int | None = None  # weight bits while training; None: 16 before GPTQ, else the scheme's
    checkpointing: bool = True
    amp: str = "auto"  # training matmuls: bf16 autocast ("bf16"), fp32 ("off"); auto = bf16 on CUDA

    def __post_init__(self):
        check_types(self)

    def validate(self) -> None:
        for name in ("steps", "batch", "micro_batch", "kl_topk"):
            if getattr(self, name) <= 0:
                raise ValueError(f"e2e_{name} must be positive, got {getattr(self, name)}")
        if self.batch % self.micro_batch:
            raise ValueError(f"e2e_batch ({self.batch}) must be a multiple of e2e_micro_batch ({self.micro_batch})")
        if self.lr <= 0 or self.scale_lr <= 0:
            raise ValueError("learning rates must be positive")
        if self.amp not in AMP_MODES + ("auto",):
            raise ValueError(f"e2e_amp must be one of {AMP_MODES} (or auto), got {self.amp!r}")
        if self.seqlen < 2 or (self.samples is not None and self.samples <= 0) or self.eval_samples < 0:
            raise ValueError("e2e_seqlen must be at least 2, e2e_samples positive, e2e_eval_samples >= 0")
        if self.w_bits is not None and self.w_bits not in (2, 3, 4, 5, 6, 7, 8, 16):
            raise ValueError(f"e2e_w_bits={self.w_bits} is not supported; use 2-8 or 16")


def train_w_bits(cfg) -> int:
    """Weight bits during end-to-end training: 16 when GPTQ follows (as SpinQuant does)."""
    opts = cfg.section("e2e")
    if opts.w_bits is not None:
        return opts.w_bits
    return 16 if cfg.scheme.weight_quantizer == "gptq" else cfg.scheme.w_bits


AMP_MODES = ("off", "bf16")


def resolve_amp(amp: str, device: str) -> str:
    """'auto' -> bf16 autocast on CUDA (the published schedules train in bf16), fp32 elsewhere."""
    if amp == "auto":
        return "bf16" if str(device).startswith("cuda") else "off"
    return amp


def _autocast(device: torch.device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# ---- the trainable transforms -------------------------------------------------------------
def ostquant_scale_sizes(geo) -> dict[str, int]:
    """Lengths per layer of OSTQuant's trainable log-scales: the RotationSet scalings, except
    the Q/K one, which has one free value per RoPE channel pair (Transforms.qk_scale expands it)."""
    return {**scale_sizes(geo), "qk": geo.n_kv_heads * geo.head_dim // 2}


class Transforms(nn.Module):
    """R1 [h, h], R2 [L, d, d] (Cayley parameters) and, for OSTQuant, log-scales per layer."""

    def __init__(self, r1: torch.Tensor, r2: torch.Tensor, log_scale_sizes: dict[str, int] | None, n_layers: int,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.r1 = CayleyOrth(r1, dtype=dtype)
        self.r2 = CayleyOrth(r2, dtype=dtype)
        self.log_scales = nn.ParameterDict(
            {k: nn.Parameter(torch.zeros(n_layers, n, dtype=dtype)) for k, n in (log_scale_sizes or {}).items()})
        self.weight_spec: QuantSpec | None = None  # fake-quantize computed weights (STE) if set

    def scale(self, name: str, layer: int) -> torch.Tensor | None:
        return self.log_scales[name][layer].exp() if name in self.log_scales else None

    def qk_scale(self, layer: int, geo) -> torch.Tensor | None:
        """The Q/K scaling of `layer` per KV-head channel: one free value per RoPE pair."""
        s = self.scale("qk", layer)
        return None if s is None else expand_rope_pairs(s, geo.n_kv_heads, geo.head_dim)

    def rotation_set(self, geo, r3: bool, r4: bool, meta: dict, dtype=torch.float32) -> RotationSet:
        # on the host, whatever device trained them: folding and saving happen there
        r2 = self.r2.final().to("cpu", dtype)  # [L, d, d] -> one per KV head (shared)
        r2 = r2[:, None].expand(-1, geo.n_kv_heads, -1, -1).contiguous()
        scales = {k: v.detach().to("cpu", torch.float64).exp().to(dtype) for k, v in self.log_scales.items()}
        if "qk" in scales:
            scales["qk"] = expand_rope_pairs(scales["qk"], geo.n_kv_heads, geo.head_dim)
        return RotationSet(self.r1.final().to("cpu", dtype), r2, r3, r4, meta, scales)


class _Param(nn.Module):
    """A weight (or bias) as a function of the transforms; `fn(t, w)` does the maths."""

    def __init__(self, transforms: Transforms, fn, quantize: bool = False):
        super().__init__()
        self._t = (transforms,)  # a tuple: not registered, so the transforms are not duplicated
        self.fn = fn
        self.quantize = quantize

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        t = self._t[0]
        out = self.fn(t, w.to(t.r1.R.dtype)).to(w.dtype)
        if self.quantize and t.weight_spec is not None:
            out = fake_quantize(out, t.weight_spec)
        return out


def _transform_value(t: Transforms, spec, layer: int, geo) -> torch.Tensor | None:
    """The current (differentiable) value of one transform at `layer`, as apply_placement takes it."""
    if spec.name == "R1":
        return t.r1.R
    if spec.name == "R2":  # one matrix per layer, shared by its KV heads (SpinQuant)
        r = t.r2.R[layer]
        return r.expand(geo.n_kv_heads, *r.shape)
    if spec.name == "qk":
        return t.qk_scale(layer, geo)
    return t.scale(spec.name, layer) if spec.kind == "diagonal" else None


def _param_fn(role: str, layer: int, geo, r4: bool, bias: bool):
    """fn(t, w): the weight (or bias) of `role` in `layer` under the current transforms, derived
    from the placement table (R3 has nothing to fold; R4's Hadamard is applied as a fast transform).
    None if no transform touches it."""
    entries = [(spec, p) for spec, p in placements_on(role)
               if (spec.name != "R4" or r4) and (not bias or touches_bias(p))]
    if not entries:
        return None

    def fn(t, w):
        for spec, p in entries:
            if spec.name == "R4":
                w = fast_hadamard_transform(w)  # w H, with H = R4's Hadamard
                continue
            value = _transform_value(t, spec, layer, geo)
            if value is not None:
                w = apply_placement(w, value, spec, p, geo, bias=bias)
        return w

    return fn


def check_e2e_supported(model: nn.Module, adapter: ModelAdapter, scale_names=()) -> None:
    """Refuse, before any training, what this graph does not build: MoE blocks (the router and the
    per-expert linears are not parametrized here) and transforms the family cannot carry."""
    if adapter.moe is not None:
        raise UnsupportedTransformError(f"{adapter.family}: end-to-end training (SpinQuant / OSTQuant) does not "
                                        "cover mixture-of-experts blocks; use quarot or dartquant")
    check_transforms(adapter, ["R1", "R2", *scale_names])


@contextlib.contextmanager
def training_view(model: nn.Module, transforms: Transforms, scheme, r3: bool, r4: bool,
                  adapter: ModelAdapter | None = None, checkpointing: bool = True):
    """Make `model` (norm-fused, unrotated) the quantized model at `transforms`; undo on exit."""
    adapter = adapter or adapter_for(model)
    check_e2e_supported(model, adapter, transforms.log_scales)
    geo = adapter.geometry(model.config)
    attn_impl = model.config._attn_implementation
    was_training, use_cache = model.training, getattr(model.config, "use_cache", None)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks, parametrized = [], []
    try:
        install_online_(model, adapter, r3=r3, r4=r4)
        install_quantizers_(model, scheme, adapter)
        for p in model.parameters():
            p.requires_grad_(False)
        for i, layer in enumerate(adapter.layers_of(model)):
            for role, linear in layer.linears().items():
                parametrize.register_parametrization(
                    linear, "weight", _Param(transforms, _param_fn(role, i, geo, r4, False), quantize=True), unsafe=True)
                parametrized.append((linear, "weight"))
                b_fn = _param_fn(role, i, geo, r4, True)
                if b_fn is not None and linear.bias is not None:
                    parametrize.register_parametrization(linear, "bias", _Param(transforms, b_fn), unsafe=True)
                    parametrized.append((linear, "bias"))
            if transforms.log_scales:
                for name in NORM_ROLES:
                    norm = getattr(layer, name)
                    parametrize.register_parametrization(norm, "weight", _Param(transforms, _param_fn(name, i, geo, r4, False)),
                                                         unsafe=True)
                    parametrized.append((norm, "weight"))
        r1 = transforms.r1.R
        hooks.append(adapter.embedding(model).register_forward_hook(
            lambda m, a, out: (out.to(r1.dtype) @ r1).to(out.dtype)))
        hooks.append(adapter.head(model).register_forward_pre_hook(
            lambda m, a: ((a[0].to(r1.dtype) @ r1.T).to(a[0].dtype),)))
        model.config.use_cache = False
        if checkpointing:  # transformers >= 5.2x renamed it
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        yield model
    finally:
        for h in hooks:
            h.remove()
        for module, name in reversed(parametrized):
            if parametrize.is_parametrized(module, name):
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        if checkpointing:
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        for block in adapter.decoder_layers(model):  # take the online modules and quantizers out again
            layer = adapter.layer(block)
            for linear in layer.linears().values():
                if isinstance(linear, QLinear):
                    linear.input_rotation = linear.input_quantizer = None
            if hasattr(layer.attn, "dq_attention"):
                del layer.attn.dq_attention
        model.set_attn_implementation(attn_impl)
        for n, p in model.named_parameters():
            p.requires_grad_(grads.get(n, False))
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache


# ---- training -----------------------------------------------------------------------------
def _set_quant(model: nn.Module, transforms: Transforms, on: bool, weight_spec: QuantSpec | None) -> None:
    set_act_quant_enabled_(model, on)
    transforms.weight_spec = weight_spec if on else None


def _loss(model, transforms, ids, method: str, amp: str, opts: E2EConfig, weight_spec) -> torch.Tensor:
    with _autocast(ids.device, amp):  # the losses themselves upcast the logits to fp32
        if method == "spinquant":
            return next_token_ce(model(input_ids=ids).logits, ids)
        with torch.no_grad():
            _set_quant(model, transforms, False, weight_spec)
            teacher = model(input_ids=ids).logits
            _set_quant(model, transforms, True, weight_spec)
        return kl_top_loss(model(input_ids=ids).logits, teacher, opts.kl_topk, opts.kl_temperature)


def train_e2e(model: nn.Module, cfg, train_ids: torch.Tensor, eval_ids: torch.Tensor | None = None, *,
              out_dir: Path | None = None, progress: bool = True) -> RotationSet:
    """Train SpinQuant / OSTQuant transforms on `train_ids` [n, seqlen]; return the RotationSet.

    `cfg` (a RunConfig): its method (spinquant | ostquant), seed, r3 / r4, `e2e` section, and
    the scheme whose activation / KV quantizers are used during training. The batches cycle
    through `train_ids` in a seeded order; `eval_ids` (held-out calibration sequences) get the
    loss before and after training, written with the curve to `out_dir`.
    """
    from tqdm.auto import tqdm

    opts = cfg.section("e2e")
    opts.validate()
    method = cfg.method
    if method not in E2E_METHODS:
        raise ValueError(f"end-to-end method must be one of {E2E_METHODS}, got {method!r}")
    amp, w_bits, seed = resolve_amp(opts.amp, cfg.device), train_w_bits(cfg), cfg.seed
    adapter = adapter_for(model)
    check_e2e_supported(model, adapter)  # before any work
    geo = adapter.geometry(model.config)
    fuse_norms_(model, adapter)
    device = next(model.parameters()).device
    r1 = random_hadamard_matrix(geo.hidden, seed)  # the same start QuaRot uses with this seed
    r2 = RotationSet.random_hadamard_r2(geo, seed)[:, 0]
    sizes = ostquant_scale_sizes(geo) if method == "ostquant" else None
    transforms = Transforms(r1, r2, sizes, geo.n_layers).to(device)
    weight_spec = QuantSpec(bits=w_bits, symmetric=True) if w_bits < 16 else None
    groups = [{"params": [transforms.r1.R, transforms.r2.R]}]
    opt = CayleySGD(groups, lr=opts.lr, momentum=opts.momentum)
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=opts.steps)]
    scale_opt = None
    if transforms.log_scales:
        scale_opt = torch.optim.Adam(transforms.log_scales.parameters(), lr=opts.scale_lr)
        scheds.append(torch.optim.lr_scheduler.CosineAnnealingLR(scale_opt, T_max=opts.steps))
    g = torch.Generator().manual_seed(seed + 29)
    order = torch.cat([torch.randperm(len(train_ids), generator=g)
                       for _ in range(math.ceil(opts.steps * opts.batch / len(train_ids)))])

    def loss_of(ids):
        return _loss(model, transforms, ids, method, amp, opts, weight_spec)
    curve, t0 = [], time.perf_counter()

    def held_out_loss() -> float | None:
        if eval_ids is None or len(eval_ids) == 0:
            return None
        with torch.no_grad():
            vals = [loss_of(eval_ids[j: j + 1].to(device)).item()
                    for j in range(len(eval_ids))]
        return sum(vals) / len(vals)

    with training_view(model, transforms, cfg.scheme, cfg.r3, cfg.r4, adapter, opts.checkpointing):
        _set_quant(model, transforms, True, weight_spec)
        eval_before = held_out_loss()
        bar = tqdm(range(opts.steps), desc=f"{method} steps", disable=not progress)
        for step in bar:
            opt.zero_grad(set_to_none=True)
            if scale_opt is not None:
                scale_opt.zero_grad(set_to_none=True)
            batch = order[step * opts.batch: (step + 1) * opts.batch]
            total = 0.0
            for j in range(0, opts.batch, opts.micro_batch):
                ids = train_ids[batch[j: j + opts.micro_batch]].to(device)
                loss = loss_of(ids) * (len(ids) / opts.batch)
                loss.backward()
                total += loss.item()
            if not math.isfinite(total):
                raise FloatingPointError(f"{method}: the loss became {total} at step {step}; "
                                         "lower --e2e-lr (or --e2e-scale-lr)")
            curve.append({"step": step, "loss": total, "lr": opt.param_groups[0]["lr"],
                          "seconds": round(time.perf_counter() - t0, 3)})
            opt.step()
            if scale_opt is not None:
                scale_opt.step()
            for s in scheds:
                s.step()
            bar.set_postfix(loss=f"{total:.4f}")
        eval_after = held_out_loss()
        _set_quant(model, transforms, False, None)
    meta = {"method": method, "seed": seed, "r1": "learned", "r2": "learned",
            "scales": sorted(transforms.log_scales.keys()), "steps": opts.steps, "batch": opts.batch,
            "seqlen": int(train_ids.shape[1]), "train_sequences": int(len(train_ids)), "lr": opts.lr, "amp": amp,
            "loss": "ce" if method == "spinquant" else f"kl_top{opts.kl_topk}",
            "eval_loss_before": eval_before, "eval_loss_after": eval_after}
    if out_dir is not None:
        resolved = {**asdict(opts), "method": method, "seed": seed, "w_bits": w_bits, "amp": amp,
                    "r3": cfg.r3, "r4": cfg.r4}
        (Path(out_dir) / f"{method}_loss.json").write_text(json.dumps(
            {"config": resolved, "eval_loss_before": eval_before, "eval_loss_after": eval_after,
             "eval_sequences": 0 if eval_ids is None else int(len(eval_ids)), "curve": curve}, indent=1))
    return transforms.rotation_set(geo, cfg.r3, cfg.r4, meta)
