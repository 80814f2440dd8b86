"""The quality guard (quant/guard.py) under streaming: the same FPReference, the same verdict.

The FP pass runs the guard windows through the raw blocks; `GuardTrace` keeps window 0's block
outputs at the reference positions, and at the end of the pass the FP final norm and lm_head
turn the last hidden states into quant/guard.py's `FPReference` (per-token NLL, top-k
log-probabilities), computed as `fp_reference` computes them. The quantize pass traces the same
windows through the quantized blocks; `check` then scores them with guard.py's own `_nll_kl`
(ratio, top-k KL) and per-layer output errors. The per-role attribution (8 more forwards of the
whole quantized model with one role's quantizers off) is not made under streaming: the record
says so, and names the worst layer.
"""

from __future__ import annotations

import math

import torch

from ..log import log
from ..quant.guard import (HIDDEN_POSITIONS, TOPK, FPReference, _log_probs, _nll_kl, _unchecked, guard_corpus,
                           warn_if_collapsed)
from .passes import logits


class GuardTrace:
    """Window 0's output of every block, at the positions FPReference keeps (float64, host)."""

    def __init__(self, windows: torch.Tensor):
        s = windows.shape[1]
        self.positions = torch.unique(torch.linspace(0, s - 1, min(HIDDEN_POSITIONS, s)).long())
        self.hidden: list[torch.Tensor] = []

    def record(self, hidden: torch.Tensor) -> None:
        self.hidden.append(hidden[0, self.positions].double().cpu())


@torch.no_grad()
def fp_reference(norm, head, hidden: torch.Tensor, windows: torch.Tensor, trace: GuardTrace, device) -> FPReference:
    """quant/guard.fp_reference from the FP pass's last hidden states (same per-window maths)."""
    nll, idx, top = [], [], []
    for i in range(windows.shape[0]):
        ids = windows[i: i + 1]
        lp = _log_probs(logits(norm, head, hidden[i: i + 1], device))
        nll.append(-lp.gather(-1, ids[0, 1:, None].to(lp.device))[:, 0].double().cpu())
        v, j = lp.topk(min(TOPK, lp.shape[-1]), dim=-1)
        top.append(v.double().cpu())
        idx.append(j.cpu())
    return FPReference(windows, torch.stack(nll), torch.stack(idx), torch.stack(top), trace.positions, trace.hidden)


@torch.no_grad()
def check(ref: FPReference, norm, head, hidden: torch.Tensor, trace: GuardTrace, cfg, r1, device) -> dict:
    """quant/guard.quality_check's verdict from the quantize pass's last hidden states."""
    try:
        nq = np_ = kl = 0.0
        tokens = 0
        for i in range(ref.windows.shape[0]):
            a, b, c = _nll_kl(logits(norm, head, hidden[i: i + 1], device), ref, i)
            nq, np_, kl, tokens = nq + a, np_ + b, kl + c, tokens + ref.windows.shape[1] - 1
        ratio = math.exp((nq - np_) / tokens)
        limit = cfg.eval.guard_max_ppl_ratio
        res = {"metric": "ppl_ratio", "value": ratio, "threshold": limit,
               "verdict": "ok" if ratio <= limit else "collapsed",
               "kl": kl / tokens, "kl_support": f"FP top {ref.top_idx.shape[-1]} + rest",
               "ppl_fp": math.exp(np_ / tokens), "ppl_q": math.exp(nq / tokens),
               "windows": int(ref.windows.shape[0]), "seqlen": int(ref.windows.shape[1]), "tokens": tokens}
        rot = r1.to("cpu", torch.float64) if r1 is not None else None  # the traces live on the host
        errs = []
        for a, b in zip(trace.hidden, ref.hidden):  # the residual stream of the rotated model is h R1
            b = b @ rot if rot is not None else b
            errs.append(float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)).mean()))
        jumps = [errs[0]] + [errs[i] - errs[i - 1] for i in range(1, len(errs))]
        res.update(layer_error=errs, worst_layer=int(max(range(len(jumps)), key=jumps.__getitem__)),
                   worst_role=None, role_16bit="not measured under streaming (whole-model forwards)")
    except Exception as e:  # a finished run is not thrown away because its check could not run
        return _unchecked(e, cfg)
    res["corpus"] = f"{guard_corpus(cfg.data.corpus)} (calibration half, first windows)"
    log.info("quality check: ppl ratio %.3f (threshold %s), %s", res["value"], res["threshold"], res["verdict"])
    warn_if_collapsed(res)
    return res
