"""Issue 17, item 1 (CPU probe, one-off): is a run's 4-bit activation error at the floor a rotation can reach?

RESULTS §54 found the recipe's activation cost in Qwen's layers 2-5 and 23 spread evenly over the tokens. This
asks whether a further rotation would lower that error: at each chosen input quantizer, on held-out windows, the
mean squared relative error of the quantizer as run, and of the same quantizer after one more Haar-random
rotation of the whole width (x Q: a full mixing, where the run's transform may be block-diagonal), and the rows'
crest factor (max |x| / rms x, which sets a per-token quantizer's step) and excess kurtosis before and after. A
Gaussian row of the same width is the reference a random rotation tends to (its crest and 4-bit error are printed
too). And what the reader sees: the error after the reader's weight (W e against W x), as run and rotated (W the
first reader's weight in the quantizer's basis, 4-bit as run). With --pca, also a transform that is not random:
the stream's principal axes (fitted on the first window) sent to a Hadamard's rows, so that a dominant direction
becomes a flat row (scored on the later windows). Forward passes only; no perplexity.
    PYTHONPATH=src python lab/rotation_floor_probe.py RUN --groups 0-23 --parts attn_in o mlp_in down --windows 1 --json OUT
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from layer_gap_probe import STREAMS, load_wrapped, parse_group, rewrap  # noqa: E402

from dartquant.data import eval_windows  # noqa: E402
from dartquant.hadamard import fast_hadamard_transform, hadamard_transform_T  # noqa: E402


def row_stats(x: torch.Tensor, y: torch.Tensor) -> dict:
    x, y = x.double(), y.double()
    rms = x.pow(2).mean(-1).sqrt().clamp_min(1e-30)
    z = x / rms.unsqueeze(-1)
    return {"rel_sq_err": ((y - x).pow(2).sum(-1) / x.pow(2).sum(-1).clamp_min(1e-30)).mean().item(),
            "crest": (x.abs().amax(-1) / rms).mean().item(),
            "excess_kurtosis": (z.pow(4).mean(-1) - 3).mean().item()}


class Pool:
    """The second moment of one or several streams' first-window rows; `fit` gives its principal axes (largest
    first) and the energy share of the first one and first eight."""

    def __init__(self):
        self.moment, self.u, self.energy = None, None, {}

    def add(self, x2: torch.Tensor) -> None:
        m = x2.double().T @ x2.double()
        self.moment = m if self.moment is None else self.moment + m

    def fit(self) -> None:
        evals, evecs = torch.linalg.eigh(self.moment)
        self.u = evecs.flip(-1).float()
        energy = evals.flip(-1).clamp_min(0)
        self.energy = {"pc1_energy": (energy[0] / energy.sum()).item(),
                       "pc8_energy": (energy[:8].sum() / energy.sum()).item()}


class Probe(torch.nn.Module):
    """Around a Bypass-wrapped quantizer: accumulates the row statistics as run and after x Q; with a `pool`,
    the first window only feeds the pool (its axes), and the later windows are scored (held out)."""

    def __init__(self, inner, weight: torch.Tensor, g: torch.Generator):
        super().__init__()
        self.inner, self.weight = inner, weight  # the reader's weight [out, in], in the quantizer's basis
        width = weight.shape[1]
        self.q = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))[0].float()
        self.sums, self.calls = {}, 0
        self.pool: Pool | None = None  # its own, or shared by the streams fitted together (--pca global)

    def forward(self, x):
        y = self.inner(x)
        x2, y2 = x.flatten(0, -2), y.flatten(0, -2)
        if self.pool is not None and self.pool.u is None:
            self.pool.add(x2)
            return y
        xr = x2 @ self.q
        yr = self.inner(xr.reshape(x.shape)).flatten(0, -2)
        g = torch.randn_like(x2)
        yg = self.inner(g.reshape(x.shape)).flatten(0, -2)
        modes = {"as_run": (x2, y2), "full_rotation": (xr, yr), "gaussian": (g, yg)}
        if self.pool is not None:  # the principal axes sent to the Hadamard's rows: a dominant direction -> a flat row
            xp = fast_hadamard_transform(x2 @ self.pool.u)
            modes["pca_hadamard"] = (xp, self.inner(xp.reshape(x.shape)).flatten(0, -2))
        for tag, (a, b) in modes.items():
            for k, v in row_stats(a, b).items():
                self.sums[f"{tag}.{k}"] = self.sums.get(f"{tag}.{k}", 0.0) + v
        # what the reader sees: the error after its weight, relative to its output (W e against W x)
        w = self.weight.double()
        signal = (x2.double() @ w.T).pow(2).sum()
        seq = x.shape[-2]
        errs = {"as_run": y2 - x2, "full_rotation": (yr - xr) @ self.q.T}
        if self.pool is not None:
            errs["pca_hadamard"] = hadamard_transform_T(modes["pca_hadamard"][1] - modes["pca_hadamard"][0]) @ \
                self.pool.u.T
        for tag, err in errs.items():
            out_err = (err.double() @ w.T).pow(2).sum(-1)
            self.sums[f"{tag}.out_rel_sq_err"] = self.sums.get(f"{tag}.out_rel_sq_err", 0.0) + \
                (out_err.sum() / signal).item()
            # position 0 of each window (the attention sink) apart: its output error against the run's signal
            self.sums[f"{tag}.out_rel_sq_err_pos0"] = self.sums.get(f"{tag}.out_rel_sq_err_pos0", 0.0) + \
                (out_err[::seq].sum() / signal).item()
        self.calls += 1
        return y

    def means(self):
        return {**{k: v / self.calls for k, v in self.sums.items()}, **(self.pool.energy if self.pool else {})}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--groups", nargs="+", required=True)
    ap.add_argument("--parts", nargs="+", choices=STREAMS, default=list(STREAMS))
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--corpus", default="wiki")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pca", nargs="?", const="stream", choices=["stream", "global"],
                    help="also: the principal axes (fitted on the first window, scored on the others) sent to a "
                    "Hadamard's rows, per stream, or one set for all q/k/v and gate/up inputs ('global': what one R1 "
                    "could do; meaningful where those inputs share a basis, e.g. QuaRot's); needs --windows 2+")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.pca and args.windows < 2:
        raise SystemExit("--pca fits on the first window and scores the others: give --windows 2 or more")
    torch.set_grad_enabled(False)
    model, tok, layers = load_wrapped(args.run)
    g = torch.Generator().manual_seed(args.seed)
    probes = {}
    for grp in args.groups:
        for i in parse_group(grp):
            for part in args.parts:
                b = layers[i][part][0]  # the streams' linears share one input: its first quantizer stands for it
                probes[f"{i}.{part}"] = rewrap(model, b, lambda q, owner: Probe(q, owner.weight.detach(), g))
    if args.pca:
        shared = Pool()
        for key, p in probes.items():
            p.pool = shared if args.pca == "global" and key.endswith((".attn_in", ".mlp_in")) else Pool()
    for n, ids in enumerate(eval_windows(tok, args.corpus, seqlen=2048, max_windows=args.windows)):
        model(ids[None])
        if n == 0 and args.pca:  # each distinct pool once
            for pool in {id(p.pool): p.pool for p in probes.values()}.values():
                pool.fit()
    out = {"run": args.run, "corpus": args.corpus, "windows": args.windows, "streams": {}}
    print(f"{'stream':10s} {'4-bit rel. sq. error: as run':>28s} {'+ full rotation':>16s} {'gaussian':>9s}"
          f" | crest as run / rotated / gaussian | excess kurtosis as run / rotated"
          f" | after the weight: as run / rotated", flush=True)
    for key, p in probes.items():
        m = out["streams"][key] = p.means()
        print(f"{key:10s} {m['as_run.rel_sq_err']:28.5f} {m['full_rotation.rel_sq_err']:16.5f} "
              f"{m['gaussian.rel_sq_err']:9.5f} | {m['as_run.crest']:5.2f} / {m['full_rotation.crest']:5.2f} / "
              f"{m['gaussian.crest']:5.2f} | {m['as_run.excess_kurtosis']:6.2f} / "
              f"{m['full_rotation.excess_kurtosis']:6.2f} | {m['as_run.out_rel_sq_err']:.5f} / "
              f"{m['full_rotation.out_rel_sq_err']:.5f} (position 0: {m['as_run.out_rel_sq_err_pos0']:.5f} / "
              f"{m['full_rotation.out_rel_sq_err_pos0']:.5f})", flush=True)
        if args.pca:
            print(f"{'':10s} principal axes -> Hadamard: rel. sq. error {m['pca_hadamard.rel_sq_err']:.5f}, crest "
                  f"{m['pca_hadamard.crest']:.2f}, kurtosis {m['pca_hadamard.excess_kurtosis']:.2f}, after the weight "
                  f"{m['pca_hadamard.out_rel_sq_err']:.5f}; energy in PC1 {m['pc1_energy']:.1%}, PC1-8 "
                  f"{m['pc8_energy']:.1%}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
