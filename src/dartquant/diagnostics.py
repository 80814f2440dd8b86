"""`dartquant inspect`: how rotations change the activations that W4A4 quantizes.

    dartquant inspect --model M [--rotations FILE ...] [--seed 0] [--samples 8] [--seqlen 512]
                      [--corpus wiki] [--split calib|eval] --out DIR [--overwrite]

Activations are captured once, from the norm-fused, *unrotated* model (calib.capture, every
token of `samples` windows of `seqlen`, up to capture's R1 token budget); every
"view" is then applied to the stored samples, never to the model. This is exact, not an
approximation: with fused norms (unit gains) the q_proj / up_proj input of the model rotated by
R1 is x R1 (RMSNorm commutes with orthogonal R1), and the o_proj input of the model rotated by
R2 is, per KV head h, x_h R2[layer, h] (rotation.py). R3/R4 do not touch these inputs.

Windows come from the corpus' calibration half (data.calib_windows, seeded random offsets) by
default. A learned rotation is then measured on the distribution it was trained on (possibly on
the same tokens); `--split eval` uses the first windows of the evaluation half instead, which no
calibration ever sees.

Views: ``none`` (identity), ``hadamard`` (RotationSet.quarot: random Hadamard R1 from --seed,
plain Hadamard R2) and one per --rotations file, labelled by its meta "method" (else the file
stem; repeated labels get the stem, then a number, appended). A set without R1 or R2 leaves that
part unrotated. Files are validated against the model's shapes before the capture.

Per layer, for the q_proj input ("r1_q"), the up_proj input ("r1_up") and the o_proj input
("r2") of x R, three numbers:

* ``max_abs``: max |x| over all sampled tokens and features of that layer. For q/up inputs it
  is at most sqrt(hidden): with fused norms they are x / rms(x), so a value near sqrt(hidden)
  means one channel holds nearly all of a token's energy;
* ``kurtosis``: Pearson kurtosis (not excess: a Gaussian gives 3, a vector with one dominant
  channel out of n gives about n) of each token's features, E[(x - mean)^4] / var^2 over the
  feature axis, then averaged over tokens. Per token, because the activation quantizer works
  per token: a token's kurtosis says how outlier-dominated the row that one scale must cover is,
  whereas kurtosis over all entries would mostly measure how token norms vary, which no
  rotation changes. Rows with zero variance are left out of the average;
* ``sqnr_db``: 10 log10(sum x^2 / sum (x - Q(x))^2) over the layer's samples (primitives.sqnr_db),
  Q = the model's default activation quantizer: 4-bit asymmetric, per token, clip 0.9.

The o_proj input is pooled per layer as it is in the model: capture stores it split per KV head
(the query heads of a group pooled); the full rows [tokens, n_heads * head_dim] are reassembled
after the per-head rotation, and stats and per-token quantization use those full rows (the
quantizer's default; with `o_proj_per_head` the model would quantize per head instead).

Samples are captured in float32 (not capture's fp16 default: this is a measurement); rotations
and quantization run in float32 like the model, moments in float64.

Output (written atomically, runs.atomic_dir): inspect.json (settings + every number; a
non-finite number is written as null), summary.md (mean over layers per view), layers.png
(per-layer max|x|, kurtosis (log y) and SQNR curves), hist_q.png / hist_o.png (log-count
histograms of every entry of the middle layer's q_proj / o_proj input under each view).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .quant.primitives import QuantSpec, fake_quantize, sqnr_db
from .calib.capture import r1_rows
from .transforms.placements import kv_head_token_view

ACT_SPEC = QuantSpec(bits=4, symmetric=False, clip_ratio=0.9)  # per token (group_size None)
PARTS = ("r1_q", "r1_up", "r2")
PART_LABELS = {"r1_q": "q_proj input", "r1_up": "up_proj input", "r2": "o_proj input"}
METRICS = ("max_abs", "kurtosis", "sqnr_db")
HIST_BINS = 201


# ---- metrics ------------------------------------------------------------------------------
def token_kurtosis(x: torch.Tensor) -> float:
    """Mean over rows of the Pearson kurtosis of each row's entries (Gaussian rows: ~3)."""
    x = x.double()
    c = x - x.mean(dim=-1, keepdim=True)
    m2 = c.pow(2).mean(dim=-1)
    m4 = c.pow(4).mean(dim=-1)
    ok = m2 > 0
    if not bool(ok.any()):
        return float("nan")
    return (m4[ok] / m2[ok].pow(2)).mean().item()


