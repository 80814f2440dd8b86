"""Quantization primitives: one spec, pure functions, one granularity argument.

Design choices (each one is relied on elsewhere, so they are spelled out):

* One `QuantSpec` describes every quantizer (weights, activations, K/V cache). Granularity is a
  single field, `group_size`, applied to the **last dimension** (torchao style):
    - ``None``: one scale per row, i.e. per output channel for a weight ``[out, in]`` and per
      token for an activation ``[..., features]``;
    - ``k > 0``: groups of ``k`` consecutive elements along the last dimension;
    - ``-1``: one scale for the whole tensor.
* Shape convention: ``x`` is viewed as ``[..., n_groups, group_len]`` (for ``None`` and ``-1``
  that is ``[..., 1, last_dim]``). `compute_qparams` returns ``scale`` and ``zero`` of shape
  ``[..., n_groups, 1]`` for ``None`` / ``k``, and ``[1, ..., 1]`` (``x.ndim + 1`` ones) for
  ``-1``, so they broadcast over that grouped view. Codes always keep ``x``'s own shape.
* Symmetric: ``scale = clip * max|x| / qmax`` with ``qmax = 2^(b-1) - 1`` and codes clamped to
  ``[-2^(b-1), 2^(b-1) - 1]`` (zero is 0). With ``clip = 1`` the largest magnitude maps to
  ``+-qmax`` exactly, so the grid is symmetric and the extra negative code ``-2^(b-1)`` is only
  reached by clipped negative values when ``clip < 1`` (the QuaRot convention). Codes are int8.
* Asymmetric: the range is first widened to contain 0 (``xmin = min(min x, 0)``,
  ``xmax = max(max x, 0)``, as GPTQ/QuaRot do) so that 0 is exactly representable (padding,
  masked values) and the zero point always lies in ``[0, 2^b - 1]`` without clamping; then
  ``scale = clip * (xmax - xmin) / (2^b - 1)``, ``zero = round(-clip * xmin / scale)``, codes
  ``clamp(round(x / scale + zero), 0, 2^b - 1)`` as uint8.
  Two details differ from the reference ``round(x / scale) + zero``, both for exact ties
  ``f = -xmin / scale = k + 1/2`` (which nice inputs hit, e.g. [-13, 17] at 4 bits): the zero
  point is rounded half *up*, and it is added *before* rounding. Then ``xmin / s + zero = +1/2``
  rounds to code 0 and ``xmax / s + zero = 2^b - 1/2`` rounds up and is clamped to the top code,
  so both ends of the range keep their codes; with half-to-even rounding of ``x / s`` alone
  (not shift-invariant by odd integers) one of the two ends always lands one code inside for
  half of such ties. Ties that are only ties up to float round-off (a range symmetric about 0
  has ``f = (2^b - 1) / 2`` in exact arithmetic) can still cost the top code; no choice of an
  integer zero point avoids that for a given scale.
* A group whose scale would be 0 (all zeros, or an underflow) gets scale 1: every code is then
  the zero point and the output is exactly 0, never NaN. Non-finite inputs are not handled.
* Arithmetic runs in ``promote(x.dtype, float32)`` (float32 for half/bfloat16, float64 stays
  float64); `fake_quantize` returns ``x.dtype``. `dequantize` returns ``scale.dtype``.
* Rounding is ``torch.round`` (half to even), as in the reference implementations.
* `fake_quantize` is on the hot path (every linear input, every forward): it is a handful of
  vectorized tensor ops with no Python loop over rows and never materialises integer codes.
  Its gradient is the straight-through estimator, d x_hat / d x = 1 everywhere (also for
  clipped values), implemented as a custom autograd function so that the forward value is
  exactly the quantized one (``x + (x_hat - x).detach()`` is off by an ulp in half precision).
* `fake_quantize(x) == dequantize(quantize(x, *compute_qparams(x)))` bitwise: both use the same
  expressions (``q * s`` symmetric, ``(q - z) * s`` asymmetric).
* MSE clip search (``mse_search=True``) tries ``mse_grid`` clip ratios evenly spaced from
  ``clip_ratio`` down to ``mse_min_ratio`` and keeps, per row / group, the one with the smallest
  ``sum |x - x_hat|^mse_norm``. The default ``mse_norm = 2`` is plain MSE, so the result is never
  worse in MSE than no search (the grid starts at ``clip_ratio``, ties keep the earlier, larger
  ratio); ``mse_norm = 2.4`` is the norm of the GPTQ/QuaRot weight search (which, with their
  grid=100 / maxshrink=0.8, tries ratios 1.0 down to 0.21). The search loops over the
  grid (not over rows) and is meant for weights / offline use, not for the activation hot path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "QuantSpec",
    "QuantizedTensor",
    "compute_qparams",
    "candidate_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "sqnr_db",
    "pack_int4",
    "unpack_int4",
]

# bits >= this means "no quantization": fake_quantize returns its input.
NO_QUANT_BITS = 16


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor. See the module docstring for the exact formulas.

    bits: 2..8, or 16 (>= 16) for no quantization. symmetric: int8 codes around 0, else uint8
    codes with an integer zero point. group_size: None = one scale per row (last dim), k = groups
    of k along the last dim, -1 = one scale per tensor. clip_ratio: shrink the min/max range by
    this factor (0 < r <= 1). mse_search / mse_grid / mse_min_ratio / mse_norm: per row/group
    search of the clip ratio over mse_grid values from clip_ratio down to mse_min_ratio,
    minimising sum |x - x_hat|^mse_norm (2 = MSE). Invalid fields raise ValueError on creation.
    """

    bits: int = 4
    symmetric: bool = True
    group_size: int | None = None
    clip_ratio: float = 1.0
    mse_search: bool = False
    mse_grid: int = 100
    mse_min_ratio: float = 0.2
    mse_norm: float = 2.0

    def __post_init__(self) -> None:
        # A spec with an impossible field is useless; fail where it is written, not at first use.
        self.validate()

    @property
    def enabled(self) -> bool:
        """False for bits >= 16: the tensor stays in floating point."""
        return self.bits < NO_QUANT_BITS

    @property
    def code_range(self) -> tuple[int, int]:
        """(smallest, largest) integer code."""
        if self.symmetric:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    @property
    def code_dtype(self) -> torch.dtype:
        """int8 for symmetric codes, uint8 for asymmetric ones (bits <= 8 always fit)."""
        return torch.int8 if self.symmetric else torch.uint8

    def validate(self, last_dim: int | None = None) -> None:
        """Raise ValueError naming the bad field; with `last_dim`, also check the grouping fits."""
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ValueError(f"QuantSpec.bits must be an int, got {self.bits!r}")
        if not (2 <= self.bits <= 8 or self.bits >= NO_QUANT_BITS):
            raise ValueError(
                f"QuantSpec.bits={self.bits} is not supported: use 2..8 (codes are stored in 8-bit "
                f"integers) or {NO_QUANT_BITS} for no quantization"
            )
        if not (0.0 < self.clip_ratio <= 1.0):
            raise ValueError(f"QuantSpec.clip_ratio={self.clip_ratio} must be in (0, 1]")
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or (g <= 0 and g != -1)):
            raise ValueError(
                f"QuantSpec.group_size={g!r} must be None (one scale per row), a positive group "
                "length, or -1 (one scale per tensor)"
            )
        if self.mse_search:
            if not isinstance(self.mse_grid, int) or self.mse_grid < 1:
                raise ValueError(f"QuantSpec.mse_grid={self.mse_grid!r} must be an int >= 1")
            if not (0.0 < self.mse_min_ratio <= self.clip_ratio):
                raise ValueError(
                    f"QuantSpec.mse_min_ratio={self.mse_min_ratio} must be in (0, clip_ratio="
                    f"{self.clip_ratio}]: the search runs from clip_ratio down to mse_min_ratio"
                )
            if not self.mse_norm > 0:
                raise ValueError(f"QuantSpec.mse_norm={self.mse_norm} must be > 0")
        if last_dim is not None and self.enabled and g is not None and g > 0 and last_dim % g:
            divisors = [d for d in range(1, g + 1) if last_dim % d == 0]
            raise ValueError(
                f"QuantSpec.group_size={g} does not divide the last dimension ({last_dim}) of the "
                f"tensor to quantize; pick a group size that divides {last_dim} (the largest one "
                f"<= {g} is {divisors[-1]}), or group_size=None for one scale per row"
            )


