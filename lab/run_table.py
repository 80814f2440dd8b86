#!/usr/bin/env python3
"""Collect finished run folders into one JSON and a markdown table: each run's name, method, seed,
bits, wiki / c4 perplexity (as its own evaluation scored them), stage seconds, and DuQuant's alpha
choices when its rotations record them (the alpha-grid experiment of RESULTS §31).

    python lab/run_table.py /tmp/s30/sm_a0.* --json docs/results/x.json [--note "protocol ..."]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("runs", nargs="+")
ap.add_argument("--json")
ap.add_argument("--note", default="")
a = ap.parse_args()
rows = []
for run in map(Path, a.runs):
    m = run / "metrics.json"
    if not m.is_file():
        print(f"(skipped {run}: no metrics.json)")
        continue
    d = json.loads(m.read_text())
    row = {"run": run.name, "model": d["model"], "method": d["method"], "seed": d["seed"],
           "w_bits": d["w_bits"], "a_bits": d["a_bits"], "kv_bits": d["kv_bits"],
           "wiki": d["ppl"]["wiki"], "c4": d["ppl"]["c4"], "tokens": d["ppl"].get("tokens"), "seconds": d["seconds"]}
    rot = run / "rotations.safetensors"
    if rot.is_file():
        from safetensors import safe_open

        with safe_open(str(rot), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("dartquant", "{}"))
        meta = meta.get("meta", meta)
        for key in ("alpha", "alpha_grid", "alpha_chosen"):
            if key in meta:
                row[key] = meta[key]
    rows.append(row)
print("| run | W/A/KV bits | wiki | c4 | calibrate s | quantize s |")
print("|---|---|---|---|---|---|")
for r in rows:
    s = r["seconds"]
    print(f"| {r['run']} | {r['w_bits']}/{r['a_bits']}/{r['kv_bits']} | {r['wiki']:.3f} | {r['c4']:.3f} | "
          f"{s.get('calibrate', 0):.0f} | {s.get('quantize', 0):.0f} |")
if a.json:
    Path(a.json).write_text(json.dumps({"note": a.note, "rows": rows}, indent=1) + "\n")
