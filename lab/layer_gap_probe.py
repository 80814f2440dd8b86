"""Issue 17, item 1 (CPU probe, one-off): which layers carry a W4A4KV4 run's activation and K/V cost.

Loads a quantized run folder and evaluates held-out perplexity with the activation quantizers (every decoder
linear's input) and the K/V quantizers of one group of layers bypassed at a time, the weights staying 4-bit.
Paired on the same weights (no run-to-run round-off): the rows "as run" (all quantizers on) and "W4 only" (every
activation and K/V quantizer off) bound the A4 + KV4 cost; each group's row says how much of it that group's
quantizers hold, alone (the parts need not add up: the errors compound).
    PYTHONPATH=src python lab/layer_gap_probe.py RUN --groups 0 1 2-3,23 --windows 4 [--parts a kv down] --json OUT
    (--baselines PRIOR.json reuses a previous run's two reference rows)
"""
import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from quantizer_parts_probe import Bypass, wrap  # noqa: E402

from dartquant.data import eval_windows  # noqa: E402
from dartquant.eval.ppl import perplexity  # noqa: E402
from dartquant.quant.act_clip import stream_of  # noqa: E402
from dartquant.zoo import load_model  # noqa: E402

LAYER = re.compile(r"\blayers\.(\d+)\.")
STREAMS = ("attn_in", "o", "mlp_in", "down")


def wrap_by_layer(model):
    """{layer index: {"a": [...], "kv": [...], stream: [...]}} of the Bypass wrappers `quantizer_parts_probe.wrap`
    puts on every quantizer, by decoder layer; the streams (act_clip's: attn_in = q/k/v, o, mlp_in = gate/up,
    down) split "a"."""
    wrap(model)
    found = {}
    for name, m in model.named_modules():
        hit = LAYER.search(name + ".")
        if hit is None:
            continue
        slot = found.setdefault(int(hit.group(1)), {"a": [], "kv": [], **{s: [] for s in STREAMS}})
        q = getattr(m, "input_quantizer", None)
        if isinstance(q, Bypass):
            slot["a"].append(q)
            slot[stream_of(name.rsplit(".", 1)[-1].removesuffix("_proj"))].append(q)
        slot["kv"] += [q for q in (getattr(m, "k_quantizer", None), getattr(m, "v_quantizer", None))
                       if isinstance(q, Bypass)]
    return found


def load_wrapped(run: str):
    """(model in float32 and eval mode, tokenizer, `wrap_by_layer`'s dict) of a run folder."""
    model, tok = load_model(run, dtype=torch.float32)
    model.eval()
    return model, tok, wrap_by_layer(model)


def rewrap(model, quantizer, make):
    """Put make(quantizer, owner) where `quantizer` sits (its linear's input_quantizer); returns it."""
    owner = next(m for m in model.modules() if getattr(m, "input_quantizer", None) is quantizer)
    owner.input_quantizer = new = make(quantizer, owner)
    return new


def read_baselines(path: str, run: str, windows: int) -> list[dict]:
    """The first two rows (as run, W4 only) of a previous layer_gap_probe JSON on the same run and windows."""
    prior = json.loads(Path(path).read_text())
    if prior["run"] != run or prior["rows"][0]["windows"] != windows:
        raise SystemExit(f"--baselines: {path} is of {prior['run']} on {prior['rows'][0]['windows']} windows, "
                         f"not {run} on {windows}")
    return prior["rows"][:2]


def parse_group(text: str) -> list[int]:
    """'2-5,23' -> [2, 3, 4, 5, 23]"""
    out = []
    for piece in text.split(","):
        lo, _, hi = piece.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--groups", nargs="+", required=True, help="layer groups, e.g. 0 1 2-5 (inclusive)")
    ap.add_argument("--parts", nargs="+", choices=["a", "kv", "a+kv", *STREAMS], default=["a+kv"],
                    help="what to bypass in a group: its activation quantizers, its K/V ones, both, or one input "
                    "stream's activation quantizers")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--baselines", help="a previous JSON of this probe on the same run and windows: its first two "
                    "rows (as run, W4 only) are reused instead of evaluated again")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model, tok, layers = load_wrapped(args.run)
    every = [q for slot in layers.values() for q in slot["a"] + slot["kv"]]
    print(f"{args.run}: {len(layers)} layers, {len(every)} quantizers", flush=True)
    data = {c: eval_windows(tok, c, seqlen=2048, max_windows=args.windows) for c in ("wiki", "c4")}
    settings = [("as run", []), ("W4 only (A16 KV16)", every)]
    for part in args.parts:
        for g in args.groups:
            idx = parse_group(g)
            off = [q for i in idx for kind in part.split("+") for q in layers[i][kind]]
            settings.append((f"{part} 16-bit in layers {g}", off))
    rows = []
    if args.baselines:
        rows, settings = read_baselines(args.baselines, args.run, args.windows), settings[2:]
    for name, off in settings:
        for q in every:
            q.off = False
        for q in off:
            q.off = True
        row = {"setting": name, "quantizers_off": len(off), "windows": args.windows}
        for c, w in data.items():
            row[c] = perplexity(model, w, progress=False)["ppl"]
        if len(rows) >= 2:  # share of the run's A4 + KV4 cost this group's quantizers hold alone
            for c in data:
                full, w4 = rows[0][c], rows[1][c]
                row[f"{c}_share"] = (full - row[c]) / (full - w4) if full != w4 else None
        rows.append(row)
        share = "" if row.get("wiki_share") is None or row.get("c4_share") is None else \
            f"   share {row['wiki_share']:.1%} / {row['c4_share']:.1%}"
        print(f"{name:32s} wiki {row['wiki']:.3f}  c4 {row['c4']:.3f}{share}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"run": args.run, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
