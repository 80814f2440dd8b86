#!/usr/bin/env python3
"""GPTQ's column loop: the torch loop against the Triton kernel (`quant/gptq_triton.py`), per linear
of a real shape, with random weights and a random well-conditioned Hessian (time does not depend
on the values). Checks that both give the same codes and weights bit for bit.

    python benchmarks/gptq_speed.py --shape llama2-7b --device cuda --out docs/results/gptq_speed_h200.json

Prints a table (seconds per linear and per decoder layer, the speedup) and writes JSON. The
Hessian is built once per input width and shared, as GPTQ shares one Hessian between the
linears that read one input (q/k/v, gate/up).

`--factorizations reference lean` compares instead the two factorizations of the inverse Hessian
(`GPTQ.quantize(factorization=...)`, Triton loop on a GPU): seconds per linear, the GPU memory the
call adds on top of what is already allocated (its peak minus the allocated before it), and how
many codes agree (the two are equal to float64 round-off, not bit for bit). A `-release` suffix
(`lean-release`) runs the call as the Hessian's last use (`release_hessian=True`, as gptq_block_
does for a down_proj): on a copy of the Hessian that the call may drop, so "added" can go below 0:

    python benchmarks/gptq_speed.py --shape llama2-70b --factorizations reference lean --out docs/results/gptq_memory_h200.json
    python benchmarks/gptq_speed.py --shape llama2-70b --factorizations lean lean-release --out gptq_memory_release.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from dartquant.quant import GPTQ, QuantSpec  # noqa: E402

# (hidden, intermediate) and the linears of one decoder layer: name -> (out, in), count per layer
SHAPES = {"llama2-7b": (4096, 11008), "llama3-8b": (4096, 14336), "llama2-70b": (8192, 28672), "smollm2-135m": (576, 1536)}


def layer_linears(shape: str) -> list[tuple[str, int, int]]:
    h, i = SHAPES[shape]
    kv = {"llama3-8b": 1024, "llama2-70b": 1024, "smollm2-135m": 192}.get(shape, h)
    return [("q", h, h), ("k", kv, h), ("v", kv, h), ("o", h, h), ("gate", i, h), ("up", i, h), ("down", h, i)]


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _hessian(n_in: int, tokens: int, dev, g) -> GPTQ:
    gq = GPTQ(n_in, device=dev)
    for _ in range(max(1, tokens // 2048)):
        gq.add_batch(torch.randn(2048, n_in, device=dev, generator=g))
    return gq


def _write(out: str, res: dict) -> None:
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, out)


def compare_factorizations(args) -> int:
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    spec = QuantSpec(bits=4, symmetric=False, mse_search=True)
    g = torch.Generator(device=dev).manual_seed(0)
    rows, seen = [], set()
    for name, n_out, n_in in layer_linears(args.shape):
        if n_in in seen:  # the factorization depends on the input width only
            continue
        seen.add(n_in)
        gq = _hessian(n_in, args.tokens, dev, g)
        w = torch.randn(n_out, n_in, device=dev, generator=g) * 0.02
        row, codes = {"linear": name, "out": n_out, "in": n_in}, {}
        for fact in args.factorizations:
            method, release = fact.removesuffix("-release"), fact.endswith("-release")
            gq.quantize(w[:64, :], spec, factorization=method)  # warm up (kernels, cusolver handles)
            solver = gq
            if release:  # the Hessian's last use (as gptq_block_ calls it): a copy the call may drop
                solver = copy.copy(gq)
                solver.H = gq.H.clone()
            sync(dev)
            if cuda:
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            qt = solver.quantize(w, spec, factorization=method, release_hessian=release)
            del solver
            sync(dev)
            row[f"{fact}_s"] = round(time.perf_counter() - t0, 3)
            if cuda:
                row[f"{fact}_added_GiB"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)
            codes[fact] = qt.codes
            del qt
        if len(codes) >= 2:  # the first factorization's codes against each other's
            a, *others = codes.values()
            row["codes_equal_share"] = min(round((a == b).float().mean().item(), 6) for b in others)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| linear | out x in | " + " | ".join(f"{f} s | {f} added GiB" for f in args.factorizations)
          + " | codes equal |\n|---|---|" + "---|---|" * len(args.factorizations) + "---|")
    for r in rows:
        print(f"| {r['linear']} | {r['out']} x {r['in']} | "
              + " | ".join(f"{r[f + '_s']} | {r.get(f + '_added_GiB', '-')}" for f in args.factorizations)
              + f" | {r.get('codes_equal_share', '-')} |")
    if args.out:
        _write(args.out, {"shape": args.shape, "device": torch.cuda.get_device_name() if cuda else platform.processor(),
                          "torch": torch.__version__, "command": " ".join(sys.argv), "rows": rows,
                          "note": "one GPTQ call per input width (the Hessian's size sets the factorization's "
                                  "memory); added GiB = peak allocated during the call minus allocated before it "
                                  "(the Hessian, the weight and the call's outputs included in the peak)"})
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=8192, help="calibration rows for the random Hessian")
    ap.add_argument("--skip-torch", action="store_true", help="time only the kernel (the torch loop is slow)")
    ap.add_argument("--factorizations", nargs="+", choices=("reference", "lean", "reference-release", "lean-release"), default=None,
                    help="compare these factorizations (time, added GPU memory, codes) instead of the loops")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.factorizations:
        return compare_factorizations(args)
    dev = torch.device(args.device)
    spec = QuantSpec(bits=4, symmetric=False, mse_search=True)  # the default W4 spec: per channel, MSE clip
    g = torch.Generator(device=dev).manual_seed(0)
    hessians: dict[int, GPTQ] = {}
    rows = []
    for name, n_out, n_in in layer_linears(args.shape):
        if n_in not in hessians:
            hessians[n_in] = _hessian(n_in, args.tokens, dev, g)
        gq = hessians[n_in]
        w = torch.randn(n_out, n_in, device=dev, generator=g) * 0.02
        row = {"linear": name, "out": n_out, "in": n_in}
        results = {}
        for columns in (("triton",) if args.skip_torch else ("torch", "triton")):
            gq.quantize(w[:64], spec, columns=columns)  # compile / warm up
            sync(dev)
            t0 = time.perf_counter()
            qt, q = gq._quantize(w, spec, blocksize=128, percdamp=0.01, act_order=False, static_groups=False,
                                 columns=columns)
            sync(dev)
            row[f"{columns}_s"] = round(time.perf_counter() - t0, 4)
            results[columns] = (qt.codes, q)
        if len(results) == 2:
            row["bit_equal"] = bool(torch.equal(results["torch"][0], results["triton"][0])
                                    and torch.equal(results["torch"][1], results["triton"][1]))
            row["speedup"] = round(row["torch_s"] / row["triton_s"], 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    total = {c: round(sum(r[f"{c}_s"] for r in rows if f"{c}_s" in r), 3) for c in ("torch", "triton")}
    print(f"\n| linear | out x in | torch s | triton s | speedup | same bits |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['linear']} | {r['out']} x {r['in']} | {r.get('torch_s', '-')} | {r['triton_s']} | "
              f"{r.get('speedup', '-')} | {r.get('bit_equal', '-')} |")
    print(f"| one decoder layer | | {total['torch'] or '-'} | {total['triton']} | | |")
    if args.out:
        res = {"shape": args.shape, "device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor(),
               "torch": torch.__version__, "command": " ".join(sys.argv), "rows": rows, "per_layer_s": total,
               "note": "one GPTQ call per linear (q/k/v and gate/up each quantized separately, as gptq_block_ does, "
                       "sharing a Hessian); includes the Cholesky inverse and the MSE clip search of the W4 spec"}
        _write(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
