"""DFRot: QuaRot's random Hadamard R1, refined by alternating quantization and Procrustes.

DFRot (Xiang & Zhang, 2024) explains why a random Hadamard R1 beats a random orthogonal one at
4-bit activations: the rare tokens with *massive activations* (one channel holding most of the
token's energy) quantize badly after a generic rotation. It refines R1 on calibration
activations X (the pooled q_proj / up_proj inputs DartQuant captures, capture.py) by minimizing

    E(R) = sum_t w_t ||x_t R - quant(x_t R)||^2 / sum_t w_t

with a large weight w_t on massive-activation tokens, alternating
  (a) fix R:  Q = quant(X R), the per-token quantizer of the run (its clip ratio included);
  (b) fix Q:  R = argmin_{R orthogonal} sum_t w_t ||x_t R - q_t||^2 = U V^T, where
              U S V^T = svd(X^T W Q)  (orthogonal Procrustes).
Step (b) never increases the surrogate J(R, Q) = sum_t w_t ||x_t R - q_t||^2 at fixed Q (it is
its exact minimizer). E itself is not guaranteed to decrease: quant() re-derives its scale and
zero point from the new x R, and min/max rounding is not the closest 4-bit grid point over all
grids. So every iterate's E is recorded and the best one (on the *training* tokens) is kept,
the start included: the result is never worse than the start on them (QuaRot's R1 by default).

Choices (defaults follow the paper and its public code where they say something):
  * iterations = 100: the public code's number of alternations.
  * massive tokens: max_c |x_c| > ma_ratio * median_c |x_c| within the token (default 100). The
    R1 inputs are RMS-normalized, so |x_c| <= sqrt(hidden) for every token and a comparison
    across tokens (max |x| vs the median token's max) never fires; the within-token ratio is
    scale-free. The paper's code thresholds the unrotated quantization error instead, at a
    model-specific value (8.5 for LLaMA): ours needs no per-model constant. On SmolLM2-135M
    (8 x 512 wiki tokens, 10% sampled) ratio > 100 flags 1.2% of the R1 rows, mostly layers 1-10.
  * ma_weight = 100: the paper's gamma; here a weight on a token's *squared* error (the W in
    X^T W Q). (A public fork scales the massive rows by gamma instead, a weight of gamma^2 on the
    squared error; `--dfrot-ma-weight 10000` reproduces that.)
  * R2: Hadamard per head, R3 / R4 online Hadamards, as QuaRot.
  * init (ours, not the paper's): "hadamard" starts from QuaRot's R1 (the paper); "principal_axes" from
    U H, U the training tokens' principal axes and H that Hadamard, so that the dominant directions of the
    stream land on flat rows (RESULTS §54-§55). The held-out report compares with QuaRot's R1 either way.
Everything runs in float64 on `cfg.device`, in chunks of tokens (one pass per iteration gives
both E(R_k) and X^T W Q_k); the result is orthogonal to float64 precision. Deterministic per
seed: the capture, the held-out split and the Hadamard signs are seeded; the solver has no
randomness.
Held-out reporting as DartQuant's: 10% of the captured tokens are held out (split_indices); the
4-bit SQNR of the rotated inputs on them, before (Hadamard) and after, for all held-out tokens
and for the massive ones. They never choose anything.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import adapter_for
from ..quant.primitives import QuantSpec, fake_quantize
from ..stages import measure
from ..transforms import RotationSet, fuse_norms_
from ..typecheck import check_types
from .capture import capture_activations
from .dartquant import _placement, _spec_dict, r1_heldout_quant, split_indices

CHUNK_TOKENS = 16_384  # rows per float64 pass: bounds the solver's working memory
INITS = ("hadamard", "principal_axes")


@dataclass
class DFRotConfig:
    """DFRot's settings (the `dfrot` section of a run config; flags `--dfrot-*`)."""

    iterations: int = 100  # alternations of quantize / Procrustes (public code: 100)
    ma_ratio: float = 100.0  # massive token: max |x_c| > ma_ratio * median |x_c| within the token
    ma_weight: float = 100.0  # weight of a massive token's squared error (paper's gamma)
    token_fraction: float = 0.1  # fraction of each sequence's tokens captured (as DartQuant)
    # where the alternation starts: "hadamard" (QuaRot's R1, the paper's), or "principal_axes": the R1 inputs'
    # principal axes (on the training tokens) sent to that Hadamard's rows, so that the dominant directions
    # become flat rows, which a per-token 4-bit quantizer handles better than a random mix (RESULTS §54).
    # With iterations 0 that start is the R1.
    init: str = "hadamard"

    def __post_init__(self):
        check_types(self)

    def validate(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"dfrot_iterations must be >= 0, got {self.iterations}")
        if not self.ma_ratio > 1 or not math.isfinite(self.ma_ratio):
            raise ValueError(f"dfrot_ma_ratio must be a finite number > 1, got {self.ma_ratio}")
        if not self.ma_weight >= 1 or not math.isfinite(self.ma_weight):
            raise ValueError(f"dfrot_ma_weight must be a finite number >= 1, got {self.ma_weight}")
        if not 0 < self.token_fraction <= 1:
            raise ValueError(f"dfrot_token_fraction must be in (0, 1], got {self.token_fraction}")
        if self.init not in INITS:
            raise ValueError(f"dfrot_init must be one of {', '.join(INITS)}, not {self.init!r}")