# ----------------------------------------------------------------------------- internals


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # half/bfloat16 inputs are quantized in float32 (scale = amax / 7 in fp16 loses bits);
    # float64 stays float64 so that tests and offline tools can be exact.
    return torch.promote_types(dtype, torch.float32)


def _grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View x as [..., n_groups, group_len] (a view when x is contiguous)."""
    g = spec.group_size
    if g is None or g == -1:
        return x.unsqueeze(-2)
    return x.reshape(*x.shape[:-1], x.shape[-1] // g, g)


def _reduce_dims(xg: torch.Tensor, spec: QuantSpec) -> tuple[int, ...]:
    return tuple(range(xg.ndim)) if spec.group_size == -1 else (-1,)


def _qparams_from_stats(stats, ratio: float, spec: QuantSpec):
    """scale, zero for one clip ratio. `stats` is amax (symmetric) or (xmin, xmax) with 0 inside.

    Shared by the direct path and every MSE-search candidate so that the candidate at
    ratio == clip_ratio is bitwise the no-search result.
    """
    if spec.symmetric:
        qmax = 2 ** (spec.bits - 1) - 1
        scale = stats * ratio / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.zeros_like(scale)
    xmin, xmax = stats
    maxq = 2**spec.bits - 1
    lo = xmin * ratio
    scale = (xmax * ratio - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # round half up, exactly (floor(f + 0.5) would itself round in fp); see the module docstring.
    # lo <= 0 so f is in [0, maxq] up to fp noise.
    f = -lo / scale
    fl = torch.floor(f)
    zero = (fl + (f - fl >= 0.5).to(f.dtype)).clamp_(0, maxq)
    return scale, zero


def _range_stats(xg: torch.Tensor, spec: QuantSpec):
    dims = _reduce_dims(xg, spec)
    if spec.symmetric:
        return xg.abs().amax(dim=dims, keepdim=True)
    xmin = xg.amin(dim=dims, keepdim=True).clamp_(max=0)
    xmax = xg.amax(dim=dims, keepdim=True).clamp_(min=0)
    return xmin, xmax


def _fq_grouped(xg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize on the grouped view; the same expressions as quantize/dequantize."""
    lo, hi = spec.code_range
    if spec.symmetric:
        return torch.round(xg / scale).clamp_(lo, hi).mul_(scale)
    q = torch.round((xg / scale).add_(zero)).clamp_(lo, hi)  # zero added before rounding
    return q.sub_(zero).mul_(scale)


