#!/usr/bin/env python3
"""GPTQ of a whole model with its Hessian forwards stopped early (`quant.weights.GPTQ_STOP_EARLY`, the default)
against whole-block forwards: seconds of `quantize_weights_`, and the codes of both compared bit for bit.

True-sequential GPTQ (the DuQuant recipe's) collects each block's Hessians in four forwards (q/k/v, o,
gate/up, down), and the next block's inputs in a fifth. A Hessian forward needs the block only up to its
step's last input, so it now stops there: about 1.1 blocks' work for the four instead of 4. One-pass GPTQ
saves only down_proj's matmul.

    python benchmarks/gptq_forward_cost.py --model smollm2-135m --windows 8 --seqlen 512 --out gptq_forward_cpu.json
    python benchmarks/gptq_forward_cost.py --model qwen2.5-coder-0.5b --windows 32 --seqlen 2048 --device cuda --out X.json

Runs alternate (off, on, off, on, ...) so drift shows; prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from dartquant.config import RunConfig  # noqa: E402
from dartquant.data import calib_windows  # noqa: E402
from dartquant.quant import weights  # noqa: E402
from dartquant.zoo import load_model  # noqa: E402


def one_run(args, ids, early: bool) -> tuple[float, dict]:
    weights.GPTQ_STOP_EARLY = early
    model, _ = load_model(args.model, dtype=torch.float32)
    scheme = RunConfig.from_flat(model=args.model, w_quantizer="gptq", gptq_true_sequential=args.true_sequential,
                                 gptq_act_order=args.act_order).scheme
    if args.device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = weights.quantize_weights_(model, scheme, ids, progress=False, device=args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--true-sequential", type=lambda v: v.lower() == "true", default=True)
    ap.add_argument("--act-order", type=lambda v: v.lower() == "true", default=True)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    _, tok = load_model(args.model)
    ids = calib_windows(tok, "wiki", args.windows, args.seqlen, 0)
    rows, first = [], {}
    for rep in range(args.reps):
        for early in (False, True):
            seconds, out = one_run(args, ids, early)
            if early not in first:
                first[early] = out
            rows.append({"rep": rep, "stop_early": early, "seconds": seconds})
            print(f"rep {rep}, stop early {early}: {seconds:.1f} s", flush=True)
    weights.GPTQ_STOP_EARLY = True
    a, b = first[False], first[True]
    equal = sorted(a) == sorted(b) and all(torch.equal(a[k].codes, b[k].codes) and torch.equal(a[k].scale, b[k].scale)
                                           for k in a)
    best = {e: min(r["seconds"] for r in rows if r["stop_early"] == e) for e in (False, True)}
    print(f"\n| {args.model}, {args.windows} x {args.seqlen}, true-sequential {args.true_sequential}, {args.device} "
          f"| whole blocks | stopped early | speedup |\n|---|---|---|---|")
    print(f"| quantize_weights_, s (best of {args.reps}) | {best[False]:.1f} | {best[True]:.1f} | "
          f"{best[False] / best[True]:.2f}x |")
    print(f"codes and scales equal: {equal}")
    result = {"model": args.model, "windows": args.windows, "seqlen": args.seqlen,
              "true_sequential": args.true_sequential, "act_order": args.act_order, "device": args.device,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                          "threads": torch.get_num_threads()},
              "rows": rows, "best_s": {str(k): v for k, v in best.items()}, "speedup": best[False] / best[True],
              "codes_equal": equal}
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    if not equal:
        sys.exit("the codes differ: the early stop changed GPTQ's result")


if __name__ == "__main__":
    main()