def massive_tokens(x: torch.Tensor, ma_ratio: float, chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """[tokens] bool: max_c |x_c| > ma_ratio * median_c |x_c| (see the module doc)."""
    out = torch.empty(x.shape[0], dtype=torch.bool)
    for i in range(0, x.shape[0], chunk):
        a = x[i: i + chunk].float().abs()
        out[i: i + chunk] = (a.amax(-1) > ma_ratio * a.median(-1).values).cpu()
    return out


@torch.no_grad()
def principal_axes_init(x: torch.Tensor, hadamard: torch.Tensor, index: torch.Tensor | None = None,
                        device="cpu", chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """U @ hadamard, U [n, n] the principal axes of the (indexed) rows of x (eigenvectors of sum x^T x, largest
    first): x U H sends the i-th axis to the Hadamard's row i, a vector of equal-magnitude entries, so a token
    dominated by a few axes becomes a nearly flat row (float64, on the CPU)."""
    rows = torch.arange(x.shape[0]) if index is None else index
    n = x.shape[1]
    moment = torch.zeros(n, n, dtype=torch.float64, device=device)
    for i in range(0, rows.numel(), chunk):
        xb = x.index_select(0, rows[i: i + chunk].to(x.device)).to(device=device, dtype=torch.float64)
        moment += xb.T @ xb
    _, vecs = torch.linalg.eigh(moment)
    return vecs.flip(-1).cpu() @ hadamard.to(torch.float64).cpu()


def procrustes(m: torch.Tensor) -> torch.Tensor:
    """argmax_{R orthogonal} tr(R^T M) = U V^T for M = U S V^T: the R minimizing ||X R - Q||_W
    when M = X^T W Q (float64)."""
    u, _, vh = torch.linalg.svd(m.double())
    return u @ vh


@torch.no_grad()
def quant_pass(x: torch.Tensor, r: torch.Tensor, spec: QuantSpec, weights: torch.Tensor,
               index: torch.Tensor | None = None, device="cpu", chunk: int = CHUNK_TOKENS) -> dict:
    """One pass over the (indexed) tokens at rotation r, quantizing with `spec` (step a):
    err = sum_t w_t ||x_t r - q_t||^2, m = X^T W Q (float64, [n, n]), and the pieces of the
    surrogate J(R, Q) = xx - 2 tr(R^T m) + qq (xx = sum w ||x||^2, qq = sum w ||q||^2), which
    give J at any R for this Q without another pass (||x R|| = ||x||)."""
    r = r.to(device=device, dtype=torch.float64)
    rows = torch.arange(x.shape[0]) if index is None else index
    m = torch.zeros_like(r)
    err = xx = qq = 0.0
    for i in range(0, rows.numel(), chunk):
        idx = rows[i: i + chunk]
        xb = x.index_select(0, idx.to(x.device)).to(device=device, dtype=torch.float64)
        wb = weights.index_select(0, idx).to(device=device, dtype=torch.float64)[:, None]
        o = xb @ r
        q = fake_quantize(o, spec)
        err += (wb * (o - q).pow(2)).sum().item()
        xx += (wb * xb.pow(2)).sum().item()
        qq += (wb * q.pow(2)).sum().item()
        m += xb.T @ (wb * q)
    return {"err": err, "m": m, "xx": xx, "qq": qq}


def surrogate(p: dict, r: torch.Tensor) -> float:
    """J(r, Q) for the Q of a quant_pass (unnormalized weighted squared error)."""
    return p["xx"] - 2.0 * (r.to(p["m"]) * p["m"]).sum().item() + p["qq"]


@torch.no_grad()
def refine_rotation(x: torch.Tensor, init: torch.Tensor, spec: QuantSpec, weights: torch.Tensor,
                    iterations: int, *, index: torch.Tensor | None = None, device="cpu",
                    progress: bool = False) -> tuple[torch.Tensor, dict]:
    """Alternate quantization and Procrustes from `init` ([n, n]); x [tokens, n] (any dtype, any
    device), weights [tokens] (CPU), index: the training rows. Returns (the best iterate by the
    weighted error on the training rows, float64 on the CPU; history).

    history["error"][k]: E(R_k) (normalized by sum w); history["procrustes"][k]: J(R_{k+1}, Q_k)
    (same normalization), <= error[k] up to roundoff: the Procrustes step's guarantee."""
    from tqdm.auto import tqdm

    rows = torch.arange(x.shape[0]) if index is None else index
    wsum = weights.index_select(0, rows).double().sum().item()
    r = init.to(device=device, dtype=torch.float64)
    hist: dict = {"error": [], "procrustes": []}
    best = (math.inf, r, 0)
    for k in tqdm(range(iterations + 1), desc="DFRot R1", disable=not progress):
        p = quant_pass(x, r, spec, weights, rows, device)
        e = p["err"] / wsum
        hist["error"].append(e)
        if e < best[0]:
            best = (e, r, k)
        if k == iterations:
            break
        r_next = procrustes(p["m"])
        hist["procrustes"].append(surrogate(p, r_next) / wsum)
        r = r_next
    hist["best_iteration"] = best[2]
    return best[1].cpu(), hist


# ------------------------------------------------------------------ the method


def calibrate_dfrot(model, cfg, calib_ids: torch.Tensor, *, timer=None, out_dir: Path | None = None,
                    progress: bool = True) -> RotationSet:
    """Capture the R1 inputs (as DartQuant), refine QuaRot's R1 on 90% of the tokens, report the
    held-out 10%; R2 / R3 / R4 as QuaRot. `cfg` is a RunConfig (its `dfrot` section)."""
    stage = timer if timer is not None else (lambda name: contextlib.nullcontext())
    opts = cfg.section("dfrot")
    adapter = adapter_for(model)
    geo = adapter.geometry(model.config)
    stages = {"capture": {}, "r1": {}}
    with stage("capture"), measure(cfg.device, stages["capture"]):
        fuse_norms_(model, adapter)  # idempotent: capture must see the weight-free normalized stream
        acts = capture_activations(model, calib_ids, fraction=opts.token_fraction, seed=cfg.seed,
                                   device=cfg.device, adapter=adapter, progress=progress)
        acts.r2 = None  # R2 stays Hadamard: its buffer is not needed
    with stage("calibrate"), measure(cfg.device, stages["r1"]):
        x = _placement(acts.r1, cfg.device, "auto")  # on CUDA: the buffer on the device if it fits
        train, held = split_indices(x.shape[0], cfg.seed)
        massive = massive_tokens(x, opts.ma_ratio)
        weights = torch.where(massive, opts.ma_weight, 1.0).double()
        spec = cfg.scheme.act_spec("q", geo.head_dim)  # the run's quantizer of q_proj / up_proj inputs
        base = RotationSet.quarot(geo, seed=cfg.seed, r3=cfg.r3, r4=cfg.r4)
        init = base.r1 if opts.init == "hadamard" else principal_axes_init(x, base.r1, train, cfg.device)
        r1, hist = refine_rotation(x, init, spec, weights, opts.iterations, index=train, device=cfg.device,
                                   progress=progress)
        held_ma = held[massive[held]]
        report = {"spec": _spec_dict(spec)}
        for name, rows in (("all", held), ("massive", held_ma)):
            report[name] = ({"init": r1_heldout_quant(x, base.r1, rows, spec, cfg.device),
                             "final": r1_heldout_quant(x, r1, rows, spec, cfg.device)} if rows.numel() else None)
        hist["heldout_quant"] = report
        acts.r1 = x = None  # free the buffer (host and device)

    def pair(name):
        return None if report[name] is None else [report[name]["init"]["sqnr_db"], report[name]["final"]["sqnr_db"]]

    summary = {
        "method": "dfrot", "seed": cfg.seed, "r1": "dfrot", "r2": "hadamard",
        "r1_tokens": {"train": int(train.numel()), "held_out": int(held.numel())},
        "r1_massive_tokens": {"train": int(massive[train].sum()), "held_out": int(held_ma.numel())},
        "r1_token_fraction": acts.fraction_r1,
        "r1_init": opts.init, "r1_iterations": opts.iterations, "r1_best_iteration": hist["best_iteration"],
        # weighted 4-bit error on the training tokens, [the start (init), kept iterate]
        "r1_train_weighted_error": [hist["error"][0], hist["error"][hist["best_iteration"]]],
        # held-out 4-bit SQNR (dB) of the rotated inputs, [Hadamard, DFRot]: all tokens / massive ones
        "r1_heldout_sqnr_db": pair("all"), "r1_heldout_sqnr_db_massive": pair("massive"),
        "stages": stages,
    }
    if out_dir is not None:
        (Path(out_dir) / "calibration_loss.json").write_text(json.dumps({"R1": hist}, indent=1))
    return RotationSet(r1, base.r2, r3=cfg.r3, r4=cfg.r4, meta=summary)
