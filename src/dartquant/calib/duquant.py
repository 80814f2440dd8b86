"""DuQuant (Lin et al., NeurIPS 2024, "Distributing Outliers via Dual Transformation"), built
from calibration activations, one decoder block at a time.

For each linear input x (the q/k/v input, the gate/up input, the o_proj and down_proj inputs):
  1. smoothing (SmoothQuant): lambda_j = max|x_j|^alpha / max|W_j|^(1 - alpha), W the readers'
     weights; x -> x / lambda, W -> W diag(lambda);
  2. R1: a block-diagonal rotation (blocks of `block_size`), built greedily per block: find the
     channel with the largest |activation|, rotate so that it is spread evenly over the block
     (a random rotation of the other channels, then a Householder reflection taking e_j to the
     uniform vector), repeat `steps` times, keep the prefix with the smallest max |activation|;
  3. P: the zigzag permutation: channels sorted by their max |x / lambda R1|, dealt to the
     blocks 0, 1, ..., n-1, n-1, ..., 0, 0, 1, ... so that every block gets a share of outliers;
  4. R2: a second greedy block rotation, on x / lambda R1 P.
The activation becomes x diag(1/lambda) R1 P R2 and every reader's weight W diag(lambda) R1 P R2:
exact before quantization.

What runs where (placements.py rows attn_norm, mlp_norm, v, up, DQ_*):
* every smoothing is folded offline: the q/k/v and gate/up ones into the RMSNorm gains, the
  o_proj one into v_proj's output rows (one lambda per KV-head channel, shared by the query
  heads of its group: attention mixes tokens, not channels, so it passes through), the
  down_proj one into up_proj's output rows (SwiGLU is linear in up);
* the o_proj input's rotation is folded offline too, into v_proj / o_proj like R2: one greedy
  rotation per KV head (block = head_dim; no permutation: a permutation across heads does not
  commute with attention, and within one block it adds nothing to a rotation);
* R1 P R2 of the q/k/v input, the gate/up input and the down_proj input run online
  (modules.OnlineBlockRotation, before the input quantizer; one module per shared input).
  The down_proj one takes R4's place (r4 must be off).

Design choices:
* Statistics per layer from the norm-fused, unrotated model (layerwise, one block on the device);
  the transforms are exact, so every layer's inputs are those of the original model and the
  construction needs no re-run. The channel maxima (smoothing, permutation) use every
  calibration token; the greedy rotations use a sample: the `outlier_tokens` rows with the
  largest max |x| over all tokens (the ones that set the 4-bit range) plus `sample_tokens`
  seeded random ones.
* Sizes the block size does not divide: the last block is ragged (block_rotation.py).
* Seeded (cfg.seed): the random rotations of the greedy steps (drawn on cfg.device: a GPU run
  draws other rotations than a CPU run of the same seed, each reproducible) and the token sample.
  The greedy searches run in float64 on cfg.device (a GPU's float64 is ample for blocks of 128);
  the results are kept on the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..adapters import adapter_for
from ..block_rotation import apply_blocks, block_sizes, pad_block
from ..layerwise import forward_plan, iterate_blocks
from ..log import log
from ..modules import as_qlinear
from ..transforms import RotationSet
from ..typecheck import check_types
from .capture import forward_order


@dataclass
class DuQuantConfig:
    """DuQuant's settings (the `duquant` section of a run config; flags `--duq-*`)."""

    block_size: int = 128  # the paper's block size
    alpha: float = 0.6  # smoothing strength; 0 = no smoothing (lambda = 1)
    steps: int = 16  # greedy rotation steps per block
    permute: bool = True  # zigzag permutation + second block rotation (off: one block rotation)
    sample_tokens: int = 2048  # random token rows per layer for the greedy rotations
    outlier_tokens: int = 256  # plus the rows with the largest max |x| (over all calibration tokens)
    # what the greedy steps keep: "max", the paper's (the block's largest |value| over all sampled rows), or
    # "token_max" (the mean over the rows of each row's largest |value| in the block, squared: a per-token
    # quantizer's step is set by its own row, not by the worst row)
    score: str = "max"

    def __post_init__(self):
        check_types(self)

    def validate(self) -> None:
        if self.block_size < 2:
            raise ValueError(f"duquant block_size must be at least 2, got {self.block_size}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"duquant alpha must be in [0, 1], got {self.alpha}")
        if self.steps < 0 or self.sample_tokens < 0 or self.outlier_tokens < 0:
            raise ValueError("duquant steps, sample_tokens and outlier_tokens must be >= 0")
        if self.score not in GREEDY_SCORES:
            raise ValueError(f"duquant score must be one of {sorted(GREEDY_SCORES)}, got {self.score!r}")
        if self.sample_tokens + self.outlier_tokens == 0 and self.steps > 0:
            raise ValueError("duquant needs sample_tokens or outlier_tokens > 0 for its greedy rotations")


# ---- the construction (pure functions) ----------------------------------------------------
# a greedy step's score of rotated rows y [nb, tokens, B], one value per block (lower is better)
GREEDY_SCORES = {
    "max": lambda y: y.abs().amax(dim=(1, 2)),
    "token_max": lambda y: y.abs().amax(dim=2).square().mean(dim=1),
}


def smoothing_scales(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """lambda = max|x|^alpha / max|W|^(1-alpha), per channel (both maxima floored at 1e-5)."""
    if alpha == 0:
        return torch.ones_like(x_amax, dtype=torch.float64)
    x, w = x_amax.double().clamp(min=1e-5), w_amax.double().clamp(min=1e-5)
    return (x.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


def _householder_to_uniform(b: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """The reflection H (symmetric, orthogonal) with e_0 H = (1, ..., 1) / sqrt(b)."""
    if b == 1:
        return torch.ones(1, 1, dtype=dtype, device=device)
    v = -torch.full((b,), 1 / math.sqrt(b), dtype=dtype, device=device)
    v[0] += 1.0
    return torch.eye(b, dtype=dtype, device=device) - 2 * torch.outer(v, v) / v.dot(v)


def _random_orthogonal(n: int, b: int, g: torch.Generator, steps: int = 1, device=None) -> torch.Tensor:
    """[steps, n, b, b] Haar-random orthogonal matrices (QR of a Gaussian, signs fixed). On the CPU
    the Gaussians come from the seeded generator `g` itself, bit for bit the rotations of earlier
    versions. On a GPU they are drawn there, by a generator seeded from `g`: drawing them on the
    host was most of DuQuant's calibration time (RESULTS §26a: 27 M Gaussians a Qwen2.5-0.5B layer).
    So a GPU run draws other (equally random) rotations than a CPU run of the same seed; each is
    reproducible."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cpu":  # one QR call per step, as before: a batch over steps rounds differently
        return torch.stack([householder_q(torch.randn(n, b, b, generator=g, dtype=torch.float64)) for _ in range(steps)])
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    a = torch.randn(steps, n, b, b, dtype=torch.float64, device=device,
                    generator=torch.Generator(device=device).manual_seed(seed))
    return _cholesky_qr2(a.flatten(0, 1)).view(steps, n, b, b)


def householder_q(a: torch.Tensor) -> torch.Tensor:
    """The Q of a = QR (a batch of square matrices) with R's diagonal made positive: Householder QR."""
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def _cholesky_qr2(a: torch.Tensor) -> torch.Tensor:
    """The Q of a = QR with R's diagonal positive, for a batch of square float64 matrices, by
    Cholesky QR applied twice (the second pass restores orthogonality to rounding). A GPU runs it
    as batched GEMMs and batched Cholesky, where Householder QR takes one launch sequence per matrix
    (most of DuQuant's calibration there). Matrices whose Gram matrix is too ill-conditioned for
    Cholesky fall back to Householder QR."""
    q = a
    bad = torch.zeros(a.shape[0], dtype=torch.bool, device=a.device)
    for _ in range(2):
        chol, info = torch.linalg.cholesky_ex(q.mT @ q)  # L, with L L^T = q^T q, so R = L^T
        bad |= info != 0
        chol[bad] = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)  # replaced below
        q = torch.linalg.solve_triangular(chol, q.mT, upper=False).mT  # q R^-1 = (L^-1 q^T)^T
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    bad |= (q.mT @ q - eye).abs().amax(dim=(1, 2)) > 1e-12  # Cholesky passed, but too ill-conditioned
    if bad.any():
        q[bad] = householder_q(a[bad])
    return q


@torch.no_grad()
def greedy_rotation(x: torch.Tensor, steps: int, g: torch.Generator, score: str = "max") -> torch.Tensor:
    """Block rotations [nb, B, B] for x [nb, tokens, B], one independent greedy search per block.

    Each step: j = the channel with the largest |value|; step = E_j diag(1, Q) H (E_j swaps
    channels 0 and j, Q a random rotation of the other channels, H the reflection taking channel
    0 to the uniform vector): the outlier channel is spread exactly evenly over the block and
    the rest is mixed at random, so the next step meets new structure. (Q after H, as a literal
    reading of the paper's E R~ Q would have it, re-concentrates the spread channel: measured
    here, a lone outlier of 100 in a block of 32 ended at 41 instead of 100 / sqrt(32) = 17.7.)
    The product with the smallest score (GREEDY_SCORES; the paper's: max |x R|; identity included) is kept."""
    nb, _, b = x.shape
    dev = x.device
    scored = GREEDY_SCORES[score]
    rot = torch.eye(b, dtype=torch.float64, device=dev).expand(nb, b, b).clone()
    best, best_max = rot.clone(), scored(x.float())
    if b == 1 or steps == 0 or x.shape[1] == 0:
        return best
    house = _householder_to_uniform(b, device=dev)
    # the rotated rows only choose the next channel and score the product: float32 is ample and
    # twice as fast; the rotation itself is accumulated in float64 (exactly orthogonal steps)
    y = x.float()
    draws = _random_orthogonal(nb, b - 1, g, steps=steps, device=dev)  # the data does not steer the draws
    for s in range(steps):
        j = y.abs().amax(dim=1).argmax(dim=-1)  # [nb]
        q = torch.eye(b, dtype=torch.float64, device=dev).expand(nb, b, b).clone()
        q[:, 1:, 1:] = draws[s]
        step = q @ house  # [nb, B, B]
        idx = torch.arange(b, device=dev).expand(nb, b).clone()
        rows = torch.arange(nb, device=dev)
        idx[rows, 0], idx[rows, j] = j, 0  # E_j as an index swap
        step = torch.gather(step, 1, idx[:, :, None].expand(nb, b, b))  # rows: E_j step
        y, rot = y @ step.float(), rot @ step
        m = scored(y)
        better = m < best_max
        best[better], best_max = rot[better], torch.minimum(m, best_max)
    return best


def block_rotation(x: torch.Tensor, block: int, steps: int, g: torch.Generator, score: str = "max") -> torch.Tensor:
    """Greedy rotations of the blocks of x [tokens, n]: [ceil(n / block), block, block], the ragged
    last block (if any) padded with the identity."""
    n = x.shape[-1]
    sizes = block_sizes(n, block)
    full = len(sizes) - (sizes[-1] != block)
    parts = []
    if full:
        parts.append(greedy_rotation(x[:, : full * block].reshape(-1, full, block).transpose(0, 1), steps, g, score))
    if full < len(sizes):
        parts.append(pad_block(greedy_rotation(x[:, full * block:].unsqueeze(0), steps, g, score)[0], block)[None])
    return torch.cat(parts)


def zigzag_permutation(score: torch.Tensor, block: int) -> torch.Tensor:
    """perm [n] (x P = x[..., perm]): channels by decreasing score dealt to the blocks in zigzag
    order 0..nb-1, nb-1..0, ...; a full (ragged) block is skipped. Block k of the permuted vector
    holds the channels dealt to it."""
    n = score.shape[0]
    sizes = block_sizes(n, block)
    nb = len(sizes)
    order = torch.argsort(score, descending=True, stable=True).tolist()
    dealt: list[list[int]] = [[] for _ in range(nb)]
    sweep = list(range(nb)) + list(range(nb - 1, -1, -1))
    pos = 0
    for ch in order:
        while len(dealt[sweep[pos % len(sweep)]]) >= sizes[sweep[pos % len(sweep)]]:
            pos += 1
        dealt[sweep[pos % len(sweep)]].append(ch)
        pos += 1
    return torch.tensor([c for d in dealt for c in d], dtype=torch.int64)


def dual_transform(x: torch.Tensor, cfg: DuQuantConfig, g: torch.Generator) -> tuple:
    """(r1, perm, r2) of smoothed activation rows x [tokens, n]; perm / r2 None without permutation.
    `x` here: the token sample; the permutation's channel scores come from it too, after R1."""
    r1 = block_rotation(x, cfg.block_size, cfg.steps, g, cfg.score)
    if not cfg.permute:
        return r1.cpu(), None, None
    y = apply_blocks(x.double(), r1)
    perm = zigzag_permutation(y.abs().amax(dim=0).cpu(), cfg.block_size)
    r2 = block_rotation(y[:, perm.to(y.device)], cfg.block_size, cfg.steps, g, cfg.score)
    return r1.cpu(), perm, r2.cpu()


# ---- capture --------------------------------------------------------------------------------
class _Observer:
    """Per-channel max |x| over every token, and a row sample for the greedy rotations: the
    `k_out` rows with the largest max |x| seen so far plus the rows `picks[j]` of calibration sequence j.

    Everything is reduced where x lives: only the kept rows leave the device, once, in `rows()` (a
    Qwen2.5-0.5B block's four inputs are ~2 GB of float32 at 32 x 2048 tokens; copying them to the
    host and reducing there made the capture CPU-bound, and a copy per call made it wait on the
    device once per sequence). A call may carry several sequences ([B, S, n]: the block forwards
    several windows at once on a GPU). The random rows are drawn in advance (`_draw_picks`) in the
    order a one-window-per-call pass drew them, so the sample depends neither on the device nor on B."""

    def __init__(self, k_out: int, picks: torch.Tensor | None):
        self.k_out, self.picks = k_out, picks
        self.amax = None
        self.outliers = None  # [<= k_out, n] float32, on x's device
        self.random: list[torch.Tensor] = []  # on x's device
        self.seen = 0  # sequences so far

    def __call__(self, x: torch.Tensor) -> None:
        seqs = x.detach().reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() >= 3 else x.detach()[None]
        rows = seqs.reshape(-1, x.shape[-1]).float()
        a = rows.abs().amax(dim=0)
        self.amax = a if self.amax is None else torch.maximum(self.amax, a)
        if self.k_out:
            pool = rows if self.outliers is None else torch.cat([self.outliers, rows])
            top = pool.abs().amax(dim=1).topk(min(self.k_out, pool.shape[0])).indices
            self.outliers = pool[top]
        if self.picks is not None:
            for seq in seqs:
                self.random.append(seq[self.picks[self.seen].to(seq.device)].float())
                self.seen += 1

    def rows(self) -> torch.Tensor:
        parts = ([] if self.outliers is None else [self.outliers]) + self.random
        return torch.cat(parts).cpu() if parts else torch.empty(0, self.amax.shape[0])


def _draw_picks(roles, n_seq: int, seqlen: int, k_rand: int, g: torch.Generator) -> dict[str, torch.Tensor | None]:
    """Each observed role's random rows [n_seq, k_rand], drawn sequence by sequence and, within a sequence, in
    the order a block's forward calls the roles: the draws that observers sharing `g` made at one window per
    call (so CPU runs keep their samples), whatever the windows per call."""
    if not k_rand:
        return {role: None for role in roles}
    picks = {role: torch.empty(n_seq, min(k_rand, seqlen), dtype=torch.long) for role in roles}
    for j in range(n_seq):
        for role in forward_order(roles):
            picks[role][j] = torch.randperm(seqlen, generator=g)[:k_rand]
    return picks


def _w_amax(*linears) -> torch.Tensor:
    """Max |W| per input channel over all readers of an input."""
    return torch.stack([m.weight.detach().abs().amax(dim=0).double().cpu() for m in linears]).amax(dim=0)


# ---- the calibration ------------------------------------------------------------------------
@torch.no_grad()
def calibrate_duquant(model, cfg, calib_ids: torch.Tensor, *, timer=None, progress: bool = True) -> RotationSet:
    """The DuQuant RotationSet of the norm-fused, unrotated `model` (see the module docstring)."""
    import contextlib

    opts: DuQuantConfig = cfg.section("duquant")
    opts.validate()
    adapter = adapter_for(model)
    if adapter.moe is not None:
        raise NotImplementedError(f"{adapter.family}: duquant does not cover mixture-of-experts blocks")
    geo = adapter.geometry(model.config)
    n_seq = calib_ids.shape[0]
    k_rand = math.ceil(opts.sample_tokens / n_seq) if opts.sample_tokens else 0
    g = torch.Generator().manual_seed(cfg.seed + 4242)
    timer = timer or (lambda stage: contextlib.nullcontext())
    kv, groups, d = geo.n_kv_heads, geo.kv_groups, geo.head_dim
    scales = {k: [] for k in ("attn_norm", "mlp_norm", "v", "up")}
    mats: dict[str, list] = {}
    before_after: dict[str, list] = {}

    def record(key, r1, perm, r2):
        for part, t in (("r1", r1), ("perm", perm), ("r2", r2)):
            if t is not None:
                mats.setdefault(f"{key}.{part}", []).append(t)

    def stat(name, x_before, x_after):
        before_after.setdefault(name, []).append((x_before.abs().max().item(), x_after.abs().max().item()))

    # on a GPU several windows per block call and the hidden states kept there (the capture was a host
    # round trip per window and block); on the CPU one window per call, as before
    batch, resident = forward_plan(geo, *calib_ids.shape, next(model.parameters()).dtype, cfg.device)
    for i, block, forward in iterate_blocks(model, adapter, calib_ids, cfg.device, progress, desc="duquant",
                                            batch=batch, resident=resident):
        layer = adapter.layer(block)
        observers = {}
        with timer("capture"):
            picks = _draw_picks(("q", "up", "o", "down"), n_seq, calib_ids.shape[1], k_rand, g)
            for role in ("q", "up", "o", "down"):
                q = as_qlinear(getattr(layer, role))
                adapter.set_linear(block, role, q)
                q.input_observer = observers[role] = _Observer(opts.outlier_tokens, picks[role])
                log.debug("observing %s of layer %d", role, i)
            forward(update=True)
            layer = adapter.layer(block)
            for role in observers:
                getattr(layer, role).input_observer = None
        with timer("calibrate"):
            for key, role, readers, scale_name in (("DQ_attn", "q", (layer.q, layer.k, layer.v), "attn_norm"),
                                                   ("DQ_mlp", "up", (layer.gate, layer.up), "mlp_norm"),
                                                   ("DQ_down", "down", (layer.down,), "up")):
                ob = observers[role]
                lam = smoothing_scales(ob.amax.cpu(), _w_amax(*readers), opts.alpha)
                scales[scale_name].append(1.0 / lam)  # the placement scales the stream by t = 1 / lambda
                x = ob.rows().to(cfg.device, torch.float64) / lam.to(cfg.device)
                r1, perm, r2 = dual_transform(x, opts, g)
                record(key, r1, perm, r2)
                stat(key, x, apply_blocks(x, r1.to(x.device), perm, None if r2 is None else r2.to(x.device)))
            # o_proj: one lambda per KV-head channel (max over its query heads), one rotation per KV head
            ob = observers["o"]
            x_amax = ob.amax.cpu().double().view(kv, groups, d).amax(dim=1)
            w_amax = _w_amax(layer.o).view(kv, groups, d).amax(dim=1)
            lam = smoothing_scales(x_amax, w_amax, opts.alpha)  # [kv, d]
            scales["v"].append(1.0 / lam.reshape(-1))
            rows = ob.rows().to(cfg.device, torch.float64).view(-1, kv, groups, d) / lam.to(cfg.device)[None, :, None, :]
            per_head = rows.permute(1, 0, 2, 3).reshape(kv, -1, d)  # [kv, tokens * groups, d]
            rot = greedy_rotation(per_head, opts.steps, g, opts.score)
            mats.setdefault("DQ_o", []).append(rot.cpu())
            stat("DQ_o", per_head, per_head @ rot)
    blocks = {k: torch.stack(v) for k, v in mats.items()}
    summary = {name: {"max_abs_before": round(sum(b for b, _ in v) / len(v), 4),
                      "max_abs_after": round(sum(a for _, a in v) / len(v), 4)} for name, v in before_after.items()}
    meta = {"method": "duquant", "seed": cfg.seed, "block_size": opts.block_size, "alpha": opts.alpha,
            "steps": opts.steps, "permute": opts.permute, "score": opts.score, "r1_layer_mean_max_abs": summary}
    return RotationSet(r3=cfg.r3, r4=False, meta=meta,
                       scales={k: torch.stack(v) for k, v in scales.items()}, blocks=blocks)
