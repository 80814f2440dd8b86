"""DartQuant: rotations calibrated from the distribution of the activations they rotate.

1. capture (capture.py): q_proj/up_proj inputs of all layers (pooled, for R1) and o_proj inputs
   per layer and KV head (for R2), a seeded random fraction of the tokens, in host memory;
2. hold out 10% of the captured tokens (a split of the *calibration* data) to report the loss
   on tokens the optimizer never saw: learning rates and options are chosen on it, never on test
   numbers. The split is by index (no copy of the buffers); for R2 it is by whole token (all
   query heads of a held-out token are held out), so that held-out o_proj inputs can be
   rebuilt as the full vectors the runtime quantizer sees;
3. train R1 (one matrix) and all R2s (one batched problem: layers x KV heads) with the Whip loss
   through QR-Orth, each starting at the random Hadamard that QuaRot would use with this seed;
4. score the result on the held-out tokens with a criterion that does not depend on the loss or
   on the input normalization: the 4-bit fake-quantization SQNR (and error) of the rotated
   inputs, quantized exactly as the run's activation quantizer does (`cfg.act_spec`);
5. return a RotationSet (R3, R4 stay fixed Hadamards); loss curves and the held-out criterion go
   to the run folder (calibration_loss.json / .png) and into the rotations' metadata.

Memory: the capture writes to host memory only. On CUDA each buffer is moved to the device for
its own training stage only (`buffers="device"`, the default when it fits) or left on the host
with only minibatches moved (`buffers="host"`); the R1 buffer is freed before R2 trains and the
R2 buffer when R2 is done; the model's weights are on the host during training (capture moves
one block at a time). Per-stage seconds and peak memory so far are recorded in the metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters import adapter_for
from ..hadamard import random_hadamard_matrix
from ..quant.primitives import fake_quantize
from ..stages import measure
from ..typecheck import check_types
from ..transforms import RotationSet, fuse_norms_
from ..transforms.placements import kv_head_token_view
from .capture import Captured, capture_activations
from .losses import LOSSES
from .train import RotationTrainConfig, train_rotation

HOLDOUT = 0.1
BUFFER_MODES = ("auto", "device", "host")


def split_indices(t: int, seed: int, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random train / held-out split of `t` tokens by index: (train rows, held-out rows), sorted
    by the permutation. With `groups` > 1 the buffer has t * groups rows, row i * groups + g
    belonging to token i, and a token goes to one side with all its rows."""
    if t < 2:
        raise ValueError(f"need at least 2 calibration tokens to hold some out, got {t}")
    perm = torch.randperm(t, generator=torch.Generator().manual_seed(seed + 17))
    n_eval = max(1, int(HOLDOUT * t))
    train, held = perm[n_eval:], perm[:n_eval]
    if groups > 1:
        offs = torch.arange(groups)
        train, held = ((s[:, None] * groups + offs).reshape(-1) for s in (train, held))
    return train, held


@dataclass
class DartQuantConfig:
    """DartQuant's settings (the `dartquant` section of a run config; flags `--dq-*`)."""

    r1_lr: float = 1e-3
    r2_lr: float = 1e-3
    epochs: int = 10
    batch_tokens: int = 4096
    token_fraction: float = 0.1
    loss: str = "whip"  # key of losses.LOSSES
    param: str = "qr"  # qr (QR-Orth) | cayley
    optimizer: str = "sgd"  # sgd | adam
    r2_normalize: str = "none"  # none | rms: the o_proj inputs before the loss
    lr_grid: list[float] = field(default_factory=list)  # non-empty: fit R1 / R2 at each lr, keep the best held-out

    def __post_init__(self):
        check_types(self)

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"dq_loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.param not in ("qr", "cayley") or self.optimizer not in ("sgd", "adam"):
            raise ValueError("dq_param must be qr or cayley and dq_optimizer sgd or adam")
        if self.r2_normalize not in ("none", "rms"):
            raise ValueError(f"dq_r2_normalize must be none or rms, got {self.r2_normalize!r}")
        if self.r1_lr <= 0 or self.r2_lr <= 0 or self.epochs <= 0 or self.batch_tokens <= 0:
            raise ValueError("dq_r1_lr, dq_r2_lr, dq_epochs and dq_batch_tokens must be positive")
        if not 0 < self.token_fraction <= 1:
            raise ValueError(f"dq_token_fraction must be in (0, 1], got {self.token_fraction}")
        if not all(lr > 0 for lr in self.lr_grid):
            raise ValueError(f"dq_lr_grid must be a list of positive learning rates, got {self.lr_grid!r}")


