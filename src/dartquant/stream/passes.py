"""What a streamed pass does with one block, and the head at the end.

Hidden states of every window set (evaluation corpora, guard windows, calibration windows) live
on the host in the compute dtype, [n, S, hidden] each; a block on the device runs over them one
window at a time (as layerwise.iterate_blocks does, with the same explicit position embeddings
and masks; on a GPU the copies overlap the compute), so device memory is one block plus one
window's activations. At the end the final
norm and lm_head turn each window into logits, and the NLL is summed exactly as eval/ppl.py's
`perplexity` sums it (cross-entropy in float32 per window, accumulated in float64), so a
streamed run reports the same numbers as an in-memory one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..layerwise import _sliding_mask, position_embeddings, run_block
from ..log import log


def _has_hooks(module: nn.Module) -> bool:
    """Any forward (pre-)hook in the module: GPTQ's Hessians, capture, routing counters."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


class BlockRunner:
    """Runs decoder blocks over host-resident hidden states; caches position embeddings per length.

    On a GPU the windows' host <-> device copies overlap the compute (`_run_overlapped`: a small
    ring of pinned staging buffers, so the host states stay ordinary memory and host memory does not
    grow); `overlap=False` keeps the synchronous copies. The overlapped path checks itself once
    against the synchronous one on the first hook-free pass and falls back (with a warning) if the
    two ever differ."""

    def __init__(self, model: nn.Module, adapter, device, overlap: bool | None = None):
        self.model, self.adapter, self.device = model, adapter, torch.device(device)
        self._pos: dict = {}
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        self._overlap_checked = False

    @property
    def copies_overlapped(self) -> bool:
        """Whether the overlapped copies ran (and passed their self-check) in this run."""
        return self.overlap and self._overlap_checked

    def _context(self, block: nn.Module, hidden: torch.Tensor):
        layer_type, window = self.adapter.attention_kind(block)
        key = (hidden.shape[1], hidden.dtype, layer_type)
        if key not in self._pos:
            self._pos[key] = position_embeddings(self.model, hidden, self.device, self.adapter, layer_type)
        return self._pos[key], _sliding_mask(hidden.shape[1], window, self.device)

    @torch.no_grad()
    def run_(self, block: nn.Module, hidden: torch.Tensor | None, update: bool = True, batch: int = 1) -> None:
        """Block over every window of `hidden` (in place when `update`), `batch` windows per call."""
        if hidden is None or hidden.shape[0] == 0:
            return
        pos_emb, mask = self._context(block, hidden)
        if self.overlap and self.device.type == "cuda" and hidden.device.type == "cpu":
            if not self._overlap_checked and update and not _has_hooks(block):
                self._check_overlap(block, hidden, batch, pos_emb, mask)
            if self.overlap:
                return self._run_overlapped(block, hidden, update, batch, pos_emb, mask)
        for j in range(0, hidden.shape[0], batch):
            out = run_block(block, hidden[j: j + batch].to(self.device), pos_emb, mask)
            if update:
                hidden[j: j + batch] = out.to(hidden.device, hidden.dtype)

    def _check_overlap(self, block, hidden, batch, pos_emb, mask) -> None:
        """Both paths on copies of the first windows (enough for every staging slot to be reused):
        the outputs must be equal bit for bit; if not, the synchronous path is used from now on."""
        self._overlap_checked = True
        first = hidden[: 3 * batch]
        a, b = first.clone(), first.clone()
        for j in range(0, a.shape[0], batch):
            a[j: j + batch] = run_block(block, a[j: j + batch].to(self.device), pos_emb, mask).to(a.dtype).cpu()
        self._run_overlapped(block, b, True, batch, pos_emb, mask)
        if not torch.equal(a, b):
            log.warning("overlapped host <-> GPU copies gave different block outputs than synchronous ones; "
                        "using synchronous copies for this run (slower, same results)")
            self.overlap = False

    def _run_overlapped(self, block, hidden, update, batch, pos_emb, mask) -> None:
        """run_ with the copies off the critical path: while window k computes, the host copies
        window k + 1 into a pinned staging buffer and a side stream sends it to the GPU, and a
        second side stream brings window k's output back into another pinned buffer, which the
        host copies into `hidden` two windows later. Two buffers each way; every reuse of a buffer
        waits for the copy that last used it, and the allocator is told which stream uses what."""
        compute = torch.cuda.current_stream(self.device)
        h2d, d2h = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)
        n = hidden.shape[0]
        starts = list(range(0, n, batch))
        shape = (min(batch, n), *hidden.shape[1:])
        pin_in = [torch.empty(shape, dtype=hidden.dtype, pin_memory=True) for _ in range(2)]
        pin_out = [torch.empty(shape, dtype=hidden.dtype, pin_memory=True) for _ in range(2)] if update else []
        in_done: list = [None, None]  # event: the last host -> GPU copy out of pin_in[slot] finished
        out_pending: list = [None, None]  # (event, first window, count) of the copy into pin_out[slot]

        def fetch(k: int):
            slot, j = k % 2, starts[k]
            m = min(batch, n - j)
            if in_done[slot] is not None:
                in_done[slot].synchronize()
            pin_in[slot][:m].copy_(hidden[j: j + m])
            with torch.cuda.stream(h2d):
                x = pin_in[slot][:m].to(self.device, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(h2d)
            in_done[slot] = ready
            return x, ready

        def drain(slot: int) -> None:
            if out_pending[slot] is not None:
                done, j, m = out_pending[slot]
                done.synchronize()
                hidden[j: j + m].copy_(pin_out[slot][:m])
                out_pending[slot] = None

        nxt = fetch(0)
        for k, j in enumerate(starts):
            x, ready = nxt
            compute.wait_event(ready)
            x.record_stream(compute)  # allocated on h2d, used on compute
            out = run_block(block, x, pos_emb, mask)
            if update:
                slot, m = k % 2, x.shape[0]
                drain(slot)  # the output two windows back, copied home; its buffer is free
                out = out.to(hidden.dtype)
                produced = torch.cuda.Event()
                produced.record(compute)
                with torch.cuda.stream(d2h):
                    d2h.wait_event(produced)
                    out.record_stream(d2h)
                    pin_out[slot][:m].copy_(out, non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record(d2h)
                out_pending[slot] = (copied, j, m)
            if k + 1 < len(starts):
                nxt = fetch(k + 1)  # host copy of the next window while the GPU computes this one
        for slot in range(2):
            drain(slot)
        compute.synchronize()

    def forward_fn(self, block: nn.Module, hidden: torch.Tensor, batch: int = 1):
        """`forward(update)` as iterate_blocks yields it (what gptq_block_ calls)."""
        return lambda update: self.run_(block, hidden, update, batch)

    @torch.no_grad()
    def embed(self, ids: torch.Tensor | None) -> torch.Tensor | None:
        """[n, S, hidden] embedding outputs on the host, written into one preallocated tensor
        (layerwise.embed_inputs concatenates a list: twice the memory for a moment)."""
        if ids is None:
            return None
        embed = self.adapter.embedding(self.model)
        first = embed(ids[:1].to(embed.weight.device))
        out = torch.empty(ids.shape[0], *first.shape[1:], dtype=first.dtype)
        out[:1] = first.cpu()
        for i in range(1, ids.shape[0]):
            out[i: i + 1] = embed(ids[i: i + 1].to(embed.weight.device)).cpu()
        return out


@torch.no_grad()
def logits(norm: nn.Module, head, hidden: torch.Tensor, device) -> torch.Tensor:
    """[1, S, vocab] logits of one window's last hidden state."""
    h = norm(hidden.to(device))
    return head(h) if isinstance(head, nn.Module) else F.linear(h, head)


@torch.no_grad()
def nll_sum(norm: nn.Module, head, hidden: torch.Tensor, ids: torch.Tensor, device) -> tuple[float, int]:
    """(summed next-token NLL, tokens) over windows `ids` [n, S] whose last hidden states are `hidden`."""
    total, tokens = 0.0, 0
    for j in range(ids.shape[0]):
        lg = logits(norm, head, hidden[j: j + 1], device)[:, :-1]
        tgt = ids[j: j + 1, 1:].to(lg.device)
        total += F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), tgt.reshape(-1), reduction="sum").double().item()
        tokens += tgt.numel()
    return total, tokens


