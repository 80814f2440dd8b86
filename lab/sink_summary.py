"""Session 29: the table of RESULTS §30 from lab/prefix_tokens_probe.py --sinks JSON files.

Per setting (a_sink_tokens, kv_sink_tokens): mean ± std over the run folders (seeds) of wiki / c4
perplexity, and the share of the as-run gap to FP that the setting closes, paired per seed.
    python lab/sink_summary.py --fp FP.json --runs SINKS.json [--baseline QUAROT_SINKS.json]
FP.json: `dartquant eval MODEL --eval-max-windows N --json` on the same windows. With --baseline
(QuaRot's runs of the same model), the share is also given of QuaRot's as-run gap (the issue's measure).
"""
import argparse
import json
import statistics


def rows_by_setting(path):
    out = {}
    for r in json.load(open(path))["rows"]:
        out.setdefault((r["a_sink_tokens"], r["kv_sink_tokens"]), []).append(r)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp", required=True)
    ap.add_argument("--runs", required=True)
    ap.add_argument("--baseline")
    args = ap.parse_args()
    fp = json.load(open(args.fp))["ppl"]
    by = rows_by_setting(args.runs)
    base = by[(0, 0)]
    quarot = rows_by_setting(args.baseline)[(0, 0)] if args.baseline else None
    print("| a_sink / kv_sink | wiki | c4 | gap closed (wiki / c4), paired | of QuaRot's gap |")
    print("|---|---|---|---|---|")
    for key, rows in by.items():
        cells = []
        for c in ("wiki", "c4"):
            v = [r[c] for r in rows]
            cells.append(f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}")
        share = []
        for c in ("wiki", "c4"):
            s = [(b[c] - r[c]) / (b[c] - fp[c]) for b, r in zip(base, rows)]
            share.append(f"{100 * statistics.mean(s):+.1f} %")
        of_q = ""
        if quarot:
            q = []
            for c in ("wiki", "c4"):
                qm = statistics.mean(r[c] for r in quarot)
                q.append(f"{100 * (qm - statistics.mean(r[c] for r in rows)) / (qm - fp[c]):.0f} %")
            of_q = " / ".join(q)
        print(f"| {key[0]} / {key[1]} | {cells[0]} | {cells[1]} | {' / '.join(share)} | {of_q} |")
    print(f"FP: wiki {fp['wiki']:.3f}, c4 {fp['c4']:.3f}")


if __name__ == "__main__":
    main()
