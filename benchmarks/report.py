#!/usr/bin/env python3
"""The headline tables of docs/RESULTS.md, generated from the JSON in docs/results/.

    python benchmarks/report.py            # rewrite the block between the headline markers
    python benchmarks/report.py --check    # exit 1 if docs/RESULTS.md is stale (tests run this)

Design choices:
* Which runs make a headline is declared here, as data (`QUALITY`, `COST`): a file name and the
  `quality.py` config string or cost row it takes. Nothing is guessed from file names, and a
  declared run that is missing is an error, not an empty cell.
* The quality JSON of one model may come from several sessions (`quality.py` / `merge_quality.py`
  files). Their runs are pooled only if they measured the same thing: every run of a model must
  have scored the same number of perplexity tokens and the same zero-shot tasks with the same
  example counts, and no (config, seed) may appear twice; otherwise the script stops.
* Mean ± sample standard deviation over seeds, formatted as `quality.py`'s own tables (3
  decimals), so a headline cell can be found verbatim in the detailed tables below it.
* The cost cells come from two benchmarks: DartQuant's whole calibration from
  `dartquant_cost.py` (every stage's GPU peak counted), the end-to-end methods from
  `e2e_cost.py`. Ratios are computed against the DartQuant cell of the same shape.
* The block is written between `<!-- headlines:begin -->` and `<!-- headlines:end -->` only;
  re-running is idempotent, and the file is replaced atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "docs" / "RESULTS.md"
RESULTS_DIR = ROOT / "docs" / "results"
BEGIN, END = "<!-- headlines:begin -->", "<!-- headlines:end -->"

# model label -> the quality.py JSON files whose runs make its rows (full held-out wiki / c4,
# 6 zero-shot tasks with --limit 100, H200; sessions 34-35's files an H100, the same GH100 chip)
QUALITY = {
    "SmolLM2-135M": ["smollm2_quality_h200.json", "smollm2_e2e_h200_session3.json",
                     "smollm2_quantloss_gptq_h200.json", "smollm2_dfrot_duquant_h200_session7.json",
                     "smollm2_duquant_seed2_h200_session12.json", "smollm2_clip_search_h200_session22.json",
                     "smollm2_gptq_options_h200_session24.json", "smollm2_asym_holdout_h200_session26.json",
                     "smollm2_qk_balance_w_mse_gptq_h100_session34.json"],
    # session 6: every Qwen row again with K's bias kept out of the K quantizer (§7, §8); the
    # rows of qwen_quality_h200.json were measured before that fix, which only FP does not touch
    "Qwen2.5-Coder-0.5B": ["qwen_kbiasfix_h200_session6.json", "qwen_quantloss_seeds12_h200_session12.json",
                           "qwen_rtn_h200_session15.json", "qwen_dqwhip_seed2_h200_session16.json",
                           "qwen_ostquant_h200_session17.json", "qwen_clip_search_h200_session22.json",
                           "qwen_gptq_options_h200_session24.json", "qwen_asym_holdout_h200_session26.json",
                           "qwen_qk_balance_w_mse_gptq_h100_session34.json", "qwen_sinks_h100_session35.json"],
    # issue 12's model, at its own protocol (§7): at most 40 windows per corpus, no zero-shot
    "Qwen2.5-Coder-1.5B (≤ 40 windows per corpus, §7)": ["qwen15_quality_h200.json"],
}
# model -> the file whose "fp" entry is its FP row, when its run files have none
FP_FROM = {"Qwen2.5-Coder-0.5B": "qwen_quality_h200.json"}
# row label -> quality.py config string (None: the full-precision model)
METHODS = {
    "FP (dequantized GGUF)": None,
    "RTN, no rotation : RTN": "rtn:rtn",
    "QuaRot : GPTQ": "quarot:gptq",
    "DartQuant, Whip : GPTQ": "dartquant:gptq",
    "DartQuant, quantization-error loss : GPTQ": "dartquant:gptq:dq_loss=quant",
    "SpinQuant : GPTQ": "spinquant:gptq",
    "OSTQuant : GPTQ": "ostquant:gptq",
    "DFRot : GPTQ": "dfrot:gptq",
    "DuQuant : GPTQ": "duquant:gptq",
    # activation clip ratios searched per input stream on calibration data (`--a-clip-search`, §24)
    "QuaRot, clip search : GPTQ": "quarot:gptq:a_clip_search=true",
    "DuQuant, clip search : GPTQ": "duquant:gptq:a_clip_search=true",
    # GPTQ's own options on top (§25): act-order + true-sequential; asymmetric (GPTAQ's target)
    "DuQuant, clip search : GPTQ act-order, true-sequential":
        "duquant:gptq:a_clip_search=true,gptq_act_order=true,gptq_true_sequential=true",
    # measured with session 24's code, the search after GPTQ; since session 25 it runs first (§26)
    "DuQuant, clip search after GPTQ : GPTQ asymmetric": "duquant:gptq:a_clip_search=true,gptq_asymmetric=true",
    # session 26 (§27): the search first, the target shrunk by cross-validation (gptq_asymmetric_holdout)
    "DuQuant, clip search : GPTQ asymmetric, holdout":
        "duquant:gptq:a_clip_search=true,gptq_asymmetric=true,gptq_asymmetric_holdout=true",
    # session 34 (§36, an H100): the weights' clip judged by GPTQ's output error (§34), Q and K balanced (§35)
    "DuQuant, clip search : GPTQ act-order, true-sequential, clip by output":
        "duquant:gptq:a_clip_search=true,gptq_act_order=true,gptq_true_sequential=true,w_mse_objective=gptq",
    "DuQuant, clip search, Q/K balance : GPTQ act-order, true-sequential":
        "duquant:gptq:a_clip_search=true,gptq_act_order=true,gptq_true_sequential=true,qk_balance=true",
    "DuQuant, clip search, Q/K balance : GPTQ act-order, true-sequential, clip by output":
        "duquant:gptq:a_clip_search=true,gptq_act_order=true,gptq_true_sequential=true,qk_balance=true,"
        "w_mse_objective=gptq",
    "QuaRot, Q/K balance : GPTQ": "quarot:gptq:qk_balance=true",
    # session 35 (§37, an H100): the sinks (§30) keep position 0's K/V (and its linears' inputs) at 16 bits
    "DuQuant, clip search, K/V sink (token 0's K/V 16-bit) : GPTQ act-order, true-sequential":
        "duquant:gptq:a_clip_search=true,gptq_act_order=true,gptq_true_sequential=true,kv_sink_tokens=1",
    "DuQuant, clip search, Q/K balance, K/V sink (token 0's K/V 16-bit) : GPTQ act-order, true-sequential, "
    "clip by output":
        "duquant:gptq:a_clip_search=true,gptq_act_order=true,gptq_true_sequential=true,qk_balance=true,"
        "w_mse_objective=gptq,kv_sink_tokens=1",
    "DuQuant, clip search, Q/K balance, both sinks (token 0 16-bit) : GPTQ act-order, true-sequential, "
    "clip by output":
        "duquant:gptq:a_clip_search=true,gptq_act_order=true,gptq_true_sequential=true,qk_balance=true,"
        "w_mse_objective=gptq,a_sink_tokens=1,kv_sink_tokens=1",
}
# model label -> (file, what differs) of quality.py jobs run one at a time with the GPU to itself (§26,
# §27, §28): their calibration time. Session 26's code draws DuQuant's random rotations on the GPU; session
# 27 measured its Cholesky QR.
ALONE = {"SmolLM2-135M": [("smollm2_calibration_alone_h200_session25.json", ""),
                          ("smollm2_calibration_alone_h200_session26.json", "rotations drawn on the GPU"),
                          ("smollm2_calibration_alone_h200_session27.json", "drawn on the GPU, Cholesky QR"),
                          ("smollm2_calibration_alone_batched_capture_h200_session27.json",
                           "drawn on the GPU, Cholesky QR, capture of 8 windows per call")],
         "Qwen2.5-Coder-0.5B": [("qwen_calibration_alone_h200_session25.json", ""),
                                ("qwen_calibration_alone_h200_session26.json", "rotations drawn on the GPU"),
                                ("qwen_calibration_alone_h200_session27.json", "drawn on the GPU, Cholesky QR"),
                                ("qwen_calibration_alone_batched_capture_h200_session27.json",
                                 "drawn on the GPU, Cholesky QR, capture of 8 windows per call")]}
SHAPES = {"llama2-7b": "Llama-2-7B", "llama3-8b": "Llama-3-8B", "llama2-70b": "Llama-2-70B"}
# (shape, method) -> (file, how to find the row). DartQuant at 7B / 8B comes from
# dartquant_cost.py: e2e_cost_7b_h200.json's DartQuant row predates counting every stage's peak.
COST_METHODS = ["DartQuant", "SpinQuant", "OSTQuant"]
COST = {
    ("llama2-7b", "DartQuant"): ("cost_h200_session4.json", {"shape": "llama2-7b"}),
    ("llama2-7b", "SpinQuant"): ("e2e_cost_7b_h200.json", {"method": "spinquant"}),
    ("llama2-7b", "OSTQuant"): ("e2e_cost_7b_h200.json", {"method": "ostquant"}),
    ("llama3-8b", "DartQuant"): ("cost_h200_session4.json", {"shape": "llama3-8b"}),
    ("llama2-70b", "DartQuant"): ("e2e_cost_70b_h200.json", {"method": "dartquant"}),
    ("llama2-70b", "SpinQuant"): ("e2e_cost_70b_h200.json", {"method": "spinquant"}),
    ("llama2-70b", "OSTQuant"): ("e2e_cost_70b_h200.json", {"method": "ostquant"}),
}


def fmt(values: list[float], digits: int = 3) -> str:
    """Mean ± sample std, as benchmarks/quality.py prints it."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _load(results: Path, name: str) -> dict:
    path = results / name
    if not path.is_file():
        raise SystemExit(f"report: {path} is declared in benchmarks/report.py but does not exist")
    return json.loads(path.read_text())


