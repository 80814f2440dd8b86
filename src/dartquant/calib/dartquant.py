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
    loss_run_clip: bool = False  # dq_loss=quant: its quantizer clips as the run's (a_clip), not at 1.0
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


def train_config(cfg, which: str, spec=None) -> RotationTrainConfig:
    """The trainer's settings for R1 or R2 from a run config (its `dartquant` section); ``spec``:
    the activation quantizer the rotation feeds (its clip ratio, with dq_loss_run_clip)."""
    dq = cfg.section("dartquant")
    clip = spec.clip_ratio if dq.loss_run_clip and spec is not None else 1.0
    return RotationTrainConfig(
        loss=dq.loss, param=dq.param, optimizer=dq.optimizer,
        lr=dq.r1_lr if which == "r1" else dq.r2_lr, epochs=dq.epochs,
        batch_tokens=dq.batch_tokens, normalize="none" if which == "r1" else dq.r2_normalize,
        seed=cfg.seed + (0 if which == "r1" else 1), quant_clip=clip)


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
    return _summarize(_r2_heldout_stats(r2_buf, r2, held_rows, geo, spec, device))


@torch.no_grad()
def _r2_heldout_stats(r2_buf, r2, held_rows, geo, spec, device) -> list[tuple[float, float, int]]:
    """r2_heldout_quant's per-layer (error, signal, tokens), for the layers r2_buf holds."""
    kvh, groups, hd = geo.n_kv_heads, geo.kv_groups, geo.head_dim
    n = held_rows.numel() // groups
    stats = []
    for layer in range(r2_buf.shape[0]):
        x = r2_buf[layer].index_select(-2, held_rows.to(r2_buf.device)).to(device).float()
        o = x @ r2[layer].to(device=device, dtype=torch.float32)  # [kvh, n * groups, hd]
        o = kv_head_token_view(o, groups).reshape(n, kvh * groups * hd)
        stats.append(_quant_stats(o, spec))
    return stats


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
    spec = cfg.scheme.act_spec("q", geo.head_dim)
    r1, hist = train_rotation(x, init, train_config(cfg, "r1", spec), progress=progress, desc="R1", device=device,
                              index=train, eval_index=held)
    hist["heldout_quant"] = {"spec": _spec_dict(spec),
                             "init": r1_heldout_quant(x, init, held, spec, device),
                             "final": r1_heldout_quant(x, r1, held, spec, device)}
    hist["tokens"] = {"train": int(train.numel()), "held_out": int(held.numel())}
    return r1, hist


def fit_r2(acts: Captured, geo, cfg, *, progress: bool = True, buffers: str = "auto") -> tuple[torch.Tensor, dict]:
    """Train all R2s ([layers, kv_heads, d, d]) on the training tokens; score them on held-out
    whole tokens with the normalization-free criterion (r2_heldout_quant, init and final)."""
    init = RotationSet.random_hadamard_r2(geo, cfg.seed)
    r2, hist, stats = _fit_r2_layers(acts.r2, init, geo, cfg, progress=progress, buffers=buffers)
    for k in ("init", "final"):
        hist["heldout_quant"][k] = _summarize(stats[k])
    return r2, hist


def _fit_r2_layers(rows: torch.Tensor, init: torch.Tensor, geo, cfg, *, progress: bool, buffers: str,
                   desc: str = "R2") -> tuple[torch.Tensor, dict, dict]:
    """R2 of the layers in `rows` [layers, kv_heads, tokens * groups, d] (all of them, or one in the
    streamed pass) from `init` [layers, kv_heads, d, d]: one batched problem of independent groups,
    so a layer fitted alone gets what it gets in the batch (train.py). Returns (r2, history, the
    held-out per-layer stats {"init", "final"}, summarized by the caller over all layers)."""
    device = cfg.device
    buf = _placement(rows, device, buffers)
    x = buf.flatten(0, 1)  # [layers * kv_heads, tokens * groups, d]: a view
    t = x.shape[-2] // geo.kv_groups
    train, held = split_indices(t, cfg.seed, geo.kv_groups)
    spec = cfg.scheme.act_spec("o", geo.head_dim)
    r2, hist = train_rotation(x, init.flatten(0, 1), train_config(cfg, "r2", spec), progress=progress, desc=desc,
                              device=device, index=train, eval_index=held)
    r2 = r2.view(init.shape)
    stats = {"init": _r2_heldout_stats(buf, init, held, geo, spec, device),
             "final": _r2_heldout_stats(buf, r2, held, geo, spec, device)}
    hist["heldout_quant"] = {"spec": _spec_dict(spec)}
    hist["tokens"] = {"train_per_head": int(train.numel()), "held_out_per_head": int(held.numel())}
    return r2, hist, stats


