#!/usr/bin/env python3
"""DartQuant's activation capture alone: wall time and peak memory, before / after, one table.

    python benchmarks/capture_speed.py --model smollm2-135m --device cuda --samples 128 \
        --out docs/results/capture_speed_h200.json
    python benchmarks/capture_speed.py --shape smollm2-135m --layers 2 --samples 4 --seqlen 256 \
        --device cpu --out /tmp/capture_cpu.json        # a random-weight check at tiny scale

The model is prepared as the pipeline prepares it (float32 on the host, embeddings untied, norms
fused) and the calibration windows are the pipeline's (`data.calib_windows`, wiki, seed 0); a
random-weight model of a known shape (`--shape`, benchmarks/dartquant_cost.py) needs no download.
Modes, each a row:
  legacy   the capture before this change: one sequence per block call, one randperm per call
           and a device -> host copy (a sync) of its rows per call, hidden states on the host;
  batch1   the current sampler (indices drawn per block, rows staged on the device, one copy per
           block) at one sequence per call, states on the host: the share of the sampler alone;
  fast     the current capture as the pipeline runs it (layerwise.forward_plan: batched forwards,
           hidden states on the device when they fit).
Every mode must keep the same rows: `max_abs_diff_vs_legacy` (and the share of identical fp16
values) says so; on a GPU, batched kernels may round differently, so a few fp16 ulps are expected.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


class PerCallSampler:
    """The earlier sampler, kept as the reference (tests/test_capture_fast.py holds the current
    one equal to it): one randperm per call (one sequence per call), rows copied to the host
    store at every call."""

    def __init__(self, k, generator, store):
        self.k, self.g, self.store, self.pos = k, generator, store, 0

    def __call__(self, x):
        import torch

        flat = x.reshape(-1, x.shape[-1])
        idx = torch.randperm(flat.shape[0], generator=self.g)[: self.k].to(flat.device)
        rows = flat[idx].to(self.store.dtype).cpu().view(self.k, *self.store.shape[1:])
        self.store[self.pos: self.pos + self.k] = rows
        self.pos += self.k


def legacy_capture(model, ids, *, fraction=0.1, max_r1_tokens=262_144, seed=0, device="cpu", store_dtype=None):
    """capture_activations as it was: one sequence per block call, the per-call sampler."""
    import torch

    from dartquant.adapters import adapter_for
    from dartquant.calib.capture import R1_PROBES, ActivationCapture, _observable
    from dartquant.layerwise import iterate_blocks
    from dartquant.transforms.fuse import split_experts_
    from dartquant.transforms.placements import SPECS, kv_head_token_view

    adapter = adapter_for(model)
    split_experts_(model, adapter)
    cap = ActivationCapture(adapter.geometry(model.config), *ids.shape, fraction=fraction, max_r1_tokens=max_r1_tokens,
                            seed=seed, store_dtype=store_dtype or torch.float16)
    n_r1, per = len(R1_PROBES), cap.per_layer1
    with torch.no_grad():
        for i, block, forward in iterate_blocks(model, adapter, ids, device, False):
            layer = adapter.layer(block)
            stores = [(role, cap.k1, cap.r1[(n_r1 * i + j) * per: (n_r1 * i + j + 1) * per])
                      for j, role in enumerate(R1_PROBES)]
            stores += [(role, cap.k2, kv_head_token_view(cap.r2[i], cap.geo.kv_groups)) for role in SPECS["R2"].probes]
            observed = []
            for role, k, store in stores:
                q = _observable(adapter, block, layer, role)
                q.input_observer = PerCallSampler(k, cap.g, store)
                observed.append(q)
            forward(update=True)
            for q in observed:
                if q.input_observer.pos != q.input_observer.store.shape[0]:
                    raise RuntimeError("capture did not see every calibration sequence")
                q.input_observer = None
    return cap.result()


def prepare(args):
    """(model, calibration ids) as the pipeline has them when DartQuant's capture starts."""
    import torch

    from dartquant.adapters import adapter_for
    from dartquant.transforms import fuse_norms_, untie_embeddings_

    if args.shape:
        from dartquant_cost import random_model

        model = random_model(args.shape, torch.float32, layers=args.layers)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (args.samples, args.seqlen), generator=torch.Generator().manual_seed(0))
    else:
        from dartquant.data import calib_windows
        from dartquant.zoo import load_model

        model, tokenizer = load_model(args.model, dtype=torch.float32)
        ids = calib_windows(tokenizer, "wiki", args.samples, args.seqlen, 0)
    adapter = adapter_for(model)
    untie_embeddings_(model, adapter)
    fuse_norms_(model, adapter)
    return model, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default="smollm2-135m", help="bundled name or HF folder")
    src.add_argument("--shape", default=None, help="random weights of a shape of benchmarks/dartquant_cost.py")
    ap.add_argument("--layers", type=int, default=None, help="with --shape: this many decoder layers")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--modes", nargs="+", default=["legacy", "batch1", "fast"], choices=["legacy", "batch1", "fast"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--profile", choices=["legacy", "batch1", "fast"], default=None,
                    help="run this mode once more under torch.profiler: its top operators go to the JSON and stdout")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch

    from dartquant.calib.capture import capture_activations
    from dartquant.layerwise import forward_plan

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, ids = prepare(args)
    prep_s = time.perf_counter() - t0
    cuda = torch.device(args.device).type == "cuda"
    kw = dict(fraction=args.fraction, max_r1_tokens=262_144, seed=0, device=args.device)
    runs = {"legacy": lambda: legacy_capture(model, ids, **kw),
            "batch1": lambda: capture_activations(model, ids, progress=False, batch=1, **kw),
            "fast": lambda: capture_activations(model, ids, progress=False, **kw)}
    from dartquant.adapters import adapter_for

    plan = forward_plan(adapter_for(model).geometry(model.config), *ids.shape, torch.float32, args.device)
    rows, results = [], {}
    if cuda:  # first CUDA calls (context, cuBLAS handles, kernel choices) are no mode's cost: warm up on 2 windows
        capture_activations(model, ids[:2], progress=False, batch=1, **kw)
        capture_activations(model, ids[:2], progress=False, batch=2, **kw)
    for mode in args.modes:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        res = runs[mode]()
        if cuda:
            torch.cuda.synchronize()
        row = {"mode": mode, "capture_s": round(time.perf_counter() - t, 2),
               "batch": 1 if mode != "fast" else plan[0], "resident": mode == "fast" and plan[1],
               "peak_gpu_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
        results[mode] = res
        if "legacy" in results and mode != "legacy":
            ref = results["legacy"]
            d1, d2 = (res.r1.float() - ref.r1.float()).abs(), (res.r2.float() - ref.r2.float()).abs()
            row["max_abs_diff_vs_legacy"] = float(max(d1.max(), d2.max()))
            row["identical_share_vs_legacy"] = round(float(((d1 == 0).sum() + (d2 == 0).sum())
                                                           / (d1.numel() + d2.numel())), 6)
            row["buffer_abs_max"] = float(max(ref.r1.float().abs().max(), ref.r2.float().abs().max()))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    profile = None
    if args.profile:  # where the time goes (CPU-side self time: launches, syncs, copies)
        from torch.profiler import ProfilerActivity, profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch_profile(activities=acts) as prof:
            runs[args.profile]()
            if cuda:
                torch.cuda.synchronize()
        profile = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
        print(profile)
    info = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "threads": torch.get_num_threads()}
    out = {"machine": info, "args": vars(args), "prepare_s": round(prep_s, 1), "rows": rows,
           "r1_rows": int(results[args.modes[-1]].r1.shape[0]), "r2_shape": list(results[args.modes[-1]].r2.shape),
           "peak_cpu_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "profile": profile}
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(args.out)  # atomic
    cols = ["mode", "batch", "resident", "capture_s", "peak_gpu_GiB", "max_abs_diff_vs_legacy",
            "identical_share_vs_legacy"]
    name = args.shape or args.model
    print(f"capture of {name}, {args.samples} x {args.seqlen}, {args.device} (prepare {prep_s:.1f} s)")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |")


if __name__ == "__main__":
    main()