def _protocol(entry: dict) -> tuple:
    """What a quality row measured: perplexity tokens and (task, examples) pairs."""
    zs = entry.get("zeroshot") or {}
    return entry["ppl"].get("tokens"), tuple(sorted((t, v.get("n")) for t, v in zs.get("tasks", {}).items()))


def quality_rows(results: Path, model: str) -> list[dict]:
    """One dict per METHODS row of `model`: label, seeds, and the per-seed wiki / c4 / 0-shot values."""
    fp, runs, seen = None, [], set()
    if model in FP_FROM:
        fp = _load(results, FP_FROM[model])["fp"]
    for name in QUALITY[model]:
        data = _load(results, name)
        if data.get("fp"):
            fp = fp or data["fp"]
        for r in data["runs"]:
            key = (r["config"], r["seed"])
            if key in seen:
                raise SystemExit(f"report: {model}: {key} appears twice in {QUALITY[model]}")
            seen.add(key)
            runs.append(r)
    rows = []
    for label, config in METHODS.items():
        chosen = [fp] if config is None and fp else [r for r in runs if r["config"] == config]
        if not chosen:
            if config is None:
                raise SystemExit(f"report: {model}: no FP entry in {QUALITY[model]}")
            rows.append({"label": label, "seeds": "0", "wiki": [], "c4": [], "zs": [], "calib": [], "protocol": set()})
            continue
        rows.append({"label": label, "seeds": "-" if config is None else str(len(chosen)),
                     "wiki": [r["ppl"]["wiki"] for r in chosen], "c4": [r["ppl"]["c4"] for r in chosen],
                     "zs": [r["zeroshot"]["avg"] for r in chosen if r.get("zeroshot")],
                     "calib": [calibration_seconds(r) for r in chosen if config is not None],
                     "grid": {lr_grid_size(r) for r in chosen},
                     "protocol": {_protocol(r) for r in chosen}})
    protocols = set().union(*(row.pop("protocol") for row in rows))
    if len(protocols) != 1:
        raise SystemExit(f"report: {model}: the runs measured different things (tokens, tasks): {protocols}")
    return rows


