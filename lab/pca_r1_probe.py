"""Issue 17 (CPU probe, one-off): would an R1 built from the residual stream's principal axes lower a run's cost?

RESULTS §54 found that sending the principal axes of the q/k/v and gate/up inputs to a Hadamard's rows (one
set for every layer: what one R1 can do) lowers their 4-bit error to ~0.82x QuaRot's random Hadamard on Qwen.
This checks the perplexity: on a run whose residual stream has one basis (QuaRot, DartQuant, SpinQuant: not
DuQuant), the axes U are fitted on the run's own calibration windows (the pooled second moment of every layer's
q/k/v and gate/up inputs), and each such input is quantized as Q(x V) V^T with V = U H. The weights are the run's
4-bit ones, untouched: the pair isolates the activations' side (a method would fold V into R1 before GPTQ).
    PYTHONPATH=src python lab/pca_r1_probe.py RUN --windows 4 --json OUT
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from layer_gap_probe import load_wrapped, rewrap  # noqa: E402
from rotation_floor_probe import Pool  # noqa: E402

from dartquant.data import calib_windows, eval_windows  # noqa: E402
from dartquant.eval.ppl import perplexity  # noqa: E402
from dartquant.hadamard import fast_hadamard_transform, hadamard_transform_T  # noqa: E402


class Rotated(torch.nn.Module):
    """x -> inner(x U H) (U H)^T once `pool` is fitted (U its axes); before, x feeds the pool if `feeds`."""

    def __init__(self, inner, pool: Pool, feeds: bool):
        super().__init__()
        self.inner, self.pool, self.feeds = inner, pool, feeds

    def forward(self, x):
        u = self.pool.u
        if u is None:
            if self.feeds:
                self.pool.add(x.flatten(0, -2))
            return self.inner(x)
        return hadamard_transform_T(self.inner(fast_hadamard_transform(x @ u))) @ u.T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    metrics = json.loads((Path(args.run) / "metrics.json").read_text())
    if metrics["ppl"]["tokens"] // 2 // 2047 != args.windows:
        raise SystemExit(f"--windows {args.windows}: the run was scored on {metrics['ppl']['tokens'] // 2 // 2047}")
    if metrics["method"] == "duquant":
        raise SystemExit("pca_r1_probe: DuQuant has no shared residual-stream basis (its transforms are per layer)")
    model, tok, layers = load_wrapped(args.run)
    # every reader of a stream is wrapped; only its first feeds the pool (one copy of each stream's rows, as
    # DFRot's capture keeps one for q/k/v and one for gate/up)
    pool = Pool()
    for slot in layers.values():
        for stream in ("attn_in", "mlp_in"):
            for j, b in enumerate(slot[stream]):
                rewrap(model, b, lambda q, _: Rotated(q, pool, feeds=j == 0))
    # the run's own calibration windows (its seed and sizes, from its config)
    conf = yaml.safe_load((Path(args.run) / "config.yaml").read_text())
    n, seqlen = int(conf["data"]["samples"]), int(conf["data"]["seqlen"])
    calib = calib_windows(tok, conf["data"]["corpus"], n=n, seqlen=seqlen, seed=int(conf["seed"]))
    for ids in calib:
        model(ids[None])
    pool.fit()
    data = {c: eval_windows(tok, c, seqlen=2048, max_windows=args.windows) for c in ("wiki", "c4")}
    row = {"setting": "q/k/v and gate/up inputs quantized as Q(x U H) (U H)^T, U the calibration's principal axes",
           "windows": args.windows, "calib": [n, seqlen], **pool.energy}
    for c, w in data.items():
        row[c] = perplexity(model, w, progress=False)["ppl"]
        row[f"{c}_vs_run"] = row[c] - metrics["ppl"][c]
    print(f"{args.run}: as run {metrics['ppl']['wiki']:.3f} / {metrics['ppl']['c4']:.3f}; principal-axes R1 "
          f"{row['wiki']:.3f} / {row['c4']:.3f} ({row['wiki_vs_run']:+.3f} / {row['c4_vs_run']:+.3f}); "
          f"PC1 {row['pc1_energy']:.1%}, PC1-8 {row['pc8_energy']:.1%} of the energy", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"run": args.run, "as_run": metrics["ppl"], "rows": [row]}, indent=1))


if __name__ == "__main__":
    main()
