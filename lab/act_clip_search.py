"""Issue 17 probe: does a per-linear activation clip ratio, chosen on calibration data by the
linear's own output error, recover part of the W4A4 gap? (RESULTS §14: the gate/up input's 4-bit
activations carry the largest share of QuaRot's gap on both bundled models.)

For a quantized run folder: run calibration windows (never the evaluation split) through the
model as it computes (quantized activations upstream), keep a seeded random sample of the rows each
linear's input quantizer sees, and pick for each input stream (q/k/v share one, gate/up one, o and
down their own) the clip ratio of the per-token quantizer that minimizes

    sum over the stream's linears of || (Q_c(x) - x) W^T ||^2      (W: the linear's GPTQ weight)

over a grid (or one clip per kind of stream, or one for all: `--scopes`); then evaluate perplexity
before and after on the same held-out windows (a paired
comparison: same rotations, same GPTQ weights). CPU, minutes on SmolLM2:

    python lab/act_clip_search.py --run runs/quickstart --eval-max-windows 8 --out clip.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dartquant.data import calib_windows  # noqa: E402
from dartquant.eval.ppl import evaluate_ppl  # noqa: E402
from dartquant.modules import QLinear  # noqa: E402
from dartquant.quant.act import ActQuantizer  # noqa: E402
from dartquant.quant.primitives import fake_quantize  # noqa: E402
from dartquant.zoo import load_model  # noqa: E402

STREAM = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_in", "up_proj": "mlp_in",
          "o_proj": "o_in", "down_proj": "down_in"}


def stream_of(name: str) -> str:
    """'model.layers.3.mlp.up_proj' -> 'model.layers.3/mlp_in' (linears reading one tensor share it)."""
    m = re.match(r"(.*layers\.\d+)\..*?(\w+_proj)$", name)
    if m is None or m.group(2) not in STREAM:
        raise ValueError(f"cannot place {name} in a stream")
    return f"{m.group(1)}/{STREAM[m.group(2)]}"


@torch.no_grad()
def sample_inputs(model, linears: dict[str, QLinear], windows: torch.Tensor, rows: int, seed: int) -> dict:
    """name -> [<= rows, in_features] float32 rows of what the linear's input quantizer received."""
    g = torch.Generator().manual_seed(seed)
    per_window = max(1, rows // windows.shape[0])
    kept: dict[str, list] = {n: [] for n in linears}
    hooks = []
    for name, q in linears.items():
        def hook(_mod, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1])
            idx = torch.randperm(x.shape[0], generator=g)[:per_window]
            kept[name].append(x[idx].float())
        hooks.append(q.input_quantizer.register_forward_pre_hook(hook))
    try:
        for w in windows:
            model(w[None])
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in kept.items()}


@torch.no_grad()
def stream_errors(linears: dict[str, QLinear], xs: dict, grid: list[float]) -> dict[str, dict]:
    """stream -> {"linears": names, "err": {clip: relative output error of the stream's linears}}."""
    streams: dict[str, list[str]] = {}
    for name in linears:
        streams.setdefault(stream_of(name), []).append(name)
    out = {}
    for stream, names in streams.items():
        x = xs[names[0]]  # the linears of a stream read the same tensor
        spec = linears[names[0]].input_quantizer.spec
        ref = [x @ linears[n].weight.float().T for n in names]
        norm = sum(r.pow(2).sum().item() for r in ref)
        errs = {}
        for c in grid:
            xq = fake_quantize(x, dataclasses.replace(spec, clip_ratio=c))
            errs[c] = sum(((xq @ linears[n].weight.float().T) - r).pow(2).sum().item() for n, r in zip(names, ref)) / norm
        out[stream] = {"linears": names, "err": errs}
    return out


def choose_clips(errors: dict[str, dict], scope: str) -> dict[str, float]:
    """stream -> clip: each stream its own ("stream"), one per kind of stream across layers ("kind":
    attn_in / o_in / mlp_in / down_in), or one for all ("global"); the lowest summed relative error."""
    def key(stream: str) -> str:
        return {"stream": stream, "kind": stream.split("/")[1], "global": "all"}[scope]

    pooled: dict[str, dict] = {}
    for stream, info in errors.items():
        acc = pooled.setdefault(key(stream), {})
        for c, e in info["err"].items():
            acc[c] = acc.get(c, 0.0) + e
    best = {k: min(errs, key=errs.get) for k, errs in pooled.items()}
    return {stream: best[key(stream)] for stream in errors}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a dartquant run folder (quantized checkpoint)")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--rows", type=int, default=2048, help="sampled rows per linear input")
    ap.add_argument("--grid", type=float, nargs="+", default=[1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6])
    ap.add_argument("--scopes", nargs="+", default=["stream", "global"], choices=["stream", "kind", "global"],
                    help="one clip per input stream, per kind of stream, or one for the model; each evaluated")
    ap.add_argument("--eval-max-windows", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1234, help="calibration windows / row sampling (not the run's seed)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    t0 = time.time()
    model, tok = load_model(args.run)
    model.eval()
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, QLinear) and isinstance(m.input_quantizer, ActQuantizer)}
    clips0 = {m.input_quantizer.spec.clip_ratio for m in linears.values()}
    before = evaluate_ppl(model, tok, max_windows=args.eval_max_windows, progress=False)
    print(f"before (clip {sorted(clips0)}): {before}", file=sys.stderr)
    windows = calib_windows(tok, "wiki", n=args.calib_samples, seqlen=args.calib_seqlen, seed=args.seed)
    xs = sample_inputs(model, linears, windows, args.rows, args.seed)
    errors = stream_errors(linears, xs, args.grid)
    results = {}
    for scope in args.scopes:
        clips = choose_clips(errors, scope)
        for stream, info in errors.items():
            for n in info["linears"]:
                q = linears[n].input_quantizer
                q.spec = dataclasses.replace(q.spec, clip_ratio=clips[stream])
        after = evaluate_ppl(model, tok, max_windows=args.eval_max_windows, progress=False)
        by_kind: dict[str, list] = {}
        for stream, c in clips.items():
            by_kind.setdefault(stream.split("/")[1], []).append(c)
        summary = {k: {"mean_clip": round(sum(v) / len(v), 4), "min": min(v), "max": max(v)} for k, v in by_kind.items()}
        results[scope] = {"ppl": after, "clips_by_kind": summary, "clips": clips}
        print(f"{scope}: {after} {json.dumps(summary)}", file=sys.stderr)
    Path(args.out).write_text(json.dumps({"args": vars(args), "clip_before": sorted(clips0), "before": before,
                                          "after": results, "errors": errors,
                                          "seconds": round(time.time() - t0, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