def _search_ratios(spec: QuantSpec) -> list[float]:
    """The clip ratios the MSE search tries: mse_grid of them, evenly from clip_ratio down to
    mse_min_ratio, as python floats, the first one exactly clip_ratio (see _qparams_from_stats)."""
    n, top, bottom = spec.mse_grid, spec.clip_ratio, spec.mse_min_ratio
    return [top - i * (top - bottom) / (n - 1) for i in range(n)] if n > 1 else [top]


def _qparams_grouped(xg: torch.Tensor, spec: QuantSpec, search_error=None) -> tuple[torch.Tensor, torch.Tensor]:
    stats = _range_stats(xg, spec)
    if not spec.mse_search:
        return _qparams_from_stats(stats, spec.clip_ratio, spec)
    dims = _reduce_dims(xg, spec)
    best_scale = best_zero = best_err = None
    for r in _search_ratios(spec):
        scale, zero = _qparams_from_stats(stats, r, spec)
        diff = _fq_grouped(xg, scale, zero, spec) - xg
        if search_error is not None:
            err = search_error(diff)
        else:  # square() is several times faster than abs().pow(2.0) on CPU
            diff = diff.square_() if spec.mse_norm == 2 else diff.abs_().pow_(spec.mse_norm)
            err = diff.sum(dim=dims, keepdim=True)
        if best_err is None:
            best_scale, best_zero, best_err = scale, zero, err
            continue
        better = err < best_err  # strict: ties keep the larger ratio
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _check(x: torch.Tensor, spec: QuantSpec) -> None:
    if not spec.enabled:
        raise ValueError(f"QuantSpec(bits={spec.bits}) means no quantization; there are no qparams/codes")
    if x.ndim == 0:
        raise ValueError("cannot quantize a 0-dim tensor: granularity is defined on the last dimension")
    spec.validate(x.shape[-1])