def train_config(cfg, which: str) -> RotationTrainConfig:
    """The trainer's settings for R1 or R2 from a run config (its `dartquant` section)."""
    dq = cfg.section("dartquant")
    return RotationTrainConfig(
        loss=dq.loss, param=dq.param, optimizer=dq.optimizer,
        lr=dq.r1_lr if which == "r1" else dq.r2_lr, epochs=dq.epochs,
        batch_tokens=dq.batch_tokens, normalize="none" if which == "r1" else dq.r2_normalize,
        seed=cfg.seed + (0 if which == "r1" else 1))


# ------------------------------------------------------------------ held-out criterion


def _quant_stats(o: torch.Tensor, spec) -> tuple[float, float, int]:
    """(sum of squared 4-bit errors, sum of squares, tokens) of per-token fake quantization."""
    err = o - fake_quantize(o, spec)
    return err.double().pow(2).sum().item(), o.double().pow(2).sum().item(), o.shape[0]


def _summarize(per_layer: list[tuple[float, float, int]]) -> dict:
    def db(sig, err):
        return float("inf") if err == 0 else 10.0 * math.log10(sig / err)

    sq = [db(s, e) for e, s, _ in per_layer]
    mse = [e / n for e, _, n in per_layer]  # squared error per token (summed over channels)
    return {"sqnr_db": sum(sq) / len(sq), "mse": sum(mse) / len(mse),
            "sqnr_db_layers": [round(v, 4) for v in sq], "mse_layers": mse}


@torch.no_grad()
def r2_heldout_quant(r2_buf: torch.Tensor, r2: torch.Tensor, held_rows: torch.Tensor, geo, spec,
                     device="cpu") -> dict:
    """4-bit quantization quality of R2-rotated o_proj inputs on held-out tokens.

    r2_buf [layers, kv_heads, tokens * kv_groups, head_dim] (the capture's layout), r2
    [layers, kv_heads, head_dim, head_dim], held_rows the held-out rows (whole tokens, from
    `split_indices(..., groups=kv_groups)`). Each held-out token is rebuilt as the full o_proj
    input [heads * head_dim] (head h * kv_groups + g = row t * kv_groups + g of KV head h),
    rotated per head (x @ R2, as in training) *without* any normalization, and fake-quantized
    with `spec` (the run's activation quantizer for o_proj). Returns the SQNR in dB (pooled over
    a layer's tokens, then the mean over layers: the criterion; higher is better) and the
    squared error per token (summed over channels, mean over tokens, then over layers), with
    the per-layer values.
    """
    kvh, groups, hd = geo.n_kv_heads, geo.kv_groups, geo.head_dim
    n = held_rows.numel() // groups
    stats = []
    for layer in range(geo.n_layers):
        x = r2_buf[layer].index_select(-2, held_rows.to(r2_buf.device)).to(device).float()
        o = x @ r2[layer].to(device=device, dtype=torch.float32)  # [kvh, n * groups, hd]
        o = kv_head_token_view(o, groups).reshape(n, kvh * groups * hd)
        stats.append(_quant_stats(o, spec))
    return _summarize(stats)


@torch.no_grad()
def r1_heldout_quant(r1_buf: torch.Tensor, r1: torch.Tensor, held_rows: torch.Tensor, spec, device="cpu",
                     chunk: int = 8192) -> dict:
    """The same for R1: held-out pooled q/up inputs, rotated, fake-quantized per token with `spec`;
    pooled SQNR over all held-out tokens (one 'layer': the buffer pools all layers)."""
    r = r1.to(device=device, dtype=torch.float32)
    e = s = n = 0
    for i in range(0, held_rows.numel(), chunk):
        x = r1_buf.index_select(0, held_rows[i: i + chunk].to(r1_buf.device)).to(device).float()
        de, ds, dn = _quant_stats(x @ r, spec)
        e, s, n = e + de, s + ds, n + dn
    out = _summarize([(e, s, n)])
    del out["sqnr_db_layers"], out["mse_layers"]
    return out


# ------------------------------------------------------------------ stages


