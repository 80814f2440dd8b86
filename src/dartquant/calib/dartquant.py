"""DartQuant: rotations calibrated from the distribution of the activations they rotate.

1. capture (capture.py): q_proj/up_proj inputs of all layers (pooled, for R1) and o_proj inputs
   per layer and KV head (for R2), a seeded random fraction of the tokens, in memory;
2. hold out 10% of the captured tokens (a split of the *calibration* data) to report the loss
   on tokens the optimizer never saw: learning rates are chosen on it, never on test numbers;
3. train R1 (one matrix) and all R2s (one batched problem: layers x KV heads) with the Whip loss
   through QR-Orth, each starting at the random Hadamard that QuaRot would use with this seed;
4. return a RotationSet (R3, R4 stay fixed Hadamards); loss curves go to the run folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..adapters import adapter_for
from ..hadamard import random_hadamard_matrix
from ..transforms import RotationSet, fuse_norms_
from .capture import capture_activations
from .train import RotationTrainConfig, train_rotation

HOLDOUT = 0.1


def _split(x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random train / held-out split of the token axis (-2)."""
    t = x.shape[-2]
    perm = torch.randperm(t, generator=torch.Generator().manual_seed(seed + 17))
    n_eval = max(1, int(HOLDOUT * t))
    perm = perm.to(x.device)
    return x.index_select(-2, perm[n_eval:]), x.index_select(-2, perm[:n_eval])


def train_config(cfg, which: str) -> RotationTrainConfig:
    return RotationTrainConfig(
        loss=cfg.dq_loss, param=cfg.dq_param, optimizer=cfg.dq_optimizer,
        lr=cfg.dq_r1_lr if which == "r1" else cfg.dq_r2_lr, epochs=cfg.dq_epochs,
        batch_tokens=cfg.dq_batch_tokens, normalize="none" if which == "r1" else cfg.dq_r2_normalize,
        seed=cfg.seed + (0 if which == "r1" else 1))


def calibrate_dartquant(model, cfg, calib_ids: torch.Tensor, *, timer=None, out_dir: Path | None = None,
                        progress: bool = True) -> RotationSet:
    """Capture, then train R1 and R2; `cfg` is a QuantConfig (its dq_* fields)."""
    import contextlib

    stage = timer if timer is not None else (lambda name: contextlib.nullcontext())
    adapter = adapter_for(model)
    geo = adapter.geometry(model.config)
    fuse_norms_(model, adapter)  # capture sees what R1 will rotate: the weight-free normalized stream
    with stage("capture"):
        acts = capture_activations(model, calib_ids, fraction=cfg.dq_token_fraction, seed=cfg.seed,
                                   device=cfg.device, adapter=adapter, progress=progress)
    device = cfg.device
    if str(device).startswith("cuda"):  # the sampled buffers fit: avoid a host copy per step
        acts.r1, acts.r2 = acts.r1.to(device), acts.r2.to(device)
    with stage("calibrate"):
        r1_train, r1_eval = _split(acts.r1, cfg.seed)
        r1_init = random_hadamard_matrix(geo.hidden, cfg.seed)
        r1, hist1 = train_rotation(r1_train, r1_init, train_config(cfg, "r1"), progress=progress, desc="R1",
                                   device=device, eval_x=r1_eval)
        # All layers' R2 at once: [layers * kv_heads, tokens, d], one independent rotation per group.
        x2 = acts.r2.flatten(0, 1)
        r2_train, r2_eval = _split(x2, cfg.seed)
        r2_init = RotationSet.random_hadamard_r2(geo, cfg.seed).flatten(0, 1)
        r2, hist2 = train_rotation(r2_train, r2_init, train_config(cfg, "r2"), progress=progress, desc="R2",
                                   device=device, eval_x=r2_eval)
    r2 = r2.view(geo.n_layers, geo.n_kv_heads, geo.head_dim, geo.head_dim)
    summary = {
        "method": "dartquant", "seed": cfg.seed, "r1": "learned", "r2": "learned",
        "r1_tokens": int(r1_train.shape[0]), "r2_tokens_per_head": int(r2_train.shape[-2]),
        "token_fraction": {"r1": acts.fraction_r1, "r2": acts.fraction_r2},
        "r1_eval_loss": [hist1.get("eval_loss_init"), hist1.get("eval_loss_final")],
        "r2_eval_loss": [hist2.get("eval_loss_init"), hist2.get("eval_loss_final")],
    }
    if out_dir is not None:
        write_curves(Path(out_dir), {"R1": hist1, "R2": hist2})
    return RotationSet(r1, r2, r3=cfg.r3, r4=cfg.r4, meta=summary)


def write_curves(out_dir: Path, histories: dict) -> None:
    """calibration_loss.json (all histories) and calibration_loss.png (per-step loss curves)."""
    (out_dir / "calibration_loss.json").write_text(json.dumps(histories, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histories), figsize=(5 * len(histories), 3.5))
    for ax, (name, h) in zip(axes if len(histories) > 1 else [axes], histories.items()):
        ax.plot(h["loss"], lw=1)
        if "eval_loss_init" in h:
            ax.axhline(h["eval_loss_init"], color="gray", ls="--", lw=1, label="held-out, init")
            ax.axhline(h["eval_loss_final"], color="C3", ls="--", lw=1, label="held-out, final")
            ax.legend(fontsize=8)
        ax.set_title(f"{name}: {h['config']['loss']} loss ({h['optimizer']})")
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_dir / "calibration_loss.png", dpi=110)
    plt.close(fig)
