"""`W4A4Linear`: a `QLinear` executed on the Triton kernels, with real 4-bit operands.

    y = w4a4_matmul(hadamard_quantize_pack(x)) + bias        (bf16 out)

Built from a `QLinear` (its online Hadamard, if any, and its `ActQuantizer`) and the weight's
`QuantizedTensor` (integer codes and scales, as the checkpoint stores them: the fake-quant model
only keeps dequantized floats, from which the codes are not recoverable in general).  Only the
W4A4 scheme of the papers is supported: weights 4-bit symmetric per output channel, activations
4-bit asymmetric per token; anything else raises before any work.

Its output equals the fake-quant `QLinear` evaluated exactly: the codes are bit-exact
(`act_quant`), the integer dot is exact (`w4a4_gemm`), and only the fp32 epilogue and the bf16
output round (<= 2^-8 relative of the float64 value; tests/test_kernels.py).  The fake-quant
QLinear itself computes in the model dtype, so in bf16 the two differ by bf16 GEMM rounding.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
from torch import nn

from ..modules import OnlineHadamard, QLinear
from ..quant.primitives import QuantizedTensor
from .act_quant import PackedActivations, hadamard_quantize_pack
from .w4a4_gemm import prepare_weight, w4a4_matmul

__all__ = ["W4A4Linear", "convert_qlinears_", "convert_run_", "load_w4a4", "PREFILL_OPERANDS"]

# the GEMM at prefill: its activation operand (packed nibbles, or planar centered bytes: w4a4_gemm
# A8) and backend. "int8s" (planar int8 bytes into the swapped GEMM: the packed weight unpacked in
# registers as the MMA's left operand) is the default: 12-17 % faster per linear than "int8" at every
# prefill shape of run 7 (docs/KERNELS.md 2c), same bits.
# "scaled_mm": planar e4m3 activations and a 1-byte e4m3 copy of the weight codes (made on first use:
# + half of bf16's weight bytes) on cuBLAS's FP8 GEMM (w4a4_gemm: exactness probed per shape).
PREFILL_OPERANDS = {"packed": None, "int8": torch.int8, "int8s": torch.int8, "fp8": torch.float8_e4m3fn,
                    "scaled_mm": torch.float8_e4m3fn}
DEFAULT_PREFILL_OPERAND = "int8s"
# above this many tokens the planar operand is used; below, the packed one with the decode backends
# (gemv, int8). int8s: from 3 tokens (session 27, KERNELS.md 2e: with the word-op nibble split it beats the
# per-lane GEMV from 3 tokens on the 7B decode linears, 0.80x its summed time at 3, and loses at 1-2);
# int8 / fp8: from 65 (run 6 measured them at prefill only); scaled_mm: from 65, and int8s from 3 to 64
# tokens (INT8S_DECODE_TOKENS: there the int8s GEMM took 0.45-0.85x cuBLAS FP8's time on every 7B linear)
# merged siblings (fusions.MergedSiblings) run up to this many tokens; above, each member its own GEMM
# on its views of the merged buffers. Run 13 (KERNELS.md 4b), A/B in one process: merged 1.09x faster
# at decode batch 1 and 8, 0.96x at a 2048-token prefill (scaled_mm); batch 64 faster across runs.
MERGED_MAX_TOKENS = 64
PLANAR_MIN_TOKENS = {"packed": 64, "int8": 64, "int8s": 2, "fp8": 64, "scaled_mm": 2}
INT8S_DECODE_TOKENS = 64  # the scaled_mm operand takes the int8s GEMM up to this many tokens


def _check_scheme(q: QLinear, qt: QuantizedTensor, name: str) -> tuple[bool, float]:
    ws = qt.spec
    if (ws.bits, ws.symmetric, ws.group_size) != (4, True, None):
        raise ValueError(f"{name}: the kernels need 4-bit symmetric per-channel weights, got {ws}")
    if tuple(qt.shape) != (q.out_features, q.in_features):
        raise ValueError(f"{name}: weight codes of shape {tuple(qt.shape)} for a {q.out_features}x{q.in_features} linear")
    aq = q.input_quantizer
    spec = getattr(aq, "spec", None)
    if spec is None or (spec.bits, spec.symmetric, spec.group_size) != (4, False, None) or spec.mse_search:
        raise ValueError(f"{name}: the kernels need a 4-bit asymmetric per-token input quantizer, got {spec}")
    rot = q.input_rotation
    if rot is not None and not isinstance(rot, OnlineHadamard):
        raise ValueError(f"{name}: only an OnlineHadamard input rotation runs in the kernel, got {type(rot).__name__}")
    if q.in_features % 2:
        raise ValueError(f"{name}: in_features={q.in_features} must be even (two codes per byte)")
    if rot is not None:
        from ..hadamard import hadamard_factorization
        from .act_quant import stage_sizes

        stage_sizes(hadamard_factorization(rot.n)[1])  # raises for sizes the kernel cannot do
    return rot is not None, spec.clip_ratio


def replace_modules_(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Put each module at its dotted name in `model` (name -> module)."""
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float32, torch.float64) else torch.bfloat16


