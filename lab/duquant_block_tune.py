#!/usr/bin/env python3
"""Issue 17 probe (item 4): tune DuQuant's online block rotations block by block, on the block's
output error with its 4-bit quantizers in the loop, and write the tuned rotations.

DuQuant builds each online transform (x R1 P R2 at the q/k/v, gate/up and down_proj inputs) greedily
from max |x| alone. Here each block's three transforms get one more block-diagonal rotation Q
(Q = exp(A - A^T) per block of R2, A starting at 0: the identity), applied after R2 and to the
readers' weights alike (x R Q (W R Q)^T = x R (W R)^T: exact), and A is fitted by Adam to

    || block_quantized(h_q) - block_fp(h_fp) ||^2

(OmniQuant's / FlatQuant's block reconstruction: h_fp the full-precision chain's block input, h_q the
quantized chain's; activations and K/V fake-quantized as the run would, the weights per-channel RTN
with straight-through gradients as GPTQ's stand-in). Backpropagation stays inside one block. Q is then
folded into R2 (R2 Q is still block-diagonal: the ragged last block's Q is the identity beyond its
real size), so the product runs the result as it is:

    python lab/duquant_block_tune.py --model smollm2-135m --rotations RUN/rotations.safetensors \
        --seed 0 --calib-samples 16 --calib-seqlen 512 --steps 200 --out TUNED.safetensors [--device cuda]
    dartquant quantize --model smollm2-135m --recipe recipes/duquant-clip-search.yaml \
        --rotations TUNED.safetensors --seed 0 ... --out RUN2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dartquant.adapters import adapter_for  # noqa: E402
from dartquant.block_rotation import apply_blocks, block_sizes  # noqa: E402
from dartquant.config import RunConfig  # noqa: E402
from dartquant.data import calib_windows  # noqa: E402
from dartquant.layerwise import embed_inputs, position_embeddings, run_block  # noqa: E402
from dartquant.quant.act import install_quantizers_, set_act_quant_enabled_  # noqa: E402
from dartquant.quant.primitives import QuantSpec, fake_quantize  # noqa: E402
from dartquant.transforms import RotationSet, fuse_norms_, rotate_, untie_embeddings_  # noqa: E402
from dartquant.zoo import load_model  # noqa: E402

STREAMS = (("DQ_attn", "q", ("q", "k", "v")), ("DQ_mlp", "gate", ("gate", "up")), ("DQ_down", "down", ("down",)))


def skew_mask(n: int, block: int) -> torch.Tensor:
    """[nb, B, B] 1 where A may be non-zero: within each block's real channels (the ragged last one's)."""
    sizes = block_sizes(n, block)
    m = torch.zeros(len(sizes), block, block, dtype=torch.float64)
    for k, s in enumerate(sizes):
        m[k, :s, :s] = 1
    return m


def rotation(a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    s = a * mask
    return torch.linalg.matrix_exp(s - s.mT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--rotations", required=True, help="a DuQuant run's rotations.safetensors")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--steps", type=int, default=200, help="Adam steps per block")
    ap.add_argument("--batch", type=int, default=2, help="windows per step")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--score-windows", type=int, default=4, help="windows the before / after check scores")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-layers", type=int, help="tune only the first N blocks (a smoke test)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--json", help="per-block losses before / after")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    cfg = RunConfig.from_flat(model=a.model, method="duquant", seed=a.seed, w_quantizer="gptq",
                              calib_samples=a.calib_samples, calib_seqlen=a.calib_seqlen)
    model, tokenizer = load_model(cfg.model, dtype=torch.float32)
    dev = torch.device(a.device)
    adapter = adapter_for(model)
    ids = calib_windows(tokenizer, cfg.data.corpus, cfg.data.samples, cfg.data.seqlen, cfg.seed)
    untie_embeddings_(model, adapter)
    fuse_norms_(model, adapter)
    rot = RotationSet.load(a.rotations)
    if rot.meta.get("method") != "duquant":
        sys.exit(f"{a.rotations}: not DuQuant rotations (method {rot.meta.get('method')!r})")
    rotate_(model, rot, adapter)
    install_quantizers_(model, cfg.scheme, adapter)
    model.to(dev)
    w_spec = QuantSpec(bits=cfg.scheme.w_bits, symmetric=cfg.scheme.w_symmetric)  # RTN, no clip search
    block_size = int(rot.meta["block_size"])
    h_fp = embed_inputs(model, adapter, ids).to(dev)
    h_q = h_fp.clone()
    pos = position_embeddings(model, h_fp, dev, adapter)
    g = torch.Generator().manual_seed(a.seed + 77)
    log = []
    for i, block in enumerate(adapter.decoder_layers(model)):
        if a.max_layers is not None and i >= a.max_layers:
            break
        t0 = time.time()
        layer = adapter.layer(block)
        with torch.no_grad():
            set_act_quant_enabled_(block, False)
            y_fp = torch.cat([run_block(block, h_fp[j: j + 1], pos) for j in range(h_fp.shape[0])])
            set_act_quant_enabled_(block, True)
        params, patched = [], []
        for key, owner, readers in STREAMS:
            online = getattr(layer, owner).input_rotation
            n = online.n
            mask = skew_mask(n, block_size).to(dev)
            a_param = torch.zeros_like(mask, requires_grad=True)
            params.append((key, online, readers, a_param, mask))
            base_forward = online.forward

            def rotated(x, base_forward=base_forward, a_param=a_param, mask=mask):
                return apply_blocks(base_forward(x), rotation(a_param, mask).to(x.dtype))

            online.forward = rotated
            for role in readers:
                lin = getattr(layer, role)
                w0 = lin.weight.detach().clone()

                def forward(x, lin=lin, w0=w0, a_param=a_param, mask=mask):
                    x = lin.input_rotation(x)
                    if lin.input_quantizer is not None:
                        x = lin.input_quantizer(x)
                    w = apply_blocks(w0, rotation(a_param, mask).to(w0.dtype))
                    return F.linear(x, fake_quantize(w, w_spec), lin.bias)

                lin.forward = forward
                patched.append((lin, w0))
        opt = torch.optim.Adam([p[3] for p in params], lr=a.lr)
        n_seq = h_q.shape[0]

        def loss_on(idx):
            out = torch.cat([run_block(block, h_q[j: j + 1], pos) for j in idx])
            return (out - y_fp[idx]).square().mean() / y_fp[idx].square().mean()

        scored = list(range(min(a.score_windows, n_seq)))
        with torch.no_grad():
            before = float(loss_on(scored))
        for _ in range(a.steps):
            idx = torch.randperm(n_seq, generator=g)[: a.batch].tolist()
            loss = loss_on(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            after = float(loss_on(scored))
            keep = after < before  # never keep a tuning that made the block worse on its own data
            for lin, w0 in patched:
                del lin.forward  # back to the class's forward
            for key, online, readers, a_param, mask in params:
                del online.forward
                if not keep:
                    continue
                q = rotation(a_param, mask)  # folded into the stored R2 (R1 without one) and, for the
                last = f"{key}.r2" if f"{key}.r2" in rot.blocks else f"{key}.r1"  # chain, the model
                rot.blocks[last][i] = (rot.blocks[last][i].double() @ q.cpu()).to(rot.blocks[last].dtype)
                attr = "r2" if online.r2 is not None else "r1"
                setattr(online, attr, (getattr(online, attr).double() @ q).to(getattr(online, attr).dtype))
                for role in readers:
                    lin = getattr(layer, role)
                    lin.weight.copy_(apply_blocks(lin.weight.double(), q).to(lin.weight.dtype))
            h_fp = y_fp
            h_q = torch.cat([run_block(block, h_q[j: j + 1], pos) for j in range(n_seq)])
        log.append({"layer": i, "before": before, "after": after, "kept": keep, "seconds": round(time.time() - t0, 1)})
        print(f"layer {i}: relative block output error {before:.5f} -> {after:.5f}{'' if keep else ' (not kept)'} "
              f"({time.time() - t0:.0f} s)", flush=True)
    rot.meta = {**rot.meta, "block_tuned": {"steps": a.steps, "lr": a.lr, "batch": a.batch}}
    rot.save(a.out)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "layers": log}, indent=1) + "\n")


if __name__ == "__main__":
    main()
