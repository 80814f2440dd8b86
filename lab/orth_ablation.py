#!/usr/bin/env python3
"""QR-Orth vs Cayley SGD on real captured activations, at equal steps: time per step, loss
reached, steps to reach given losses (train and held-out Whip loss of R1).

    python lab/orth_ablation.py --model smollm2-135m --samples 8 --seqlen 512 --steps 200 \
        --lrs 0.01 0.1 --out docs/results/orth_ablation_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def steps_to(losses: list[float], target: float, window: int = 10) -> int | None:
    """First step at which the running mean of the last `window` minibatch losses is <= target."""
    for i in range(len(losses)):
        v = sum(losses[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1))
        if v <= target:
            return i + 1
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lrs", nargs="+", type=float, default=[0.01, 0.1])
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from dartquant.adapters import adapter_for
    from dartquant.calib.capture import capture_activations
    from dartquant.calib.dartquant import split_indices
    from dartquant.calib.train import RotationTrainConfig, train_rotation
    from dartquant.data import calib_windows
    from dartquant.hadamard import random_hadamard_matrix
    from dartquant.transforms import fuse_norms_
    from dartquant.zoo import load_model

    model, tok = load_model(args.model)
    fuse_norms_(model)
    geo = adapter_for(model).geometry(model.config)
    ids = calib_windows(tok, "wiki", args.samples, args.seqlen, seed=0)
    acts = capture_activations(model, ids, fraction=0.1, seed=0, device=args.device, progress=False)
    train, held = split_indices(acts.r1.shape[0], 0)  # the held-out split DartQuant itself uses
    init = random_hadamard_matrix(geo.hidden, 0)
    runs = []
    for param in ("qr", "cayley"):
        for lr in args.lrs:
            cfg = RotationTrainConfig(param=param, lr=lr, epochs=10**6, batch_tokens=args.batch_tokens, seed=0)
            _, h = train_rotation(acts.r1, init, cfg, progress=False, device=args.device, max_steps=args.steps,
                                  index=train, eval_index=held)
            runs.append({"param": param, "lr": lr, "steps": h["steps"], "seconds_per_step": h["seconds_per_step"],
                         "train_loss_first": h["loss"][0], "train_loss_last": h["loss"][-1],
                         "eval_loss_init": h["eval_loss_init"], "eval_loss_final": h["eval_loss_final"],
                         "loss": h["loss"]})
            print(f"{param:<7} lr {lr:<6g} {h['seconds_per_step'] * 1e3:7.1f} ms/step  held-out "
                  f"{h['eval_loss_init']:.3f} -> {h['eval_loss_final']:.3f}", file=sys.stderr)
    # steps to reach fractions of the way from the start to the best final training loss
    start = runs[0]["loss"][0]
    best = min(min(r["loss"]) for r in runs)
    targets = [start - f * (start - best) for f in (0.5, 0.8, 0.9, 0.95)]
    lines = ["| param | lr | ms/step | held-out loss (init -> final) | steps to 50% / 80% / 90% / 95% of the best drop |",
             "|---|---|---|---|---|"]
    for r in runs:
        reach = " / ".join(str(steps_to(r["loss"], t) or "-") for t in targets)
        lines.append(f"| {r['param']} | {r['lr']:g} | {r['seconds_per_step'] * 1e3:.1f} | "
                     f"{r['eval_loss_init']:.3f} -> {r['eval_loss_final']:.3f} | {reach} |")
    Path(args.out).write_text(json.dumps({"args": vars(args), "targets": targets, "runs": runs,
                                          "r1_tokens": int(train.numel()), "table": lines}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