class SharedInput:
    """The last activation quantization of a group of W4A4Linears that may read one tensor.

    q / k / v read the same hidden states, gate / up too: quantizing once saves two of three (one
    of two) activation kernels. A hit needs the very same tensor object, still alive, at the same
    version (an in-place change bumps it), with the same settings. The memo holds the tensor by a
    weak reference whose callback drops the codes when the tensor dies, so nothing outlives the
    layer's own temporaries (a strong reference would keep every layer's input alive: GBs at a
    large prefill). Under CUDA-graph capture the first reader's launch is recorded and the others
    read its outputs, which every replay rewrites in the same order."""

    def __init__(self):
        self._ref = None
        self._settings = None
        self._act = None
        self._primed = False  # the memo came from `prime` (a fused norm), not from quantizing x

    def quantize(self, x: torch.Tensor, clip_ratio: float, rotate: bool, planar: torch.dtype | None = None):
        settings = (x._version, clip_ratio, rotate, planar)
        if self._ref is not None and self._ref() is x:
            if self._settings == settings:
                return self._act
            if self._primed:  # x is a fused norm's placeholder: its values were never written
                raise RuntimeError(f"a fused norm's output was quantized with {self._settings[1:]}, and is now "
                                   f"read with {settings[1:]}: unfuse_norm_quant_ before changing settings")
        act = hadamard_quantize_pack(x.reshape(-1, x.shape[-1]), clip_ratio, rotate=rotate, planar=planar)
        self._ref, self._settings, self._act = weakref.ref(x, self._forget), settings, act
        self._primed = False
        return act

    def prime(self, x: torch.Tensor, act: PackedActivations, clip_ratio: float, rotate: bool,
              planar: torch.dtype | None) -> None:
        """Record `act` as the quantization of `x` (made elsewhere: `NormQuant`'s fused kernel)."""
        settings = (x._version, clip_ratio, rotate, planar)
        self._ref, self._settings, self._act = weakref.ref(x, self._forget), settings, act
        self._primed = True

    def _forget(self, ref) -> None:
        if ref is self._ref:
            self._ref = self._settings = self._act = None
            self._primed = False


