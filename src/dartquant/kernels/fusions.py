"""Fusions across modules of a model on the W4A4 kernels (applied after the model is on its device).

1. **A block's RMSNorm and its readers' activation quantization as one kernel** (`NormQuant`).
   In a pre-norm decoder block the normalised stream is read only by linears: the input norm by
   q / k / v, the post-attention norm by gate / up.  When all of them are `W4A4Linear`s without an
   online Hadamard (R1 folded offline), the normalised tensor is never needed in floats: one
   kernel (`act_quant.rmsnorm_quantize_pack`) reads the residual stream once and writes the 4-bit
   codes, where the unfused model runs the norm (five or six elementwise kernels with fp32
   intermediates) and then the quantize kernel.  The norm module returns a placeholder tensor of
   the right shape (never written) and hands the codes to the readers' `SharedInput`.
2. **Siblings as one GEMM** (`MergedSiblings`): q / k / v and gate / up read one tensor; their
   weights concatenated along the output give one GEMM launch instead of three / two (at decode
   a GEMV of 8-45 MB is latency-bound: one larger launch moves the bytes faster).  Each linear
   returns its columns of the shared output (a view).  Exact: the same integer dots, the same
   epilogue per output channel.

Design choices:
* Installed only where the structure says it is safe: an RMSNorm of Llama style (gain after the
  cast; not Gemma's gain in fp32 nor its sandwich norms), dense MLP (a MoE router reads the
  norm's output too), readers all W4A4Linears of one SharedInput with the same settings and no
  rotation.  Siblings merge when they share the input quantization and settings.
* The norm fusion is then checked by running it (`verify_fused_norms_`): short forwards with the
  placeholders filled with 0, 1000 and NaN must give the same finite logits, since nothing should
  read the values (any reader outside the fused linears makes them differ), and each fused kernel
  must give the codes of its original norm + the quantizer on the inputs the plain model gives it;
  otherwise every norm fusion is undone.  A reader asking the
  SharedInput for other settings than the primed ones raises (`SharedInput.quantize`) instead of
  quantizing the placeholder.
* The norm fusion computes the unfused function up to the fp32 summation order of the mean of
  squares (the kernel's docstring); logits compared in tests/test_kernels_backend.py.
* Merged siblings hold the concatenated weight; the members' buffers become views of it (weight
  memory unchanged: `bench.weight_bytes` counts memory ranges).  Moving the model to another device
  afterwards would copy the views apart: fuse after `.to(device)` (`apply_fusions_`).
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch import nn

from ..modules import RMSNorm
from .act_quant import hadamard_quantize_pack, rmsnorm_quantize_pack
from .linear import W4A4Linear, _out_dtype, replace_modules_
from .w4a4_gemm import PackedWeight, planar_weight

__all__ = ["MergedSiblings", "NormQuant", "apply_fusions_", "fuse_norm_quant_", "merge_siblings_",
           "unfuse_norm_quant_", "verify_fused_norms_"]

log = logging.getLogger(__name__)


class NormQuant(nn.Module):
    """RMSNorm + the per-token 4-bit quantization of all its readers (see the module docstring)."""

    def __init__(self, norm: RMSNorm, readers: list[W4A4Linear], original: nn.Module | None = None):
        super().__init__()
        self.norm = norm  # the gain and eps (a dartquant RMSNorm sharing the model's weight)
        self.original = [original or norm]  # what unfuse_norm_quant_ puts back (a list: not a submodule twice)
        self.readers = readers  # a plain list: not submodules (they stay where they are)
        self.shared = readers[0].shared_input
        self.clip_ratio = readers[0].clip_ratio
        gain = norm.gain().detach()
        self.unit_gain = bool(torch.all(gain == 1))
        self.fill: float | None = None  # verify_fused_norms_: the placeholder's value (None: not written)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // x.shape[-1]
        planar = self.readers[0].activation_operand(tokens)
        if any(r.activation_operand(tokens) != planar for r in self.readers[1:]):
            raise RuntimeError("the linears reading one fused norm ask for different activation operands: "
                               "unfuse_norm_quant_ before changing their settings one by one")
        gain = None if self.unit_gain else self.norm.gain().detach()
        act = rmsnorm_quantize_pack(x, gain, self.norm.variance_epsilon, self.clip_ratio, planar)
        out = torch.empty_like(x) if self.fill is None else torch.full_like(x, self.fill)
        self.shared.prime(out, act, self.clip_ratio, False, planar)
        return out

    def extra_repr(self) -> str:
        return f"{self.norm.extra_repr()}, fused with the 4-bit quantization of {len(self.readers)} linears"


def _norm_fusable(norm: RMSNorm, readers: list) -> bool:
    """Llama-style gain, and readers that are W4A4Linears sharing one unrotated input quantization."""
    if norm.scale_in_float32 or not readers or not all(isinstance(r, W4A4Linear) for r in readers):
        return False
    first = readers[0]
    if first.shared_input is None or any(r.rotate for r in readers):
        return False
    same = lambda r: (r.shared_input is first.shared_input and r.clip_ratio == first.clip_ratio  # noqa: E731
                      and r.in_features == first.in_features)
    return all(same(r) for r in readers) and norm.weight.shape == (first.in_features,)


def fuse_norm_quant_(model: nn.Module) -> list[str]:
    """Replace every block norm whose only readers are W4A4Linears by a `NormQuant` (structure only;
    `verify_fused_norms_` checks it by running). Returns the replaced norms' names."""
    from ..adapters import adapter_for

    adapter = adapter_for(model)
    if adapter.branch_norms or adapter.norm_scale_in_float32:
        return []
    names = []
    for i, block in enumerate(adapter.decoder_layers(model)):
        if adapter.is_moe_block(block):
            continue
        lm = adapter.layer(block)
        for attr, path, readers in (("input_norm", adapter.input_norm, [lm.q, lm.k, lm.v]),
                                    ("post_attn_norm", adapter.post_attn_norm, [lm.gate, lm.up])):
            original = getattr(lm, attr)
            try:  # transformers' own RMSNorm as dartquant's, with the family's gain convention
                norm = RMSNorm.replacing(original, adapter.norm_offset, adapter.norm_scale_in_float32)
            except TypeError:  # not an RMSNorm
                continue
            if _norm_fusable(norm, readers):
                replace_modules_(block, {path: NormQuant(norm, readers, original)})
                names.append(f"{adapter.layers}.{i}.{path}")
    return names


