#!/usr/bin/env python3
"""Loss ablation: DartQuant's Whip vs quantization-error / variance / kurtosis losses, in perplexity.

    python lab/loss_ablation.py --model smollm2-135m --seeds 0 1 2 --losses whip quant variance kurtosis \
        --wq rtn --calib-samples 8 --calib-seqlen 1024 --eval-max-windows 8 --lr-grid 0.01 0.1 1 \
        --out docs/results/loss_ablation_cpu.json

Every row is W4A4KV4 with the RunConfig defaults except the rotation. For each seed the
calibration activations are captured once (they do not depend on the loss) and R1 / R2 are
trained with each loss (QR-Orth, SGD momentum, cosine, 10 epochs); the rotations are then handed
to the ordinary pipeline (`rotations=` file) which quantizes the weights (`--wq`) and evaluates.
Learning rates: the losses have different scales, so each loss gets its own: chosen per loss
and per rotation (R1, R2) on seed 0's capture as the lowest *held-out* value of that loss on
the 10% held-out calibration tokens, then used for every seed. The held-out 4-bit SQNR
criterion of each trained rotation is recorded too. QuaRot (the random Hadamard that every
DartQuant run starts from) is the reference. Test perplexity is only reported, never used.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--losses", nargs="+", default=["whip", "quant", "variance", "kurtosis"])
    ap.add_argument("--wq", nargs="+", default=["rtn"], help="weight quantizers (rtn, gptq)")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=1024)
    ap.add_argument("--eval-max-windows", type=int, default=8)
    ap.add_argument("--lr-grid", nargs="+", type=float, default=[0.01, 0.1, 1.0])
    ap.add_argument("--no-quarot", action="store_true")
    ap.add_argument("--reuse", help="a previous output JSON of the same settings: its runs (and FP) are kept, "
                                    "not recomputed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from dartquant.adapters import adapter_for
    from dartquant.calib.dartquant import capture, fit_r1, fit_r2
    from dartquant.data import calib_windows
    from dartquant.config import RunConfig
    from dartquant.pipeline import run_quantize
    from dartquant.transforms import RotationSet
    from dartquant.zoo import load_model
    from quality import machine

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "machine": {**machine(), "threads": args.threads}, "lr_selection": {},
              "calibration": [], "runs": []}
    base = dict(model=args.model, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                eval_max_windows=args.eval_max_windows)
    t_start = time.time()
    if args.reuse:
        old = json.loads(Path(args.reuse).read_text())
        result["runs"] = old.get("runs", [])
        if old.get("fp"):
            result["fp"] = old["fp"]
        result["reused_from"] = args.reuse

    def done(tag: str, wq: str, seed: int) -> bool:
        return any((r["config"], r["wq"], r["seed"]) == (tag, wq, seed) for r in result["runs"])

    def save():
        out_path.write_text(json.dumps(result, indent=1))

    def evaluate(tag: str, wq: str, seed: int, tmp: Path, **kw):
        if done(tag, wq, seed):
            return
        cfg = RunConfig.from_flat(**base, **kw, w_quantizer=wq, seed=seed)
        m = run_quantize(cfg, tmp / f"run-{len(result['runs'])}", eval_fp="fp" not in result, progress=False)
        result.setdefault("fp", m.get("fp"))
        result["runs"].append({"config": tag, "wq": wq, "seed": seed, "ppl": m["ppl"], "seconds": m["seconds"]})
        save()
        print(f"{tag:<18} {wq} seed {seed}: wiki {m['ppl']['wiki']:.3f} c4 {m['ppl']['c4']:.3f} "
              f"({time.time() - t_start:.0f} s)", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        chosen: dict = {}
        for seed in args.seeds:  # seed-major, so that partial results cover every config
            if not args.no_quarot:
                for wq in args.wq:
                    evaluate("quarot", wq, seed, tmp, method="quarot")
            model, tok = load_model(args.model)
            geo = adapter_for(model).geometry(model.config)
            cfg0 = RunConfig.from_flat(**base, method="dartquant", seed=seed)
            ids = calib_windows(tok, cfg0.calib_corpus, cfg0.calib_samples, cfg0.calib_seqlen, seed)
            t0 = time.perf_counter()
            acts = capture(model, cfg0, ids, progress=False)
            capture_s = time.perf_counter() - t0
            del model
            for loss in args.losses:
                cal = {"seed": seed, "loss": loss, "capture_s": round(capture_s, 1)}
                if loss not in chosen:  # first seed: choose R1 / R2 lr on held-out calibration loss
                    table, fits = {"r1": {}, "r2": {}}, {}
                    for lr in args.lr_grid:
                        cfg = RunConfig.from_flat(**{**cfg0.to_dict(), "dq_loss": loss, "dq_r1_lr": lr, "dq_r2_lr": lr})
                        for which, fit in (("r1", fit_r1), ("r2", fit_r2)):
                            try:
                                r, h = fit(acts, geo, cfg, progress=False)
                            except FloatingPointError as e:
                                table[which][str(lr)] = {"failed": str(e)}
                                continue
                            table[which][str(lr)] = {
                                "heldout_loss": [h["eval_loss_init"], h["eval_loss_final"]],
                                "heldout_sqnr_db": [h["heldout_quant"]["init"]["sqnr_db"],
                                                    h["heldout_quant"]["final"]["sqnr_db"]],
                                "seconds": round(h["seconds"], 1)}
                            fits[(which, str(lr))] = (r, h)
                            print(f"  {loss} {which} lr {lr:g}: held-out loss {h['eval_loss_init']:.4g} -> "
                                  f"{h['eval_loss_final']:.4g}, SQNR {table[which][str(lr)]['heldout_sqnr_db'][0]:.3f}"
                                  f" -> {table[which][str(lr)]['heldout_sqnr_db'][1]:.3f} dB", file=sys.stderr,
                                  flush=True)
                    best = {}
                    for which in ("r1", "r2"):
                        ok = {lr: v for lr, v in table[which].items() if "failed" not in v}
                        best[which] = min(ok, key=lambda lr: ok[lr]["heldout_loss"][1])
                    chosen[loss] = {"r1_lr": float(best["r1"]), "r2_lr": float(best["r2"])}
                    result["lr_selection"][loss] = {"seed": seed, "table": table, **chosen[loss]}
                    (r1, h1), (r2, h2) = fits[("r1", best["r1"])], fits[("r2", best["r2"])]
                else:
                    cfg = RunConfig.from_flat(**{**cfg0.to_dict(), "dq_loss": loss, "dq_r1_lr": chosen[loss]["r1_lr"],
                                         "dq_r2_lr": chosen[loss]["r2_lr"]})
                    r1, h1 = fit_r1(acts, geo, cfg, progress=False)
                    r2, h2 = fit_r2(acts, geo, cfg, progress=False)
                cal.update(r1_lr=chosen[loss]["r1_lr"], r2_lr=chosen[loss]["r2_lr"],
                           r1_heldout_loss=[h1["eval_loss_init"], h1["eval_loss_final"]],
                           r2_heldout_loss=[h2["eval_loss_init"], h2["eval_loss_final"]],
                           r1_heldout_sqnr_db=[h1["heldout_quant"]["init"]["sqnr_db"],
                                               h1["heldout_quant"]["final"]["sqnr_db"]],
                           r2_heldout_sqnr_db=[h2["heldout_quant"]["init"]["sqnr_db"],
                                               h2["heldout_quant"]["final"]["sqnr_db"]],
                           r1_seconds=round(h1["seconds"], 1), r2_seconds=round(h2["seconds"], 1))
                result["calibration"].append(cal)
                save()
                rot = tmp / f"rot-{loss}-{seed}.safetensors"
                RotationSet(r1, r2, r3=cfg0.r3, r4=cfg0.r4,
                            meta={"method": "dartquant", "seed": seed, "loss": loss}).save(rot)
                for wq in args.wq:
                    evaluate(f"dartquant:{loss}", wq, seed, tmp, method="dartquant", rotations=str(rot))
            del acts
    result["seconds_total"] = round(time.time() - t_start, 1)
    result["table"] = table_lines(result)
    save()
    print("\n".join(result["table"]))


def table_lines(result: dict) -> list[str]:
    lines = ["| rotation (loss) | weights | R1 lr / R2 lr (held-out) | seeds | held-out SQNR dB R1 / R2 "
             "(QuaRot init -> trained) | wiki ppl | c4 ppl |", "|---|---|---|---|---|---|---|"]
    fp = result.get("fp")
    if fp:
        lines.append(f"| FP | - | - | - | - | {fp['ppl']['wiki']:.2f} | {fp['ppl']['c4']:.2f} |")
    for (tag, wq) in dict.fromkeys((r["config"], r["wq"]) for r in result["runs"]):
        runs = [r for r in result["runs"] if (r["config"], r["wq"]) == (tag, wq)]
        lr, sq = "-", "-"
        if tag.startswith("dartquant:"):
            loss = tag.split(":", 1)[1]
            sel = result["lr_selection"].get(loss, {})
            lr = f"{sel.get('r1_lr', '-'):g} / {sel.get('r2_lr', '-'):g}"
            cal = [c for c in result["calibration"] if c["loss"] == loss]
            sq = (f"{fmt([c['r1_heldout_sqnr_db'][0] for c in cal])} -> {fmt([c['r1_heldout_sqnr_db'][1] for c in cal])}"
                  f" / {fmt([c['r2_heldout_sqnr_db'][0] for c in cal])} -> "
                  f"{fmt([c['r2_heldout_sqnr_db'][1] for c in cal])}")
        lines.append(f"| {tag} | {wq} | {lr} | {len(runs)} | {sq} | {fmt([r['ppl']['wiki'] for r in runs])} | "
                     f"{fmt([r['ppl']['c4'] for r in runs])} |")
    return lines


if __name__ == "__main__":
    main()