class R2Fitter:
    """R2 fitted layer by layer while the streamed FP pass captures (stream/run.py): `fit_layer_(i,
    rows)` as soon as layer i's o_proj rows are captured, so the capture's R2 buffer is one layer
    (host memory flat in depth; 34 GB of samples at Llama-2-70B shape otherwise). `result()` gives
    what fit_best(fit_r2, ...) gives on the whole buffer: the same seed, init, split and per-group
    training (train.py: groups do not interact), the history merged over layers (losses are means
    over groups, held-out SQNR summarized over all layers), and with dq_lr_grid every layer fitted
    at each lr and the lr chosen on the held-out loss of all layers together, as fit_best chooses."""

    def __init__(self, geo, cfg, *, progress: bool = False, buffers: str = "auto"):
        self.geo, self.cfg, self.progress, self.buffers = geo, cfg, progress, buffers
        self.init = RotationSet.random_hadamard_r2(geo, cfg.seed)
        self.grid = [float(lr) for lr in cfg.section("dartquant").lr_grid]
        self.parts: dict = {lr: [] for lr in (self.grid or [None])}  # lr -> per layer (r2, hist, stats)
        self.rows_bytes = 0  # of all layers' samples (what the whole buffer would have taken)
        self.record: dict = {}  # seconds / memory of the fits, as `measure` records a stage
        self._seconds = 0.0

    def fit_layer_(self, i: int, rows: torch.Tensor) -> None:
        """Fit layer i's R2 on its rows [kv_heads, tokens * groups, d] (used now, not kept)."""
        if any(len(p) != i for p in self.parts.values()):
            raise RuntimeError(f"R2Fitter: layer {i} out of order")
        rec: dict = {}
        with measure(self.cfg.device, rec):
            for lr, parts in self.parts.items():
                cfg = self.cfg if lr is None else self.cfg.with_section("dartquant", r2_lr=lr)
                parts.append(_fit_r2_layers(rows[None], self.init[i: i + 1], self.geo, cfg, progress=self.progress,
                                            buffers=self.buffers, desc=f"R2[{i}]"))
        self._seconds += rec.pop("seconds")
        self.record = {**rec, "seconds": round(self._seconds, 3)}
        self.rows_bytes += rows.numel() * rows.element_size()

    def result(self) -> tuple[torch.Tensor, dict]:
        if any(len(p) != self.geo.n_layers for p in self.parts.values()):
            raise RuntimeError("R2Fitter: not every layer was fitted")
        fits = [(lr, *_merge_r2_fits(parts)) for lr, parts in self.parts.items()]
        if not self.grid:
            return fits[0][1], fits[0][2]
        return _choose_lr(fits, "r2")


def _merge_r2_fits(parts: list) -> tuple[torch.Tensor, dict]:
    """Per-layer (r2, history, stats) -> what one batched fit over all layers reports."""
    hists = [h for _, h, _ in parts]
    n, h0 = len(hists), hists[0]
    out = dict(h0)
    out["loss"] = [sum(h["loss"][s] for h in hists) / n for s in range(len(h0["loss"]))]
    out["epoch_loss"] = [sum(h["epoch_loss"][e] for h in hists) / n for e in range(len(h0["epoch_loss"]))]
    out["group_epoch_loss"] = [sum((h["group_epoch_loss"][e] for h in hists), [])
                               for e in range(len(h0["group_epoch_loss"]))]
    for k in ("init", "final"):  # the mean over all groups, as train_rotation takes it
        groups = sum((h[f"eval_group_loss_{k}"] for h in hists), [])
        out[f"eval_group_loss_{k}"] = groups
        out[f"eval_loss_{k}"] = torch.tensor(groups, dtype=torch.float32).mean().item()
    out["group_chunks"] = sum(h["group_chunks"] for h in hists)
    out["seconds"] = sum(h["seconds"] for h in hists)
    out["seconds_per_step"] = out["seconds"] / out["steps"] if out["steps"] else float("nan")
    out["orth_error"] = max(h["orth_error"] for h in hists)
    out["heldout_quant"] = {"spec": h0["heldout_quant"]["spec"],
                            **{k: _summarize(sum((st[k] for _, _, st in parts), [])) for k in ("init", "final")}}
    return torch.cat([r for r, _, _ in parts]), out


def fit_best(fit, acts: Captured, geo, cfg, name: str, *, progress: bool = True,
             buffers: str = "auto") -> tuple[torch.Tensor, dict]:
    """`fit` (fit_r1 / fit_r2) at the section's {name}_lr, or, when its lr_grid is set, at each lr of
    the grid on the same capture, keeping the one with the lowest held-out loss (the split the
    fit itself holds out: calibration data only). The history gets `lr_selection`."""
    grid = cfg.section("dartquant").lr_grid
    if not grid:
        return fit(acts, geo, cfg, progress=progress, buffers=buffers)
    fits = [(float(lr), *fit(acts, geo, cfg.with_section("dartquant", **{f"{name}_lr": float(lr)}),
                             progress=progress, buffers=buffers)) for lr in grid]
    return _choose_lr(fits, name)


def _choose_lr(fits: list[tuple[float, torch.Tensor, dict]], name: str) -> tuple[torch.Tensor, dict]:
    """The (rotation, history) of the lr with the lowest finite held-out loss; the history gets
    `lr_selection` (the grid, each lr's held-out loss [init, final], the choice)."""
    best, table = None, {}
    for lr, r, h in fits:
        final = h["eval_loss_final"]
        table[str(lr)] = [h["eval_loss_init"], final]
        if math.isfinite(final) and (best is None or final < best[1]["eval_loss_final"]):
            best = (r, h, lr)
    grid = [lr for lr, _, _ in fits]
    if best is None:
        raise FloatingPointError(f"{name.upper()}: the held-out loss diverged at every lr of dq_lr_grid "
                                 f"{grid}; try smaller learning rates")
    r, h, lr = best
    h["lr_selection"] = {"grid": grid, "held_out_loss": table, "chosen": lr}
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
    r2_fitter = acts.r2_fitter  # the streamed pass fitted R2 layer by layer already (R2Fitter)
    buffer_bytes = {"r1": acts.r1.numel() * acts.r1.element_size(),
                    "r2": r2_fitter.rows_bytes if r2_fitter else acts.r2.numel() * acts.r2.element_size()}
    with stage("calibrate"):
        with measure(cfg.device, stages["r1"]):
            r1, hist1 = fit_best(fit_r1, acts, geo, cfg, "r1", progress=progress, buffers=buffers)
            acts.r1 = None  # free the R1 buffer (host and device) before R2 trains
        if r2_fitter is not None:
            r2, hist2 = r2_fitter.result()
            stages["r2"] = r2_fitter.record
        else:
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
