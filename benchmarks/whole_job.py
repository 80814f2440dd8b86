#!/usr/bin/env python3
"""The whole quantization job, stage by stage: seconds and peak host RSS / GPU memory.

    python benchmarks/whole_job.py --shapes llama2-7b --methods rtn quarot dartquant spinquant \
        --stream true false --device cuda --dir /data/wj --out docs/results/whole_job_h200.json

For each shape a model folder of random weights is written once (`--dir`/<shape>[-L<k>]):
config.json, float16 safetensors sharded one decoder block per file plus the index (never
the whole model in memory: each tensor is drawn, written and dropped), and the bundled
SmolLM2 tokenizer cut to the shape's vocabulary (tokens and merges with ids >= vocab
removed; a BPE without them still tokenizes everything, in smaller pieces). Then every
(method, stream) pair runs as `dartquant quantize ... --json` in a fresh subprocess, and its
metrics.json gives the stage seconds (`seconds`) and the process's own peaks
(`peak_memory_bytes`: host RSS, CUDA allocated; Linux starts a child's peak RSS at its parent's
resident size when forked, so a host peak below this script's own RSS, ~1-2 GB, reads as that;
`peak_raised_bytes`: the stage that set each peak). spinquant runs in memory only (it cannot
stream). Random weights time the work faithfully (nothing depends on the values) but the
perplexities are meaningless, and the quality guard says so: `--fail-on-collapse false`.

`--layers k` cuts a shape to k decoder layers (70B: measure at 4 and 8 layers; memory must be
flat in depth, time grows linearly, so time(80) = t(4) + (t(8) - t(4)) * 76 / 4).
On the GPU machine (64 GB disk, a 10-minute limit per command: one job per command; the model
folder written by the first command of a shape is reused by the next ones; --clean on the last):
    B="python benchmarks/whole_job.py --device cuda --dir /tmp/wj --out docs/results/whole_job_h200.json"
    $B --shapes smollm2-135m --methods rtn quarot dartquant spinquant --stream true false --clean
    $B --shapes llama2-7b --methods quarot --stream true        # then dartquant, rtn; and --stream false
    $B --shapes llama2-7b --methods spinquant --stream false --clean -- --e2e-steps 20   # x5 for 100 steps
    (llama3-8b the same)
    $B --shapes llama2-70b --layers 4 8 --methods quarot --stream true     # then dartquant; --clean last
Disk (float16 folder + one run folder): SmolLM2 0.3 + 0.2 GB, Llama-2-7B 13.5 + 3.8, Llama-3-8B
16.1 + 5.6, Llama-2-70B 4 layers 7.9 + 2.8, 8 layers 14.7 + 4.5 (both depths kept: 27 GB).

Mixtral-8x7B (a mixture of experts: 8 experts of 14336, top-2; ~93 GB in float16, so cut to 2
and 4 layers; one block is 2.90 GB float16, the embedding and head 0.52 GB): its files keep
Mixtral's per-expert names (block_sparse_moe.experts.<e>.w1/w3/w2), the router is random too, so
every calibration token reaches its top-2 of 8 experts by a ~random routing (each expert sees about
a quarter of the tokens): each row gives the fewest and most calibration tokens an expert got
(`routed_tokens`, from GPTQ's forward) and the expert linears that got none (`unrouted`: RTN).
One (depth, method) per command, calibration at the paper's 128 x 2048, evaluation cut to 40
windows per corpus (not calibration; it keeps each command within the limit). The L2 folder
(6.3 GB) and the L4 folder (12.1 GB) are both kept until the end, plus one run folder (~2-3.5 GB):
~22 GB of disk; host memory ~15 GB by estimate (the windows' hidden states):
    M="python benchmarks/whole_job.py --device cuda --dir /tmp/wj --out docs/results/whole_job_moe_h200.json \
       --shapes mixtral-8x7b --stream true --eval-max-windows 40"
    $M --layers 2 --methods quarot
    $M --layers 2 --methods dartquant
    $M --layers 4 --methods quarot
    $M --layers 4 --methods dartquant
    rm -rf /tmp/wj/mixtral-8x7b-L2 /tmp/wj/mixtral-8x7b-L4
In a background batch (no per-command limit) the same is one command, --clean keeping one folder
at a time (16 GB of disk at most; lab/device/jobs/session7_moe.sh):
    python benchmarks/whole_job.py --device cuda --dir /tmp/wj_moe --out docs/results/whole_job_moe_h200.json \
        --shapes mixtral-8x7b --layers 2 4 --methods quarot dartquant --stream true --eval-max-windows 40 --clean
After the second depth, the JSON's `full_depth` (and the last lines printed) holds the 32-layer
estimates (a line through the depths measured, per stage) with each depth's memory peaks (flat).
If L4 runs past the limit, measure --layers 1 instead: the line goes through L1 and L2.
The same at a tiny MoE shape on the CPU (a check of the path, not a measurement):
    python benchmarks/whole_job.py --shapes tiny-moe --layers 1 2 --methods quarot dartquant --stream true --clean \
        --device cpu --dir /tmp/wj_moe --calib-samples 4 --calib-seqlen 64 --eval-seqlen 64 --eval-max-windows 2

Prints a table and writes JSON (the rows, the commands, the machine); a later invocation with
the same --out adds its rows (replacing rows of the same shape, depth, method and stream), so
one (shape, method, stream) per command fits a per-command time limit. Each run folder is
removed once read; with --clean each model folder this invocation wrote is removed after its
runs (the model folder is otherwise reused by later invocations with the same --dir).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dartquant_cost import SHAPES  # noqa: E402  (one table of real shapes for every benchmark)

SHAPES = {**SHAPES, "tiny": dict(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=3000),
          # mixtures of experts (model_type: the config class; the files keep one tensor per expert linear)
          "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, num_local_experts=8,
                               num_experts_per_tok=2, rope_theta=1e6),
          "tiny-moe": dict(model_type="mixtral", hidden_size=128, intermediate_size=192, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=3000, num_local_experts=4,
                           num_experts_per_tok=2)}
METHODS = ("rtn", "quarot", "dartquant", "spinquant")
IN_MEMORY_ONLY = ("spinquant", "ostquant")


def folder_name(shape: str, layers: int | None) -> str:
    return shape if layers is None else f"{shape}-L{layers}"


def write_tokenizer(out: Path, vocab: int) -> None:
    """The bundled SmolLM2 tokenizer, cut to ids < vocab (merges whose parts or result are gone removed)."""
    from dartquant.zoo import resolve_model

    src = resolve_model("smollm2-135m")
    tok = json.loads((src / "tokenizer.json").read_text())
    model = tok["model"]
    kept = {t: i for t, i in model["vocab"].items() if i < vocab}
    merges = [m for m in model["merges"] if (m.split(" ") if isinstance(m, str) else m)[0] in kept
              and (m.split(" ") if isinstance(m, str) else m)[1] in kept
              and "".join(m.split(" ") if isinstance(m, str) else m) in kept]
    model["vocab"], model["merges"] = kept, merges
    tok["added_tokens"] = [a for a in tok["added_tokens"] if a["id"] < vocab]
    (out / "tokenizer.json").write_text(json.dumps(tok))
    shutil.copy(src / "tokenizer_config.json", out / "tokenizer_config.json")


def write_model(out: Path, shape: str, layers: int | None, init_device: str) -> float:
    """Random float16 weights (std 0.02, norms 1) of the shape, one block per shard; returns GB written."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    kw = dict(SHAPES[shape])
    if layers is not None:
        kw["num_hidden_layers"] = layers
    config = AutoConfig.for_model(kw.pop("model_type", "llama"), **kw, max_position_embeddings=4096,
                                  tie_word_embeddings=False, torch_dtype="float16")
    n_experts = getattr(config, "num_local_experts", None)  # Mixtral: a router and experts instead of one MLP
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(str(tmp))
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    hd = h // config.num_attention_heads
    kv = config.num_key_value_heads * hd
    g = torch.Generator(device=init_device).manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device=init_device) * 0.02).half().cpu()

    groups = [{"model.embed_tokens.weight": lambda: rnd(config.vocab_size, h)}]
    for L in range(n):
        p = f"model.layers.{L}."
        groups.append({p + "self_attn.q_proj.weight": lambda: rnd(h, h),
                       p + "self_attn.k_proj.weight": lambda: rnd(kv, h),
                       p + "self_attn.v_proj.weight": lambda: rnd(kv, h),
                       p + "self_attn.o_proj.weight": lambda: rnd(h, h),
                       p + "input_layernorm.weight": lambda: torch.ones(h, dtype=torch.float16),
                       p + "post_attention_layernorm.weight": lambda: torch.ones(h, dtype=torch.float16)})
        if n_experts is None:
            groups[-1].update({p + "mlp.gate_proj.weight": lambda: rnd(i, h),
                               p + "mlp.up_proj.weight": lambda: rnd(i, h),
                               p + "mlp.down_proj.weight": lambda: rnd(h, i)})
        else:  # Mixtral's checkpoint names (w1 gate, w3 up, w2 down); a random router routes tokens ~uniformly
            groups[-1][p + "block_sparse_moe.gate.weight"] = lambda: rnd(n_experts, h)
            for e in range(n_experts):
                x = f"{p}block_sparse_moe.experts.{e}."
                groups[-1].update({x + "w1.weight": lambda: rnd(i, h), x + "w3.weight": lambda: rnd(i, h),
                                   x + "w2.weight": lambda: rnd(h, i)})
    groups.append({"model.norm.weight": lambda: torch.ones(h, dtype=torch.float16),
                   "lm_head.weight": lambda: rnd(config.vocab_size, h)})
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {key: make() for key, make in group.items()}
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({key: name for key in tensors})
        del tensors
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    write_tokenizer(tmp, config.vocab_size)
    os.replace(tmp, out)
    return total / 1e9