def unfuse_norm_quant_(model: nn.Module) -> int:
    """Put the plain norms back. Returns how many."""
    fused = {name: m.original[0] for name, m in model.named_modules() if isinstance(m, NormQuant)}
    replace_modules_(model, fused)
    return len(fused)


@torch.no_grad()
def verify_fused_norms_(model: nn.Module, device, tokens: int = 16) -> bool:
    """Run `tokens` tokens with every fused norm's placeholder filled with 0, 1000 and NaN: equal
    finite logits show that nothing but the fused linears reads it (a NaN alone can be swallowed
    by a min / max; two finite fills cannot both be). Otherwise every fusion is undone (logged).
    Returns whether the fusions stay."""
    fused = [m for m in model.modules() if isinstance(m, NormQuant)]
    if not fused:
        return False
    vocab = model.config.get_text_config().vocab_size
    ids = torch.arange(tokens, device=device).remainder(vocab)[None]
    runs = []
    try:
        for fill in (0.0, 1000.0, float("nan")):
            for m in fused:
                m.fill = fill
            runs.append(model(ids, use_cache=False).logits.float())
    finally:
        for m in fused:
            m.fill = None
    ref = runs[0]
    tol = 1e-3 * float(ref.abs().max()) if bool(torch.isfinite(ref).all()) else 0.0
    ok = tol > 0 and all(bool(torch.isfinite(r).all()) and float((r - ref).abs().max()) <= tol for r in runs[1:])
    if ok:  # and each fused kernel computes its norm + quantizer on the inputs the plain model gives it
        ok = _same_codes_as_the_plain_norms(model, ids)
    if not ok:
        unfuse_norm_quant_(model)
        log.warning("fused RMSNorm + quantization undone: something besides the fused linears reads a norm's "
                    "output, the fused kernel disagrees with the norm, or the model's logits are not finite")
    return ok


def _same_codes_as_the_plain_norms(model: nn.Module, ids: torch.Tensor) -> bool:
    """Per fused norm, on the input the plain (unfused) model gives it: the fused kernel's codes
    against the original norm module followed by the quant-only kernel. Compared per norm, not by
    logits: one code moved by a summation order can move a random 4-bit model's logits a lot
    (KERNELS.md 4b). At most 1e-3 of the packed bytes may differ (measured at the 7B shape: 1.5e-7)
    and every scale within 1e-2 (a bf16 rounding of the row's extreme value moves it by 2^-8)."""
    placed = {name: m for name, m in model.named_modules() if isinstance(m, NormQuant)}
    unfuse_norm_quant_(model)
    inputs = {}
    hooks = [m.original[0].register_forward_pre_hook(
        lambda mod, args, name=name: inputs.__setitem__(name, args[0].reshape(-1, args[0].shape[-1])))
        for name, m in placed.items()]
    try:
        model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        replace_modules_(model, placed)
    for name, m in placed.items():
        x = inputs.get(name)
        if x is None:
            return False
        gain = None if m.unit_gain else m.norm.gain().detach()
        got = rmsnorm_quantize_pack(x, gain, m.norm.variance_epsilon, m.clip_ratio)
        want = hadamard_quantize_pack(m.original[0](x), m.clip_ratio, rotate=False)
        # the codes are nearly blind to the norm (per-token codes do not change when a row is
        # scaled): the scales carry it
        scale_err = float(((got.scale - want.scale).abs() / want.scale.abs().clamp_min(1e-30)).max())
        if float((got.codes != want.codes).float().mean()) > 1e-3 or scale_err > 1e-2:
            return False
    return True


