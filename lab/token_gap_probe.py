"""Issue 17, item 1 (CPU probe, one-off): which tokens carry a W4A4KV4 run's activation cost in chosen layers.

RESULTS §53 found the cost of Qwen's recipe in the MLP inputs of a few layers. This asks which tokens: at the
chosen layers' input streams, only the rows a criterion picks pass through at 16 bits (every other quantizer as
run), and held-out perplexity says how much of the run's A4 + KV4 cost those rows hold. Criteria, per call (one
2048-token window):
    none, all  no rows (reproduces the run's row) / every row (layer_gap_probe's stream row)
    first:N    positions < N
    err:P      the fraction P of rows with the largest squared 4-bit error at that quantizer
    massive:P  the fraction P of rows with the largest |h|_max / rms(h) of the block's input residual h
               (massive activations, Sun et al. 2024)
`--stats` first prints, per layer and stream, how the squared error is spread over the rows: the share position 0,
the top 1 % and the top 5 % of rows hold, and how many of the top 1 % by error are massive-activation rows.
    PYTHONPATH=src python lab/token_gap_probe.py RUN --groups 2-5,23 --parts mlp_in down \
        --select first:1 err:0.01 err:0.1 massive:0.01 --windows 4 --baselines PRIOR.json --stats --json OUT
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from layer_gap_probe import STREAMS, load_wrapped, parse_group, read_baselines, rewrap  # noqa: E402

from dartquant.adapters import adapter_for  # noqa: E402
from dartquant.data import eval_windows  # noqa: E402
from dartquant.eval.ppl import perplexity  # noqa: E402


def top_rows(score: torch.Tensor, frac: float) -> torch.Tensor:
    """bool mask of the round(frac * n) (at least 1) highest of `score` [rows]."""
    k = max(1, int(round(frac * score.numel())))
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask[score.topk(k).indices] = True
    return mask


class Residuals:
    """Per decoder layer, the last call's |h|_max / rms(h) of the block's input rows (flattened)."""

    def __init__(self, model):
        self.massive: dict[int, torch.Tensor] = {}
        for i, block in enumerate(adapter_for(model).decoder_layers(model)):
            block.register_forward_pre_hook(self._hook(i), with_kwargs=True)

    def _hook(self, i):
        def pre(module, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).flatten(0, -2).float()
            self.massive[i] = h.abs().amax(-1) / h.pow(2).mean(-1).sqrt().clamp_min(1e-12)
        return pre


def selector(criterion: str, layer: int, res: Residuals):
    """A function (x, y) -> bool [rows] of the rows to pass at 16 bits."""
    kind, _, arg = criterion.partition(":")
    if kind == "none":  # a check: reproduces the run's own row
        return lambda x, y: torch.zeros(x.shape[:-1], dtype=torch.bool).flatten()
    if kind == "all":
        return lambda x, y: torch.ones(x.shape[:-1], dtype=torch.bool).flatten()
    if kind == "first":
        n = int(arg)
        return lambda x, y: torch.arange(x.shape[-2]).repeat(x.numel() // x.shape[-1] // x.shape[-2]) < n
    if kind == "err":
        return lambda x, y: top_rows((y - x).flatten(0, -2).pow(2).sum(-1), float(arg))
    if kind == "massive":
        return lambda x, y: top_rows(res.massive[layer], float(arg))
    raise SystemExit(f"--select: unknown criterion {criterion!r} (none, all, first:N, err:P, massive:P)")


class Stats:
    """Per (layer, stream), over all calls: squared-error shares of position 0 / top 1 % / top 5 % rows."""

    def __init__(self):
        self.acc: dict[tuple, dict] = {}

    def recorder(self, key, layer, res: Residuals):
        def rec(x, y):
            e = (y - x).flatten(0, -2).double().pow(2).sum(-1)
            rel = e / x.flatten(0, -2).double().pow(2).sum(-1).clamp_min(1e-30)
            seq = x.shape[-2]
            top1, top5 = top_rows(e, 0.01), top_rows(e, 0.05)
            heavy = top_rows(res.massive[layer], 0.01)
            a = self.acc.setdefault(key, {"total": 0.0, "pos0": 0.0, "top1": 0.0, "top5": 0.0, "rows": 0,
                                          "top1_massive": 0, "top1_rows": 0, "rel_sum": 0.0, "rel_max": 0.0})
            a["total"] += e.sum().item()
            a["pos0"] += e[::seq].sum().item()
            a["top1"] += e[top1].sum().item()
            a["top5"] += e[top5].sum().item()
            a["rows"] += e.numel()
            a["top1_massive"] += (top1 & heavy).sum().item()
            a["top1_rows"] += top1.sum().item()
            a["rel_sum"] += rel.sum().item()
            a["rel_max"] = max(a["rel_max"], rel.max().item())
            return torch.zeros_like(e, dtype=torch.bool)
        return rec

    def report(self):
        out = {}
        for (layer, stream), a in sorted(self.acc.items()):
            row = {"pos0": a["pos0"] / a["total"], "top1pct": a["top1"] / a["total"], "top5pct": a["top5"] / a["total"],
                   "top1_that_are_massive": a["top1_massive"] / max(1, a["top1_rows"]),
                   "rel_err_mean": a["rel_sum"] / a["rows"], "rel_err_max": a["rel_max"]}
            out[f"{layer}.{stream}"] = row
            print(f"layer {layer:2d} {stream:7s} share of sq. error: pos0 {row['pos0']:6.1%}  top1% {row['top1pct']:6.1%}"
                  f"  top5% {row['top5pct']:6.1%}   top1% rows massive {row['top1_that_are_massive']:6.1%}"
                  f"   rel err mean {row['rel_err_mean']:.4f} max {row['rel_err_max']:.4f}", flush=True)
        return out


class RowBypass(torch.nn.Module):
    """Wraps a layer_gap_probe Bypass: `pick(x, y)` -> rows that skip the 4-bit quantizer."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.pick = inner, None

    def forward(self, x):
        y = self.inner(x)
        if self.pick is None or self.inner.off:
            return y
        keep = self.pick(x, y).reshape(x.shape[:-1])
        return torch.where(keep.unsqueeze(-1), x, y)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--groups", nargs="+", required=True, help="layer groups, e.g. 2-5,23")
    ap.add_argument("--parts", nargs="+", choices=STREAMS, default=["mlp_in", "down"])
    ap.add_argument("--select", nargs="+", default=["first:1", "err:0.01", "err:0.1", "massive:0.01"])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--stats", action="store_true", help="first, one pass with the error spread over rows")
    ap.add_argument("--baselines", help="a layer_gap_probe JSON of the same run and windows (as run, W4 only)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if not args.baselines:
        raise SystemExit("--baselines: run layer_gap_probe.py on this run first (its as-run and W4-only rows)")
    model, tok, layers = load_wrapped(args.run)
    res = Residuals(model)
    # a RowBypass around each wrapped activation quantizer of the chosen layers and streams
    chosen = {}
    for g in args.groups:
        for i in parse_group(g):
            for part in args.parts:
                for b in layers[i][part]:
                    chosen.setdefault((i, part), []).append(rewrap(model, b, lambda q, _: RowBypass(q)))
    data = {c: eval_windows(tok, c, seqlen=2048, max_windows=args.windows) for c in ("wiki", "c4")}
    out = {"run": args.run, "groups": args.groups, "parts": args.parts, "windows": args.windows,
           "rows": read_baselines(args.baselines, args.run, args.windows)}
    if args.stats:
        stats = Stats()
        for (i, part), rbs in chosen.items():
            for rb in rbs:
                rb.pick = stats.recorder((i, part), i, res)
        for c, w in data.items():
            perplexity(model, w, progress=False)
        out["stats"] = stats.report()
    full, w4 = out["rows"][0], out["rows"][1]
    for crit in args.select:
        for (i, part), rbs in chosen.items():
            for rb in rbs:
                rb.pick = selector(crit, i, res)
        row = {"setting": f"{crit} rows of {'+'.join(args.parts)} 16-bit in layers {' '.join(args.groups)}",
               "windows": args.windows}
        for c, w in data.items():
            row[c] = perplexity(model, w, progress=False)["ppl"]
            row[f"{c}_share"] = (full[c] - row[c]) / (full[c] - w4[c])
        out["rows"].append(row)
        print(f"{row['setting']:60s} wiki {row['wiki']:.3f}  c4 {row['c4']:.3f}   share "
              f"{row['wiki_share']:.1%} / {row['c4_share']:.1%}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