# ----------------------------------------------------------------------------- public API


def compute_qparams(x: torch.Tensor, spec: QuantSpec, search_error=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) for x, shaped to broadcast over x viewed as [..., n_groups, group_len].

    Shapes: [..., n_groups, 1] for group_size None (n_groups = 1) or k; all ones for -1.
    dtype: promote(x.dtype, float32). `zero` holds integer values (all 0 when symmetric).
    Computed without gradient.
    search_error: with spec.mse_search, the cost the search minimises instead of
    sum |x - x_hat|^mse_norm: a function of the error x_hat - x in the grouped view
    [..., n_groups, group_len] returning one cost per group, shaped like the scale
    (e.g. a weight row's output error on calibration inputs; gptq.GPTQ.quantize).
    """
    _check(x, spec)
    with torch.no_grad():
        xg = _grouped(x.detach().to(_compute_dtype(x.dtype)), spec)
        return _qparams_grouped(xg, spec, search_error)


def candidate_qparams(x: torch.Tensor, spec: QuantSpec) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(scale, zero) of every clip ratio the spec's MSE search would try, in its order (largest
    ratio first), shaped as `compute_qparams` returns them; for a caller that judges the
    candidates by its own measure (gptq.GPTQ.quantize with clip_objective "gptq")."""
    _check(x, spec)
    if not spec.mse_search:
        raise ValueError("candidate_qparams: the spec has no clip search (mse_search=False)")
    with torch.no_grad():
        xg = _grouped(x.detach().to(_compute_dtype(x.dtype)), spec)
        stats = _range_stats(xg, spec)
        return [_qparams_from_stats(stats, r, spec) for r in _search_ratios(spec)]


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes of x (same shape as x): int8 if symmetric, uint8 if asymmetric."""
    _check(x, spec)
    lo, hi = spec.code_range
    q = _grouped(x.detach().to(scale.dtype), spec) / scale
    if not spec.symmetric:
        q = q + zero  # before rounding, see the module docstring
    return torch.round(q).clamp_(lo, hi).to(spec.code_dtype).reshape(x.shape)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """codes -> values in scale.dtype, same shape as codes."""
    _check(codes, spec)
    q = _grouped(codes, spec).to(scale.dtype)
    if not spec.symmetric:
        q = q - zero
    return (q * scale).reshape(codes.shape)


def _fake_quantize_impl(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    xg = _grouped(x.to(_compute_dtype(x.dtype)), spec)
    scale, zero = _qparams_grouped(xg, spec)
    return _fq_grouped(xg, scale, zero, spec).reshape(x.shape).to(x.dtype)


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:  # noqa: D102
        return _fake_quantize_impl(x, spec)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad, None


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize x with qparams computed from x itself; same shape and dtype as x.

    bits >= 16 returns x itself. Gradient: straight-through (identity).
    """
    if not spec.enabled or x.numel() == 0:
        return x
    _check(x, spec)
    if x.requires_grad and torch.is_grad_enabled():
        return _FakeQuantSTE.apply(x, spec)
    return _fake_quantize_impl(x, spec)


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """20 log10(||x|| / ||x - x_hat||) in dB (float64 norms); inf when x_hat == x."""
    x64 = x.detach().to(torch.float64)
    err = torch.linalg.vector_norm(x64 - x_hat.detach().to(torch.float64)).item()
    sig = torch.linalg.vector_norm(x64).item()
    if err == 0.0:
        return float("inf")
    if sig == 0.0:
        return float("-inf")
    return 20.0 * math.log10(sig / err)


# ----------------------------------------------------------------------------- int4 packing


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte along the last dim: element 2i -> low nibble, 2i+1 -> high.

    Accepts signed codes in [-8, 7] (stored as two's-complement nibbles) or unsigned ones in
    [0, 15]. An odd last dimension is padded with one 0 code; `unpack_int4` takes the true length.
    Returns uint8 of shape [..., ceil(n / 2)].
    """
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"pack_int4 needs an integer tensor, got {codes.dtype}")
    if codes.ndim == 0:
        raise ValueError("pack_int4 needs at least one dimension")
    if codes.numel() and (codes.min().item() < -8 or codes.max().item() > 15):
        raise ValueError(
            f"pack_int4: codes in [{codes.min().item()}, {codes.max().item()}] do not fit 4 bits "
            "([-8, 7] signed or [0, 15] unsigned)"
        )
    c = codes.to(torch.int16) & 0xF  # two's complement nibble for negatives
    if c.shape[-1] % 2:
        c = F.pad(c, (0, 1))
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, n: int, signed: bool) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 [..., ceil(n/2)] -> codes [..., n] (int8 if signed else uint8)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 needs uint8, got {packed.dtype}")
    if packed.shape[-1] != (n + 1) // 2:
        raise ValueError(f"unpack_int4: last dim {packed.shape[-1]} does not hold {n} codes")
    p = packed.to(torch.int16)
    v = torch.stack((p & 0xF, (p >> 4) & 0xF), dim=-1).flatten(-2)[..., :n]
    if signed:
        return torch.where(v >= 8, v - 16, v).to(torch.int8)
    return v.to(torch.uint8)


# ----------------------------------------------------------------------------- container


def _group_code(g: int | None) -> int:
    return 0 if g is None else g


@dataclass
class QuantizedTensor:
    """Integer codes + scales of one quantized tensor (typically a weight [out, in]).

    `codes` has `shape` (unpacked, int8 / uint8); `scale` / `zero` follow the grouped shape
    convention of `compute_qparams` (e.g. [out, n_groups, 1]); `dequantize()` is exactly
    `dequantize(codes, scale, zero, spec)` in scale's dtype.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec
    shape: torch.Size

    @classmethod
    def from_float(cls, x: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
        """Round-to-nearest quantization of x (qparams from x itself, MSE search if the spec says)."""
        scale, zero = compute_qparams(x, spec)
        return cls(quantize(x, scale, zero, spec), scale, zero, spec, torch.Size(x.shape))

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.spec).reshape(self.shape)

    def to_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Plain tensors (integers and scales only), keys `prefix + name`, e.g. prefix "w.".

        * ``codes``: uint8, two per byte along the last dim when bits == 4 (`pack_int4`), else
          int8 / uint8 one per byte;
        * ``scale``: as stored (its dtype is kept);
        * ``zero``: uint8, asymmetric only (symmetric zero points are all 0);
        * ``qmeta``: int64 ``[bits, symmetric, group_size (0 = None, -1 = tensor), *shape]``.
        """
        s = self.spec
        codes = pack_int4(self.codes) if s.bits == 4 else self.codes.to(s.code_dtype)
        out = {
            prefix + "codes": codes.contiguous(),
            prefix + "scale": self.scale.contiguous(),
            prefix + "qmeta": torch.tensor(
                [s.bits, int(s.symmetric), _group_code(s.group_size), *self.shape], dtype=torch.int64
            ),
        }
        if not s.symmetric:
            out[prefix + "zero"] = self.zero.to(torch.uint8).contiguous()
        return out

    @classmethod
    def from_state_dict(
        cls, state: dict[str, torch.Tensor], prefix: str = "", spec: QuantSpec | None = None
    ) -> QuantizedTensor:
        """Inverse of `to_state_dict`. Without `spec`, bits/symmetric/group_size come from qmeta
        (clip / MSE settings only matter when quantizing, so they are not stored)."""
        meta = state[prefix + "qmeta"].tolist()
        bits, symmetric, gcode, shape = meta[0], bool(meta[1]), meta[2], torch.Size(meta[3:])
        if spec is None:
            spec = QuantSpec(bits=bits, symmetric=symmetric, group_size=None if gcode == 0 else gcode)
        elif (spec.bits, spec.symmetric, _group_code(spec.group_size)) != (bits, symmetric, gcode):
            raise ValueError(
                f"{prefix}qmeta says bits={bits}, symmetric={symmetric}, group_size code={gcode}, "
                f"but the given spec is {spec}"
            )
        scale = state[prefix + "scale"]
        codes = state[prefix + "codes"]
        if bits == 4:
            codes = unpack_int4(codes, shape[-1], signed=symmetric)
        codes = codes.to(spec.code_dtype).reshape(shape)
        zero = torch.zeros_like(scale) if symmetric else state[prefix + "zero"].to(scale.dtype)
        return cls(codes, scale, zero, spec, shape)
