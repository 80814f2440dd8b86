#!/usr/bin/env python3
"""DFRot's massive-token weight, judged on held-out calibration tokens (no perplexity).

    python lab/dfrot_weights.py --model smollm2-135m --samples 8 --seqlen 512 --weights 1 100 10000 \
        --out docs/results/dfrot_weights_cpu.json

One capture (as `--method dfrot` does it), then R1 refined from QuaRot's random Hadamard at each
weight; prints the held-out 4-bit SQNR (dB) of the rotated R1 inputs for all / ordinary /
massive tokens, and the seconds per alternation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--ma-ratio", type=float, default=100.0)
    ap.add_argument("--weights", nargs="+", type=float, default=[1.0, 100.0, 10000.0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    from dartquant.adapters import adapter_for
    from dartquant.calib.capture import capture_activations
    from dartquant.calib.dartquant import r1_heldout_quant, split_indices
    from dartquant.calib.dfrot import massive_tokens, refine_rotation
    from dartquant.config import RunConfig
    from dartquant.data import calib_windows
    from dartquant.transforms import RotationSet, fuse_norms_
    from dartquant.zoo import load_model

    cfg = RunConfig.from_flat(model=args.model, seed=args.seed, device=args.device)
    model, tok = load_model(args.model, dtype=torch.float32)
    adapter = adapter_for(model)
    geo = adapter.geometry(model.config)
    ids = calib_windows(tok, cfg.data.corpus, args.samples, args.seqlen, args.seed)
    fuse_norms_(model, adapter)
    acts = capture_activations(model, ids, fraction=0.1, seed=args.seed, device=args.device, adapter=adapter,
                               progress=False)
    x = acts.r1
    train, held = split_indices(x.shape[0], args.seed)
    massive = massive_tokens(x, args.ma_ratio)
    spec = cfg.scheme.act_spec("q", geo.head_dim)
    init = RotationSet.quarot(geo, seed=args.seed).r1
    groups = {"all": held, "ordinary": held[~massive[held]], "massive": held[massive[held]]}

    def sqnr(r):
        return {k: r1_heldout_quant(x, r, rows, spec, args.device)["sqnr_db"] for k, rows in groups.items()}

    rows = [{"r1": "quarot", **sqnr(init)}]
    for w in args.weights:
        weights = torch.where(massive, w, 1.0).double()
        t0 = time.time()
        r, hist = refine_rotation(x, init, spec, weights, args.iterations, index=train, device=args.device)
        sec = (time.time() - t0) / (args.iterations + 1)
        rows.append({"r1": f"dfrot w={w:g}", **sqnr(r), "best_iteration": hist["best_iteration"],
                     "seconds_per_iteration": sec, "train_error": [hist["error"][0], min(hist["error"])]})
    lines = ["| R1 | held-out SQNR dB, all | ordinary | massive | best iteration |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['r1']} | {row['all']:.3f} | {row['ordinary']:.3f} | {row['massive']:.3f} | "
                     f"{row.get('best_iteration', '-')} |")
    result = {"args": vars(args), "tokens": {"train": int(train.numel()), "held_out": int(held.numel()),
                                             "massive_train": int(massive[train].sum()),
                                             "massive_held_out": int(groups["massive"].numel())},
              "rows": rows, "table": lines}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
