"""Quality guard: before a quantized model is handed out, compare it with its FP model.

Design choices:
* **Held-out calibration text.** The check runs on the *calibration half* (never the evaluation
  half, so it never peeks at the reported numbers) of a corpus that the run did not calibrate
  on: c4 when calibrating on wiki, wiki otherwise. So its windows are disjoint from every
  calibration window by construction, without re-deriving where calib_windows put them.
  Consecutive windows from the start of that half: the same tokens for every run and seed.
* **The FP reference is taken right after loading** (`fp_reference`), before anything changes the
  model: per-token NLL, the top-64 next-token log-probabilities, and the block outputs of the
  first window at up to 256 positions. A few MB; no second copy of the model is ever loaded (it
  doubled the memory of a 7B run and cost a reload), and the end of the run needs only the
  quantized model's forwards.
* **Metric: the perplexity ratio** exp(mean NLL_q - mean NLL_fp) on those windows. Next to it the
  KL(FP || quantized) of the next-token distributions *coarsened to the FP top 64 + the rest*
  (a lower bound of the full KL, equal to it where the top 64 hold all the mass; it is what can
  be kept without storing 4 x 2048 x vocab FP logits). The verdict compares the ratio with
  `cfg.eval.guard_max_ppl_ratio` (default and its justification: docs/RESULTS.md, "Quality
  guard"): healthy runs measured there stay below it, collapsed ones are far above.
* **Attribution**, when the verdict is not ok (or asked for): on the first window only, (a) ratio
  and KL again with one role's input quantizers (q/k/v/o/gate/up/down, or "kv" for the K and V
  cache) switched to 16 bits, 8 forwards; the role whose removal brings the KL down most is named;
  (b) the per-token relative error of every layer's output hidden state against the FP model's
  (mapped into the rotated basis by R1: the residual stream of the rotated model is h R1 exactly),
  averaged over the stored positions; the layer that adds the most error is named. Healthy runs
  skip it: it cost more than the check itself.
* Loud, not fatal, at this level: a warning on stderr and `metrics["quality_check"]`; the CLI
  turns a "collapsed" verdict into exit status 3 unless `fail_on_collapse` is false.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import LINEAR_ROLES, ModelAdapter, adapter_for
from ..data import corpus_split, tokenize
from ..log import log
from ..eval.ppl import model_device

COLLAPSE_EXIT_STATUS = 3


def guard_corpus(calib_corpus: str) -> str:
    """A corpus whose calibration half this run never read."""
    return "c4" if calib_corpus == "wiki" else "wiki"


def guard_windows(tokenizer, calib_corpus: str, n: int, seqlen: int) -> torch.Tensor:
    """[n', seqlen'] consecutive windows from the start of the calibration half of guard_corpus
    (n' <= n and seqlen' <= seqlen when the half is short; at least one)."""
    stream = tokenize(tokenizer, corpus_split(guard_corpus(calib_corpus), "calib"))
    seqlen = min(seqlen, stream.numel())  # never fail at the end of a run over a long calib_seqlen
    n = max(1, min(n, stream.numel() // seqlen))
    return stream[: n * seqlen].view(n, seqlen)


TOPK = 64  # FP next-token log-probabilities kept per position for the KL
HIDDEN_POSITIONS = 256  # positions of the first window whose block outputs are kept


@dataclass
class FPReference:
    """What the check needs of the FP model, taken before the run changes it (see the docstring)."""

    windows: torch.Tensor  # [n, S] token ids
    nll: torch.Tensor  # [n, S-1] float64 per-token NLL
    top_idx: torch.Tensor  # [n, S-1, k] the FP model's most likely next tokens
    top_logp: torch.Tensor  # [n, S-1, k] float64 their log-probabilities
    positions: torch.Tensor  # positions of window 0 whose block outputs are kept
    hidden: list[torch.Tensor]  # per block: [len(positions), hidden] float64 output of window 0


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    # float32: a float64 [S, vocab] is 4 GB at Gemma's 262k vocabulary; what is gathered from it
    # is summed in float64
    return F.log_softmax(logits[0, :-1].float(), -1)  # [S-1, vocab]


@torch.no_grad()
def fp_reference(fp_model: nn.Module, windows: torch.Tensor, k: int = TOPK) -> FPReference:
    """The FP model's numbers on `windows` [n, S] (see FPReference)."""
    dev = model_device(fp_model)
    nll, idx, top = [], [], []
    hidden: list[torch.Tensor] = []
    positions = torch.unique(torch.linspace(0, windows.shape[1] - 1, min(HIDDEN_POSITIONS, windows.shape[1])).long())
    for i in range(windows.shape[0]):
        ids = windows[i: i + 1]
        if i == 0:
            logits, outs = _logits_and_block_outputs(fp_model, ids)
            hidden = [h[0, positions.to(h.device)].double().cpu() for h in outs]
        else:
            logits = fp_model(ids.to(dev)).logits
        lp = _log_probs(logits)
        nll.append(-lp.gather(-1, ids[0, 1:, None].to(lp.device))[:, 0].double().cpu())
        v, j = lp.topk(min(k, lp.shape[-1]), dim=-1)
        top.append(v.double().cpu())
        idx.append(j.cpu())
    return FPReference(windows, torch.stack(nll), torch.stack(idx), torch.stack(top), positions, hidden)


