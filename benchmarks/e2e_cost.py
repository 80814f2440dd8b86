#!/usr/bin/env python3
"""Calibration cost side by side: DartQuant vs SpinQuant vs OSTQuant, one table.

    # this CPU, the real SmolLM2-135M
    python benchmarks/e2e_cost.py --model smollm2-135m --device cpu --out docs/results/e2e_cost_cpu.json
    # the H200, random weights of the Llama-2-7B shape (timing does not depend on the values)
    python benchmarks/e2e_cost.py --shape llama2-7b --device cuda --dtype bfloat16 --micro-batch 8 \
        --out /tmp/res/e2e_cost_7b.json
    # the H200, Llama-2-70B shape: does not fit one GPU for end-to-end training, so every method
    # is measured at 6 and 9 decoder layers and extrapolated linearly in depth to 80 (say so)
    python benchmarks/e2e_cost.py --shape llama2-70b --layers 6 9 --device cuda --dtype bfloat16 \
        --batch 8 --micro-batch 8 --steps 2 --dq-samples 128 --out /tmp/res/e2e_cost_70b.json

Each method runs in a fresh subprocess, so that its peak memory (CPU: peak RSS; CUDA: peak
allocated) is its own. DartQuant runs its whole calibration (capture + R1 + R2) with
`--dq-samples` sequences, as `dartquant quantize --method dartquant` does. SpinQuant and OSTQuant
run `--steps` optimizer steps of `--batch` sequences (after one warm-up step, not counted); their
time is *extrapolated* linearly to the published schedule, 100 steps x 8 sequences of 2048
tokens (SpinQuant's; OSTQuant's own schedule differs and is not modelled). Peak memory of the
end-to-end methods includes the model, which must sit on the device for end-to-end training.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dartquant_cost import SHAPES  # noqa: E402
from worker import emit, run  # noqa: E402

PUBLISHED_STEPS, PUBLISHED_BATCH = 100, 8
PAPER_7B = {"dartquant": {"hours": 0.14, "GiB": 17.4}, "spinquant": {"hours": 0.30, "GiB": 20.0}}
PAPER_70B_RATIOS = {"spinquant_vs_dartquant": {"time": 47, "memory": 10}}


def extrapolate(rows: list[dict], full_layers: int) -> dict:
    """Least-squares line through (layers, value) for the time and the peak memories of one
    method measured at reduced depths, evaluated at the full depth. Decoder layers are
    identical, so every cost is (fixed part) + (per-layer part) x layers."""
    ok = [r for r in rows if "error" not in r]
    out = {"method": rows[0]["method"], "layers": full_layers, "extrapolated_from_layers": [r["layers"] for r in ok],
           "schedule": (ok[0]["schedule"] if ok else "-") + f"; extrapolated in depth to {full_layers} layers"}
    if len(ok) < 2:
        return {**out, "error": "fewer than two depths measured"}
    for key in ("full_schedule_s", "peak_gpu_GiB", "peak_cpu_rss_GiB"):
        pts = [(r["layers"], r[key]) for r in ok if key in r]
        if len(pts) < 2:
            continue
        n = len(pts)
        mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
        slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
        out[key] = round(my + slope * (full_layers - mx), 2)
        out[key + "_per_layer"] = round(slope, 4)
        if slope < 0 or out[key] <= 0:  # noise larger than the per-layer cost: measure deeper / longer
            out.setdefault("not_extrapolable", []).append(key)
    out["extrapolated"] = True
    return out


def add_ratios(rows: list[dict]) -> None:
    """Time and memory of each method over DartQuant's, where both numbers are trustworthy
    (measured, or extrapolated from a cost that grows with depth). Memory is GPU memory on a
    GPU, peak RSS on the CPU."""
    base = next((r for r in rows if r["method"] == "dartquant" and "error" not in r), None)
    if base is None:
        return
    mem = "peak_gpu_GiB" if "peak_gpu_GiB" in base else "peak_cpu_rss_GiB"
    for r in rows:
        for ratio, key in (("time_vs_dartquant", "full_schedule_s"), ("memory_vs_dartquant", mem)):
            bad = set(r.get("not_extrapolable", [])) | set(base.get("not_extrapolable", []))
            if "error" not in r and key in r and key in base and key not in bad:
                r[ratio] = round(r[key] / base[key], 2)


def _model(args):
    import torch

    dtype = getattr(torch, args.dtype)
    if args.shape:  # DartQuant keeps the model on the host; end-to-end training needs it on the device
        from dartquant_cost import random_model

        where = "cpu" if args.worker == "dartquant" else args.device
        return random_model(args.shape, dtype, args.depth, init_device=args.device, device=where), None
    from dartquant.zoo import load_model

    return load_model(args.model, dtype=dtype)


def _ids(args, model, tokenizer, n: int):
    import torch

    if tokenizer is None:  # random weights: random tokens
        return torch.randint(0, model.config.vocab_size, (n, args.seqlen), generator=torch.Generator().manual_seed(0))
    from dartquant.data import calib_windows

    return calib_windows(tokenizer, "wiki", n, args.seqlen, seed=0)


def worker(args) -> dict:
    import torch

    from dartquant.config import RunConfig
    from dartquant.transforms import fuse_norms_, untie_embeddings_

    cuda = args.device.startswith("cuda")
    model, tokenizer = _model(args)
    untie_embeddings_(model)
    fuse_norms_(model)
    out = {"method": args.worker, "seqlen": args.seqlen}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if args.worker == "dartquant":
        from dartquant.calib.dartquant import calibrate_dartquant
        from dartquant.stages import StageTimer

        ids = _ids(args, model, tokenizer, args.dq_samples)
        cfg = RunConfig.from_flat(device=args.device, seed=0, calib_samples=args.dq_samples, calib_seqlen=args.seqlen)
        timer = StageTimer()
        t0 = time.perf_counter()
        calibrate_dartquant(model, cfg, ids, timer=timer, progress=False)
        if cuda:
            torch.cuda.synchronize()
        out.update(measured_s=round(time.perf_counter() - t0, 1), stages_s=timer.seconds,
                   schedule=f"capture {args.dq_samples} x {args.seqlen}, {cfg.dq_epochs} epochs R1 + R2",
                   full_schedule_s=round(time.perf_counter() - t0, 1), extrapolated=False)
    else:
        from dartquant.calib.e2e import train_e2e

        model.to(args.device)
        if cuda:
            torch.cuda.synchronize()
            out["model_GiB"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        steps = args.steps + 1  # the first step warms up (allocator, kernels) and is not counted
        ids = _ids(args, model, tokenizer, steps * args.batch)
        cfg = RunConfig.from_flat(method=args.worker, device=args.device, e2e_steps=steps, e2e_batch=args.batch,
                                  e2e_micro_batch=args.micro_batch, e2e_amp=args.amp).resolve()
        with tempfile.TemporaryDirectory() as tmp:
            train_e2e(model, cfg, ids, None, out_dir=Path(tmp), progress=False)
            curve = json.loads((Path(tmp) / f"{args.worker}_loss.json").read_text())["curve"]
        ends = [c["seconds"] for c in curve]  # cumulative, taken after each step's backward
        per_step = statistics.median(b - a for a, b in zip(ends, ends[1:]))
        per_seq = per_step / args.batch
        out.update(measured_s=round(ends[-1], 1), measured_steps=args.steps, batch=args.batch,
                   micro_batch=args.micro_batch, amp=args.amp, step_s=round(per_step, 3), seq_s=round(per_seq, 3),
                   schedule=f"{PUBLISHED_STEPS} steps x {PUBLISHED_BATCH} seq x {args.seqlen} (extrapolated)",
                   full_schedule_s=round(per_seq * PUBLISHED_STEPS * PUBLISHED_BATCH, 1), extrapolated=True,
                   first_loss=curve[0]["loss"], last_loss=curve[-1]["loss"])
    out["peak_cpu_rss_GiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if cuda:
        out["peak_gpu_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="a bundled or local model (real weights)")
    src.add_argument("--shape", default=None, help="random weights of a known shape, e.g. llama2-7b")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--methods", nargs="+", default=["dartquant", "spinquant", "ostquant"])
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--dq-samples", type=int, default=32, help="DartQuant calibration sequences (the default run's)")
    ap.add_argument("--steps", type=int, default=2, help="timed end-to-end steps (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per timed step")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--amp", default="off", choices=["off", "bf16"], help="bf16 autocast in end-to-end training")
    ap.add_argument("--layers", nargs="*", type=int, default=[],
                    help="with --shape: measure at these reduced depths (>= 2 of them) and extrapolate time and "
                         "peak memory linearly in depth to the full model (for shapes that do not fit, e.g. 70B)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--depth", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.shape and not args.model:
        args.model = "smollm2-135m"
    if args.worker:
        emit(worker(args))
        return

    import torch

    if args.layers and (not args.shape or len(args.layers) < 2):
        ap.error("--layers needs --shape and at least two depths")
    rows, measured = [], []
    for method in args.methods:
        for depth in args.layers or [None]:
            cmd = [sys.executable, __file__, "--worker", method] + [a for a in sys.argv[1:]]
            if depth is not None:
                cmd += ["--depth", str(depth)]
            t0 = time.perf_counter()
            row = run(cmd, {"method": method})
            row["wall_incl_load_s"] = round(time.perf_counter() - t0, 1)
            if depth is not None:
                row["layers"] = depth
            print(json.dumps(row), file=sys.stderr)
            (measured if depth is not None else rows).append(row)
        if args.layers:
            rows.append(extrapolate([r for r in measured if r["method"] == method],
                                    SHAPES[args.shape]["num_hidden_layers"]))
    add_ratios(rows)
    info = {"torch": torch.__version__, "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows,
                                              "measured_at_reduced_depth": measured, "paper_7b": PAPER_7B,
                                              "paper_70b_ratios": PAPER_70B_RATIOS}, indent=1))
    cols = ["method", "layers", "schedule", "measured_s", "step_s", "full_schedule_s", "time_vs_dartquant",
            "peak_gpu_GiB", "peak_cpu_rss_GiB", "memory_vs_dartquant", "model_GiB"]
    print(f"model: {args.shape or args.model} ({args.dtype}) on {args.device}; {info}")
    for r in measured:
        print(f"  measured at {r.get('layers')} layers: {r['method']}: " + json.dumps(
            {k: r.get(k) for k in ("full_schedule_s", "peak_gpu_GiB", "peak_cpu_rss_GiB", "error") if k in r}))
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |")


if __name__ == "__main__":
    main()
