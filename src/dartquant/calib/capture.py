"""Activation capture for rotation calibration, in memory, with true random token sampling.

The norm-fused, *unrotated* model runs one decoder block at a time (layerwise.py). While a block
runs, observers on its q_proj, up_proj and o_proj keep a seeded random subset of the tokens
they see:
  * q_proj and up_proj inputs of every layer are pooled: they train the one global R1;
  * o_proj inputs are kept per layer and split per KV head: they train that layer's R2.
Samples are stored in half precision (fp16; the math later is fp32) in preallocated buffers whose
size is fixed by the token budget, so memory does not grow with depth beyond the sampled buffer.
The o_proj samples are written straight into their final per-KV-head layout (no reshuffling copy
of the R2 buffer at the end), and always to host memory: the device only ever holds one block.
With `r2_one_layer`, the R2 buffer holds one layer only, used after each block (the streamed
pass fits that layer's R2 at once: host memory flat in depth).
In a mixture-of-experts block no single expert sees every token, so the MLP stream is sampled
where it enters the experts (RoutedExperts.input_observer: all tokens, before routing).
The public DartQuant code wrote one file per (sample, layer, module); nothing here touches disk.

Speed (SmolLM2's capture took 136-164 s on a shared H200 against 2-6 s for QuaRot's stage, with
one 2048-token sequence per block call, a device -> host copy, i.e. a sync, per sequence and
observed linear, and the hidden states going to the host and back per block;
benchmarks/capture_speed.py times the old and the new path side by side):
  * every sampled token index is drawn when a block is attached, in the order the per-call
    sampler of earlier versions drew them (sequence by sequence, the observed linears in forward
    order), so the same seed keeps the same tokens whatever the forward batch;
  * a block runs over several sequences per call (layerwise.forward_plan: up to FORWARD_TOKENS per call), with
    the hidden states kept on the device when they fit;
  * sampled rows are gathered on the device into one staging buffer per observed linear and
    copied to the host once per block (not once per sequence: each such copy is a sync).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import LINEAR_ROLES, MLP_ROLES, ModelAdapter, adapter_for
from ..transforms.fuse import split_experts_
from ..layerwise import forward_plan, iterate_blocks
from ..modules import as_qlinear
from ..transforms.placements import SPECS, kv_head_token_view

# The inputs R1 acts on: one linear per distinct stream it rotates (attention and MLP inputs);
# the rows of layer i, probe j sit at block (len(R1_PROBES) * i + j) of the pooled buffer.
R1_PROBES = SPECS["R1"].probes
if len(SPECS["R2"].probes) != 1:
    raise ImportError("capture keeps one R2 buffer per layer: R2 must have exactly one probe")


@dataclass
class Captured:
    r1: torch.Tensor  # [tokens, hidden] pooled q_proj / up_proj inputs of all layers
    r2: torch.Tensor | None  # [layers, kv_heads, tokens * kv_groups, head_dim] o_proj inputs (row t * groups + g)
    fraction_r1: float  # fraction of each sequence's tokens kept for R1 (per observed linear)
    fraction_r2: float  # ... and for R2
    tokens_seen: int  # tokens per layer that passed through
    r2_fitter: object = None  # with r2 None: calib.dartquant.R2Fitter, each layer's R2 fitted during the capture


def sample_fraction(n_tokens_per_layer: int, n_layers: int, fraction: float, max_r1_tokens: int | None) -> float:
    """The sampling fraction, reduced if needed so the pooled R1 buffer stays within budget."""
    if not 0 < fraction <= 1:
        raise ValueError(f"token fraction must be in (0, 1], got {fraction}")
    if max_r1_tokens is not None:
        fraction = min(fraction, max_r1_tokens / (len(R1_PROBES) * n_layers * n_tokens_per_layer))
    return fraction


def forward_order(roles) -> list[str]:
    """Observed roles in the order a decoder block calls them (attention, o_proj, MLP): the
    order in which the per-call sampler drew their token indices."""
    return sorted(roles, key=LINEAR_ROLES.index)


class _Sampler:
    """Keeps the tokens `idx[j]` of calibration sequence j that an observed linear sees.

    `idx` [n_seq, k] is drawn in advance (ActivationCapture.attach); calls may carry several
    sequences ([B, S, features], or [B * S, features] at a MoE experts' entry). Rows are gathered
    where the activations are into a staging buffer [n_seq * k, features] in the store's dtype and
    written to `store` ([n_seq * k, *feature_shape], host) by `flush()`, once per block. Each row is
    viewed as feature_shape (e.g. the o_proj input [heads * head_dim] as [kv_heads, kv_groups,
    head_dim]) when written.
    """

    def __init__(self, idx: torch.Tensor, seqlen: int, store: torch.Tensor):
        self.idx, self.seqlen, self.store = idx, seqlen, store
        self.seq = 0  # calibration sequences seen so far
        self.staging: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.seqlen, x.shape[-1])  # [B, S, features]
        b, k = x.shape[0], self.idx.shape[1]
        if self.staging is None:  # on the activations' device: no sync per call
            self.idx = self.idx.to(x.device)
            self.staging = torch.empty(self.store.shape[0], x.shape[-1], dtype=self.store.dtype, device=x.device)
        idx = self.idx[self.seq: self.seq + b]  # [B, k]
        rows = torch.gather(x, 1, idx.unsqueeze(-1).expand(b, k, x.shape[-1]))  # [B, k, features]
        self.staging[self.seq * k: (self.seq + b) * k] = rows.reshape(b * k, -1)
        self.seq += b

    @torch.no_grad()
    def flush(self) -> None:
        """The staged rows into the host store (one copy per block)."""
        if self.seq != self.idx.shape[0]:
            raise RuntimeError("capture did not see every calibration sequence")
        self.store.copy_(self.staging.view(self.store.shape))
        self.staging = None


class ActivationCapture:
    """The sampled buffers and the observers that fill them, one block at a time: `attach(i,
    block)` before block i runs over every calibration sequence, `detach()` after. Shared by
    capture_activations (in memory) and the streamed pass (stream/), so both draw the same tokens.

    `r2_one_layer`: the R2 buffer holds one layer ([1, kv_heads, tokens * kv_groups, head_dim],
    reused): after `detach()`, `r2[0]` holds the last block's rows until the next `attach`; the
    caller uses them then (the streamed pass fits that layer's R2); `result().r2` is None."""

    def __init__(self, geo, n_seq: int, seqlen: int, *, fraction: float = 0.1, max_r1_tokens: int | None = 262_144,
                 seed: int = 0, store_dtype: torch.dtype = torch.float16, r2_one_layer: bool = False):
        if n_seq == 0:
            raise ValueError("capture needs at least one calibration sequence")
        self.geo, self.seqlen, self.n_seq = geo, seqlen, n_seq
        # R2 keeps `fraction` of each sequence; R1 pools len(R1_PROBES) * n_layers streams, so its fraction is
        # reduced when needed to keep the pooled buffer within max_r1_tokens.
        self.k2 = max(1, int(round(sample_fraction(n_seq * seqlen, geo.n_layers, fraction, None) * seqlen)))
        self.k1 = max(1, int(round(sample_fraction(n_seq * seqlen, geo.n_layers, fraction, max_r1_tokens) * seqlen)))
        self.per_layer1 = n_seq * self.k1
        n_r1 = len(R1_PROBES)
        self.r1 = torch.empty(geo.n_layers * n_r1 * self.per_layer1, geo.hidden, dtype=store_dtype)
        # R2 buffer in its final layout: [layers, kv_heads, tokens * kv_groups, head_dim]; row
        # t * kv_groups + g of KV head h is query head h * kv_groups + g of sampled token t (the
        # query heads of a KV group are pooled). Layer i's sampler writes through the view
        # [tokens, kv_heads, kv_groups, head_dim] of r2[i].
        self.r2_one_layer = r2_one_layer
        self.r2 = torch.empty(1 if r2_one_layer else geo.n_layers, geo.n_kv_heads, n_seq * self.k2 * geo.kv_groups,
                              geo.head_dim, dtype=store_dtype)
        self.g = torch.Generator().manual_seed(seed)
        self.observed: list = []

    def _draw(self, ks: dict[str, int]) -> dict[str, torch.Tensor]:
        """Each observed role's token indices [n_seq, k], drawn sequence by sequence and, within a
        sequence, in forward order: the draws a per-call sampler made, so the seed fixes the tokens."""
        idx = {role: torch.empty(self.n_seq, k, dtype=torch.long) for role, k in ks.items()}
        order = forward_order(ks)
        for j in range(self.n_seq):
            for role in order:
                idx[role][j] = torch.randperm(self.seqlen, generator=self.g)[: ks[role]]
        return idx

    def attach(self, i: int, block: nn.Module, adapter: ModelAdapter) -> None:
        layer = adapter.layer(block)
        n_r1, per = len(R1_PROBES), self.per_layer1
        # what R1 and R2 act on, from the placement table: R1's probes pooled, R2's per layer
        r1_stores = [(role, self.k1, self.r1[(n_r1 * i + j) * per: (n_r1 * i + j + 1) * per])
                     for j, role in enumerate(R1_PROBES)]
        r2 = self.r2[0 if self.r2_one_layer else i]
        r2_stores = [(role, self.k2, kv_head_token_view(r2, self.geo.kv_groups)) for role in SPECS["R2"].probes]
        idx = self._draw({role: k for role, k, _ in r1_stores + r2_stores})
        for role, _, store in r1_stores + r2_stores:
            q = _observable(adapter, block, layer, role)
            q.input_observer = _Sampler(idx[role], self.seqlen, store)
            self.observed.append(q)

    def detach(self) -> None:
        for q in self.observed:
            q.input_observer.flush()
            q.input_observer = None
        self.observed = []

    def result(self) -> Captured:
        return Captured(r1=self.r1, r2=None if self.r2_one_layer else self.r2, fraction_r1=self.k1 / self.seqlen,
                        fraction_r2=self.k2 / self.seqlen, tokens_seen=self.n_seq * self.seqlen)


@torch.no_grad()
def capture_activations(model: nn.Module, calib_ids: torch.Tensor, *, fraction: float = 0.1,
                        max_r1_tokens: int | None = 262_144, seed: int = 0, device="cpu",
                        adapter: ModelAdapter | None = None, progress: bool = True,
                        store_dtype: torch.dtype = torch.float16, batch: int | None = None) -> Captured:
    """Sample the inputs that R1 and R2 act on (the model must be norm-fused and unrotated).
    `batch`: sequences per block forward (default: forward_plan's choice for the device)."""
    adapter = adapter or adapter_for(model)
    split_experts_(model, adapter)
    n_seq, seqlen = calib_ids.shape
    cap = ActivationCapture(adapter.geometry(model.config), n_seq, seqlen, fraction=fraction,
                            max_r1_tokens=max_r1_tokens, seed=seed, store_dtype=store_dtype)
    planned, resident = forward_plan(cap.geo, n_seq, seqlen, next(model.parameters()).dtype, device)
    batch = batch or planned
    for i, block, forward in iterate_blocks(model, adapter, calib_ids, device, progress, desc="capture",
                                            batch=batch, resident=resident):
        cap.attach(i, block, adapter)
        forward(update=True)
        cap.detach()
    return cap.result()


def _observable(adapter: ModelAdapter, block: nn.Module, layer, role: str) -> nn.Module:
    """The module whose `input_observer` sees the input of `role` for every token: the linear
    itself (wrapped in a QLinear), or, for an MLP role of a MoE block, the experts' entry."""
    if layer.is_moe and role in MLP_ROLES:
        return block.get_submodule(f"{adapter.mlp}.{adapter.moe.experts}")
    q = as_qlinear(getattr(layer, role))
    adapter.set_linear(block, role, q)
    return q


def r1_rows(r1: torch.Tensor, n_layers: int) -> list[dict[str, torch.Tensor]]:
    """The pooled R1 buffer split back per layer: [{probe role: its sampled inputs}]."""
    per = r1.shape[0] // (len(R1_PROBES) * n_layers)
    n = len(R1_PROBES)
    return [{role: r1[(n * i + j) * per: (n * i + j + 1) * per] for j, role in enumerate(R1_PROBES)}
            for i in range(n_layers)]