def run_one(model: Path, method: str, stream: str, args, run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "dartquant.cli", "quantize", "--model", str(model), "--method", method,
           "--stream", stream, "--device", args.device, "--out", str(run_dir),
           "--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen),
           "--eval-seqlen", str(args.eval_seqlen), "--fail-on-collapse", "false", "--overwrite"]
    if args.eval_max_windows is not None:
        cmd += ["--eval-max-windows", str(args.eval_max_windows)]
    if args.skip_fp_eval:
        cmd.append("--skip-fp-eval")
    cmd += args.extra
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    # the job's messages and progress bars go to a log beside the run folder, live (a poll can tail it)
    log_path = run_dir.with_name(run_dir.name + ".log")
    t0 = time.perf_counter()
    with open(log_path, "w") as log_file:
        p = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, text=True, env=env)
    row = {"method": method, "stream": stream, "wall_s": round(time.perf_counter() - t0, 1), "exit": p.returncode,
           "command": " ".join(cmd), "log": str(log_path)}
    metrics_file = run_dir / "metrics.json"
    if p.returncode not in (0, 3) or not metrics_file.is_file():
        row["error"] = log_path.read_text(errors="replace")[-2000:]
        return row
    m = json.loads(metrics_file.read_text())
    peaks = m.get("peak_memory_bytes", {})
    row.update(seconds=m.get("seconds", {}), streamed="stream" in m,
               host_rss_GB=round(peaks.get("cpu_rss", 0) / 1e9, 2),
               gpu_GiB=round(peaks["cuda"] / 2**30, 2) if "cuda" in peaks else None,
               ppl=m.get("ppl"), shards=m.get("stream", {}).get("shards"),
               copies_overlapped=m.get("stream", {}).get("copies_overlapped"),
               unrouted=m.get("gptq_rtn_fallbacks", []),  # MoE: expert linears GPTQ saw no token for (RTN)
               peak_set_by={kind: _top_stage(raised) for kind, raised in m.get("peak_raised_bytes", {}).items()},
               # how far each stage raised each peak (GB host, GiB GPU): which stage to slim next
               peak_raised={kind: {stage: round(v / (2**30 if kind == "cuda" else 1e9), 2) for stage, v in raised.items()}
                            for kind, raised in m.get("peak_raised_bytes", {}).items()})
    if "moe_routed_tokens" in m:  # MoE: calibration tokens per expert (fewest, most; of calib_tokens x top-k)
        routed = m["moe_routed_tokens"]
        row["routed_tokens"] = {k: routed[k] for k in ("calib_tokens", "min", "max")}
    return row


