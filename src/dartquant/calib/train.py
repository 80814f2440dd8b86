"""Minibatch training of one rotation (or a batch of independent ones).

:func:`train_rotation` fits R on stored activations x so that a loss of
o = x R (default: Whip) goes down, with R kept orthogonal by QR-Orth or by
Cayley SGD (see :mod:`.orth`).

Design choices:

- **Layouts.** ``x [tokens, n]`` with ``init [n, n]``: one rotation (R1,
  activations pooled over layers).  ``x [groups, tokens, n]`` with
  ``init [groups, n, n]``: independent rotations (R2, one per KV head) trained
  together in one batched QR / batched Cayley step.  The objective is the
  *sum* of the per-group losses, so each group receives exactly the gradient
  it would get if trained alone, and every optimizer used acts elementwise
  (SGD, Adam) or per matrix (CayleySGD): groups do not interact.  All groups
  see the same token permutation (it depends only on the seed and the token
  count), so batched training equals training each group separately with the
  same seed, up to floating-point roundoff of batched vs unbatched kernels.
  Logged losses are the *mean* over groups, comparable to the ungrouped case.
- **Precision.** x may be stored in float16/bfloat16 (large calibration sets);
  each minibatch is cast to float32 on the compute device.  Parameters and
  optimizer state are float32.  The returned R is recomputed in float64
  (Q(Z) for QR-Orth, projection onto O(n) for Cayley, which removes float32
  drift) and returned as float32 on CPU; the orthogonality error of the
  result is checked (< 1e-5) and stored in the history.
- **Sampling.** Each epoch draws a fresh permutation of the tokens from a
  ``torch.Generator`` seeded with ``cfg.seed`` (on CPU, so the sequence does
  not depend on the device); minibatches of ``batch_tokens``, the last one of
  an epoch may be smaller.  With the same inputs and seed two runs give the
  same R (on CPU; GPU kernels may not be bitwise deterministic).
- **Schedule.** ``"cosine"`` decays lr from ``cfg.lr`` to 0 over the planned
  number of steps (``epochs * steps_per_epoch``, or ``max_steps`` if smaller)
  and is evaluated before each step; ``"constant"`` keeps ``cfg.lr``.
- **Normalization.** ``normalize="rms"`` divides every token by its RMS over
  channels before the rotation (RMS is rotation invariant, so this equals
  normalizing o).  Whip is not scale invariant; with it, the result no longer
  depends on the activation scale (e.g. layer-dependent magnitudes in the
  pooled R1 data).  Applied identically to ``eval_x``.
- **Held-out evaluation.** ``eval_x`` (same layout as x) is scored with the
  training loss at the init and at the end, in chunks, without gradients:
  a way to pick learning rates without touching test data.
- **Index views instead of copies.** ``index`` / ``eval_index`` name the
  tokens (axis -2) of ``x`` / ``eval_x`` to train / evaluate on, so a train /
  held-out split of one buffer costs no copy of it (``eval_x`` defaults to
  ``x`` when only ``eval_index`` is given).  Training on ``x`` with ``index``
  gives exactly what training on ``x.index_select(-2, index)`` gives.
- **Memory.** x stays where it is (CPU or device); each minibatch is gathered
  there, moved to the compute device in its storage dtype, then cast to
  float32 on the device.
"""

from __future__ import annotations

import functools

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .losses import LOSSES
from .orth import CayleyOrth, CayleySGD, QROrth, orthogonality_error

__all__ = ["RotationTrainConfig", "train_rotation"]


