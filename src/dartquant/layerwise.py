"""Run a model one decoder block at a time: the memory-lean backbone of GPTQ and capture.

Weights stay where they are (the CPU); each block is moved to the compute device, run over
all calibration sequences, and moved back, and its outputs become the next block's inputs.
Peak device memory is one block plus one call's activations, whatever the depth: one sequence
per call on the CPU; on a GPU `forward_plan` batches sequences (launch- and sync-bound
otherwise) and keeps the hidden states on the device when they fit.

The block inputs are computed explicitly (embedding, rotary position embeddings, no mask:
transformers' SDPA path is then causal), instead of capturing them by raising an exception
from a hooked first layer. Families with several attention types (Gemma 3: sliding-window and
global layers, each with its own RoPE base) get each block's own position embeddings and, where
the sequence is longer than the window, an explicit sliding-window causal mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import ModelAdapter, adapter_for
from .modules import register_attention


# Several calibration windows per block call keep a GPU busy (one 2048-token window of a small
# model is microseconds of work per kernel, so the loop was launch- and sync-bound), within bounds
# that keep the device within the 24 GiB target at 70B shape:
FORWARD_TOKENS = 16384  # at most this many tokens per call
ACTIVATION_BYTES = 2 << 30  # and about this much of a call's live activations (estimate below)
# hidden states stay on the device between blocks when they take at most this share of its free
# memory and at most RESIDENT_BYTES (Llama-2-7B's 128 x 2048 float32 states: 4.3 GB; 70B's: 8.6 GB)
RESIDENT_SHARE = 0.25
RESIDENT_BYTES = 6 << 30


def forward_plan(geo, n_seq: int, seqlen: int, dtype: torch.dtype, device) -> tuple[int, bool]:
    """(windows per block call, keep the hidden states on the device) for a block-by-block pass
    over calibration windows (DartQuant's capture, GPTQ) of a model of geometry `geo`.

    On the CPU one window per call and host-resident states, as before (the matmuls of one window
    already fill the cores, and the CPU path stays bit for bit what it was). On a GPU as many
    windows as FORWARD_TOKENS and ACTIVATION_BYTES allow, a block call's live tensors taken as
    ~4 of the hidden width and ~4 of the widest MLP per token (residual, norm, q/k/v, attention;
    gate, up, their product)."""
    device = torch.device(device)
    if device.type == "cpu":
        return 1, False
    size = torch.empty((), dtype=dtype).element_size()
    per_token = 4 * (geo.hidden + max(geo.mlp_widths)) * size
    tokens = min(FORWARD_TOKENS, ACTIVATION_BYTES // per_token)
    batch = max(1, min(n_seq, tokens // max(1, seqlen)))
    need = n_seq * seqlen * geo.hidden * size
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    return batch, need <= min(RESIDENT_SHARE * free, RESIDENT_BYTES)


@torch.no_grad()
def embed_inputs(model: nn.Module, adapter: ModelAdapter, ids: torch.Tensor) -> torch.Tensor:
    """Embedding outputs [n, S, hidden] on the CPU (float32 or the model's dtype)."""
    embed = adapter.embedding(model)
    return torch.cat([embed(ids[i: i + 1].to(embed.weight.device)).cpu() for i in range(ids.shape[0])])


@torch.no_grad()
def position_embeddings(model: nn.Module, hidden: torch.Tensor, device, adapter: ModelAdapter | None = None,
                        layer_type: str | None = None) -> tuple:
    """(cos, sin) for positions 0..S-1, computed by the model's own rotary module (for one
    attention type where the rotary module has several)."""
    rotary = (adapter or adapter_for(model)).rotary_embedding(model)
    pos = torch.arange(hidden.shape[1], device=device).unsqueeze(0)
    rotary_device = next(iter(rotary.buffers())).device
    extra = (layer_type,) if layer_type is not None else ()
    cos, sin = rotary(hidden[:1].to(rotary_device), pos.to(rotary_device), *extra)
    return cos.to(device), sin.to(device), pos


def _sliding_mask(seqlen: int, window: int | None, device) -> torch.Tensor | None:
    """[1, 1, S, S] boolean: causal and less than `window` back; None where plain causal is the same."""
    if not window or seqlen <= window:
        return None
    i = torch.arange(seqlen, device=device)
    return ((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window))[None, None]


class StopBlock(Exception):
    """Raised inside a block call by a hook that has seen all it needs of this call (GPTQ's Hessian forwards,
    quant/weights.py): `run_block` then returns None, and no caller may use that output."""


def run_block(block: nn.Module, hidden: torch.Tensor, pos_emb: tuple,
              mask: torch.Tensor | None = None) -> torch.Tensor | None:
    cos, sin, pos = pos_emb
    try:
        out = block(hidden, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
    except StopBlock:
        return None
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def iterate_blocks(model: nn.Module, adapter: ModelAdapter, ids: torch.Tensor, device: str | torch.device,
                   progress: bool = True, desc: str = "layers", *, batch: int = 1,
                   resident: bool = False) -> Iterator[tuple[int, nn.Module, Callable]]:
    """Yield (index, block on device, forward) for each block; `forward(update)` runs the block over
    every calibration sequence and, if update, replaces the stored inputs by its outputs.

    `batch` sequences go through the block per call (1: one window's activations on the device);
    `resident`: the hidden states live on the device, not on the host (no round trip per block).

    The caller may change the block between forwards (e.g. quantize its weights, then call
    forward(update=True) so the next block sees the quantized block's outputs).
    """
    device = torch.device(device)
    # Blocks run without a mask: only SDPA (which we delegate to) is then causal; eager would not be.
    model.set_attn_implementation(register_attention())
    hidden = embed_inputs(model, adapter, ids)  # [n, S, hidden] on CPU
    if resident:
        hidden = hidden.to(device)
    blocks = adapter.decoder_layers(model)
    kinds = {adapter.attention_kind(b) for b in blocks}  # (rotary layer type, sliding window)
    pos_embs = {k: position_embeddings(model, hidden, device, adapter, k[0]) for k in {(t, None) for t, _ in kinds}}
    masks = {w: _sliding_mask(hidden.shape[1], w, device) for _, w in kinds}
    for i in tqdm(range(len(blocks)), desc=desc, disable=not progress, leave=False):
        block = blocks[i]
        home = next(block.parameters()).device
        block.to(device)
        layer_type, window = adapter.attention_kind(block)
        pos_emb, mask = pos_embs[(layer_type, None)], masks[window]

        def forward(update: bool, block=block, pos_emb=pos_emb, mask=mask) -> None:
            for j in range(0, hidden.shape[0], batch):
                out = run_block(block, hidden[j: j + batch].to(device), pos_emb, mask)
                if update:
                    hidden[j: j + batch] = out.to(hidden.device, hidden.dtype)

        yield i, block, forward
        block.to(home)
