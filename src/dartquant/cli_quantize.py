"""`dartquant quantize` and `dartquant eval`: flags mirror QuantConfig's fields (kebab-case)."""

from __future__ import annotations

import argparse
import dataclasses
import json


_HELP = {
    "method": "rotation method (rtn = no rotation); registered: see `dartquant quantize --help`",
    "w_quantizer": "rtn or gptq (default: gptq, or rtn for --method rtn)",
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


def _optional(kind):
    def parse(v: str):
        return None if v.lower() in ("none", "null") else kind(v)
    parse.__name__ = kind.__name__
    return parse


def _role_bits(item: str) -> tuple[str, int]:
    role, _, bits = item.partition("=")
    if not bits.isdigit():
        raise argparse.ArgumentTypeError(f"expected ROLE=BITS (e.g. down=8), got {item!r}")
    return role, int(bits)


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per flat RunConfig name; default None so that only given flags override a recipe."""
    from .config import RunConfig, _resolve

    for flat, (section, f) in RunConfig.flat_fields().items():
        owner = RunConfig if section is None else type(RunConfig().section(section))
        hint = _resolve(f.type, owner)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kw: dict = {"default": None, "dest": flat, "help": _HELP.get(flat, f"(default: {default!r})")}
        flag = "--" + flat.replace("_", "-")
        text = str(hint)
        if hint is bool:
            p.add_argument(flag, type=_parse_bool, metavar="BOOL", **kw)
        elif text.startswith("list[float]"):
            p.add_argument(flag, nargs="*", type=float, metavar="X", **kw)
        elif text.startswith("list["):
            p.add_argument(flag, nargs="*", **kw)
        elif text.startswith("dict["):
            p.add_argument(flag, nargs="*", type=_role_bits, metavar="ROLE=BITS", **kw)
        elif hint in (int, float, str):
            p.add_argument(flag, type=hint, **kw)
        elif text in ("int | None", "typing.Optional[int]"):
            p.add_argument(flag, type=_optional(int), **kw)
        else:  # str | None
            p.add_argument(flag, **kw)


def resolve_config(args):
    """The recipe (if any), then every given flag on top, checked as one RunConfig."""
    from .config import RunConfig, load_yaml

    settings: dict = {}
    if args.recipe:
        RunConfig.from_yaml(args.recipe)  # its own errors name the file
        settings.update(load_yaml(args.recipe))
    for flat in RunConfig.flat_fields():
        value = getattr(args, flat, None)
        if value is None:
            continue
        if isinstance(value, list) and value and isinstance(value[0], tuple):  # ROLE=BITS items
            value = dict(value)
        settings[flat] = value
    return RunConfig.from_dict(settings)


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

    from .config import RunConfig
    from .pipeline import evaluate
    from .zoo import load_model

    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype))
    cfg = RunConfig.from_dict({"eval_seqlen": args.seqlen, "eval_max_windows": args.max_windows,
                               "tasks": args.tasks or [], "zeroshot_limit": args.limit, "device": args.device})
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