@dataclass
class RotationTrainConfig:
    loss: str = "whip"  # key of LOSSES: "whip", "quant", "variance", "kurtosis"
    param: str = "qr"  # "qr" (QR-Orth latent) or "cayley" (R on the manifold)
    optimizer: str = "sgd"  # "sgd" (with momentum) or "adam"; param="cayley" forces CayleySGD
    lr: float = 1e-3
    momentum: float = 0.9
    epochs: int = 10
    batch_tokens: int = 4096
    schedule: str = "cosine"  # or "constant"
    normalize: str = "none"  # "none" or "rms" (per-token RMS normalization before the loss)
    seed: int = 0
    sign_fix: bool = True  # QR-Orth: positive diagonal in the R factor (start exactly at init)
    cayley_method: str = "exact"  # CayleySGD: "exact" (solve) or "iterative" (Li et al.)
    cayley_reorth_every: int = 0  # CayleySGD: project onto O(n) every k steps (0 = never)
    # grouped rotations (R2: layers x KV heads): a step's float32 minibatch is processed in chunks
    # of groups of at most this many MiB (gradients accumulate; the same update), so that memory
    # does not grow with the number of groups (1024 at 7B: 2 GiB per minibatch copy)
    group_chunk_mib: float = 256.0
    quant_clip: float = 1.0  # loss="quant": the clip ratio of its fake quantizer