def _placement(buf: torch.Tensor, device, buffers: str) -> torch.Tensor:
    """Where a buffer lives while it trains: on a CUDA device if asked / if it fits, else host."""
    if buffers not in BUFFER_MODES:
        raise ValueError(f"buffers must be one of {BUFFER_MODES}, got {buffers!r}")
    dev = torch.device(device)
    if dev.type != "cuda" or buffers == "host":
        return buf
    if buffers == "auto":
        free, _ = torch.cuda.mem_get_info(dev)
        if buf.numel() * buf.element_size() > 0.4 * free:  # leave room for the minibatch work
            return buf
    return buf.to(dev)


def capture(model, cfg, calib_ids: torch.Tensor, *, progress: bool = True) -> Captured:
    """Fuse the norms (capture sees what R1 will rotate: the weight-free normalized stream) and
    sample the inputs of R1 and R2 into host memory."""
    adapter = adapter_for(model)
    fuse_norms_(model, adapter)
    return capture_activations(model, calib_ids, fraction=cfg.section("dartquant").token_fraction, seed=cfg.seed,
                               device=cfg.device, adapter=adapter, progress=progress)


def fit_r1(acts: Captured, geo, cfg, *, progress: bool = True, buffers: str = "auto") -> tuple[torch.Tensor, dict]:
    """Train R1 on the pooled buffer's training split; score it on the held-out split.

    The history gets `heldout_quant` = {"init": ..., "final": ...} (see r1_heldout_quant)."""
    device = cfg.device
    x = _placement(acts.r1, device, buffers)
    train, held = split_indices(x.shape[0], cfg.seed)
    init = random_hadamard_matrix(geo.hidden, cfg.seed)
    r1, hist = train_rotation(x, init, train_config(cfg, "r1"), progress=progress, desc="R1", device=device,
                              index=train, eval_index=held)
    spec = cfg.scheme.act_spec("q", geo.head_dim)
    hist["heldout_quant"] = {"spec": _spec_dict(spec),
                             "init": r1_heldout_quant(x, init, held, spec, device),
                             "final": r1_heldout_quant(x, r1, held, spec, device)}
    hist["tokens"] = {"train": int(train.numel()), "held_out": int(held.numel())}
    return r1, hist


def fit_r2(acts: Captured, geo, cfg, *, progress: bool = True, buffers: str = "auto") -> tuple[torch.Tensor, dict]:
    """Train all R2s ([layers, kv_heads, d, d]) on the training tokens; score them on held-out
    whole tokens with the normalization-free criterion (r2_heldout_quant, init and final)."""
    device = cfg.device
    buf = _placement(acts.r2, device, buffers)
    x = buf.flatten(0, 1)  # [layers * kv_heads, tokens * groups, d]: a view
    t = x.shape[-2] // geo.kv_groups
    train, held = split_indices(t, cfg.seed, geo.kv_groups)
    init = RotationSet.random_hadamard_r2(geo, cfg.seed)
    r2, hist = train_rotation(x, init.flatten(0, 1), train_config(cfg, "r2"), progress=progress, desc="R2",
                              device=device, index=train, eval_index=held)
    r2 = r2.view(geo.n_layers, geo.n_kv_heads, geo.head_dim, geo.head_dim)
    spec = cfg.scheme.act_spec("o", geo.head_dim)
    hist["heldout_quant"] = {"spec": _spec_dict(spec),
                             "init": r2_heldout_quant(buf, init, held, geo, spec, device),
                             "final": r2_heldout_quant(buf, r2, held, geo, spec, device)}
    hist["tokens"] = {"train_per_head": int(train.numel()), "held_out_per_head": int(held.numel())}
    return r2, hist


def fit_best(fit, acts: Captured, geo, cfg, name: str, *, progress: bool = True,
             buffers: str = "auto") -> tuple[torch.Tensor, dict]:
    """`fit` (fit_r1 / fit_r2) at the section's {name}_lr, or, when its lr_grid is set, at each lr of
    the grid on the same capture, keeping the one with the lowest held-out loss (the split the
    fit itself holds out: calibration data only). The history gets `lr_selection`."""
    grid = cfg.section("dartquant").lr_grid
    if not grid:
        return fit(acts, geo, cfg, progress=progress, buffers=buffers)
    best, table = None, {}
    for lr in grid:
        r, h = fit(acts, geo, cfg.with_section("dartquant", **{f"{name}_lr": float(lr)}), progress=progress,
                   buffers=buffers)
        final = h["eval_loss_final"]
        table[str(lr)] = [h["eval_loss_init"], final]
        if math.isfinite(final) and (best is None or final < best[1]["eval_loss_final"]):
            best = (r, h, float(lr))
    if best is None:
        raise FloatingPointError(f"{name.upper()}: the held-out loss diverged at every lr of dq_lr_grid "
                                 f"{grid}; try smaller learning rates")
    r, h, lr = best
    h["lr_selection"] = {"grid": [float(x) for x in grid], "held_out_loss": table, "chosen": lr}
    return r, h


