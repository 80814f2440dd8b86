"""Export measurements on run folders: size, time, logit match and perplexity (prints a table, writes JSON).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/export_cpu.py RUN [RUN ...] --work DIR --json OUT.json

For each run folder (from `dartquant quantize --out`):
  * export it (`--drop-kv-quant`, bfloat16 and float32), timed; size on disk vs the FP16 size of the
    unrotated model (2 bytes per parameter of the model the run started from, tied weights once);
  * the run's round-off sensitivity ("floor": max |logit| change when the embeddings move by 1e-7
    relative), and the max |logit| difference between the export (loaded by `zoo.load_export`: transformers +
    compressed-tensors) and the run's own model with the export's semantics (KV quantizers off,
    activation clip 1.0), on the first eval window: the exactness check;
  * perplexity (wiki, c4; the run's eval protocol) of: the run as evaluated (metrics.json), the run
    without KV quantization (cost of --drop-kv-quant), the run without KV quantization and with
    activation clip 1.0 (cost of the missing clip ratio), the run's weights alone (W4A16), and the
    exports (bfloat16, float32, and bfloat16 --weight-only).
Each step's cost is the difference between consecutive rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from dartquant.adapters import adapter_for
from dartquant.eval.ppl import evaluate_ppl
from dartquant.export import export_run
from dartquant.zoo import load_export
from dartquant.quant.act import ActQuantizer
from dartquant.config import RunConfig
from dartquant.runs import write_json
from dartquant.zoo import load_model, resolve_model


# (name, dtype, weight_only); the weight-only logit difference is against the W4A16 reference below
VARIANTS = (("bfloat16", "bfloat16", False), ("float32", "float32", False), ("bf16-w4a16", "bfloat16", True),
            ("fp32-w4a16", "float32", True))


def fp16_bytes(model_spec: str) -> int:
    """2 bytes per parameter stored in the model's own safetensors (tied weights are stored once)."""
    from safetensors import safe_open

    n = 0
    for f in resolve_model(model_spec).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return 2 * n


def drop_kv_(model) -> None:
    for layer in adapter_for(model).layers_of(model):
        layer.attn.dq_attention.k_quantizer = layer.attn.dq_attention.v_quantizer = None


def clip_one_(model) -> None:
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            m.spec = dataclasses.replace(m.spec, clip_ratio=1.0)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def measure(run: Path, work: Path) -> dict:
    spec = json.loads((run / "dartquant.json").read_text())
    cfg = RunConfig.from_dict(spec["quantization"])
    metrics = json.loads((run / "metrics.json").read_text())
    ev = dict(seqlen=cfg.eval.seqlen, max_windows=cfg.eval.max_windows, progress=False)
    row = {"run": str(run), "model": cfg.model, "method": cfg.method, "w_quantizer": cfg.scheme.w_quantizer,
           "eval": {"seqlen": cfg.eval.seqlen, "max_windows": cfg.eval.max_windows},
           "fp16_bytes": fp16_bytes(cfg.model), "ppl": {"run": metrics["ppl"]}}
    model, tok = load_model(run)
    drop_kv_(model)
    row["ppl"]["run_no_kv"] = evaluate_ppl(model, tok, **ev)
    clip_one_(model)
    row["ppl"]["run_no_kv_clip1"] = evaluate_ppl(model, tok, **ev)
    ids = tok(open(__file__).read(), return_tensors="pt").input_ids[:, :cfg.eval.seqlen]
    # The run's own sensitivity to float round-off: its logits when the embeddings move by ~1e-7
    # relative. A W4A4 model flips activation codes at near-ties, so no export can match it closer.
    emb = model.get_input_embeddings()(ids)
    noisy = emb * (1 + 1e-7 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        ref = model(ids).logits
        row["roundoff_floor_w4a4"] = (model(inputs_embeds=noisy).logits - ref).abs().max().item()
        for m in model.modules():
            if isinstance(m, ActQuantizer):
                m.enabled = False
        ref_w4a16 = model(ids).logits
        row["roundoff_floor_w4a16"] = (model(inputs_embeds=noisy).logits - ref_w4a16).abs().max().item()
    row["ppl"]["run_w4a16"] = evaluate_ppl(model, tok, **ev)
    del model
    for variant, dtype, weight_only in VARIANTS:
        out = work / f"{run.name}-{variant}"
        t0 = time.perf_counter()
        info = export_run(run, out, dtype=dtype, drop_kv_quant=True, weight_only=weight_only, overwrite=True,
                          progress=False)
        seconds = time.perf_counter() - t0
        exported, _ = load_export(out, torch.float32)
        with torch.no_grad():
            got = exported(ids).logits
        ref_v = ref_w4a16 if weight_only else ref
        row[variant] = {"bytes": folder_bytes(out), "seconds": round(seconds, 2),
                      "size_vs_fp16": round(folder_bytes(out) / row["fp16_bytes"], 4),
                      "max_abs_logit_diff": (got - ref_v).abs().max().item(), "max_abs_logit": ref_v.abs().max().item(),
                      "not_expressible": info["not_expressible"]}
        row["ppl"][f"export_{variant}"] = evaluate_ppl(exported, tok, **ev)
        del exported
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--work", type=Path, required=True, help="where the exports are written")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for run in args.runs:
        rows.append(measure(run, args.work))
        write_json(args.json, {"rows": rows, "torch_threads": torch.get_num_threads()})
    print(f"{'run':<34}{'stage':<18}{'wiki':>9}{'c4':>9}")
    for r in rows:
        for stage, ppl in r["ppl"].items():
            print(f"{Path(r['run']).name:<34}{stage:<18}{ppl['wiki']:>9.3f}{ppl['c4']:>9.3f}")
    print(f"\n{'run':<34}{'variant':<12}{'MiB':>8}{'vs FP16':>9}{'export s':>10}{'max|dlogit|':>13}{'max|logit|':>12}")
    for r in rows:
        for variant, _, _ in VARIANTS:
            d = r[variant]
            print(f"{Path(r['run']).name:<34}{variant:<12}{d['bytes'] / 2**20:>8.1f}{d['size_vs_fp16']:>9.3f}"
                  f"{d['seconds']:>10.1f}{d['max_abs_logit_diff']:>13.2e}{d['max_abs_logit']:>12.2f}")


if __name__ == "__main__":
    main()