def _normalize(xb: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "none":
        return xb
    if mode == "rms":
        rms = xb.pow(2).mean(dim=-1, keepdim=True).add(1e-12).sqrt()
        return xb / rms
    raise ValueError(f"unknown normalize {mode!r} (use 'none' or 'rms')")


def _check_inputs(x: torch.Tensor, init: torch.Tensor) -> None:
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [tokens, n] or [groups, tokens, n], got {tuple(x.shape)}")
    n = x.shape[-1]
    want = (n, n) if x.dim() == 2 else (x.shape[0], n, n)
    if tuple(init.shape) != want:
        raise ValueError(f"init must have shape {want} for x of shape {tuple(x.shape)}, got {tuple(init.shape)}")
    if x.shape[-2] == 0:
        raise ValueError("x has no tokens")


@torch.no_grad()
def _batch(x: torch.Tensor, idx: torch.Tensor, device) -> torch.Tensor:
    """x[..., idx, :] as float32 on `device` (gathered where x lives, cast on the device)."""
    if idx.device != x.device:
        idx = idx.to(x.device)
    return x.index_select(-2, idx).to(device=device, non_blocking=True).to(torch.float32)


def _group_chunks(x: torch.Tensor, cfg) -> list[slice]:
    """Slices of the group axis such that one chunk's float32 minibatch fits cfg.group_chunk_mib."""
    if x.dim() == 2:
        return [slice(None)]
    per_group = max(1, min(cfg.batch_tokens, x.shape[-2]) * x.shape[-1] * 4)
    size = max(1, min(x.shape[0], int(cfg.group_chunk_mib * 2**20) // per_group))
    return [slice(i, i + size) for i in range(0, x.shape[0], size)]


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-chunk results back into one (a single chunk, e.g. 2-D input's 0-d loss, as is)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@torch.no_grad()
def _eval_loss(model, x_eval, loss_fn, cfg, device, index=None) -> torch.Tensor:
    """Per-group mean loss over the tokens `index` of x_eval (all if None); 0-d for 2-D input."""
    r = model().detach()
    t = x_eval.shape[-2] if index is None else index.numel()
    chunks = _group_chunks(x_eval, cfg)
    total = None
    for i in range(0, t, cfg.batch_tokens):
        parts = []
        for sl in chunks:  # slice(None) for 2-D input: the whole x and R
            if index is None:
                xb = x_eval[sl][..., i : i + cfg.batch_tokens, :].to(device=device).to(torch.float32)
            else:
                xb = _batch(x_eval[sl], index[i : i + cfg.batch_tokens], device)
            o = _normalize(xb, cfg.normalize) @ r[sl]
            parts.append(loss_fn(o, reduction="none").sum(dim=-1))  # sum of per-token values
        s = _join(parts)
        total = s if total is None else total + s
    return (total / t).cpu()


def train_rotation(
    x: torch.Tensor,
    init: torch.Tensor,
    cfg: RotationTrainConfig,
    *,
    progress: bool = True,
    desc: str = "R",
    device=None,
    max_steps: int | None = None,
    eval_x: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
    eval_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Calibrate a rotation on activations ``x``.

    Args:
        x: ``[tokens, n]`` or ``[groups, tokens, n]`` activations (any float
            dtype; each minibatch is cast to float32).
        init: orthogonal start, ``[n, n]`` or ``[groups, n, n]``.
        cfg: hyperparameters, see :class:`RotationTrainConfig`.
        progress: show a tqdm bar.
        desc: label of the bar.
        device: compute device (default: the device of ``x``).  x stays where
            it is; only minibatches are moved.
        max_steps: stop after this many optimizer steps (the cosine schedule
            is then planned over ``min(max_steps, epochs * steps_per_epoch)``).
        eval_x: optional held-out activations (same layout as x).
        index: optional 1-D LongTensor, the tokens (axis -2) of x to train on
            (default: all); a view-free train split.
        eval_index: optional tokens of eval_x to evaluate on (default: all);
            with eval_x None, eval_x is x (a held-out split of the same buffer).

    Returns:
        ``(R, history)``: R is float32 on CPU, same shape as ``init``,
        orthogonal to < 1e-5.  history has ``loss`` (per step, mean over
        groups), ``lr`` (per step), ``epoch_loss`` (mean of the step losses of each epoch),
        ``steps``, ``seconds`` (training loop wall time, without evaluation),
        ``seconds_per_step``, ``orth_error``, ``config``; with groups also
        ``group_epoch_loss`` (per epoch, a list per group); with ``eval_x``
        ``eval_loss_init`` / ``eval_loss_final`` (mean over groups) and, with
        groups, ``eval_group_loss_init`` / ``eval_group_loss_final``.
    """
    _check_inputs(x, init)
    if eval_x is None and eval_index is not None:
        eval_x = x
    for name, ix, src in (("index", index, x), ("eval_index", eval_index, eval_x)):
        if ix is not None:
            if ix.dim() != 1 or ix.numel() == 0:
                raise ValueError(f"{name} must be a non-empty 1-D tensor of token indices")
            if int(ix.min()) < 0 or int(ix.max()) >= src.shape[-2]:
                raise ValueError(f"{name} out of range for {src.shape[-2]} tokens")
    if eval_x is not None and (eval_x.dim() != x.dim() or eval_x.shape[-1] != x.shape[-1]
                               or (x.dim() == 3 and eval_x.shape[0] != x.shape[0])):
        raise ValueError(f"eval_x shape {tuple(eval_x.shape)} does not match x shape {tuple(x.shape)}")
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}; choose from {sorted(LOSSES)}")
    if cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    loss_fn = LOSSES[cfg.loss]
    if cfg.loss == "quant" and cfg.quant_clip != 1.0:
        loss_fn = functools.partial(loss_fn, clip_ratio=cfg.quant_clip)
    device = torch.device(device) if device is not None else x.device
    grouped = x.dim() == 3

    init32 = init.detach().to(device=device, dtype=torch.float32)
    if cfg.param == "qr":
        model = QROrth(init32, sign_fix=cfg.sign_fix)
        params = [model.Z]
        if cfg.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
        elif cfg.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=cfg.lr)
        else:
            raise ValueError(f"unknown optimizer {cfg.optimizer!r} (use 'sgd' or 'adam')")
        opt_name = cfg.optimizer
    elif cfg.param == "cayley":
        model = CayleyOrth(init32)
        opt = CayleySGD([model.R], lr=cfg.lr, momentum=cfg.momentum, method=cfg.cayley_method,
                        reorth_every=cfg.cayley_reorth_every)
        opt_name = "cayley_sgd"
    else:
        raise ValueError(f"unknown param {cfg.param!r} (use 'qr' or 'cayley')")

    if index is not None:
        index = index.to(x.device)
    t = x.shape[-2] if index is None else index.numel()
    bt = max(1, int(cfg.batch_tokens))
    steps_per_epoch = math.ceil(t / bt)
    planned = cfg.epochs * steps_per_epoch
    if max_steps is not None:
        planned = min(planned, int(max_steps))

    def lr_at(step: int) -> float:
        if cfg.schedule == "constant" or planned <= 0:
            return cfg.lr
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / planned))

    history: dict = {"loss": [], "lr": [], "epoch_loss": [], "config": asdict(cfg), "optimizer": opt_name}
    if grouped:
        history["group_epoch_loss"] = []
    if eval_x is not None:
        ev = _eval_loss(model, eval_x, loss_fn, cfg, device, eval_index)
        history["eval_loss_init"] = ev.mean().item()
        if grouped:
            history["eval_group_loss_init"] = ev.tolist()

    gen = torch.Generator(device="cpu").manual_seed(int(cfg.seed))
    chunks = _group_chunks(x, cfg)
    history["group_chunks"] = len(chunks)
    step = 0
    bar = tqdm(total=planned, desc=desc, disable=not progress, leave=False)
    t0 = time.perf_counter()
    for _epoch in range(cfg.epochs):
        if step >= planned:
            break
        perm = torch.randperm(t, generator=gen)
        if x.device.type != "cpu":
            perm = perm.to(x.device)
        ep_sum, ep_n, ep_groups = 0.0, 0, None
        for i in range(0, t, bt):
            if step >= planned:
                break
            idx = perm[i : i + bt]
            tokens = idx if index is None else index[idx]
            lr_now = lr_at(step)
            for g in opt.param_groups:
                g["lr"] = lr_now
            opt.zero_grad(set_to_none=True)
            # The loss is a sum over groups with independent gradients: backpropagate it one chunk
            # of groups at a time into R, then once through the parametrization (Q(Z) / Cayley).
            r = model()
            r_leaf = r.detach().requires_grad_(True)
            parts = []
            for sl in chunks:
                xb = _normalize(_batch(x[sl], tokens, device), cfg.normalize)
                pg = loss_fn(xb @ r_leaf[sl], reduction="groups")  # [groups in chunk] or 0-d
                pg.sum().backward()
                parts.append(pg.detach())
                del xb, pg
            r.backward(r_leaf.grad)
            per_group = _join(parts)
            opt.step()
            step += 1

            pg = per_group.detach().float().cpu()
            val = pg.mean().item()
            if not math.isfinite(val):
                bar.close()
                raise FloatingPointError(f"{desc}: loss became {val} at step {step} (lr too large?)")
            history["loss"].append(val)
            history["lr"].append(lr_now)
            ep_sum += val
            ep_n += 1
            if grouped:
                ep_groups = pg.clone() if ep_groups is None else ep_groups + pg
            bar.update(1)
            if step % 10 == 0 or step == planned:
                bar.set_postfix(loss=f"{val:.4g}")
        if ep_n:
            history["epoch_loss"].append(ep_sum / ep_n)
            if grouped:
                history["group_epoch_loss"].append((ep_groups / ep_n).tolist())
    seconds = time.perf_counter() - t0
    bar.close()

    history["steps"] = step
    history["seconds"] = seconds
    history["seconds_per_step"] = seconds / step if step else float("nan")

    if eval_x is not None:
        ev = _eval_loss(model, eval_x, loss_fn, cfg, device, eval_index)
        history["eval_loss_final"] = ev.mean().item()
        if grouped:
            history["eval_group_loss_final"] = ev.tolist()

    # Final rotation: recomputed in float64 (exact Q(Z), or projection of the
    # Cayley iterate to remove float32 drift), then stored as float32.
    r_final = model.final().to(device="cpu", dtype=torch.float32)
    err = orthogonality_error(r_final)
    if err >= 1e-5:
        # float32 rounding of a float64-orthogonal matrix is ~1e-7; this
        # would mean a non-finite or degenerate latent.
        raise FloatingPointError(f"{desc}: final rotation not orthogonal (error {err:.2e})")
    history["orth_error"] = err
    return r_final.contiguous(), history
