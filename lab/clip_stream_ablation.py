#!/usr/bin/env python3
"""Issue 17: which input streams' searched clip ratios help or hurt (eval only, paired).

A run with the fixed clip and its `--a-clip-search true` twin have the same weights (the search
changes no GPTQ input, RESULTS §15d), so installing a subset of the searched ratios on the fixed
run isolates each stream kind. For each subset a variant folder is made beside OUT (the fixed run's
files hard-linked, its dartquant.json given `act_clips` = the subset) and scored by `dartquant ppl`.

    python lab/clip_stream_ablation.py runs/clip13q/qwen2.5-coder-0.5b-quarot-s0-search-false \
        runs/clip13q/qwen2.5-coder-0.5b-quarot-s0-search-true --out runs/clip14q --max-windows 8 \
        --subsets qkv,o gate,up,down down qkv,o,down
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

KINDS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate": ("gate_proj",), "up": ("up_proj",),
         "down": ("down_proj",)}


def variant(fixed: Path, clips: dict[str, float], out: Path) -> Path:
    if (out / "dartquant.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    for f in fixed.iterdir():
        if f.is_file() and f.name != "dartquant.json" and not (tmp / f.name).exists():
            os.link(f, tmp / f.name)
    spec = json.loads((fixed / "dartquant.json").read_text())
    spec["act_clips"] = clips
    (tmp / "dartquant.json").write_text(json.dumps(spec, indent=1))
    os.replace(tmp, out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fixed", type=Path)
    ap.add_argument("searched", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--subsets", nargs="+", required=True, help="comma-joined kinds of " + ", ".join(KINDS))
    args = ap.parse_args()
    chosen = json.loads((args.searched / "dartquant.json").read_text())["act_clips"]
    record = args.out / "ablation.json"  # subsets already scored are kept, not re-run
    results = json.loads(record.read_text())["results"] if record.is_file() else {}
    for subset in args.subsets:
        if subset in results:
            continue
        kinds = subset.split(",")
        suffixes = tuple(s for k in kinds for s in KINDS[k])
        clips = {n: c for n, c in chosen.items() if n.endswith(suffixes)}
        folder = variant(args.fixed, clips, args.out / f"clips-{subset.replace(',', '+')}")
        p = subprocess.run([sys.executable, "-m", "dartquant.cli", "ppl", str(folder), "--max-windows",
                            str(args.max_windows), "--json"], capture_output=True, text=True)
        if p.returncode:
            print(p.stderr[-2000:], file=sys.stderr)
            return 1
        ppl = json.loads(p.stdout.strip().splitlines()[-1])
        results[subset] = {"streams": len(clips), "wiki": ppl["wiki"], "c4": ppl["c4"]}
        print(f"{subset:>16}: {len(clips):3d} linears  wiki {ppl['wiki']:.3f}  c4 {ppl['c4']:.3f}", flush=True)
        record.write_text(json.dumps(
            {"fixed": str(args.fixed), "searched": str(args.searched), "max_windows": args.max_windows,
             "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
