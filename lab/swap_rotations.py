#!/usr/bin/env python3
"""Swap experiments (issue 17): a rotation set made of R1 from one source and R2 from another.

    python lab/swap_rotations.py --model qwen2.5-coder-0.5b --r1 spin.safetensors --r2 quarot \
        --seed 0 --out spinR1_hadR2.safetensors

A source is a rotations .safetensors (a run folder's rotations.safetensors) or "quarot" (the
random Hadamard R1 / Hadamard R2 that `--method quarot --seed SEED` uses). R3 and R4 stay the
online Hadamards. The result is used with `dartquant quantize --rotations FILE` (or quality.py's
`--set rotations=FILE`), so every other setting stays that of the run it is compared with.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--r1", required=True, help="FILE or quarot")
    ap.add_argument("--r2", required=True, help="FILE or quarot")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from dartquant.pipeline import model_geometry
    from dartquant.transforms import RotationSet

    geo = model_geometry(args.model)
    quarot = RotationSet.quarot(geo, seed=args.seed)

    def source(spec: str) -> RotationSet:
        return quarot if spec == "quarot" else RotationSet.load(spec)

    r1, r2 = source(args.r1), source(args.r2)
    out = RotationSet(r1.r1, r2.r2, r3=True, r4=True,
                      meta={"method": "swap", "r1_from": args.r1, "r2_from": args.r2, "seed": args.seed})
    out.validate(geo)
    out.save(args.out)
    print(f"{args.out}: R1 from {args.r1}, R2 from {args.r2}")


if __name__ == "__main__":
    main()
