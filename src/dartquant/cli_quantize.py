"""`dartquant quantize` and `dartquant eval`: flags are the RunConfig's flat names (kebab-case)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from .kernels.backend import PREFILL_OPERAND_CHOICES, PREFILL_OPERAND_HELP


_HELP = {
    "method": "rotation method (rtn = no rotation); registered: see `dartquant quantize --help`",
    "w_quantizer": "rtn or gptq (default: gptq, or rtn for --method rtn)",
    "rotations": "rotations .safetensors to apply instead of computing them",
    "a_bits_overrides": "per-role activation bits, e.g. down=8 o=8",
    "tasks": "zero-shot tasks (lm-eval), e.g. arc_easy piqa; none by default",
    "eval_max_windows": "score at most this many perplexity windows per corpus",
    "eval_corpora": "perplexity corpora: wiki and/or c4 (default: both)",
    "w_group_size": "weight group size (default: per output channel)",
    "a_sink_tokens": "the first N positions of every sequence skip the decoder linears' 4-bit input quantizers "
                     "(the attention sink's massive activations). Not in the papers' W4A4KV4 protocol, not run by "
                     "--backend triton, quantized in an export (default: 0)",
    "kv_sink_tokens": "keep the K/V of the first N positions of every sequence unquantized (the attention "
                      "sink; IntactKV). Not in the papers' W4A4KV4 protocol, and not run by --kv kernels "
                      "(default: 0)",
    "dq_lr_grid": "DartQuant: fit R1 / R2 at each of these learning rates and keep the lowest held-out "
                  "calibration loss, e.g. 1e-3 1e-2 1e-1 1 10 (default: none, use --dq-r1-lr / --dq-r2-lr)",
    "stream": "layer streaming: auto (stream when the float32 model exceeds a third of host memory), true, false",
    "shard_mb": "a streamed run's checkpoint is split into shards of about this many MB (default 2048)",
    "r1": "rotate the residual stream (R1); false for families that cannot carry it (Gemma 3: quarot only)",
    "r1_online": "with --r1 false: a Hadamard on the q/k/v input and one on the gate/up input of every layer, "
                 "applied online (R1's job where R1 cannot be folded; Gemma 3)",
    "r4": "online Hadamard on the down_proj input (default: true; false for duquant, whose own online "
          "transform takes its place)",
    "qk_balance": "scale q_proj's and k_proj's output channels (RoPE pairs tied; q . k unchanged) so that q and k "
                  "carry the same energy per channel pair, from calibration statistics: less error from the 4-bit "
                  "K cache, nothing online (default: false)",
    "e2e_amp": "end-to-end training precision: auto (bf16 autocast on CUDA, fp32 elsewhere), bf16, off",
    "gptq_true_sequential": "GPTQ per block in steps (q/k/v, o, gate/up, down), each from inputs computed with "
                            "the earlier steps quantized; 4 forwards per block (default: false, one)",
    "gptq_asymmetric": "GPTQ against the unquantized-activation output: Hessians from each linear's 4-bit "
                       "inputs, target weight W C H^-1, so the weights absorb part of the activation "
                       "quantizer's error (GPTAQ's asymmetric calibration; default: false)",
    "gptq_asymmetric_qkv": "with gptq_asymmetric: false keeps plain GPTQ for q/k/v, whose outputs the 4-bit "
                           "K/V quantizer reads (default: true)",
    "gptq_asymmetric_holdout": "with gptq_asymmetric: shrink each linear's target towards its weight by the "
                               "strength two-fold cross-validation over the calibration windows picks "
                               "(17 float64 solves per input: minutes a layer on a CPU at Qwen2.5-0.5B's "
                               "MLP width; default: false)",
    "gptq_hessian_mb": "collect a block's GPTQ Hessians in forwards holding at most this many MB of them "
                       "(same result, more forwards; default: all at once unless they exceed 40%% of a GPU's "
                       "free memory)",
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
    from .config import RunConfig
    from .typecheck import resolve

    for flat, (section, f) in RunConfig.flat_fields().items():
        owner = RunConfig if section is None else type(RunConfig().section(section))
        hint = resolve(f.type, owner)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kw: dict = {"default": None, "dest": flat, "help": _HELP.get(flat, f"(default: {default!r})")}
        flag = "--" + flat.replace("_", "-")
        text = str(hint)
        if hint is bool or text == "bool | None":
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
    from .runs import check_out_dir
    from .pipeline import run_quantize

    check_out_dir(args.out, args.overwrite, inputs=(args.recipe,))  # the recipe too must survive --overwrite
    cfg = resolve_config(args)
    if args.export:  # what the export cannot say is refused before any work
        from .export import check_exportable

        check_exportable(cfg.scheme, drop_kv_quant=True)
        if cfg.method_spec.export_refusal:
            from .export import ExportError

            raise ExportError(f"--export: {cfg.method} runs cannot be exported: {cfg.method_spec.export_refusal}")
        check_out_dir(args.export, args.overwrite, inputs=(args.out,))
    metrics = run_quantize(cfg, args.out, overwrite=args.overwrite, eval_fp=not args.skip_fp_eval,
                           progress=not args.json)
    if args.export:
        from .export import export_run

        metrics["export"] = export_run(args.out, args.export, overwrite=args.overwrite, drop_kv_quant=True,
                                       progress=not args.json)
    if args.json:
        print(json.dumps(metrics))
    else:
        print_summary(metrics)
        print(f"\nrun folder: {args.out}")
    if cfg.eval.fail_on_collapse and metrics.get("quality_check", {}).get("verdict") == "collapsed":
        from .quant.guard import COLLAPSE_EXIT_STATUS

        return COLLAPSE_EXIT_STATUS
    return 0


def print_summary(metrics: dict) -> None:
    rows = []
    if "fp" in metrics:
        rows.append(("FP", metrics["fp"]["ppl"], metrics["fp"].get("zeroshot", {}).get("avg")))
    label = metrics["method"]
    if "w_bits" in metrics:  # a quantized model (a model evaluated as loaded has no scheme to name)
        label += f" W{metrics['w_bits']}A{metrics['a_bits']}KV{metrics['kv_bits']}"
    rows.append((label, metrics["ppl"], metrics.get("zeroshot", {}).get("avg")))
    corpora = [k for k in metrics["ppl"] if k != "tokens"]
    print(f"\n{'model':<24}" + "".join(f"{c + ' ppl':>12}" for c in corpora) + f"{'0-shot avg':>12}")
    for name, ppl, zs in rows:
        print(f"{name:<24}" + "".join(f"{ppl[c]:>12.3f}" for c in corpora) + (f"{zs:>12.4f}" if zs is not None else f"{'-':>12}"))
    secs = metrics.get("seconds", {})
    if secs:
        print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()))


def run_eval_config(model: str):
    """The resolved RunConfig of a `dartquant quantize` run folder (its config.yaml), else None."""
    from pathlib import Path

    from .config import RunConfig, load_yaml

    folder = Path(model)
    path = folder / "config.yaml"
    if not path.is_file() or not (folder / "dartquant.json").is_file():
        return None
    data = load_yaml(path)
    if not isinstance(data, dict) or "command" in data:  # a `dartquant rotate` folder: no eval settings
        return None
    return RunConfig.from_dict(data, where=str(path))


def cmd_eval(args) -> int:
    """Evaluate with the run's own settings (config.yaml of a quantize run) unless flags say
    otherwise, so that `dartquant eval RUN` reproduces the run's numbers exactly."""
    import torch

    from .config import RunConfig
    from .pipeline import evaluate

    run = run_eval_config(args.model)
    base = run or RunConfig()
    flags = {"eval_seqlen": "seqlen", "eval_max_windows": "max_windows", "eval_corpora": "corpora", "tasks": "tasks",
             "zeroshot_limit": "limit", "device": "device", "dtype": "dtype"}
    ev = base.eval
    settings = {"eval_seqlen": ev.seqlen, "eval_max_windows": ev.max_windows, "eval_corpora": ev.corpora,
                "tasks": ev.tasks,
                "zeroshot_limit": ev.zeroshot_limit, "device": base.device, "dtype": base.dtype}
    if run is not None and settings["device"].startswith("cuda") and not torch.cuda.is_available():
        settings["device"] = "cpu"
    # flags given on the command line win (absent ones are not in args: argparse.SUPPRESS)
    settings.update({k: getattr(args, f) for k, f in flags.items() if hasattr(args, f)})
    cfg = RunConfig.from_flat(**settings, seed=base.seed)
    cfg.resolve().validate()  # before loading: --max-windows 0, unknown tasks, ...
    from .pipeline import check_data_packages

    check_data_packages(cfg)  # the text / task data there (or installed) before loading
    from .kernels.backend import load_for_backend

    # torch: zoo.load_model on the CPU (evaluate moves it); triton: the run's linears on the W4A4 kernels,
    # on the run's device (refusals before loading)
    backend = getattr(args, "backend", "torch")
    model, tokenizer = load_for_backend(args.model, backend, dtype=getattr(torch, cfg.dtype),
                                        device=cfg.device if backend == "triton" else "cpu",
                                        prefill_operand=getattr(args, "prefill_operand", None))
    res = evaluate(model, tokenizer, cfg, progress=not args.json)
    if args.json:
        print(json.dumps(res))
    else:
        # a quantize run's folder: its method and bits name the row; any other model: its name alone
        named = {"method": args.model}
        if run is not None:
            named = {"method": run.method, "w_bits": run.scheme.w_bits, "a_bits": run.scheme.a_bits,
                     "kv_bits": run.scheme.kv_bits}
        print_summary({**named, **res})
        if run is not None:
            print(f"settings from {args.model}/config.yaml: seqlen {cfg.eval.seqlen}, max windows "
                  f"{cfg.eval.max_windows}, tasks {cfg.eval.tasks or 'none'}, {cfg.dtype} on {cfg.device}")
    return 0