def _top_stage(raised: dict[str, int]) -> str | None:
    """The stage that raised a peak the most (pipeline stages.StageTimer: `peak_raised_bytes`)."""
    return max(raised, key=raised.get) if raised else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["tiny"], choices=sorted(SHAPES))
    ap.add_argument("--layers", nargs="*", type=int, default=[], help="cut every shape to these depths (e.g. 4 8)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--stream", nargs="+", default=["true", "false"], choices=["true", "false", "auto"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--init-device", default=None, help="where random weights are drawn (default: --device)")
    ap.add_argument("--dir", required=True, help="model and run folders are written here")
    ap.add_argument("--out", default=None, help="JSON results")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=2048)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--eval-max-windows", type=int, default=None, help="default: all held-out windows")
    ap.add_argument("--skip-fp-eval", action="store_true")
    ap.add_argument("--clean", action="store_true", help="remove the model folders written here at the end")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more `dartquant quantize` flags")
    args = ap.parse_args()
    args.extra = [a for a in args.extra if a != "--"]
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    rows, written = [], []
    for shape in args.shapes:
        for layers in args.layers or [None]:
            folder = base / folder_name(shape, layers)
            if not (folder / "model.safetensors.index.json").is_file():
                t0 = time.perf_counter()
                gb = write_model(folder, shape, layers, args.init_device or args.device)
                written.append(folder)
                print(f"wrote {folder} ({gb:.1f} GB float16) in {time.perf_counter() - t0:.0f} s", flush=True)
            for method in args.methods:
                for stream in args.stream:
                    if stream != "false" and method in IN_MEMORY_ONLY:
                        continue
                    run_dir = base / f"run-{folder.name}-{method}-{stream}"
                    row = {"shape": shape, "layers": layers or SHAPES[shape]["num_hidden_layers"],
                           **run_one(folder, method, stream, args, run_dir)}
                    shutil.rmtree(run_dir, ignore_errors=True)  # ours: written by this benchmark's command
                    rows.append(row)
                    print(format_row(row), flush=True)
                    if args.out:  # after every row: a stopped batch keeps what it measured
                        save_rows(Path(args.out), rows, args, final=False)
            if args.clean and folder in written:  # before the next shape: the disk holds one model at a time
                shutil.rmtree(folder)
    print("\n" + table(rows))
    if args.out:
        result = save_rows(Path(args.out), rows, args, final=True)
        for e in result["full_depth"]:
            print(format_extrapolated(e))
        print(f"\nwrote {args.out} ({len(result['rows'])} rows)")
    return 0 if all("error" not in r for r in rows) else 1


def save_rows(out: Path, rows: list[dict], args, final: bool) -> dict:
    """Merge this invocation's rows into `out` (rows of earlier invocations are kept, one (shape,
    depth, method, stream) each) and write it atomically; the command is recorded once."""
    old = json.loads(out.read_text()) if out.is_file() else {}
    key = ("shape", "layers", "method", "stream")
    mine = {tuple(r[k] for k in key) for r in rows}
    kept = [r for r in old.get("rows", []) if tuple(r[k] for k in key) not in mine]
    command = " ".join(sys.argv)
    commands = old.get("commands", [])
    result = {"commands": commands if command in commands else commands + [command], "machine": machine(args.device),
              "rows": kept + rows, "complete": final}
    result["full_depth"] = extrapolate(result["rows"])  # from every invocation's rows: one depth per command
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    return result


def extrapolate(rows: list[dict]) -> list[dict]:
    """Full-depth estimates of each (shape, method, stream) measured at two or more cut depths:
    decoder layers are identical, so each stage's seconds (and the wall time) are a fixed part plus
    a per-layer part: a least-squares line through (layers, seconds), evaluated at the full depth.
    A stage whose line falls with depth (noise above its per-layer cost) is listed in
    `not_extrapolable`. Peaks are given as measured at each depth: they must be flat in depth."""
    out = []
    groups: dict = {}
    for r in rows:
        if "error" not in r and r["layers"] < SHAPES.get(r["shape"], {}).get("num_hidden_layers", 0):
            groups.setdefault((r["shape"], r["method"], r["stream"]), {})[r["layers"]] = r
    for (shape, method, stream), by_depth in sorted(groups.items()):
        if len(by_depth) < 2:
            continue
        depths, n = sorted(by_depth), SHAPES[shape]["num_hidden_layers"]
        bad: list[str] = []

        def at_n(key: str, values: list[float]) -> float:
            mx, my = sum(depths) / len(depths), sum(values) / len(values)
            slope = sum((x - mx) * (y - my) for x, y in zip(depths, values)) / sum((x - mx) ** 2 for x in depths)
            if slope < 0:
                bad.append(key)
            return round(my + slope * (n - mx), 1)

        last = by_depth[depths[-1]]
        stages = {k: at_n(k, [by_depth[d]["seconds"].get(k, 0.0) for d in depths]) for k in last["seconds"]}
        e = {"shape": shape, "layers": n, "method": method, "stream": stream, "from_layers": depths,
             "wall_s": at_n("wall_s", [by_depth[d]["wall_s"] for d in depths]), "seconds": stages,
             "host_rss_GB": [by_depth[d]["host_rss_GB"] for d in depths],
             "gpu_GiB": [by_depth[d]["gpu_GiB"] for d in depths]}
        if bad:
            e["not_extrapolable"] = bad
        out.append(e)
    return out


def format_extrapolated(e: dict) -> str:
    at = " / ".join(f"L{d}" for d in e["from_layers"])
    return (f"{e['shape']} at {e['layers']} layers (from {at}) {e['method']} stream={e['stream']}: "
            f"~{e['wall_s']} s wall; " + ", ".join(f"{k} {e['seconds'][k]:.0f}" for k in STAGES if k in e["seconds"])
            + f"; peaks {at}: host RSS {e['host_rss_GB']} GB, GPU {e['gpu_GiB']} GiB"
            + (f"; not extrapolable (falls with depth): {e['not_extrapolable']}" if "not_extrapolable" in e else ""))


STAGES = ("load", "eval_fp", "capture", "calibrate", "rotate", "quantize", "eval", "save", "guard")


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['shape']} L{r['layers']} {r['method']} stream={r['stream']}: FAILED (exit {r['exit']}): " \
               f"{r['error'].strip().splitlines()[-1] if r['error'].strip() else ''}"
    s = r["seconds"]
    return (f"{r['shape']} L{r['layers']} {r['method']} stream={r['stream']}: {r['wall_s']} s wall, host RSS "
            f"{r['host_rss_GB']} GB, GPU {r['gpu_GiB']} GiB"
            + "".join(f" ({kind} peak set in {stage})" for kind, stage in r.get("peak_set_by", {}).items() if stage)
            + "; " + ", ".join(f"{k} {s[k]:.1f}" for k in STAGES if k in s)
            + (f"; tokens per expert {r['routed_tokens']['min']}..{r['routed_tokens']['max']} of "
               f"{r['routed_tokens']['calib_tokens']}, unrouted {r['unrouted'] or 'none'}"
               if "routed_tokens" in r else ""))


def table(rows: list[dict]) -> str:
    head = ["shape", "L", "method", "stream", "wall s", *STAGES, "RSS GB", "GPU GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['layers']} | {r['method']} | {r['stream']} | "
                         f"failed (exit {r['exit']}) |")
            continue
        s = r["seconds"]
        cells = [r["shape"], r["layers"], r["method"], r["stream"] + (" (streamed)" if r["streamed"] else ""),
                 r["wall_s"], *(f"{s[k]:.1f}" if k in s else "" for k in STAGES), r["host_rss_GB"], r["gpu_GiB"] or ""]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def machine(device: str) -> dict:
    out = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        out["torch"] = torch.__version__
        if device.startswith("cuda") and torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return out


if __name__ == "__main__":
    sys.exit(main())