def calibration_seconds(run: dict) -> float:
    """A run's calibration: capturing activations and fitting rotations (the `capture` and `calibrate`
    stages; GPTQ and evaluation are the same work for every method and are not counted)."""
    s = run["seconds"]
    return s.get("capture", 0.0) + s.get("calibrate", 0.0)


def lr_grid_size(run: dict) -> int:
    """How many learning rates a run calibrated to choose one (`--dq-lr-grid`; 0: none)."""
    selection = (run.get("calibration") or {}).get("lr_selection") or {}
    return len(selection.get("r1", {}).get("grid", []))


def quality_table(results: Path) -> list[str]:
    lines = ["| model | method : weights | seeds | wiki ppl | c4 ppl | 0-shot avg | calibration s |",
             "|---|---|---|---|---|---|---|"]
    for model in QUALITY:
        rows = quality_rows(results, model)
        quantized = [r for r in rows if r["seeds"] not in ("-", "0")]
        # best quantized mean per column: lowest perplexity, highest accuracy
        best = {"wiki": min(statistics.mean(r["wiki"]) for r in quantized),
                "c4": min(statistics.mean(r["c4"]) for r in quantized),
                "zs": max((statistics.mean(r["zs"]) for r in quantized if r["zs"]), default=None)}
        for i, r in enumerate(rows):
            if r["seeds"] == "0":
                lines.append(f"| {model if i == 0 else ''} | {r['label']} | - | not measured | | | |")
                continue
            cells = []
            for col in ("wiki", "c4", "zs"):
                text = fmt(r[col])
                bold = r["seeds"] != "-" and r[col] and statistics.mean(r[col]) == best[col]
                cells.append(f"**{text}**" if bold else text)
            grid = f" (lr grid of {max(r['grid'])})" if max(r["grid"], default=0) else ""
            cells.append(f"{statistics.mean(r['calib']):.0f}{grid}" if r["calib"] else "-")
            lines.append(f"| {model if i == 0 else ''} | {r['label']} | {r['seeds']} | " + " | ".join(cells) + " |")
    return lines


