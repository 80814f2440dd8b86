"""Activation clip ratios chosen per input stream on calibration data (`a_clip_search`).

The per-token activation quantizer clips each token's range by one ratio (`a_clip`, 0.9 by
default: QuaRot's choice, the same for every linear). Some inputs want more clipping and a few
want none (RESULTS §14e: SmolLM2's down_proj inputs in layers 2, 11 and 28 triple their output
error at 0.85), so one ratio for all cannot serve them. With `a_clip_search`, each block, right
after its weights are quantized (before, under asymmetric GPTQ, whose weights are fitted to the
ratio they see: weights.clip_search_first), runs its calibration inputs once more (the same inputs GPTQ
saw), samples `a_clip_search_rows` rows of what every input quantizer receives (seeded, the
same tokens whatever the batching), and gives each *input stream* the ratio on the grid
{1.0, 0.95, ..., a_clip_search_min} (which always holds `a_clip`) that minimizes the output error
of the linears reading it, with their quantized weights:

    sum over the stream's linears of || (Q_c(x) - x) W^T ||^2

A stream is what one tensor feeds: q/k/v share the attention input, gate/up the MLP input (an
expert's gate/up theirs), o and down have their own. One ratio per stream keeps the kernels'
shared quantization of q/k/v and gate/up (kernels/linear.py) one pass. The ratios are stored in
the run folder's dartquant.json ("act_clips", module name -> ratio) and re-installed on load;
the search is calibration-only (no evaluation text) and adds one forward per block.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
from torch import nn

from ..adapters import ModelAdapter
from .act import set_act_quant_enabled_
from .primitives import fake_quantize

# linears that read one tensor (a layer's, or an expert's): one input stream (GPTQ shares their Hessian too)
SHARED_INPUT = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "gate": "mlp_in", "up": "mlp_in"}
CLIP_STEP = 0.05


def clip_grid(default: float, lowest: float) -> list[float]:
    """1.0, 0.95, ... down to `lowest`, with the scheme's default ratio always in it."""
    n = int(math.floor((1.0 - lowest) / CLIP_STEP + 1e-9))
    grid = {round(1.0 - k * CLIP_STEP, 6) for k in range(n + 1)} | {float(default)}
    return sorted(grid, reverse=True)


def stream_of(key: str) -> str:
    """'experts.3.up' -> 'experts.3.mlp_in', 'q' -> 'attn_in', 'o' -> 'o'."""
    prefix, _, role = key.rpartition(".")
    stream = SHARED_INPUT.get(role, role)
    return f"{prefix}.{stream}" if prefix else stream


class _RowSampler:
    """Keeps the rows of chosen token positions from every call of one input quantizer.

    Dense inputs ([windows, seq, d], the windows in order over the calls) keep the same
    `positions` (flat token indices over all calibration windows) however the windows are
    batched. Inputs of another shape (MoE experts: only the routed tokens, flattened, with no
    position to go by) keep each row whose seeded hash of its values falls under
    rows / total_tokens: the same rows, in the same order, however the calls split them (a
    draw per call would depend on the batching: the GPU's capture batches 8 windows a call)."""

    HASH_COLUMNS = 256  # the hash reads at most this many of a row's values (evenly spaced)
    PRIME = 2_147_483_647  # 2^31 - 1; multipliers < 2^28 and 16-bit halves keep every sum in int64

    def __init__(self, positions: torch.Tensor, total_tokens: int, rows: int, generator: torch.Generator):
        self.positions, self.total, self.rows = positions, total_tokens, rows
        self.hash_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self.seen = 0  # dense: windows seen so far
        self.kept: list[torch.Tensor] = []
        self.keys: list[torch.Tensor] = []  # non-dense: each kept row's hash, to order them
        self.hash_cols: torch.Tensor | None = None  # the columns the hash reads and their multipliers, drawn
        self.hash_mult: torch.Tensor | None = None  # at the first call (one input width a sampler)

    def row_hash(self, x2: torch.Tensor) -> torch.Tensor:
        """A value in [0, 1) per row, from the float32 bits of up to HASH_COLUMNS of its values."""
        if self.hash_cols is None:
            d = x2.shape[1]
            self.hash_cols = torch.linspace(0, d - 1, min(d, self.HASH_COLUMNS)).round().long().unique()
            g = torch.Generator().manual_seed(self.hash_seed)
            self.hash_mult = torch.randint(1, 2**28, (2 * len(self.hash_cols),), generator=g, dtype=torch.int64)
        bits = x2[:, self.hash_cols.to(x2.device)].float().cpu().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        halves = torch.cat([bits & 0xFFFF, bits >> 16], dim=1)
        return ((halves * self.hash_mult).sum(1) % self.PRIME).double() / self.PRIME

    def __call__(self, _module, args) -> None:
        x = args[0]
        if x.dim() == 3:
            b, s = x.shape[:2]
            lo, hi = self.seen * s, (self.seen + b) * s
            self.seen += b
            idx = self.positions[(self.positions >= lo) & (self.positions < hi)] - lo
            if idx.numel():
                self.kept.append(x.reshape(b * s, -1)[idx.to(x.device)].float())
            return
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.shape[0]:
            return
        u = self.row_hash(x2)
        keep = torch.nonzero(u < self.rows / self.total).flatten()
        if keep.numel():
            self.kept.append(x2[keep.to(x.device)].float())
            self.keys.append(u[keep])

    def rows_(self) -> torch.Tensor | None:
        if not self.kept:
            return None
        rows = torch.cat(self.kept)
        if self.keys:  # non-dense: in hash order, not in the order the calls brought them
            rows = rows[torch.cat(self.keys).argsort(stable=True).to(rows.device)]
        return rows