class MergedSiblings:
    """W4A4Linears reading one tensor as one GEMM over their concatenated weights (module docstring).

    Not a module: it holds the concatenated buffers, of which the members' buffers are views. The
    first member's settings (operand, backend) choose the GEMM; the output of one input tensor is
    kept (weakly, as `SharedInput` does) for the other members."""

    def __init__(self, members: list[W4A4Linear]):
        self.members, self.lead = members, members[0]
        self.columns, off = {}, 0
        for m in members:
            self.columns[id(m)] = (off, off + m.out_features)
            off += m.out_features
        cat = lambda name: torch.cat([getattr(m, name) for m in members])  # noqa: E731
        self.weight = PackedWeight(cat("codes"), cat("scale"), cat("rowsum"), self.lead.in_features)
        biases = [m.bias for m in members]
        self.bias = None
        if any(b is not None for b in biases):  # a member without a bias adds zeros (exact)
            dtype = next(b.dtype for b in biases if b is not None)
            self.bias = torch.cat([b.detach() if b is not None else torch.zeros(m.out_features, dtype=dtype,
                                                                                device=m.codes.device)
                                   for b, m in zip(biases, members)])
        self.codes_fp8 = cat("codes_fp8") if all(m.codes_fp8 is not None for m in members) else None
        for m in members:  # the members' own buffers become views of the concatenated ones
            lo, hi = self.columns[id(m)]
            m.codes, m.scale, m.rowsum = self.weight.codes[lo:hi], self.weight.scale[lo:hi], self.weight.rowsum[lo:hi]
            if m.bias is not None:
                m.bias.data = self.bias[lo:hi]
            m.codes_fp8 = None if self.codes_fp8 is None else self.codes_fp8[lo:hi]
            m.merged = self
        self._ref = self._settings = self._y = None

    def fp8_weight(self) -> torch.Tensor:
        """The concatenated e4m3 weight (scaled_mm), made on first use; members hold views of it."""
        if self.codes_fp8 is None:
            self.codes_fp8 = planar_weight(self.weight, torch.float8_e4m3fn)
            for m in self.members:
                lo, hi = self.columns[id(m)]
                m.codes_fp8 = self.codes_fp8[lo:hi]
        return self.codes_fp8

    def output(self, member: W4A4Linear, x: torch.Tensor) -> torch.Tensor:
        """`member`'s columns [tokens, N_member] of the merged GEMM of x (computed once per tensor)."""
        lead = self.lead
        planar = lead.activation_operand(x.numel() // x.shape[-1])
        settings = (x._version, planar, lead.backend, lead.prefill_operand, _out_dtype(x))
        if self._ref is None or self._ref() is not x or self._settings != settings:
            if self.weight.codes.device != x.device:
                raise RuntimeError("merged siblings' weights are on another device than the input: the model was "
                                   "moved after kernels.fusions.apply_fusions_ (fuse after .to(device))")
            act = lead.quantize_input(x, planar)
            y = lead.gemm(act, planar, self.weight, self.fp8_weight, self.bias, _out_dtype(x))
            self._ref, self._settings, self._y = weakref.ref(x, self._forget), settings, y
        lo, hi = self.columns[id(member)]
        return self._y[:, lo:hi]

    def _forget(self, ref) -> None:
        if ref is self._ref:
            self._ref = self._settings = self._y = None


def _mergeable(readers: list) -> bool:
    if len(readers) < 2 or not all(isinstance(r, W4A4Linear) and r.merged is None for r in readers):
        return False
    key = lambda r: (id(r.shared_input), r.in_features, r.clip_ratio, r.rotate, r.backend,  # noqa: E731
                     r.prefill_operand, r.planar_min_tokens, r.codes.device)
    return readers[0].shared_input is not None and len({key(r) for r in readers}) == 1


def merge_siblings_(model: nn.Module) -> list[str]:
    """Merge q / k / v and gate / up of every dense block into `MergedSiblings` where they can be.
    Returns the first member's name of each merged group."""
    from ..adapters import adapter_for

    adapter = adapter_for(model)
    names = []
    for i, block in enumerate(adapter.decoder_layers(model)):
        if adapter.is_moe_block(block):
            continue
        lm = adapter.layer(block)
        for role, readers in (("q", [lm.q, lm.k, lm.v]), ("gate", [lm.gate, lm.up])):
            if _mergeable(readers):
                MergedSiblings(readers)
                names.append(f"{adapter.layers}.{i}.{role}")
    return names


def apply_fusions_(model: nn.Module, device, norms: bool = True, siblings: bool = True) -> dict:
    """The fusions `--backend triton` and `dartquant bench` run with, on a model already on `device`:
    merged siblings, then fused norms (checked by running). Returns what was fused."""
    out = {"merged_siblings": merge_siblings_(model) if siblings else [], "fused_norms": []}
    if norms and fuse_norm_quant_(model):
        if verify_fused_norms_(model, device):
            out["fused_norms"] = [n for n, m in model.named_modules() if isinstance(m, NormQuant)]
    log.info("W4A4 fusions: %d block norms fused with their readers' quantization, %d sibling groups as one GEMM",
             len(out["fused_norms"]), len(out["merged_siblings"]))
    return out
