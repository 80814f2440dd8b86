"""Quality guard: before a quantized model is handed out, compare it with its FP model.

Design choices:
* **Held-out calibration text.** The check runs on the *calibration half* (never the evaluation
  half, so it never peeks at the reported numbers) of a corpus that the run did not calibrate
  on: c4 when calibrating on wiki, wiki otherwise. So its windows are disjoint from every
  calibration window by construction, without re-deriving where calib_windows put them.
  Consecutive windows from the start of that half: the same tokens for every run and seed.
* **The FP reference is reloaded** from `cfg.model` at the end of the run, window by window
  next to the quantized model: run_quantize changes its model in place, and reloading keeps
  the guard a small, local addition at the end of the pipeline.
* **Metric: the perplexity ratio** exp(mean NLL_q - mean NLL_fp) on those windows, with the mean
  KL(FP || quantized) of the next-token distributions next to it. The verdict compares the
  ratio with `cfg.eval.guard_max_ppl_ratio` (default and its justification: docs/RESULTS.md, "Quality
  guard"): healthy runs measured there stay below it, collapsed ones are far above.
* **Attribution, cheap:** on the first window only, (a) ratio and KL again with one role's
  input quantizers (q/k/v/o/gate/up/down, or "kv" for the K and V cache) switched to 16 bits,
  8 forwards; the role whose removal brings the KL down most is named; (b) the per-token relative error of
  every layer's output hidden state against the FP model's (mapped into the rotated basis by
  R1: the residual stream of the rotated model is h R1 exactly), averaged over tokens; the
  layer that adds the most error is named.
* Loud, not fatal, at this level: a warning on stderr and `metrics["quality_check"]`; the CLI
  turns a "collapsed" verdict into exit status 3 unless `fail_on_collapse` is false.
"""

from __future__ import annotations

import math

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


@torch.no_grad()
def _nll_kl(q_logits: torch.Tensor, fp_logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, float, float]:
    """Summed NLL of the quantized and FP models and summed KL(FP || Q), float64 sums."""
    q = F.log_softmax(q_logits[0, :-1].float(), -1)
    p = F.log_softmax(fp_logits[0, :-1].float(), -1)
    tgt = ids[0, 1:].to(q.device)
    nll_q = -q.gather(-1, tgt[:, None]).double().sum().item()
    nll_p = -p.gather(-1, tgt[:, None]).double().sum().item()
    kl = (p.exp() * (p - q)).sum(-1).double().sum().item()
    return nll_q, nll_p, kl


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
def _block_outputs(model, ids) -> list[torch.Tensor]:
    """Every decoder block's output (the residual stream; HF's last hidden state is after the
    final norm, whose gain fusion moved into lm_head, so hidden_states would not compare)."""
    outs, hooks = [], []
    for block in adapter_for(model).decoder_layers(model):
        hooks.append(block.register_forward_hook(
            lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).detach())))
    try:
        model(ids.to(model_device(model)))
    finally:
        for h in hooks:
            h.remove()
    return outs


@torch.no_grad()
def _layer_errors(q_model, fp_model, ids, r1: torch.Tensor | None) -> list[float]:
    dev = model_device(q_model)
    hq, hf = _block_outputs(q_model, ids), _block_outputs(fp_model, ids)
    rot = r1.to(dev, torch.float64) if r1 is not None else None
    errs = []
    for a, b in zip(hq, hf):
        b = b.to(dev, torch.float64)
        b = b @ rot if rot is not None else b
        e = (a.double() - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)
        errs.append(float(e.mean()))
    return errs


@torch.no_grad()
def quality_check(q_model: nn.Module, fp_model: nn.Module, windows: torch.Tensor, *, max_ppl_ratio: float,
                  r1: torch.Tensor | None = None, attribute: bool = True) -> dict:
    """Compare `q_model` (rotated + quantized, quantizers installed) with `fp_model` on `windows`.

    Returns {"metric", "value", "threshold", "verdict", "kl", "ppl_fp", "ppl_q", "windows",
    "tokens", and with `attribute`: "role_16bit", "worst_role", "layer_error",
    "worst_layer"}."""
    adapter = adapter_for(q_model)
    nq = np_ = kl = 0.0
    tokens = 0
    for i in range(windows.shape[0]):
        ids = windows[i: i + 1]
        a, b, c = _nll_kl(q_model(ids.to(model_device(q_model))).logits,
                          fp_model(ids.to(model_device(fp_model))).logits, ids)
        nq, np_, kl, tokens = nq + a, np_ + b, kl + c, tokens + ids.shape[1] - 1
    ratio = math.exp((nq - np_) / tokens)
    res = {"metric": "ppl_ratio", "value": ratio, "threshold": max_ppl_ratio,
           "verdict": "ok" if ratio <= max_ppl_ratio else "collapsed",
           "kl": kl / tokens, "ppl_fp": math.exp(np_ / tokens), "ppl_q": math.exp(nq / tokens),
           "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "tokens": tokens}
    if not attribute:
        return res
    ids = windows[:1]
    fp_logits = fp_model(ids.to(model_device(fp_model))).logits
    n1 = ids.shape[1] - 1

    def score() -> dict:
        nll_q, nll_p, kl1 = _nll_kl(q_model(ids.to(model_device(q_model))).logits, fp_logits, ids)
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
    errs = _layer_errors(q_model, fp_model, ids, r1)
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


def run_guard(model: nn.Module, tokenizer, cfg, load_fp, rotations=None) -> dict:
    """The check as run_quantize runs it: reload the FP model (`load_fp()`), compare on
    cfg.eval.guard_windows held-out windows of cfg.data.seqlen tokens, warn loudly if collapsed."""
    fp_model = None
    try:
        windows = guard_windows(tokenizer, cfg.data.corpus, cfg.eval.guard_windows, cfg.data.seqlen)
        fp_model = load_fp()
        model.to(cfg.device)
        r1 = getattr(rotations, "r1", None)
        check = quality_check(model, fp_model, windows, max_ppl_ratio=cfg.eval.guard_max_ppl_ratio, r1=r1)
    except Exception as e:  # a finished run is not thrown away because its check could not run
        log.warning("WARNING: the quality check could not run (%s: %s); the model was NOT checked against "
                    "the FP model", type(e).__name__, e)
        return {"verdict": "error", "error": f"{type(e).__name__}: {e}", "threshold": cfg.eval.guard_max_ppl_ratio}
    finally:
        model.to("cpu")
        del fp_model
    check["corpus"] = f"{guard_corpus(cfg.data.corpus)} (calibration half, first windows)"
    log.info("quality check: ppl ratio %.3f (threshold %s), %s", check["value"], check["threshold"], check["verdict"])
    warn_if_collapsed(check)
    return check
