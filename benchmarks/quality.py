#!/usr/bin/env python3
"""Quality sweep: methods x seeds on one model; prints a mean +- spread table, writes JSON.

    python benchmarks/quality.py --model smollm2-135m --configs rtn:rtn quarot:rtn quarot:gptq \
        dartquant:rtn dartquant:gptq --seeds 0 1 2 --tasks arc_easy piqa --limit 200 --device cuda \
        --out docs/results/smollm2.json

A config is METHOD:WEIGHT_QUANTIZER. Every run uses the same RunConfig otherwise (W4A4KV4
defaults, per-channel weights), differing only in method, weight quantizer and seed. FP is
evaluated once. With `--dq-lr-grid`, each DartQuant run picks its R1 and R2 learning rates
from the grid by the held-out split of its own *calibration* activations (RunConfig.dq_lr_grid),
never by the evaluation numbers. (Before session 3 the pick was made once, on seed 0's capture,
and used for every seed of the invocation; the device batches ran one seed per invocation.)
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


def parse_config(config: str) -> tuple[str, str, dict]:
    """METHOD[:WEIGHT_QUANTIZER[:key=value,key=value]] -> (method, wq, RunConfig overrides); a list
    value as [a,b,c] (its commas are not separators)."""
    import re

    import yaml

    method, _, rest = config.partition(":")
    wq, _, extra = rest.partition(":")
    overrides = {k: yaml.safe_load(v) for k, _, v in (kv.partition("=") for kv in re.split(r",(?![^\[]*\])", extra) if kv)}
    return method, wq, overrides


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--configs", nargs="+", default=["rtn:rtn", "quarot:rtn", "quarot:gptq"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--tasks", nargs="*", default=[])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-max-windows", type=int, default=None)
    ap.add_argument("--dq-lr-grid", nargs="*", type=float, default=[])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra RunConfig settings")
    ap.add_argument("--no-fp", action="store_true", help="skip the full-precision evaluation")
    ap.add_argument("--progress", action="store_true", help="progress bars (training steps, windows) on stderr")
    ap.add_argument("--keep-rotations", metavar="DIR", help="copy each run's rotations.safetensors to "
                    "DIR/<out stem>_<config>_s<seed>.safetensors (for swap experiments, `dartquant inspect`)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import yaml

    from dartquant.config import RunConfig
    from dartquant.pipeline import run_quantize

    extra = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}
    base = dict(model=args.model, tasks=args.tasks, zeroshot_limit=args.limit, device=args.device,
                calib_samples=args.calib_samples, eval_max_windows=args.eval_max_windows, **extra)
    result = {"args": vars(args), "runs": [], "machine": machine()}
    t0 = time.time()
    fp = None
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            method, wq, overrides = parse_config(config)
            if method == "dartquant" and args.dq_lr_grid and "dq_r1_lr" not in overrides:
                # each run picks its R1 / R2 lr on its own capture's held-out split (dq_lr_grid)
                overrides = {**overrides, "dq_lr_grid": args.dq_lr_grid}
            # no randomness without a rotation and without calibration (GPTQ's windows are drawn by seed)
            seeds = args.seeds[:1] if (method == "rtn" and wq == "rtn") else args.seeds
            for seed in seeds:
                cfg = RunConfig.from_flat(**{**base, **overrides}, method=method, w_quantizer=wq or None, seed=seed)
                out = Path(tmp) / f"run-{len(result['runs'])}"
                m = run_quantize(cfg, out, eval_fp=fp is None and not args.no_fp, progress=args.progress)
                fp = fp or m.get("fp")
                if args.keep_rotations and (out / "rotations.safetensors").is_file():
                    import shutil

                    keep = Path(args.keep_rotations)
                    keep.mkdir(parents=True, exist_ok=True)
                    label = config.replace(":", "_").replace("=", "-").replace(",", "_")
                    shutil.copyfile(out / "rotations.safetensors", keep / f"{Path(args.out).stem}_{label}_s{seed}.safetensors")
                run = {"config": config, "seed": seed, "ppl": m["ppl"], "zeroshot": m.get("zeroshot"),
                       "seconds": m["seconds"], "peak_memory_bytes": m["peak_memory_bytes"],
                       "calibration": m.get("calibration"), "quality_check": m.get("quality_check"),
                       "online_cost": m.get("online_cost")}
                result["runs"].append(run)
                zs = m.get("zeroshot", {}).get("avg")
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps({**result, "fp": fp}, indent=1))  # partial results survive
                print(f"{config:<16} seed {seed}: wiki {m['ppl']['wiki']:.3f} c4 {m['ppl']['c4']:.3f}"
                      + (f" 0-shot {zs:.4f}" if zs is not None else "") + f"  ({time.time() - t0:.0f} s)",
                      file=sys.stderr)
    result["fp"] = fp
    result["seconds_total"] = time.time() - t0
    lines = table(result)
    result["table"] = lines
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("\n".join(lines))


def table(result: dict) -> list[str]:
    lines = ["| config | seeds | wiki ppl | c4 ppl | 0-shot avg |", "|---|---|---|---|---|"]
    fp = result.get("fp")
    if fp:
        zs = fp.get("zeroshot", {}).get("avg")
        lines.append(f"| FP | - | {fp['ppl']['wiki']:.3f} | {fp['ppl']['c4']:.3f} | {fmt([zs]) if zs else '-'} |")
    for config in dict.fromkeys(r["config"] for r in result["runs"]):
        runs = [r for r in result["runs"] if r["config"] == config]
        zs = [r["zeroshot"]["avg"] for r in runs if r.get("zeroshot")]
        lines.append(f"| {config} | {len(runs)} | {fmt([r['ppl']['wiki'] for r in runs])} | "
                     f"{fmt([r['ppl']['c4'] for r in runs])} | {fmt(zs)} |")
    return lines


def machine() -> dict:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


if __name__ == "__main__":
    main()
