#!/usr/bin/env python3
"""Working memory of DartQuant's R2 training step at a real model's group count, with and
without chunking the groups (layers x KV heads) of a step's minibatch.

    python lab/r2_memory.py --shape llama2-7b --device cpu --out docs/results/r2_memory_cpu.json

R2 trains one rotation per (layer, KV head) on a shared token minibatch: at Llama-2-7B that is
1024 groups, and one float32 copy of a 4096-token minibatch is 2 GiB. The buffer here is random
(the memory does not depend on the values) and holds only a few minibatches of tokens, so the
run is short; the per-step working memory (peak minus the buffer) is what the full run adds on
top of its buffer. CPU: peak RSS, with the high-water mark reset after the buffer is built
(/proc/self/clear_refs); CUDA: max_memory_allocated after reset_peak_memory_stats.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dartquant_cost import SHAPES  # noqa: E402
from worker import emit, run  # noqa: E402


def _status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak since the last clear_refs reset) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(groups: int, head_dim: int, tokens: int, device: str, chunk_mib: float, steps: int) -> dict:
    import torch

    from dartquant.calib.dartquant import split_indices
    from dartquant.calib.train import RotationTrainConfig, train_rotation
    from dartquant.hadamard import random_hadamard_matrix

    g = torch.Generator().manual_seed(0)
    x = torch.randn(groups, tokens, head_dim, generator=g, dtype=torch.float16)  # the captured buffer
    if device.startswith("cuda"):
        x = x.to(device)
    init = random_hadamard_matrix(head_dim, 0).float().expand(groups, head_dim, head_dim).contiguous()
    train, held = split_indices(tokens, 0)
    cfg = RotationTrainConfig(lr=1.0, epochs=1, group_chunk_mib=chunk_mib)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark
        base = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    _, hist = train_rotation(x, init, cfg, progress=False, device=device, max_steps=steps, index=train,
                             eval_index=held)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else _status_bytes("VmHWM")
    return {"groups": groups, "head_dim": head_dim, "tokens": tokens, "chunk_mib": chunk_mib,
            "group_chunks": hist["group_chunks"], "steps": hist["steps"], "seconds": round(seconds, 1),
            "buffer_GiB": round(x.numel() * 2 / 2**30, 2), "baseline_GiB": round(base / 2**30, 2),
            "peak_GiB": round(peak / 2**30, 2), "step_working_GiB": round((peak - base) / 2**30, 2),
            "loss_first": hist["loss"][0], "loss_last": hist["loss"][-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=2 * 4096 + 1024, help="tokens per group in the synthetic buffer")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--chunks-mib", nargs="+", type=float, default=[1e9, 256.0],
                    help="group_chunk_mib values to compare (1e9: no chunking)")
    ap.add_argument("--worker", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    shape = SHAPES[args.shape]
    kv = shape.get("num_key_value_heads", shape["num_attention_heads"])
    groups, head_dim = shape["num_hidden_layers"] * kv, shape["hidden_size"] // shape["num_attention_heads"]
    if args.worker is not None:  # one measurement per process: peaks must not carry over
        emit(measure(groups, head_dim, args.tokens, args.device, args.worker, args.steps))
        return
    rows = []
    for mib in args.chunks_mib:
        cmd = [sys.executable, __file__, "--shape", args.shape, "--device", args.device, "--tokens", str(args.tokens),
               "--steps", str(args.steps), "--worker", str(mib)]
        rows.append(run(cmd, {"chunk_mib": mib}))
        print(json.dumps(rows[-1]), file=sys.stderr)
    info = {"torch": torch.__version__, "device": args.device,
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None}
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows}, indent=1))
    cols = ["chunk_mib", "group_chunks", "groups", "buffer_GiB", "peak_GiB", "step_working_GiB", "seconds", "steps"]
    print(f"R2 step memory, {args.shape} groups on {args.device}")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |")


if __name__ == "__main__":
    main()
