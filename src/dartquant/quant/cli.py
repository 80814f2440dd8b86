"""`dartquant quantize` and `dartquant eval`: flags mirror QuantConfig's fields (kebab-case)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from .config import METHODS, WEIGHT_QUANTIZERS, QuantConfig

_HELP = {
    "method": f"rotation method: {', '.join(METHODS)} (rtn = no rotation)",
    "w_quantizer": f"{' or '.join(WEIGHT_QUANTIZERS)} (default: gptq, or rtn for --method rtn)",
    "rotations": "rotations .safetensors to apply instead of computing them",
    "a_bits_overrides": "per-role activation bits, e.g. down=8 o=8",
    "tasks": "zero-shot tasks (lm-eval), e.g. arc_easy piqa; none by default",
    "eval_max_windows": "score at most this many perplexity windows per corpus",
    "w_group_size": "weight group size (default: per output channel)",
    "dq_lr_grid": "DartQuant: fit R1 / R2 at each of these learning rates and keep the lowest held-out "
                  "calibration loss, e.g. 1e-3 1e-2 1e-1 1 10 (default: none, use --dq-r1-lr / --dq-r2-lr)",
    "e2e_amp": "end-to-end training precision: auto (bf16 autocast on CUDA, fp32 elsewhere), bf16, off",
}


def _parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def _optional_int(v: str) -> int | None:
    return None if v.lower() in ("none", "null") else int(v)


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per QuantConfig field; default None so that only given flags override a recipe."""
    for f in dataclasses.fields(QuantConfig):
        flag = "--" + f.name.replace("_", "-")
        kw: dict = {"default": None, "dest": f.name, "help": _HELP.get(f.name, f"(default: {f.default!r})"
                                                                   if f.default is not dataclasses.MISSING else None)}
        if f.name == "tasks":
            p.add_argument(flag, nargs="*", **kw)
        elif f.name == "a_bits_overrides":
            p.add_argument(flag, nargs="*", metavar="ROLE=BITS", **kw)
        elif f.name == "dq_lr_grid":
            p.add_argument(flag, nargs="*", type=float, metavar="LR", **kw)
        elif f.type in ("bool",):
            p.add_argument(flag, type=_parse_bool, metavar="BOOL", **kw)
        elif f.type in ("int",):
            p.add_argument(flag, type=int, **kw)
        elif f.type in ("int | None",):
            p.add_argument(flag, type=_optional_int, **kw)
        elif f.type in ("float",):
            p.add_argument(flag, type=float, **kw)
        else:
            p.add_argument(flag, **kw)


def resolve_config(args) -> QuantConfig:
    base = QuantConfig.from_yaml(args.recipe).to_dict() if args.recipe else QuantConfig().to_dict()
    for name in QuantConfig.field_names():
        value = getattr(args, name, None)
        if value is None:
            continue
        if name == "a_bits_overrides":
            parsed = {}
            for item in value:
                role, _, bits = item.partition("=")
                if not bits.isdigit():
                    raise ValueError(f"--a-bits-overrides expects ROLE=BITS items (e.g. down=8), got {item!r}")
                parsed[role] = int(bits)
            value = parsed
        base[name] = value
    return QuantConfig.from_dict(base)


def cmd_quantize(args) -> int:
    from .pipeline import run_quantize

    cfg = resolve_config(args)
    metrics = run_quantize(cfg, args.out, overwrite=args.overwrite, eval_fp=not args.skip_fp_eval,
                           progress=not args.json)
    if args.json:
        print(json.dumps(metrics))
    else:
        print_summary(metrics)
        print(f"\nrun folder: {args.out}")
    if cfg.fail_on_collapse and metrics.get("quality_check", {}).get("verdict") == "collapsed":
        from .guard import COLLAPSE_EXIT_STATUS

        return COLLAPSE_EXIT_STATUS
    return 0


def print_summary(metrics: dict) -> None:
    rows = []
    if "fp" in metrics:
        rows.append(("FP", metrics["fp"]["ppl"], metrics["fp"].get("zeroshot", {}).get("avg")))
    label = f"{metrics['method']} W{metrics['w_bits']}A{metrics['a_bits']}KV{metrics['kv_bits']}"
    rows.append((label, metrics["ppl"], metrics.get("zeroshot", {}).get("avg")))
    corpora = [k for k in metrics["ppl"] if k != "tokens"]
    print(f"\n{'model':<24}" + "".join(f"{c + ' ppl':>12}" for c in corpora) + f"{'0-shot avg':>12}")
    for name, ppl, zs in rows:
        print(f"{name:<24}" + "".join(f"{ppl[c]:>12.3f}" for c in corpora) + (f"{zs:>12.4f}" if zs is not None else f"{'-':>12}"))
    secs = metrics.get("seconds", {})
    if secs:
        print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()))


def cmd_eval(args) -> int:
    import torch

    from ..zoo import load_model
    from .config import QuantConfig
    from .pipeline import evaluate

    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype))
    cfg = QuantConfig(eval_seqlen=args.seqlen, eval_max_windows=args.max_windows, tasks=args.tasks or [],
                      zeroshot_limit=args.limit, device=args.device)
    res = evaluate(model, tokenizer, cfg, progress=not args.json)
    if args.json:
        print(json.dumps(res))
    else:
        print_summary({"method": args.model, "w_bits": "?", "a_bits": "?", "kv_bits": "?", **res})
    return 0


def add_quant_commands(sub) -> None:
    s = sub.add_parser("quantize", help="rotate, calibrate, quantize (W/A/KV), evaluate and save")
    s.add_argument("--recipe", help="YAML file of QuantConfig settings; flags override it")
    s.add_argument("--out", required=True, help="run folder (must not exist or be empty)")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--skip-fp-eval", action="store_true", help="do not evaluate the unquantized model")
    s.add_argument("--json", action="store_true", help="print metrics.json's content")
    _add_config_flags(s)
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("eval", help="evaluate a model or a saved run folder")
    s.add_argument("model", help="run folder, HF folder, bundled name or .gguf")
    s.add_argument("--tasks", nargs="*", default=[], help="zero-shot tasks")
    s.add_argument("--limit", type=int, default=None, help="examples per zero-shot task")
    s.add_argument("--seqlen", type=int, default=2048)
    s.add_argument("--max-windows", type=int, default=None)
    s.add_argument("--dtype", default="float32")
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", action="store_true", help="print the metrics object")
    s.set_defaults(func=cmd_eval)