@torch.no_grad()
def stream_errors(x: torch.Tensor, weights: list[torch.Tensor], spec, grid: list[float]) -> list[float]:
    """Output error of the stream's linears at each clip ratio of `grid`, relative to their output.

    sum_i ||e_i W^T||^2 = sum_i e_i (W^T W) e_i^T: when the stream's linears have more outputs than
    inputs (q/k/v, gate/up), one Gram matrix of the inputs' width is cheaper than the outputs."""
    ws = [w.float() for w in weights]
    if sum(w.shape[0] for w in ws) > x.shape[1]:
        gram = sum(w.T @ w for w in ws)

        def energy(e: torch.Tensor) -> float:
            return float(((e @ gram) * e).sum())
    else:
        def energy(e: torch.Tensor) -> float:
            return sum(float((e @ w.T).square().sum()) for w in ws)
    ref = energy(x) or 1.0
    out = []
    for clip in grid:
        e = fake_quantize(x, dataclasses.replace(spec, clip_ratio=clip)) - x
        out.append(energy(e) / ref)
    return out


@torch.no_grad()
def search_block_clips_(block: nn.Module, adapter: ModelAdapter, forward, scheme, name_of, *, layer: int,
                        total_tokens: int, seed: int) -> dict[str, dict]:
    """Choose and install one clip ratio per input stream of `block` (module docstring).

    `forward(update=False)` runs the block over its calibration inputs (activation quantizers are
    switched on in the block for it, as at run time); `total_tokens` counts those inputs' tokens.
    Returns {stream's first module name: {"clip", "linears", "errors"}}."""
    linears = {k: q for k, q in adapter.layer(block).linears().items()
               if getattr(q, "input_quantizer", None) is not None}
    streams: dict[str, list[str]] = {}
    for key in linears:
        streams.setdefault(stream_of(key), []).append(key)
    if not streams:
        return {}
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer)  # one draw per layer, any batching
    rows = min(scheme.a_clip_search_rows, total_tokens)
    positions = torch.randperm(total_tokens, generator=g)[:rows].sort().values
    samplers, hooks = {}, []
    for stream, keys in streams.items():
        samplers[stream] = _RowSampler(positions, total_tokens, rows, g)
        hooks.append(linears[keys[0]].input_quantizer.register_forward_pre_hook(samplers[stream]))
    set_act_quant_enabled_(block, True)
    try:
        forward(update=False)
    finally:
        for h in hooks:
            h.remove()
        set_act_quant_enabled_(block, scheme.gptq_act_quant)
    chosen = {}
    for stream, keys in streams.items():
        x = samplers[stream].rows_()
        spec = linears[keys[0]].input_quantizer.spec
        if x is None or not spec.enabled:  # an expert no calibration token reached: keep the default
            continue
        grid = clip_grid(spec.clip_ratio, scheme.a_clip_search_min)
        errors = stream_errors(x, [linears[k].weight for k in keys], spec, grid)
        best = grid[min(range(len(grid)), key=errors.__getitem__)]  # ties: the larger ratio
        for k in keys:
            q = linears[k].input_quantizer
            q.spec = dataclasses.replace(q.spec, clip_ratio=best)
        chosen[name_of(linears[keys[0]])] = {"clip": best, "linears": [name_of(linears[k]) for k in keys],
                                             "errors": dict(zip(map(str, grid), [round(e, 6) for e in errors]))}
    return chosen


@dataclasses.dataclass
class ClipSearchRecord:
    """What a run's search chose, block by block (stream's first module name -> choice), and the
    seconds it took (they also count in the quantize stage, where the search runs)."""

    chosen: dict[str, dict] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def search_block_(self, *args, **kwargs) -> None:
        """search_block_clips_(*args, **kwargs), recorded."""
        t0 = time.perf_counter()
        self.chosen.update(search_block_clips_(*args, **kwargs))
        self.seconds += time.perf_counter() - t0

    def act_clips(self) -> dict[str, float]:
        """module name -> clip ratio, for every linear the search chose for (dartquant.json keeps it)."""
        return {name: c["clip"] for c in self.chosen.values() for name in c["linears"]}

    def summary(self, default: float) -> dict:
        """metrics.json's record: how many streams moved, to which ratios, and each stream's choice."""
        clips = [c["clip"] for c in self.chosen.values()]
        hist: dict[str, int] = {}
        for c in sorted(clips, reverse=True):
            hist[str(c)] = hist.get(str(c), 0) + 1
        return {"streams": len(clips), "changed": sum(c != default for c in clips), "histogram": hist,
                "seconds": round(self.seconds, 3),
                "chosen": {name: {"clip": c["clip"], "errors": c["errors"]} for name, c in self.chosen.items()}}


def apply_act_clips_(model: nn.Module, clips: dict[str, float] | None) -> None:
    """Install the ratios a search chose (load_quantized: from dartquant.json)."""
    if not clips:
        return
    modules = dict(model.named_modules())
    for name, clip in clips.items():
        q = modules.get(name)
        quantizer = getattr(q, "input_quantizer", None)
        if quantizer is None:
            raise ValueError(f"dartquant.json names an activation clip for {name!r}, which has no input "
                             "quantizer in this model; the folder does not match its config")
        quantizer.spec = dataclasses.replace(quantizer.spec, clip_ratio=float(clip))
