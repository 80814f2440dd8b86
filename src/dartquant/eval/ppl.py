"""Perplexity on held-out windows: exp(mean next-token NLL over every predicted position)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import EVAL_CORPORA, eval_windows


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True, desc: str = "ppl") -> dict:
    """{"ppl", "nll", "tokens"} of `model` over `windows` [n, seqlen]; NLL accumulated in float64."""
    device = model_device(model)
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
        ids = windows[start: start + batch_size].to(device)
        logits = model(ids).logits[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.double().item()
        total_tokens += ids[:, 1:].numel()
    mean = total_nll / total_tokens
    return {"ppl": math.exp(mean), "nll": mean, "tokens": total_tokens}


def evaluate_ppl(model, tokenizer, corpora=EVAL_CORPORA, seqlen: int = 2048, max_windows: int | None = None,
                 batch_size: int = 1, progress: bool = True) -> dict:
    """{"wiki": ppl, "c4": ppl, "tokens": total tokens scored} (the keys are the corpora asked for)."""
    out: dict = {}
    tokens = 0
    for corpus in corpora:
        res = perplexity(model, eval_windows(tokenizer, corpus, seqlen, max_windows), batch_size, progress,
                         desc=f"{corpus} ppl")
        out[corpus] = res["ppl"]
        tokens += res["tokens"]
    out["tokens"] = tokens
    return out
