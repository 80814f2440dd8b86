"""Losses on rotated activations o = x R, used to calibrate R locally.

Shapes and reduction (the same for every loss here):

- ``o`` is ``[tokens, n]`` (one rotation) or ``[groups, tokens, n]``
  (independent rotations trained together, e.g. one per KV head); any number
  of leading dims is accepted, the last two are always (tokens, channels).
- Each loss is first a *per-token* value computed along the channel axis.
  For the Whip and quantization-error losses that value is a *sum* over
  channels (they are sums of per-element terms); for the variance and kurtosis
  losses it is the per-token statistic over the channels (a variance or a
  kurtosis is already a normalized aggregate, summing it over channels has no
  meaning).
- ``reduction="mean"`` (default) then averages over every other axis
  (tokens and groups) to a scalar; ``reduction="groups"`` averages over the
  token axis only and returns one value per group (shape ``o.shape[:-2]``, a
  0-d tensor for 2-D input); ``reduction="none"`` returns the per-token values
  (shape ``o.shape[:-1]``).

The training loop (:mod:`.train`) uses ``reduction="groups"`` and *sums* over
groups, so each group's gradient is exactly what it would be if that group
were trained alone.

Definitions and choices:

- **whip** (DartQuant): ``sum_c exp(-|o_c|)``.  Rotations preserve the token
  norm, so pushing small entries away from zero forces the large ones to
  shrink: a flatter, smaller-range distribution.  It is *not* scale
  invariant: the natural scale is |o| ~ 1; the caller may RMS-normalize
  tokens first (``RotationTrainConfig.normalize="rms"``).  |o| is not
  differentiable at 0; autograd uses sign(0) = 0 there, a null set in
  practice.
- **quant**: squared error between o and its 4-bit per-token asymmetric
  min/max fake quantization (clip ratio 1.0, or the run's activation clip with
  ``dq_loss_run_clip``), summed over channels.  Rounding
  uses a straight-through estimator (STE, identity gradient), the usual choice
  in QAT.  Consequence worth knowing: with STE the *direct* path o -> q(o)
  has gradient 1, so d(o - q(o))/do = 0 along it and the gradient flows only
  through the scale/zero point, i.e. through the per-token min and max.  The
  loss then acts as "shrink the per-token range, weighted by the rounding
  residuals".  ``ste=False`` gives the almost-everywhere exact gradient
  instead (round() is piecewise constant, so the direct path has gradient 1
  in ``o`` and 0 in ``q``); both are offered, STE is the default.  The fake
  quantizer is local to this module on purpose (no dependency on
  ``dartquant.quant``).
- **variance**: per token, the (population) variance over channels of the
  magnitudes |o_c|.  Since sum_c o_c^2 is fixed by the rotation,
  var(|o|) = mean(o^2) - mean(|o|)^2 is minimized by maximizing the L1 norm
  at a fixed L2 norm, i.e. by flattening the token: the same goal as Whip, but
  a weaker (quadratic) push on the small entries.
- **kurtosis**: per token, the (Pearson, non-excess) kurtosis over channels,
  ``E[(o - mu)^4] / Var(o)^2`` with population moments.  3 for a Gaussian,
  6 for a Laplacian, 1.8 for a uniform; lower means lighter tails.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = [
    "whip_loss",
    "quant_error_loss",
    "variance_loss",
    "kurtosis_loss",
    "fake_quant_per_token",
    "LOSSES",
]

def _reduce(per_token: torch.Tensor, reduction: str) -> torch.Tensor:
    # per_token has shape o.shape[:-1]: (..., tokens)
    if reduction == "mean":
        return per_token.mean()
    if reduction == "groups":
        return per_token.mean(dim=-1)
    if reduction == "none":
        return per_token
    raise ValueError(f"unknown reduction {reduction!r} (use 'mean', 'groups' or 'none')")


def _check(o: torch.Tensor) -> None:
    if o.dim() < 2:
        raise ValueError(f"expected o of shape [..., tokens, n], got {tuple(o.shape)}")


def whip_loss(o: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Whip loss: mean over tokens (and groups) of ``sum_c exp(-|o_c|)``."""
    _check(o)
    return _reduce(torch.exp(-o.abs()).sum(dim=-1), reduction)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    # forward: round; backward: identity
    return x + (torch.round(x) - x).detach()


def fake_quant_per_token(
    o: torch.Tensor, bits: int = 4, clip_ratio: float = 1.0, ste: bool = True
) -> torch.Tensor:
    """Per-token (last axis) asymmetric min/max fake quantization.

    The range always includes 0 (min clamped <= 0, max >= 0), as in the usual
    activation quantizers, so that 0 is exactly representable.  ``ste=True``
    rounds with a straight-through estimator; ``ste=False`` uses plain
    ``torch.round`` (zero gradient through the rounding).
    """
    qmax = 2**bits - 1
    rnd = _round_ste if ste else torch.round
    xmin = o.amin(dim=-1, keepdim=True).clamp(max=0) * clip_ratio
    xmax = o.amax(dim=-1, keepdim=True).clamp(min=0) * clip_ratio
    scale = ((xmax - xmin) / qmax).clamp(min=1e-8)
    zero = rnd(-xmin / scale)
    q = torch.clamp(rnd(o / scale) + zero, 0, qmax)
    return (q - zero) * scale


def quant_error_loss(
    o: torch.Tensor, reduction: str = "mean", bits: int = 4, ste: bool = True, clip_ratio: float = 1.0
) -> torch.Tensor:
    """Squared 4-bit fake-quantization error, summed over channels.

    See the module docstring for what the STE does to the gradient.  ``clip_ratio`` < 1 models
    a clipping quantizer (the run's activation clip, `dq_loss_run_clip`): the clipped error counts.
    """
    _check(o)
    err = o - fake_quant_per_token(o, bits=bits, clip_ratio=clip_ratio, ste=ste)
    return _reduce((err * err).sum(dim=-1), reduction)


def variance_loss(o: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Per-token variance (over channels) of the magnitudes |o_c|."""
    _check(o)
    a = o.abs()
    return _reduce(a.var(dim=-1, unbiased=False), reduction)


def kurtosis_loss(o: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Per-token Pearson kurtosis over channels, E[(o-mu)^4] / Var(o)^2."""
    _check(o)
    c = o - o.mean(dim=-1, keepdim=True)
    c2 = c * c
    m2 = c2.mean(dim=-1)
    m4 = (c2 * c2).mean(dim=-1)
    # clamp instead of "+ eps": an additive eps would bias the ratio for
    # small-scale activations (m2^2 can be ~1e-12 for |o| ~ 1e-3).
    denom = (m2 * m2).clamp(min=torch.finfo(o.dtype).tiny)
    return _reduce(m4 / denom, reduction)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "whip": whip_loss,
    "quant": quant_error_loss,
    "variance": variance_loss,
    "kurtosis": kurtosis_loss,
}
