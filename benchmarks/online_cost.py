#!/usr/bin/env python3
"""Online transform cost per token: QuaRot's R3 + R4 Hadamards vs DuQuant's block rotations.

    python benchmarks/online_cost.py --out docs/results/online_cost.json

Counts, from each model's geometry (transforms/online.py: online_cost_from_geometry, the same
numbers `metrics.json` reports as `online_cost` for a run), the FLOPs per token of the online
transforms next to those of the decoder linears, and the parameters they store. FLOPs, not
time: a Hadamard is memory-bound and a block matmul runs on tensor cores, so the wall-clock
ratio needs the GPU (docs/KERNELS.md measures the Hadamard). Bundled models are read from their
config.json (installed ones only); the 7B / 8B rows are the published geometries.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

PUBLISHED = {  # hidden, intermediate, layers, heads, kv heads, head_dim
    "llama-2-7b": (4096, 11008, 32, 32, 32, 128),
    "llama-3-8b": (4096, 14336, 32, 32, 8, 128),
}


def geometries(names):
    from dartquant.adapters import Geometry
    from dartquant.pipeline import model_geometry
    from dartquant.zoo import BUNDLED

    for name in names:
        if name in PUBLISHED:
            h, i, l, nh, nkv, d = PUBLISHED[name]
            yield name, Geometry(h, i, l, nh, nkv, d, 0)
        elif name in BUNDLED and BUNDLED[name].installed():
            yield name, model_geometry(name)
        else:
            print(f"skipping {name}: not installed", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b",
                                                    "llama-2-7b", "llama-3-8b"])
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from dartquant.transforms.online import online_cost_from_geometry

    setups = {"quarot (R3 + R4)": dict(r3=True, r4=True),
              "duquant + R3": dict(r3=True, r4=False, block_size=args.block_size, permute=True),
              "duquant, no permutation + R3": dict(r3=True, r4=False, block_size=args.block_size, permute=False)}
    rows, result = [], {"block_size": args.block_size, "models": {}}
    for name, geo in geometries(args.models):
        result["models"][name] = {"geometry": geo.__dict__, "setups": {}}
        for setup, kw in setups.items():
            c = online_cost_from_geometry(geo, **kw)
            result["models"][name]["setups"][setup] = c
            rows.append(f"| {name} | {setup} | {c['total_flops_per_token'] / 1e6:.2f} | "
                        f"{c['overhead'] * 100:.2f}% | {c['blocks']['params'] / 1e6:.2f} |")
    lines = ["| model | online transforms | MFLOP / token | vs linears | stored params (M) |",
             "|---|---|---|---|---|", *rows]
    result["table"] = lines
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