def alone_table(results: Path) -> list[str]:
    """Calibration (capture + calibrate stages) of one run per method, each alone on the GPU, and its
    ratio to SpinQuant's on the same model (issue 17's bound: at most 1/5)."""
    label_of = {config: label for label, config in METHODS.items() if config}
    lines = ["| model | method : weights | capture s | calibrate s | calibration s | / SpinQuant's | peak GPU, whole run |",
             "|---|---|---|---|---|---|---|"]
    for model, files in ALONE.items():
        runs = [(r, note) for name, note in files for r in _load(results, name)["runs"]]
        spin = [calibration_seconds(r) for r, _ in runs if r["config"] == "spinquant:gptq"]
        if len(spin) != 1:
            raise SystemExit(f"report: {files}: expected one SpinQuant run, found {len(spin)}")
        for i, (r, note) in enumerate(runs):
            s = r["seconds"]
            label = label_of.get(r["config"], r["config"]) + (f" ({note})" if note else "")
            lines.append(f"| {model if i == 0 else ''} | {label} | {s.get('capture', 0):.1f} | {s.get('calibrate', 0):.1f} | "
                         f"{calibration_seconds(r):.1f} | {calibration_seconds(r) / spin[0]:.2f} | "
                         f"{_gib(r['peak_memory_bytes']['cuda'] / 2**30)} |")
    return lines


def _cost_row(results: Path, name: str, match: dict) -> dict:
    rows = [r for r in _load(results, name)["rows"] if all(r.get(k) == v for k, v in match.items())]
    if len(rows) != 1:
        raise SystemExit(f"report: {name}: {len(rows)} rows match {match}, expected 1")
    r = rows[0]
    if r.get("error"):
        raise SystemExit(f"report: {name}: the row {match} failed ({r['error']})")
    seconds = r["total_s"] if "total_s" in r else r["full_schedule_s"]
    return {"s": seconds, "gib": r["peak_gpu_GiB"], "layers_from": r.get("extrapolated_from_layers")}


def _seconds(s: float) -> str:
    return f"{s:,.0f} s" if s >= 100 else f"{s:.1f} s"


def _gib(g: float) -> str:
    return f"{g:.2f} GiB" if g < 10 else f"{g:.1f} GiB"


def cost_table(results: Path) -> list[str]:
    lines = ["| shape | " + " | ".join(COST_METHODS) + " |", "|---|" + "---|" * len(COST_METHODS)]
    for shape, label in SHAPES.items():
        cells = {m: _cost_row(results, *COST[(shape, m)]) for m in COST_METHODS if (shape, m) in COST}
        layers = {tuple(c["layers_from"]) for c in cells.values() if c["layers_from"]}
        if layers:
            label += " (extrapolated in depth from " + " and ".join(map(str, sorted(layers)[0])) + " layers)"
        dq = cells["DartQuant"]
        out = []
        for m in COST_METHODS:
            c = cells.get(m)
            if c is None:
                out.append("not measured")
                continue
            text = f"{_seconds(c['s'])}, {_gib(c['gib'])}"
            if m != "DartQuant":
                text += f" ({c['s'] / dq['s']:.1f}× / {c['gib'] / dq['gib']:.1f}×)"
            out.append(text)
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    return lines