def activation_stats(x: torch.Tensor, spec: QuantSpec = ACT_SPEC) -> dict:
    """{max_abs, kurtosis, sqnr_db} of x [tokens, features] (see the module docstring)."""
    x = x.float()
    return {"max_abs": x.abs().max().item(), "kurtosis": token_kurtosis(x),
            "sqnr_db": sqnr_db(x, fake_quantize(x, spec))}


# ---- views --------------------------------------------------------------------------------
def o_rows(heads: torch.Tensor, kv_groups: int) -> torch.Tensor:
    """One layer's per-KV-head samples [kv_heads, tokens * groups, d] -> o_proj rows [tokens, heads * d]."""
    view = kv_head_token_view(heads, kv_groups)
    return view.reshape(view.shape[0], -1)


def rotate_r1(x: torch.Tensor, r1: torch.Tensor | None) -> torch.Tensor:
    x = x.float()
    return x if r1 is None else x @ r1.float()


def rotate_r2(heads: torch.Tensor, r2: torch.Tensor | None) -> torch.Tensor:
    """x_h R2_h for every KV head h.   heads: [kv_heads, tokens, d], r2: [kv_heads, d, d]."""
    heads = heads.float()
    return heads if r2 is None else torch.bmm(heads, r2.float())


def view_stats(captured, geometry, rotations) -> tuple[dict, dict]:
    """Per-layer stats of one view (rotations: a RotationSet, or None for the identity).

    Returns ({"r1_q": [...], "r1_up": [...], "r2": [...]}, the middle layer's rotated
    {"r1_q": q input, "r2": o input} for the histograms).
    """
    r1 = None if rotations is None else rotations.r1
    r2 = None if rotations is None else rotations.r2
    mid = geometry.n_layers // 2
    stats, samples = {p: [] for p in PARTS}, {}
    for i, probes in enumerate(r1_rows(captured.r1, geometry.n_layers)):
        q, up = probes["q"], probes["up"]
        xq, xu = rotate_r1(q, r1), rotate_r1(up, r1)
        xo = o_rows(rotate_r2(captured.r2[i], None if r2 is None else r2[i]), geometry.kv_groups)
        for part, x in (("r1_q", xq), ("r1_up", xu), ("r2", xo)):
            stats[part].append({"layer": i, **activation_stats(x)})
        if i == mid:
            samples = {"r1_q": xq, "r2": xo}
    return stats, samples


def view_label(rotations, path: Path, taken: set[str]) -> str:
    """The file's meta method (else its stem), made unique among `taken`."""
    label = str(rotations.meta.get("method") or path.stem)
    if label in taken:
        label = f"{label} ({path.stem})"
    base, n = label, 2
    while label in taken:
        label, n = f"{base} #{n}", n + 1
    return label


def load_views(paths, geometry=None) -> list[tuple[str, object, Path]]:
    """[(label, RotationSet, path)] for the --rotations files; validated when geometry is given."""
    from .transforms import RotationSet

    views, taken = [], {"none", "hadamard"}
    for p in paths:
        p = Path(p)
        rot = RotationSet.load(p)  # FileNotFoundError / ValueError with the path in the message
        if geometry is not None:
            try:
                rot.validate(geometry)
            except ValueError as e:
                raise ValueError(f"{p}: {e}") from e
        label = view_label(rot, p, taken)
        taken.add(label)
        views.append((label, rot, p))
    return views


# ---- summary ------------------------------------------------------------------------------
def layer_mean(rows: list[dict], metric: str) -> float:
    vals = [r[metric] for r in rows if r[metric] is not None and math.isfinite(r[metric])]
    return sum(vals) / len(vals) if vals else float("nan")


