#!/usr/bin/env python3
"""R2 trained on raw vs per-token RMS-normalized o_proj inputs, judged on calibration data only.

    python lab/r2_normalization.py --models smollm2-135m qwen2.5-coder-0.5b --seeds 0 1 2 \
        --calib-samples 8 --seqlen 2048 --out docs/results/r2_normalization_cpu.json

For each model and seed: capture the calibration activations once (as `dartquant quantize
--method dartquant` does), then train R2 (all layers x KV heads, Whip loss, QR-Orth, the
RunConfig defaults otherwise) with `dq_r2_normalize` = none and = rms, at every learning rate
of `--lr-grid`. Within a mode the learning rate is chosen on the held-out 10% of the calibration
tokens by that mode's own held-out Whip loss (the two modes' losses live on different scales,
so they are never compared with each other). The modes are compared by a criterion that does
not depend on the loss or on the normalization: the 4-bit per-token asymmetric (clip 0.9, the
run's activation quantizer) SQNR in dB of the R2-rotated *raw* o_proj inputs of held-out
tokens, per layer, averaged over layers (higher is better); the squared error per token is
reported too. Nothing here looks at test data.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

MODES = ("none", "rms")


def run_model_seed(model_name: str, seed: int, args) -> dict:
    from dartquant.adapters import adapter_for
    from dartquant.calib.dartquant import capture, fit_r2
    from dartquant.data import calib_windows
    from dartquant.config import RunConfig
    from dartquant.zoo import load_model

    model, tok = load_model(model_name)
    geo = adapter_for(model).geometry(model.config)
    base = RunConfig.from_flat(model=model_name, seed=seed, calib_samples=args.calib_samples, calib_seqlen=args.seqlen,
                       method="dartquant")
    ids = calib_windows(tok, base.calib_corpus, base.calib_samples, base.calib_seqlen, seed)
    t0 = time.perf_counter()
    acts = capture(model, base, ids, progress=False)
    capture_s = time.perf_counter() - t0
    del model
    rms = acts.r2.float().pow(2).mean(-1).sqrt()  # per (layer, head, row) RMS of the o_proj input slices
    out = {"model": model_name, "seed": seed, "capture_s": round(capture_s, 1),
           "r2_rows_per_head": acts.r2.shape[2], "o_input_rms_per_layer": rms.mean(dim=(1, 2)).tolist(),
           "modes": {}}
    for mode in MODES:
        per_lr = {}
        for lr in args.lr_grid:
            cfg = RunConfig.from_flat(**{**base.to_dict(), "dq_r2_lr": lr, "dq_r2_normalize": mode})
            t0 = time.perf_counter()
            try:
                _, h = fit_r2(acts, geo, cfg, progress=False)
            except FloatingPointError as e:  # lr too large: recorded, never selected
                per_lr[str(lr)] = {"failed": str(e)}
                continue
            q = h["heldout_quant"]
            per_lr[str(lr)] = {"heldout_loss": [h["eval_loss_init"], h["eval_loss_final"]],
                               "sqnr_db": [q["init"]["sqnr_db"], q["final"]["sqnr_db"]],
                               "mse": [q["init"]["mse"], q["final"]["mse"]],
                               "sqnr_db_layers_final": q["final"]["sqnr_db_layers"],
                               "steps": h["steps"], "seconds": round(time.perf_counter() - t0, 2)}
            print(f"{model_name} seed {seed} {mode:<4} lr {lr:<6g} held-out whip "
                  f"{h['eval_loss_init']:.4f} -> {h['eval_loss_final']:.4f}  SQNR "
                  f"{q['init']['sqnr_db']:.3f} -> {q['final']['sqnr_db']:.3f} dB", file=sys.stderr)
        ok = {lr: v for lr, v in per_lr.items() if "failed" not in v}
        best = min(ok, key=lambda lr: ok[lr]["heldout_loss"][1])
        out["modes"][mode] = {"per_lr": per_lr, "selected_lr": float(best), **{
            k: ok[best][k] for k in ("heldout_loss", "sqnr_db", "mse")}}
    return out


def summarize(rows: list[dict]) -> tuple[list[str], dict]:
    def ms(v):
        return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"

    lines = ["| model | R2 inputs | seeds | selected lr (per seed) | held-out SQNR dB, Hadamard init | "
             "held-out SQNR dB, trained | gain dB | held-out sq. error / token, trained |",
             "|---|---|---|---|---|---|---|---|"]
    verdict = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        for mode in MODES:
            m = [r["modes"][mode] for r in rs]
            init, fin = [x["sqnr_db"][0] for x in m], [x["sqnr_db"][1] for x in m]
            lines.append(f"| {model} | {'raw' if mode == 'none' else 'RMS-normalized'} | {len(rs)} | "
                         f"{', '.join(format(x['selected_lr'], 'g') for x in m)} | {ms(init)} | {ms(fin)} | "
                         f"{ms([b - a for a, b in zip(init, fin)])} | {ms([x['mse'][1] for x in m])} |")
            verdict.setdefault(mode, []).extend(fin)
    means = {mode: statistics.mean(v) for mode, v in verdict.items()}
    winner = max(means, key=means.get)
    return lines, {"mean_sqnr_db": means, "winner": winner,
                   "wins": {mode: sum(1 for r in rows if r["modes"][mode]["sqnr_db"][1] ==
                                      max(r["modes"][m]["sqnr_db"][1] for m in MODES)) for mode in MODES}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--lr-grid", nargs="+", type=float, default=[1e-3, 1e-2, 1e-1, 1.0, 10.0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fair on a shared 2-core machine)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import platform

    import torch

    torch.set_num_threads(args.threads)

    result = {"args": vars(args), "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                              "threads": torch.get_num_threads()}, "rows": []}
    t0 = time.time()
    for model in args.models:
        for seed in args.seeds:
            result["rows"].append(run_model_seed(model, seed, args))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))  # partial results survive
    lines, verdict = summarize(result["rows"])
    result.update(table=lines, verdict=verdict, seconds_total=round(time.time() - t0, 1))
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("\n".join(lines))
    print(f"\nwinner by mean held-out SQNR: {verdict['winner']} ({verdict['mean_sqnr_db']}); "
          f"per (model, seed) wins: {verdict['wins']}")


if __name__ == "__main__":
    main()