def _paper_line(results: Path) -> str:
    p7 = _load(results, "e2e_cost_7b_h200.json")["paper_7b"]
    p70 = _load(results, "e2e_cost_70b_h200.json")["paper_70b_ratios"]["spinquant_vs_dartquant"]
    return (f"Paper (A800; the `paper_*` fields of the e2e_cost JSON): Llama-2-7B DartQuant {_seconds(p7['dartquant']['hours'] * 3600)}, "
            f"{_gib(p7['dartquant']['GiB'])}; SpinQuant {_seconds(p7['spinquant']['hours'] * 3600)}, "
            f"{_gib(p7['spinquant']['GiB'])}. Llama-2-70B: SpinQuant {p70['time']}× DartQuant's time, "
            f"{p70['memory']}× its memory.")


def render(results: Path = RESULTS_DIR) -> str:
    """The generated block, markers included."""
    quality_files = ", ".join(f"`{f}`" for f in dict.fromkeys([*(f for fs in QUALITY.values() for f in fs),
                                                               *FP_FROM.values()]))
    cost_files = ", ".join(f"`{f}`" for f in dict.fromkeys(name for name, _ in COST.values()))
    lines = [BEGIN,
             "<!-- generated by `python benchmarks/report.py` from docs/results/*.json; do not edit by hand -->",
             "",
             "**Quality**: W4A4KV4 (weights 4-bit per channel, activations 4-bit per token, KV 4-bit per",
             "group of 64), full held-out wiki / c4 perplexity (lower is better; the 1.5B model: its first",
             "windows, §7), 6 zero-shot tasks with the first 100 examples each (higher is better), mean ± std",
             "over seeds, H200 (the `_h100_` files: an H100, the same GH100 chip); best quantized value per model",
             "in bold; the rows named \"sink\" keep position 0's K/V (\"both sinks\": and its linears' inputs) at",
             "16 bits, outside the strict W4A4KV4 protocol (§30, §37). Calibration s: the mean of the runs' capture + calibrate stages (GPTQ and evaluation",
             "excluded), measured while 3-14 jobs shared the GPU:",
             "indicative only, and a run that chose its learning rate on a grid calibrated once per candidate;",
             "the cost table below measures one calibration alone. Protocol: §2. Sources: " + quality_files + ".",
             "", *quality_table(results), "",
             "**Calibration alone** on the bundled models: one seed-0 job per method with the H200 to itself,",
             "the same capture + calibrate stages (SpinQuant at its published 100 steps of 8 × 2048 tokens, all 8",
             "sequences per forward), and the ratio to SpinQuant's (§26-§28). Sources: " +
             ", ".join(f"`{name}`" for files in ALONE.values() for name, _ in files) + ".",
             "", *alone_table(results), "",
             "**Calibration cost** on one H200 (random weights of the real shapes): time, peak GPU memory, and",
             "for the end-to-end methods (100 steps × 8 × 2048 tokens, extrapolated from 2 timed steps) their",
             "time / memory over DartQuant's. At Llama-2-7B and -3-8B DartQuant's cell is `dartquant_cost.py`'s",
             "whole calibration (every stage's peak counted), a separate run from the end-to-end cells.",
             "Protocol: §3, §6b. Sources: " + cost_files + ".",
             "", *cost_table(results), "",
             _paper_line(results),
             END]
    return "\n".join(lines)


def splice(text: str, block: str) -> str:
    """`text` with the block between the markers replaced by `block`."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"report: {RESULTS_MD.name} needs exactly one {BEGIN} ... {END} pair")
    head, rest = text.split(BEGIN)
    return head + block + rest.split(END, 1)[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")
    ap.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of the JSON files")
    ap.add_argument("--md", type=Path, default=RESULTS_MD, help="the Markdown file to update")
    args = ap.parse_args(argv)
    text = args.md.read_text()
    new = splice(text, render(args.results))
    if args.check:
        if new != text:
            print(f"{args.md} is stale: run `python benchmarks/report.py`", file=sys.stderr)
            return 1
        return 0
    if new != text:
        with tempfile.NamedTemporaryFile("w", dir=args.md.parent, delete=False, suffix=".tmp") as f:
            f.write(new)
        os.replace(f.name, args.md)
    print(render(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
