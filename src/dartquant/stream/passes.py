"""What a streamed pass does with one block, and the head at the end.

Hidden states of every window set (evaluation corpora, guard windows, calibration windows) live
on the host in the compute dtype, [n, S, hidden] each (pinned when the device is a GPU, so that
copies overlap the computation); a block on the device runs over them one window at a time (as layerwise.iterate_blocks does, with the same explicit position embeddings
and masks), so device memory is one block plus one window's activations. At the end the final
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


class BlockRunner:
    """Runs decoder blocks over host-resident hidden states; caches position embeddings per length."""

    def __init__(self, model: nn.Module, adapter, device):
        self.model, self.adapter, self.device = model, adapter, torch.device(device)
        self._pos: dict = {}

    def _context(self, block: nn.Module, hidden: torch.Tensor):
        layer_type, window = self.adapter.attention_kind(block)
        key = (hidden.shape[1], hidden.dtype, layer_type)
        if key not in self._pos:
            self._pos[key] = position_embeddings(self.model, hidden, self.device, self.adapter, layer_type)
        return self._pos[key], _sliding_mask(hidden.shape[1], window, self.device)

    @torch.no_grad()
    def run_(self, block: nn.Module, hidden: torch.Tensor | None, update: bool = True, batch: int = 1) -> None:
        """Block over every window of `hidden` (in place when `update`), `batch` windows per call."""
        if hidden is None:
            return
        pos_emb, mask = self._context(block, hidden)
        if self.device.type == "cuda" and hidden.device.type == "cpu" and hidden.is_pinned():
            return self._run_overlapped(block, hidden, update, batch, pos_emb, mask)
        for j in range(0, hidden.shape[0], batch):
            out = run_block(block, hidden[j: j + batch].to(self.device), pos_emb, mask)
            if update:
                hidden[j: j + batch] = out.to(hidden.device, hidden.dtype)

    def _run_overlapped(self, block, hidden, update, batch, pos_emb, mask) -> None:
        """run_ on a GPU with pinned host states: window j + 1 is copied in and window j - 1's
        output copied out on side streams while window j computes (the same values, in the same
        order: only the waiting goes). Windows are distinct slices, so no copy reads what another
        writes; everything has landed when this returns."""
        compute = torch.cuda.current_stream(self.device)
        h2d, d2h = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)
        starts = range(0, hidden.shape[0], batch)

        def fetch(j):
            with torch.cuda.stream(h2d):
                x = hidden[j: j + batch].to(self.device, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(h2d)
            return x, ready

        nxt = fetch(0)
        for j in starts:
            x, ready = nxt
            compute.wait_event(ready)
            x.record_stream(compute)  # x was allocated on h2d and is used on compute
            if j + batch < hidden.shape[0]:
                nxt = fetch(j + batch)
            out = run_block(block, x, pos_emb, mask)
            if update:
                out = out.to(hidden.dtype)
                done = torch.cuda.Event()
                done.record(compute)
                with torch.cuda.stream(d2h):
                    d2h.wait_event(done)
                    out.record_stream(d2h)
                    hidden[j: j + batch].copy_(out, non_blocking=True)
        d2h.synchronize()
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
        # pinned on a GPU run: the block passes copy windows in and out asynchronously (run_);
        # where the host cannot pin that much, pageable memory and synchronous copies
        shape = (ids.shape[0], *first.shape[1:])
        try:
            out = torch.empty(shape, dtype=first.dtype, pin_memory=self.device.type == "cuda")
        except RuntimeError:
            out = torch.empty(shape, dtype=first.dtype)
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