def _nll_kl(q_logits: torch.Tensor, ref: FPReference, i: int) -> tuple[float, float, float]:
    """Summed NLL of the quantized and FP models on window i and summed top-k-coarsened KL(FP || Q)."""
    q = _log_probs(q_logits)
    ids = ref.windows[i]
    nll_q = -q.gather(-1, ids[1:, None].to(q.device)).double().sum().item()
    p_top = ref.top_logp[i].to(q.device)  # [S-1, k]
    q_top = q.gather(-1, ref.top_idx[i].to(q.device)).double()
    kl = (p_top.exp() * (p_top - q_top)).sum(-1)
    # the rest of the vocabulary as one outcome: p_rest log(p_rest / q_rest), 0 log 0 = 0
    p_rest = (1 - p_top.exp().sum(-1)).clamp_min(0)
    q_rest = (1 - q_top.exp().sum(-1)).clamp_min(1e-300)
    kl = kl + torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-300).log() - q_rest.log()), 0.0)
    return nll_q, ref.nll[i].sum().item(), kl.sum().item()


def _act_quantizers(model: nn.Module, adapter: ModelAdapter) -> dict[str, list[nn.Module]]:
    """role -> the ActQuantizers at that role's input in every layer; "kv" -> K and V quantizers."""
    out: dict[str, list] = {r: [] for r in (*LINEAR_ROLES, "kv")}
    for layer in adapter.layers_of(model):
        for role, lin in layer.linears().items():
            if getattr(lin, "input_quantizer", None) is not None:
                out[role].append(lin.input_quantizer)
        t = getattr(layer.attn, "dq_attention", None)
        for q in (getattr(t, "k_quantizer", None), getattr(t, "v_quantizer", None)):
            if q is not None:
                out["kv"].append(q)
    return {r: qs for r, qs in out.items() if qs}