class W4A4Linear(nn.Module):
    """Packed 4-bit weight + the Triton activation kernel and GEMM (see the module docstring)."""

    def __init__(self, q: QLinear, qt: QuantizedTensor, name: str = "linear", backend: str = "auto",
                 prefill_operand: str = DEFAULT_PREFILL_OPERAND):
        super().__init__()
        self.rotate, self.clip_ratio = _check_scheme(q, qt, name)
        self.in_features, self.out_features = q.in_features, q.out_features
        self.backend = backend
        if prefill_operand not in PREFILL_OPERANDS:
            raise ValueError(f"prefill_operand must be one of {sorted(PREFILL_OPERANDS)}, got {prefill_operand!r}")
        # more than PLANAR_MIN_TOKENS tokens: the activations as 1-byte planar centered codes
        # (w4a4_gemm A8: no unpack of A in the GEMM) on the int8 or fp8 tensor cores: int8 5-10 %
        # faster per linear than packed on the H200, fp8 slower (KERNELS.md run 6), int8s faster still (run 7)
        self.prefill_operand = prefill_operand
        self.planar_min_tokens: int | None = None  # None: PLANAR_MIN_TOKENS of the operand
        w = prepare_weight(qt.codes.to(torch.int8), qt.scale.reshape(-1))
        self.register_buffer("codes", w.codes)
        self.register_buffer("scale", w.scale)
        self.register_buffer("rowsum", w.rowsum)
        self.bias = None if q.bias is None else nn.Parameter(q.bias.detach().clone(), requires_grad=False)
        self.shared_input: SharedInput | None = None  # set by convert_qlinears_ for siblings
        self.merged = None  # a MergedSiblings (fusions.merge_siblings_): one GEMM with q / k / v or gate / up
        self.register_buffer("codes_fp8", None)  # the scaled_mm operand's weight (made on first use)
        if prefill_operand == "scaled_mm":  # made now, so that weight memory counts it
            self.fp8_weight()

    def fp8_weight(self) -> torch.Tensor:
        """The weight codes as a planar e4m3 operand [N, K] (scaled_mm prefill), kept as a buffer."""
        if self.codes_fp8 is None or self.codes_fp8.device != self.codes.device:
            from .w4a4_gemm import PackedWeight, planar_weight

            self.codes_fp8 = planar_weight(PackedWeight(self.codes, self.scale, self.rowsum, self.in_features),
                                           torch.float8_e4m3fn)
        return self.codes_fp8

    def activation_operand(self, tokens: int) -> torch.dtype | None:
        """The GEMM's activation operand for an input of `tokens` tokens: None (packed nibbles) or
        the dtype of the planar centered codes."""
        if self.backend == "int8s":  # the swapped GEMM reads planar int8 activations at every size
            return torch.int8
        min_tokens = (PLANAR_MIN_TOKENS[self.prefill_operand] if self.planar_min_tokens is None
                      else self.planar_min_tokens)
        if tokens <= min_tokens:
            return None
        if self.prefill_operand == "scaled_mm" and tokens <= INT8S_DECODE_TOKENS and self.planar_min_tokens is None:
            return torch.int8  # decode batches: the int8s GEMM on the packed weight beats cuBLAS FP8 there
        return PREFILL_OPERANDS[self.prefill_operand]

    def quantize_input(self, x: torch.Tensor, planar: torch.dtype | None) -> PackedActivations:
        """The activation kernel on x (once per tensor for siblings sharing a `SharedInput`)."""
        if self.shared_input is not None:
            return self.shared_input.quantize(x, self.clip_ratio, self.rotate, planar)
        return hadamard_quantize_pack(x.reshape(-1, self.in_features), self.clip_ratio, rotate=self.rotate,
                                      planar=planar)

    def gemm(self, act: PackedActivations, planar: torch.dtype | None, weight, fp8_weight, bias,
             out_dtype: torch.dtype) -> torch.Tensor:
        """[tokens, N] = the 4-bit GEMM of `act` with `weight` (a PackedWeight: this linear's, or the
        concatenated one of `MergedSiblings`) on the backend this linear's settings choose, + bias."""
        tokens, n = act.codes.shape[0], weight.scale.shape[0]
        out = torch.empty(tokens, n, device=act.codes.device, dtype=out_dtype)
        if planar is None:
            y = w4a4_matmul(act.codes, act.scale, act.zero, weight, self.backend, out=out)
        elif self.prefill_operand == "scaled_mm" and planar == torch.float8_e4m3fn:
            y = w4a4_matmul(act.codes, act.scale, None, weight, "scaled_mm", out=out, w_planar=fp8_weight())
        else:  # planar int8 goes to int8s, except on the "int8" operand (kept for comparisons)
            be = ("fp8" if planar == torch.float8_e4m3fn
                  else "int8" if self.prefill_operand == "int8" and self.backend != "int8s" else "int8s")
            y = w4a4_matmul(act.codes, act.scale, None, weight, be, out=out)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .w4a4_gemm import PackedWeight

        lead = x.shape[:-1]
        if x.shape[-1] != self.in_features:
            raise ValueError(f"W4A4Linear({self.in_features}) got an input of last dimension {x.shape[-1]}")
        if self.merged is not None and x.numel() <= MERGED_MAX_TOKENS * self.in_features:
            # one GEMM for all siblings, this linear's columns of it (decode sizes: fusions.MergedSiblings)
            return self.merged.output(self, x).reshape(*lead, self.out_features).to(x.dtype)
        planar = self.activation_operand(x.numel() // self.in_features)
        act = self.quantize_input(x, planar)
        w = PackedWeight(self.codes, self.scale, self.rowsum, self.in_features)
        # fp32 models get the epilogue's fp32 value; others bf16 (the fast path)
        y = self.gemm(act, planar, w, self.fp8_weight, self.bias, _out_dtype(x))
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, W4 sym per-channel, "
                f"A4 asym per-token clip {self.clip_ratio}, hadamard={self.rotate}, backend={self.backend}, "
                f"prefill_operand={self.prefill_operand}")