def add_quant_commands(sub) -> None:
    s = sub.add_parser("quantize", help="rotate, calibrate, quantize (W/A/KV), evaluate and save")
    s.add_argument("--recipe", help="YAML file of RunConfig settings (nested or flat names); flags override it")
    s.add_argument("--out", required=True, help="run folder (must not exist or be empty)")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--skip-fp-eval", action="store_true", help="do not evaluate the unquantized model")
    s.add_argument("--export", metavar="DIR", help="also write a compressed-tensors export of the run (as "
                   "`dartquant export RUN --out DIR --drop-kv-quant`; see docs/EXPORT.md)")
    s.add_argument("--json", action="store_true", help="print metrics.json's content")
    _add_config_flags(s)
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("eval", help="evaluate a model or a saved run folder (with the run's own settings "
                                    "unless flags override them)")
    s.add_argument("model", help="run folder, HF folder, bundled name or .gguf")
    unset = argparse.SUPPRESS  # an absent flag keeps the run's own setting
    s.add_argument("--tasks", nargs="*", default=unset, help="zero-shot tasks (default: the run's, else none)")
    s.add_argument("--limit", type=_optional(int), default=unset, help="examples per zero-shot task ('none': all)")
    s.add_argument("--seqlen", type=int, default=unset, help="default: the run's eval_seqlen, else 2048")
    s.add_argument("--max-windows", type=_optional(int), default=unset,
                   help="windows per corpus ('none': all); default: the run's eval_max_windows, else all")
    s.add_argument("--corpora", nargs="+", choices=("wiki", "c4"), default=unset,
                   help="perplexity corpora (default: the run's eval_corpora, else wiki and c4)")
    s.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"), default=unset,
                   help="default: the run's dtype, else float32")
    s.add_argument("--device", default=unset, help="default: the run's device (cpu without CUDA), else cpu")
    s.add_argument("--backend", choices=("torch", "triton"), default="torch",
                   help="triton: the run's linears on the W4A4 kernels (W4 per-channel + A4 per-token runs only)")
    s.add_argument("--prefill-operand", choices=PREFILL_OPERAND_CHOICES, default=None,
                   help=PREFILL_OPERAND_HELP)
    s.add_argument("--json", action="store_true", help="print the metrics object")
    s.set_defaults(func=cmd_eval)
