"""DuQuant's capture at a forced number of calibration windows per block call, on the CPU (where the product
takes one): `dartquant quantize ARGS` in this process with `calib.duquant.forward_plan` patched. With the
sampling fixed in session 37 (RESULTS §46), a batched pass draws the same random rows as a one-window pass,
so what is left between the two is the batched forward's float summation order. Pair two runs of the same
seed (`--windows 1` and `--windows 8`), then compare their rotations.safetensors and perplexities:

    PYTHONPATH=src python lab/duquant_batch_pairing.py --windows 8 -- --model smollm2-135m --method duquant \\
        --seed 0 --calib-samples 16 --calib-seqlen 512 --eval-max-windows 4 --out runs/dq_w8
    PYTHONPATH=src python lab/duquant_batch_pairing.py --compare runs/dq_w1 runs/dq_w8
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def compare(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    ra, rb = load_file(str(a / "rotations.safetensors")), load_file(str(b / "rotations.safetensors"))
    diff = {k: float((ra[k].double() - rb[k].double()).abs().max()) for k in ra if k in rb}
    differing = {k: v for k, v in diff.items() if v > 0}
    out = {"runs": [str(a), str(b)], "tensors": len(diff), "differing": len(differing),
           "max_abs_diff": max(diff.values()) if diff else None,
           "largest": dict(sorted(differing.items(), key=lambda kv: -kv[1])[:8])}
    for run in (a, b):
        out[str(run)] = json.loads((run / "metrics.json").read_text()).get("ppl")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, help="windows per block call in DuQuant's capture")
    ap.add_argument("--compare", nargs=2, type=Path, metavar="RUN")
    args, rest = ap.parse_known_args()
    if args.compare:
        print(json.dumps(compare(*args.compare), indent=1))
        return
    from dartquant.calib import duquant
    from dartquant.cli import main as cli_main

    duquant.forward_plan = lambda *a, **k: (args.windows, False)
    sys.exit(cli_main(["quantize", *[r for r in rest if r != "--"]]))


if __name__ == "__main__":
    main()