def convert_qlinears_(model: nn.Module, qtensors: dict[str, QuantizedTensor], backend: str = "auto",
                      share_inputs: bool = True, prefill_operand: str = DEFAULT_PREFILL_OPERAND) -> list[str]:
    """Replace every QLinear named in `qtensors` (module name -> weight codes) by a W4A4Linear.

    All QLinears are checked before the first one is replaced.  With `share_inputs`, the linears
    of one parent module (an attention's q / k / v / o, an MLP's gate / up / down) share a
    `SharedInput`, so that readers of one tensor quantize it once.  Returns the converted names."""
    targets = {name: m for name, m in model.named_modules() if isinstance(m, QLinear) and name in qtensors}
    missing = sorted(set(qtensors) - set(targets))
    if missing:
        raise ValueError(f"no QLinear named {missing[:5]} in the model")
    new = {name: W4A4Linear(q, qtensors[name], name, backend, prefill_operand) for name, q in targets.items()}
    if share_inputs:
        groups: dict[str, SharedInput] = {}
        for name, module in new.items():
            module.shared_input = groups.setdefault(name.rpartition(".")[0], SharedInput())
    replace_modules_(model, new)
    return sorted(new)


def convert_run_(model: nn.Module, folder, backend: str = "auto",
                 prefill_operand: str = DEFAULT_PREFILL_OPERAND) -> list[str]:
    """Swap every QLinear of `model` (loaded from run `folder`) whose codes are in the folder's
    ``quantized.safetensors`` for a W4A4Linear (all checked first). Returns the converted names."""
    from ..quant.checkpoint import read_quantized_state

    state = read_quantized_state(Path(folder))[1]  # one file or shards (a streamed run)
    prefixes = sorted(k[: -len(".qmeta")] for k in state if k.endswith(".qmeta"))
    qtensors = {p: QuantizedTensor.from_state_dict(state, prefix=f"{p}.") for p in prefixes}
    return convert_qlinears_(model, qtensors, backend, prefill_operand=prefill_operand)


def load_w4a4(folder, device="cpu", backend: str = "auto", dtype: torch.dtype = torch.float32,
              prefill_operand: str = DEFAULT_PREFILL_OPERAND):
    """(model, tokenizer) of a quantized output folder with its 4-bit linears on the kernels.

    Loads the folder as `zoo.load_model` does (the fake-quant model: online rotations,
    quantizers), then `convert_run_`.  Embeddings, norms, attention (K/V stay fake-quantized) and
    an unquantized lm_head run as before, in `dtype` (float32: the GEMM writes its fp32 epilogue;
    bfloat16: the fast path).  `backend.load_for_backend` checks the run before calling this."""
    from ..zoo import load_model

    model, tokenizer = load_model(folder, dtype=dtype, device="cpu")
    convert_run_(model, folder, backend, prefill_operand)
    return model.to(device), tokenizer