def ppl_metrics(norm, head, hidden: dict, windows: dict, device) -> dict:
    """{"corpus": ppl, ..., "tokens": total} as eval.ppl.evaluate_ppl reports it."""
    out: dict = {}
    tokens = 0
    for corpus, ids in windows.items():
        nll, n = nll_sum(norm, head, hidden[corpus], ids, device)
        out[corpus] = math.exp(nll / n)
        tokens += n
    out["tokens"] = tokens
    return out


class RoutedTokens:
    """Counts the tokens routed to each expert of a MoE block from now until `close()` (which
    returns [counts], or [] for a dense block). Read off the experts' routing argument, so around
    GPTQ's calibration forward it is what each expert's Hessians saw."""

    def __init__(self, block: nn.Module, adapter):
        self.handle = None
        if adapter.is_moe_block(block):
            experts = block.get_submodule(f"{adapter.mlp}.{adapter.moe.experts}")
            self.seen = torch.zeros(len(experts), dtype=torch.long)
            self.handle = experts.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:  # RoutedExperts.forward(hidden, top_k_index [T, k], top_k_weights)
        self.seen.add_(torch.bincount(args[1].reshape(-1).cpu(), minlength=self.seen.numel()))

    def reset_(self) -> None:
        """Forget the counts so far (true-sequential GPTQ runs several forwards: the last one counts)."""
        if self.handle is not None:
            self.seen.zero_()

    def close(self) -> list[list[int]]:
        if self.handle is None:
            return []
        self.handle.remove()
        return [self.seen.tolist()]