def _spec_dict(spec) -> dict:
    return {"bits": spec.bits, "symmetric": spec.symmetric, "group_size": spec.group_size,
            "clip_ratio": spec.clip_ratio}


def calibrate_dartquant(model, cfg, calib_ids: torch.Tensor | None, *, timer=None, out_dir: Path | None = None,
                        progress: bool = True, buffers: str = "auto", captured: Captured | None = None) -> RotationSet:
    """Capture, then train R1 and R2; `cfg` is a RunConfig (its `dartquant` section).

    `buffers` ("auto", "device", "host"): on CUDA, whether each captured buffer moves to the GPU
    for its own training stage ("auto": if it takes at most 40% of the free device memory) or
    stays on the host with only minibatches moved. Ignored on the CPU. `captured`: samples captured already (the streamed pass, stream/):
    no capture then."""
    import contextlib

    stage = timer if timer is not None else (lambda name: contextlib.nullcontext())
    geo = adapter_for(model).geometry(model.config)
    stages = {"capture": {}, "r1": {}, "r2": {}}
    with stage("capture"), measure(cfg.device, stages["capture"]):
        acts = captured if captured is not None else capture(model, cfg, calib_ids, progress=progress)
    buffer_bytes = {"r1": acts.r1.numel() * acts.r1.element_size(), "r2": acts.r2.numel() * acts.r2.element_size()}
    with stage("calibrate"):
        with measure(cfg.device, stages["r1"]):
            r1, hist1 = fit_best(fit_r1, acts, geo, cfg, "r1", progress=progress, buffers=buffers)
            acts.r1 = None  # free the R1 buffer (host and device) before R2 trains
        with measure(cfg.device, stages["r2"]):
            r2, hist2 = fit_best(fit_r2, acts, geo, cfg, "r2", progress=progress, buffers=buffers)
            acts.r2 = None
    q1, q2 = hist1["heldout_quant"], hist2["heldout_quant"]
    summary = {
        "method": "dartquant", "seed": cfg.seed, "r1": "learned", "r2": "learned",
        "r1_tokens": hist1["tokens"]["train"], "r2_tokens_per_head": hist2["tokens"]["train_per_head"],
        "token_fraction": {"r1": acts.fraction_r1, "r2": acts.fraction_r2},
        "r1_eval_loss": [hist1.get("eval_loss_init"), hist1.get("eval_loss_final")],
        "r2_eval_loss": [hist2.get("eval_loss_init"), hist2.get("eval_loss_final")],
        # the normalization- and loss-independent held-out criterion: 4-bit SQNR (dB) of the
        # rotated inputs, [init (random Hadamard), final]
        "r1_heldout_sqnr_db": [q1["init"]["sqnr_db"], q1["final"]["sqnr_db"]],
        "r2_heldout_sqnr_db": [q2["init"]["sqnr_db"], q2["final"]["sqnr_db"]],
        "buffer_bytes": buffer_bytes, "buffers": buffers, "stages": stages,
        "r1_lr": hist1["config"]["lr"], "r2_lr": hist2["config"]["lr"],
    }
    if cfg.section("dartquant").lr_grid:
        summary["lr_selection"] = {"r1": hist1["lr_selection"], "r2": hist2["lr_selection"]}
    if out_dir is not None:
        write_curves(Path(out_dir), {"R1": hist1, "R2": hist2})
    return RotationSet(r1, r2, r3=cfg.r3, r4=cfg.r4, meta=summary)


def write_curves(out_dir: Path, histories: dict) -> None:
    """calibration_loss.json (all histories, with the held-out criterion) and
    calibration_loss.png (per-step loss curves)."""
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
        title = f"{name}: {h['config']['loss']} loss ({h['optimizer']})"
        if "heldout_quant" in h:
            q = h["heldout_quant"]
            title += f"\nheld-out 4-bit SQNR {q['init']['sqnr_db']:.2f} -> {q['final']['sqnr_db']:.2f} dB"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_dir / "calibration_loss.png", dpi=110)
    plt.close(fig)