@torch.no_grad()
def _logits_and_block_outputs(model, ids) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and every decoder block's output (the residual stream; HF's last hidden state is
    after the final norm, whose gain fusion moved into lm_head, so hidden_states would not compare)."""
    outs, hooks = [], []
    for block in adapter_for(model).decoder_layers(model):
        hooks.append(block.register_forward_hook(
            lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).detach())))
    try:
        logits = model(ids.to(model_device(model))).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, outs


@torch.no_grad()
def _layer_errors(q_model, ref: FPReference, r1: torch.Tensor | None) -> list[float]:
    _, hq = _logits_and_block_outputs(q_model, ref.windows[:1])
    rot = r1.to(torch.float64) if r1 is not None else None
    errs = []
    for a, b in zip(hq, ref.hidden):
        a = a[0, ref.positions.to(a.device)].double().cpu()
        b = b @ rot if rot is not None else b
        e = (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)
        errs.append(float(e.mean()))
    return errs


@torch.no_grad()
def quality_check(q_model: nn.Module, ref: FPReference, *, max_ppl_ratio: float,
                  r1: torch.Tensor | None = None, attribute: bool | None = None) -> dict:
    """Compare `q_model` (rotated + quantized, quantizers installed) with the FP reference.

    Returns {"metric", "value", "threshold", "verdict", "kl", "ppl_fp", "ppl_q", "windows",
    "tokens", and when attributing (`attribute` True, or None and the verdict is not ok):
    "role_16bit", "worst_role", "layer_error", "worst_layer"}."""
    adapter = adapter_for(q_model)
    dev = model_device(q_model)
    windows = ref.windows
    nq = np_ = kl = 0.0
    tokens = 0
    for i in range(windows.shape[0]):
        a, b, c = _nll_kl(q_model(windows[i: i + 1].to(dev)).logits, ref, i)
        nq, np_, kl, tokens = nq + a, np_ + b, kl + c, tokens + windows.shape[1] - 1
    ratio = math.exp((nq - np_) / tokens)
    res = {"metric": "ppl_ratio", "value": ratio, "threshold": max_ppl_ratio,
           "verdict": "ok" if ratio <= max_ppl_ratio else "collapsed",
           "kl": kl / tokens, "kl_support": f"FP top {ref.top_idx.shape[-1]} + rest",
           "ppl_fp": math.exp(np_ / tokens), "ppl_q": math.exp(nq / tokens),
           "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "tokens": tokens}
    if attribute is None:
        attribute = res["verdict"] != "ok"
    if not attribute:
        return res
    ids = windows[:1]
    n1 = ids.shape[1] - 1

    def score() -> dict:
        nll_q, nll_p, kl1 = _nll_kl(q_model(ids.to(dev)).logits, ref, 0)
        return {"ppl_ratio": math.exp((nll_q - nll_p) / n1), "kl": kl1 / n1}

    per_role = {"all": score()}
    for role, quantizers in _act_quantizers(q_model, adapter).items():
        saved = [q.enabled for q in quantizers]
        for q in quantizers:
            q.enabled = False
        try:
            per_role[role] = score()
        finally:
            for q, s in zip(quantizers, saved):
                q.enabled = s
    # first window: ratio and KL with that role's input quantizers left at 16 bits; the role whose
    # removal brings the model closest to FP (lowest KL; the ratio can fall below 1 by chance)
    res["role_16bit"] = per_role
    roles = {k: v["kl"] for k, v in per_role.items() if k != "all"}
    res["worst_role"] = min(roles, key=roles.get) if roles else None
    errs = _layer_errors(q_model, ref, r1)
    res["layer_error"] = errs
    jumps = [errs[0]] + [errs[i] - errs[i - 1] for i in range(1, len(errs))]
    res["worst_layer"] = int(max(range(len(jumps)), key=jumps.__getitem__))
    return res


def warn_if_collapsed(check: dict) -> None:
    """The loud part: several stderr lines when the verdict is not ok (always, even without progress)."""
    if check.get("verdict") == "ok":
        return
    lines = [
        "!" * 78,
        f"QUALITY CHECK FAILED: the quantized model's perplexity on held-out calibration text is "
        f"{check['value']:.2f}x the FP model's (threshold {check['threshold']:.2f}x; FP {check['ppl_fp']:.2f}, "
        f"quantized {check['ppl_q']:.2f}; mean KL {check['kl']:.3f} nats/token).",
    ]
    if check.get("worst_role") is not None:
        lines.append(f"Most of it comes from the {check['worst_role']!r} quantizers (with them at 16 bits the ratio "
                     f"is {check['role_16bit'][check['worst_role']]['ppl_ratio']:.2f}x on the first window) and layer "
                     f"{check['worst_layer']} adds the most output error.")
    lines += ["This model is not usable as is. Try --a-bits-overrides ROLE=8 for that role, another method, or "
              "see docs/RESULTS.md (Quality guard). --fail-on-collapse false keeps exit status 0.", "!" * 78]
    for line in lines:
        log.warning(line)  # warnings reach stderr even without --verbose / a configured logger


def take_fp_reference(model: nn.Module, tokenizer, cfg) -> FPReference | dict:
    """The FP reference as run_quantize takes it, right after loading: cfg.eval.guard_windows
    held-out windows of cfg.data.seqlen tokens. A failure is returned as the check's error record
    (the run goes on, loudly unchecked)."""
    try:
        windows = guard_windows(tokenizer, cfg.data.corpus, cfg.eval.guard_windows, cfg.data.seqlen)
        model.to(cfg.device)
        return fp_reference(model, windows)
    except Exception as e:  # a run is not thrown away because its check could not run
        return _unchecked(e, cfg)
    finally:
        model.to("cpu")


def _unchecked(e: Exception, cfg) -> dict:
    log.warning("WARNING: the quality check could not run (%s: %s); the model was NOT checked against "
                "the FP model", type(e).__name__, e)
    return {"verdict": "error", "error": f"{type(e).__name__}: {e}", "threshold": cfg.eval.guard_max_ppl_ratio}


def run_guard(model: nn.Module, ref: FPReference | dict, cfg, rotations=None) -> dict:
    """The check as run_quantize runs it at the end: compare with the reference `take_fp_reference`
    took, warn loudly if collapsed. `ref` may be that function's error record."""
    if isinstance(ref, dict):
        return ref
    try:
        model.to(cfg.device)
        check = quality_check(model, ref, max_ppl_ratio=cfg.eval.guard_max_ppl_ratio,
                              r1=getattr(rotations, "r1", None))
    except Exception as e:  # a finished run is not thrown away because its check could not run
        return _unchecked(e, cfg)
    finally:
        model.to("cpu")
    check["corpus"] = f"{guard_corpus(cfg.data.corpus)} (calibration half, first windows)"
    log.info("quality check: ppl ratio %.3f (threshold %s), %s", check["value"], check["threshold"], check["verdict"])
    warn_if_collapsed(check)
    return check
