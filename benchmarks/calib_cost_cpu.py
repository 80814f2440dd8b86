#!/usr/bin/env python3
"""DartQuant calibration cost on the CPU for the bundled real models: wall time and peak memory
of capture, R1 training and R2 training, and the size of the captured buffers.

    python benchmarks/calib_cost_cpu.py --models smollm2-135m qwen2.5-coder-0.5b \
        --out docs/results/calib_cost_cpu.json

Each model runs in a fresh subprocess (so peak RSS values do not mix). The stages are those of
`calibrate_dartquant` (capture into host buffers, R1 on its train split, free the R1 buffer, R2),
with the RunConfig defaults unless overridden: 32 sequences x 2048 tokens of wiki, 10% of the
tokens (R1 pool capped at 262,144 tokens), 10 epochs, batches of 4096 tokens, Whip, QR-Orth. Peak
RSS per stage is sampled every 20 ms by a thread (VmRSS of /proc/self/status) and reset at each
stage start; `ru_maxrss` gives the process's overall peak. "baseline" is the RSS after loading
the model and the calibration windows.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from worker import emit, run  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssPeak:
    """Background sampler of this process's RSS; `reset()` starts a new stage."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.every)

    def reset(self) -> None:
        self.peak = rss_bytes()

    def read(self) -> int:
        return max(self.peak, rss_bytes())

    def stop(self) -> None:
        self._stop.set()


def measure(model_name: str, args) -> dict:
    """One model, in this process."""
    import torch

    torch.set_num_threads(args.threads)
    from dartquant.adapters import adapter_for
    from dartquant.calib.dartquant import capture, fit_r1, fit_r2
    from dartquant.data import calib_windows
    from dartquant.config import RunConfig
    from dartquant.zoo import load_model

    sampler = RssPeak()
    cfg = RunConfig.from_flat(model=model_name, method="dartquant", calib_samples=args.samples, calib_seqlen=args.seqlen,
                      dq_epochs=args.epochs, seed=0)
    t = time.perf_counter()
    model, tok = load_model(model_name)
    ids = calib_windows(tok, cfg.calib_corpus, cfg.calib_samples, cfg.calib_seqlen, cfg.seed)
    geo = adapter_for(model).geometry(model.config)
    out = {"model": model_name, "samples": args.samples, "seqlen": args.seqlen, "epochs": args.epochs,
           "threads": args.threads, "load_s": round(time.perf_counter() - t, 1), "baseline_rss_GiB": rss_bytes() / 2**30}

    def stage(name, fn):
        sampler.reset()
        t0 = time.perf_counter()
        res = fn()
        out[f"{name}_s"] = round(time.perf_counter() - t0, 1)
        out[f"{name}_peak_rss_GiB"] = round(sampler.read() / 2**30, 3)
        return res

    acts = stage("capture", lambda: capture(model, cfg, ids, progress=False))
    out["r1_buffer"] = {"shape": list(acts.r1.shape), "dtype": str(acts.r1.dtype),
                        "MiB": round(acts.r1.numel() * acts.r1.element_size() / 2**20, 1)}
    out["r2_buffer"] = {"shape": list(acts.r2.shape), "dtype": str(acts.r2.dtype),
                        "MiB": round(acts.r2.numel() * acts.r2.element_size() / 2**20, 1)}
    _, h1 = stage("r1", lambda: fit_r1(acts, geo, cfg, progress=False))
    acts.r1 = None
    _, h2 = stage("r2", lambda: fit_r2(acts, geo, cfg, progress=False))
    acts.r2 = None
    sampler.stop()
    out.update(r1_steps=h1["steps"], r1_s_per_step=round(h1["seconds_per_step"], 4), r2_steps=h2["steps"],
               r1_train_tokens=h1["tokens"]["train"], r2_train_tokens_per_head=h2["tokens"]["train_per_head"],
               r1_heldout_sqnr_db=[round(h1["heldout_quant"][k]["sqnr_db"], 3) for k in ("init", "final")],
               r2_heldout_sqnr_db=[round(h2["heldout_quant"][k]["sqnr_db"], 3) for k in ("init", "final")])
    out["total_s"] = round(out["capture_s"] + out["r1_s"] + out["r2_s"], 1)
    out["peak_rss_GiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    out["baseline_rss_GiB"] = round(out["baseline_rss_GiB"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child mode: measure one model, print JSON
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.one:
        emit(measure(args.one, args))
        return
    if not args.out:
        ap.error("--out is required")
    rows = []
    for model in args.models:
        cmd = [sys.executable, __file__, "--one", model, "--samples", str(args.samples), "--seqlen",
               str(args.seqlen), "--epochs", str(args.epochs), "--threads", str(args.threads)]
        row = run(cmd, {"model": model})
        if "error" in row:
            raise SystemExit(f"{model}: child failed ({row['error']})")
        rows.append(row)
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    machine = {"cpu": cpu, "cores": __import__("os").cpu_count(), "python": platform.python_version(),
               "torch": torch.__version__}
    cols = ["model", "capture_s", "r1_s", "r2_s", "total_s", "r1_steps", "r2_steps", "capture_peak_rss_GiB",
            "r1_peak_rss_GiB", "r2_peak_rss_GiB", "peak_rss_GiB", "baseline_rss_GiB"]
    lines = ["| " + " | ".join(cols + ["R1 buffer MiB", "R2 buffer MiB"]) + " |", "|" + "---|" * (len(cols) + 2)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + f" | {r['r1_buffer']['MiB']} | {r['r2_buffer']['MiB']} |")
    Path(args.out).write_text(json.dumps({"args": vars(args), "machine": machine, "rows": rows, "table": lines},
                                         indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
