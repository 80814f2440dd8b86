#!/usr/bin/env python3
"""Merge quality.py JSON files (e.g. from parallel GPU jobs, one per config and seed) into one
JSON and one mean +- spread table:

    python benchmarks/merge_quality.py /tmp/res/sm_*.json --out docs/results/smollm2_quality_all.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    merged: dict = {"sources": [], "runs": [], "fp": None, "dq_lr_selection": {}}
    for f in args.files:
        d = json.loads(Path(f).read_text())
        if "sources" in d:  # an already merged file: keep the sources it lists
            merged["sources"] += d["sources"]
        else:
            merged["sources"].append({"file": Path(f).name, "args": d.get("args"), "machine": d.get("machine")})
        merged["runs"] += d.get("runs", [])
        merged["fp"] = merged["fp"] or d.get("fp")
        merged["dq_lr_selection"].update(d.get("dq_lr_selection") or {})
    order = {}
    for r in merged["runs"]:
        order.setdefault(r["config"], len(order))
    merged["runs"].sort(key=lambda r: (order[r["config"]], r["seed"]))
    merged["table"] = table(merged)
    Path(args.out).write_text(json.dumps(merged, indent=1))
    print("\n".join(merged["table"]))


if __name__ == "__main__":
    main()