def summary_table(results: dict) -> str:
    """Markdown table: per view, the mean over layers of each metric for q / up / o inputs."""
    short = {"r1_q": "q", "r1_up": "up", "r2": "o"}
    names = {"max_abs": "max\\|x\\|", "kurtosis": "kurt", "sqnr_db": "SQNR dB"}
    head = ["view"] + [f"{short[p]} {names[m]}" for p in PARTS for m in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for view, parts in results.items():
        cells = [view] + [_fmt(layer_mean(parts[p], m), m) for p in PARTS for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v: float, metric: str) -> str:
    if not math.isfinite(v):
        return "n/a"
    return f"{v:.2f}" if metric == "sqnr_db" or v < 100 else f"{v:.1f}"


def _finite_or_none(obj):
    """JSON has no inf/nan: write them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


# ---- plots --------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layers(results: dict, path: Path) -> None:
    """3 x 3 grid: rows max|x|, kurtosis (log y) and SQNR; columns q / up / o inputs; one curve per view."""
    plt = _pyplot()
    fig, axes = plt.subplots(3, 3, figsize=(14, 10), sharex=True)
    for col, part in enumerate(PARTS):
        for row, metric in enumerate(METRICS):
            ax = axes[row, col]
            for view, parts in results.items():
                ys = [float("nan") if r[metric] is None else r[metric] for r in parts[part]]
                ax.plot([r["layer"] for r in parts[part]], ys, marker=".", lw=1, label=view)
            if metric != "sqnr_db":
                ax.set_yscale("log")
            ax.set_title(f"{PART_LABELS[part]}: {metric}", fontsize=10)
            ax.grid(alpha=0.3)
            if row == 2:
                ax.set_xlabel("layer")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_histograms(samples: dict[str, torch.Tensor], title: str, path: Path) -> None:
    """Overlaid log-count histograms of all entries, shared symmetric bins."""
    plt = _pyplot()
    lim = max(x.abs().max().item() for x in samples.values()) or 1.0
    edges = torch.linspace(-lim, lim, HIST_BINS + 1)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for view, x in samples.items():
        counts = torch.histc(x.float().flatten(), bins=HIST_BINS, min=-lim, max=lim)
        ax.stairs(counts.numpy(), edges.numpy(), label=f"{view} (max|x| {x.abs().max().item():.3g})", lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("value")
    ax.set_ylabel("count")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(folder: Path, results: dict, mid_samples: dict, mid: int) -> None:
    """layers.png, hist_q.png, hist_o.png."""
    plot_layers(results, folder / "layers.png")
    plot_histograms({v: s["r1_q"] for v, s in mid_samples.items()}, f"layer {mid} q_proj input", folder / "hist_q.png")
    plot_histograms({v: s["r2"] for v, s in mid_samples.items()}, f"layer {mid} o_proj input", folder / "hist_o.png")


# ---- run ----------------------------------------------------------------------------------
def _check_unrotated(folder: Path) -> None:
    """Activations must come from the original model: reject rotated or quantized output folders."""
    from .zoo import read_transform_file

    spec = read_transform_file(folder) or {}
    method = (spec.get("rotations") or {}).get("method")
    if "quantization" in spec or (method is not None and method != "fuse-only"):
        raise ValueError(f"{folder} holds an already rotated or quantized model; inspect needs the original "
                         "model (rotations are applied to its captured activations)")


def inspect_model(model, calib_ids: torch.Tensor, views: list[tuple[str, object]], *, seed: int = 0,
                  device="cpu", progress: bool = True) -> tuple[dict, dict, object]:
    """Capture once, then stats per view. views: [(label, RotationSet or None)].

    Returns (results {view: {part: [per layer dicts]}}, mid-layer samples {view: {...}}, Captured).
    """
    from .adapters import adapter_for
    from .calib.capture import capture_activations
    from .transforms import fuse_norms_

    adapter = adapter_for(model)
    geo = adapter.geometry(model.config)
    for _, rot in views:
        if rot is not None:
            rot.validate(geo)
    fuse_norms_(model, adapter)
    captured = capture_activations(model, calib_ids, fraction=1.0, seed=seed, device=device, adapter=adapter,
                                   progress=progress, store_dtype=torch.float32)
    results, samples = {}, {}
    for label, rot in views:
        results[label], samples[label] = view_stats(captured, geo, rot)
    return results, samples, captured


def _windows(tokenizer, corpus: str, split: str, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    from .data import calib_windows, eval_windows

    if split == "calib":
        return calib_windows(tokenizer, corpus, samples, seqlen, seed)
    return eval_windows(tokenizer, corpus, seqlen, max_windows=samples)


def _capture_settings(cap, geo) -> dict:
    return {
        "tokens_per_layer": {"r1": int(cap.r1.shape[0] // (2 * geo.n_layers)),
                             "r2": int(cap.r2.shape[2] // geo.kv_groups)},
        "fraction": {"r1": cap.fraction_r1, "r2": cap.fraction_r2},
        "geometry": {k: getattr(geo, k) for k in ("hidden", "n_layers", "n_heads", "n_kv_heads", "head_dim")},
        "act_quant": {"bits": ACT_SPEC.bits, "symmetric": ACT_SPEC.symmetric, "clip_ratio": ACT_SPEC.clip_ratio,
                      "granularity": "per token"},
        "kurtosis": "Pearson (Gaussian = 3), per token over features, averaged over tokens",
        "histogram_layer": geo.n_layers // 2,
    }


def run_inspect(model: str, out, *, rotations=(), seed: int = 0, samples: int = 8, seqlen: int = 512,
                corpus: str = "wiki", split: str = "calib", overwrite: bool = False, device="cpu",
                progress: bool = True) -> dict:
    """The whole `dartquant inspect`: returns what inspect.json holds (with the summary table)."""
    from .adapters import adapter_for
    from .runs import atomic_dir, check_out_dir, write_json
    from .transforms import RotationSet
    from .zoo import load_model, resolve_model

    if samples < 1 or seqlen < 2:
        raise ValueError(f"need --samples >= 1 and --seqlen >= 2 (got {samples}, {seqlen})")
    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib' or 'eval', not {split!r}")
    out = check_out_dir(out, overwrite)
    load_views(rotations)  # fail fast on missing / unreadable files, before loading the model
    t0 = time.time()
    folder = resolve_model(model)
    _check_unrotated(folder)
    net, tokenizer = load_model(folder, dtype=torch.float32)
    geo = adapter_for(net).geometry(net.config)
    files = load_views(rotations, geo)
    views = [("none", None), ("hadamard", RotationSet.quarot(geo, seed))] + [(lab, rot) for lab, rot, _ in files]
    ids = _windows(tokenizer, corpus, split, samples, seqlen, seed)
    with torch.no_grad():
        results, mid_samples, cap = inspect_model(net, ids, views, seed=seed, device=device, progress=progress)
    report = {"settings": {"model": str(model), "rotations": {lab: str(p) for lab, _, p in files}, "seed": seed,
                           "samples": int(ids.shape[0]), "seqlen": seqlen, "corpus": corpus, "split": split,
                           **_capture_settings(cap, geo), "seconds": round(time.time() - t0, 1)},
              "views": results, "summary_md": summary_table(results)}
    header = (f"# dartquant inspect: {model}\n\nMean over {geo.n_layers} layers ({ids.shape[0]} x {seqlen} tokens of "
              f"{corpus}, {split} half; SQNR of 4-bit asymmetric per-token quantization, clip 0.9).")
    with atomic_dir(out) as tmp:
        write_json(tmp / "inspect.json", _finite_or_none(report))
        (tmp / "summary.md").write_text(f"{header}\n\n{report['summary_md']}\n")
        write_plots(tmp, results, mid_samples, geo.n_layers // 2)
    return report


# ---- command line -------------------------------------------------------------------------
def cmd_inspect(args) -> int:
    report = run_inspect(args.model, args.out, rotations=args.rotations, seed=args.seed, samples=args.samples,
                         seqlen=args.seqlen, corpus=args.corpus, split=args.split, overwrite=args.overwrite,
                         device=args.device, progress=not args.quiet)
    print(report["summary_md"])
    print(f"\nwrote {args.out} (inspect.json, summary.md, layers.png, hist_q.png, hist_o.png) "
          f"in {report['settings']['seconds']} s")
    return 0


def add_inspect_command(subparsers) -> None:
    """Register `inspect` on a subparsers object (cli.build_parser's `sub`)."""
    from .data import CORPORA
    from .zoo import DEFAULT_MODEL

    s = subparsers.add_parser("inspect", help="activation statistics (max|x|, kurtosis, 4-bit SQNR) per layer "
                                              "without / with rotations")
    s.add_argument("--model", default=DEFAULT_MODEL, help="bundled name, HF folder or .gguf file (unrotated)")
    s.add_argument("--rotations", nargs="+", default=[], metavar="FILE",
                   help="rotations .safetensors files to compare (besides 'none' and 'hadamard')")
    s.add_argument("--seed", type=int, default=0, help="seed of the Hadamard view's R1 and of the calibration windows")
    s.add_argument("--samples", type=int, default=8, help="windows (sequences) to capture")
    s.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    s.add_argument("--corpus", default="wiki", choices=list(CORPORA), help="text corpus of the windows")
    s.add_argument("--split", default="calib", choices=["calib", "eval"],
                   help="windows from the corpus' calibration half (seeded random offsets, the default) or "
                        "the first windows of its evaluation half (tokens no calibration saw)")
    s.add_argument("--device", default="cpu", help="device of the capture forward passes")
    s.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_inspect)
