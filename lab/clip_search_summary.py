"""Summarize lab/clip_search_sweep.sh: per method, the paired wiki / c4 perplexities with the fixed
clip and with `--a-clip-search`, and the share of the gap to FP the search closes.

    python lab/clip_search_summary.py runs/clip13 --fp-wiki 13.0 --fp-c4 30.0 --out docs/results/x.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("root")
ap.add_argument("--fp-wiki", type=float, required=True)
ap.add_argument("--fp-c4", type=float, required=True)
ap.add_argument("--out")
a = ap.parse_args()
fp = {"wiki": a.fp_wiki, "c4": a.fp_c4}
rows: dict = {}
for m in sorted(Path(a.root).glob("*/metrics.json")):
    name = re.match(r"(.*)-(\w+)-s(\d+)-search-(true|false)$", m.parent.name)
    model, method, seed, search = name.groups()
    metrics = json.loads(m.read_text())
    row = rows.setdefault((model, method), {}).setdefault(int(seed), {})
    row[search] = metrics["ppl"]
    if search == "true":
        row["search"] = {k: v for k, v in metrics["act_clip_search"].items() if k != "chosen"}
        row["seconds_quantize"] = metrics["seconds"].get("quantize")
out = {"fp": fp, "rows": []}
print("| model | method | seed | wiki clip 0.9 | wiki searched | c4 clip 0.9 | c4 searched | wiki gap closed | c4 gap closed | streams changed |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (model, method), seeds in sorted(rows.items()):
    closed = {"wiki": [], "c4": []}
    for seed, r in sorted(seeds.items()):
        if "true" not in r or "false" not in r:
            continue
        share = {c: (r["false"][c] - r["true"][c]) / (r["false"][c] - fp[c]) for c in fp}
        for c in fp:
            closed[c].append(share[c])
        print(f"| {model} | {method} | {seed} | {r['false']['wiki']:.3f} | {r['true']['wiki']:.3f} | {r['false']['c4']:.3f} | "
              f"{r['true']['c4']:.3f} | {100 * share['wiki']:.1f} % | {100 * share['c4']:.1f} % | "
              f"{r['search']['changed']} / {r['search']['streams']} |")
        out["rows"].append({"model": model, "method": method, "seed": seed, "fixed": r["false"], "searched": r["true"],
                            "gap_closed": share, "search": r["search"]})
    if closed["wiki"]:
        print(f"| {model} | {method} | mean | | | | | {100 * statistics.mean(closed['wiki']):.1f} % | "
              f"{100 * statistics.mean(closed['c4']):.1f} % | |")
# the yardstick: the share of QuaRot's gap to FP (fixed clip, mean over seeds) each setting closes
print("\n| model | method | clip | seeds | wiki | c4 | share of QuaRot's wiki gap | c4 gap |")
print("|---|---|---|---|---|---|---|---|")
out["means"] = []
for (model, method), seeds in sorted(rows.items()):
    ref = rows.get((model, "quarot"), {})
    ref_mean = {c: statistics.mean(r["false"][c] for r in ref.values() if "false" in r) for c in fp} if ref else None
    for search, label in (("false", "0.9"), ("true", "searched")):
        vals = {c: [r[search][c] for r in seeds.values() if search in r] for c in fp}
        if not vals["wiki"]:
            continue
        mean = {c: statistics.mean(v) for c, v in vals.items()}
        sd = {c: statistics.stdev(v) if len(v) > 1 else 0.0 for c, v in vals.items()}
        share = {c: (ref_mean[c] - mean[c]) / (ref_mean[c] - fp[c]) for c in fp} if ref_mean else None
        print(f"| {model} | {method} | {label} | {len(vals['wiki'])} | {mean['wiki']:.3f} ± {sd['wiki']:.3f} | "
              f"{mean['c4']:.3f} ± {sd['c4']:.3f} | " + (f"{100 * share['wiki']:.1f} % | {100 * share['c4']:.1f} % |"
                                                          if share else "- | - |"))
        out["means"].append({"model": model, "method": method, "clip": label, "seeds": len(vals["wiki"]),
                             "mean": mean, "std": sd, "share_of_quarot_gap": share})
if a.out:
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
