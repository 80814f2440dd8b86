"""End to end: a Llama-shaped model (random weights) in bf16 vs the same model on the W4A4 kernels.

Through a real run folder (the default way: what `dartquant bench` measures), three steps, each
skipped when its output exists under --dir, each a subprocess:
  1. a random-weight sharded float16 model folder of the shape (whole_job.write_model),
  2. `dartquant quantize --method quarot --w-quantizer rtn --stream true` into a run folder
     (random weights: the perplexity is meaningless, the guard is off),
  3. `dartquant bench RUN --prefill 2048 --batch 1 8 64 --json OUT`.
    PYTHONPATH=src python benchmarks/kernels_e2e.py --run-shape llama2-7b --dir /tmp/kb \
        --out docs/results/kernels_bench_h200.json                             # GPU, ~13.5 + 3.8 GB of disk
    PYTHONPATH=src TRITON_INTERPRET=1 python benchmarks/kernels_e2e.py --run-shape tiny --dir /tmp/kb \
        --out /tmp/kb/bench.json --device cpu -- --prefill 16 --batch 4 --context 8 # logic check on the CPU
Arguments after `--` go to `dartquant bench`. On a machine with a per-command time limit, split it:
    PYTHONPATH=src python benchmarks/kernels_e2e.py --run-shape llama2-7b --dir /tmp/kb --prepare-only
    PYTHONPATH=src python -m dartquant.cli bench /tmp/kb/run-llama2-7b-quarot-rtn --json OUT

A bare GPU machine cannot install the corpora the quantize step evaluates on: write them here
(`--write-data-cache DIR`, 2.5 MB), carry DIR there and set DARTQUANT_CACHE=DIR. The random model
folder gets a character tokenizer (no SmolLM2 needed).

The in-memory mode (no run folder, no corpora: the model is built and converted by hand, then
timed by the same harness as `dartquant bench`):
    PYTHONPATH=src python benchmarks/kernels_e2e.py --out e2e.json              # Llama-2-7B shape, GPU
    PYTHONPATH=src TRITON_INTERPRET=1 python benchmarks/kernels_e2e.py --tiny   # logic check on the CPU

There the W4A4 model is built the way a QuaRot run folder is (QLinear + 4-bit asymmetric
per-token input quantizer, clip 0.9; down_proj with the online Hadamard R4; RTN 4-bit symmetric
per-channel weights), then converted with `kernels.linear.convert_qlinears_`, and each block norm
fused with its readers' quantization and q / k / v, gate / up merged into one GEMM each, as
`dartquant bench` does (`kernels.fusions`; `--no-fuse-norms`, `--no-merge-siblings`: apart;
`--compare-unfused`: both timed).  Attention, the final norm,
embeddings and lm_head are transformers' own on both sides (bf16 K/V on both sides).  Timing,
both modes: kernels/bench.py (prefill of `--prefill` tokens at batch 1; decode steps on a static
cache of `--context` tokens, in a CUDA graph on both sides where capture works).
(docs/results/kernels_e2e_h200.json came from an older harness: eager decode, no CUDA graphs.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from dartquant.kernels.backend import PREFILL_OPERAND_CHOICES  # noqa: E402
from dartquant.kernels.bench import weight_bytes  # noqa: E402
from dartquant.kernels.fusions import apply_fusions_, fuse_norm_quant_, unfuse_norm_quant_, verify_fused_norms_  # noqa: E402
from dartquant.kernels.linear import convert_qlinears_, replace_modules_  # noqa: E402
from dartquant.modules import OnlineHadamard, as_qlinear  # noqa: E402
from dartquant.quant.act import ActQuantizer  # noqa: E402
from dartquant.quant.primitives import QuantizedTensor, QuantSpec  # noqa: E402

ROLES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# the in-memory shapes (`--shape`): Llama-2-7B (MHA, down_proj's Hadamard 11008 = 172 * 64) and Llama-3-8B
# (GQA with 8 KV heads, 14336 = 28 * 512, a 128k vocabulary)
SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
}


def build(tiny: bool, device, shape: str = "llama2-7b"):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=128, max_position_embeddings=512)
    else:
        cfg = LlamaConfig(**SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return model


def to_w4a4_(model):
    """QLinear + quantizers as a run folder has them, then the kernels. Returns the converted names."""
    qtensors = {}
    spec_a = QuantSpec(bits=4, symmetric=False, clip_ratio=0.9)
    for i, layer in enumerate(model.model.layers):
        for role in ROLES:
            parent_name, _, child = role.rpartition(".")
            parent = layer.get_submodule(parent_name)
            q = as_qlinear(getattr(parent, child))
            qt = QuantizedTensor.from_float(q.weight.detach().float(), QuantSpec(bits=4, symmetric=True))
            q.input_quantizer = ActQuantizer(spec_a)
            if child == "down_proj":
                q.input_rotation = OnlineHadamard(q.in_features)
            setattr(parent, child, q)
            qtensors[f"model.layers.{i}.{role}"] = qt
    return convert_qlinears_(model, qtensors)


def build_w4a4(device, prefill_operand: str = "scaled_mm"):
    """The Llama-2-7B-shape model converted (to_w4a4_) with every fusion, as `dartquant bench` runs it."""
    from dartquant.kernels.linear import W4A4Linear

    model = build(False, device)
    to_w4a4_(model)
    for m in model.modules():
        if isinstance(m, W4A4Linear):
            m.prefill_operand = prefill_operand
    apply_fusions_(model, device)
    return model


# kernel names -> what they are (the breakdown of `--profile`); first match wins
KERNEL_CATEGORIES = [
    ("activation kernel (Hadamard + quantize)", ("_hadamard_quant", "_hadamard_split", "_quantize_split")),
    ("RMSNorm + quantize (fused)", ("_rmsnorm_quant",)),
    ("W4A4 GEMM (Triton)", ("_w4a4",)),
    ("GEMM (cuBLAS: bf16, FP8 scaled_mm)", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90_", "matmul")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
    ("copies / fills", ("memcpy", "memset", "copy", "fillfunctor")),
]


def kernel_category(name: str) -> str:
    low = name.lower()
    for cat, keys in KERNEL_CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other (norms, rotary, elementwise)"


def kernel_breakdown(fn, reps: int = 3) -> dict:
    """GPU kernel time of one call of `fn` by category (torch.profiler, CUDA activity), against the
    call's wall time: what the time goes to, and how much of it no kernel runs (launch gaps)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()  # wall time without the profiler, the same calls
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t) * 1e3 / reps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    cats, kernels = {}, []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0) or 0
        if us <= 0:
            continue
        ms = us / 1e3 / reps
        cats[kernel_category(e.key)] = cats.get(kernel_category(e.key), 0.0) + ms
        kernels.append({"kernel": e.key[:90], "ms": ms, "calls": e.count // reps})
    kernels.sort(key=lambda r: -r["ms"])
    return {"wall_ms": wall_ms, "kernel_ms": sum(cats.values()),
            "categories_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1])), "top_kernels": kernels[:12]}


def print_breakdown(label: str, b: dict) -> None:
    print(f"\n{label}: wall {b['wall_ms']:.2f} ms per call (eager), GPU kernels {b['kernel_ms']:.2f} ms")
    print("| what | ms | share of kernel time |\n|---|---|---|")
    for cat, ms in b["categories_ms"].items():
        print(f"| {cat} | {ms:.3f} | {ms / max(b['kernel_ms'], 1e-9):.0%} |")
    print("| (no kernel running: launch gaps, host) | "
          f"{max(b['wall_ms'] - b['kernel_ms'], 0):.3f} | - |", flush=True)


def profile_model(model, s, device, label: str) -> dict:
    """Kernel breakdown of the prefill (batch 1, s.prefill tokens) and of one eager decode step at
    each batch; errors are recorded, never fatal (the timings are already written)."""
    from dartquant.kernels.bench import _forward_kwargs, make_decode_step

    out = {}
    try:
        ids = torch.randint(0, model.config.vocab_size, (1, s.prefill), device=device,
                            generator=torch.Generator(device).manual_seed(0))
        kw = _forward_kwargs(model)
        with torch.no_grad():
            out["prefill"] = kernel_breakdown(lambda: model(ids, use_cache=False, **kw))
        print_breakdown(f"{label}, prefill {s.prefill}", out["prefill"])
        for b in s.batches:
            step = make_decode_step(model, b, s.context, device)
            out[f"decode_b{b}"] = kernel_breakdown(step, reps=10)
            print_breakdown(f"{label}, one eager decode step, batch {b}", out[f"decode_b{b}"])
            del step
            torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001 - a profile is extra; its failure is recorded
        out["error"] = f"{type(e).__name__}: {e}"[:500]
        print(f"{label}: profile failed: {out['error']}", flush=True)
    return out


def in_memory(args) -> int:
    """bf16 vs the same model converted by hand, timed by `dartquant bench`'s harness (kernels/bench.py)."""
    from dartquant.kernels.bench import BenchSettings, format_table, measure_side, ratios
    from dartquant.runs import write_json

    device = torch.device("cpu" if args.tiny else "cuda")
    s = BenchSettings(prefill=8 if args.tiny else args.prefill, batches=[3] if args.tiny else args.batch,
                      context=4 if args.tiny else args.context, device=str(device))
    model = build(args.tiny, device, args.shape)
    result = {"run": "in memory: " + ("tiny" if args.tiny else f"{args.shape} shape, random weights, RTN, "
                                      "R4 on down_proj, no R1 / R2 folded (same cost)"),
              "settings": {**s.__dict__},
              # which card gave the numbers: an H100 and an H200 differ in bandwidth, so ratios too
              "machine": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                          "torch": torch.__version__}}
    result["bf16"] = measure_side(model, s, device)
    print("bf16", json.dumps({k: v for k, v in result["bf16"].items() if not k.startswith("decode")}), flush=True)
    if args.profile and device.type == "cuda":
        result.setdefault("profile", {})["bf16"] = profile_model(model, s, device, "bf16")
    if args.bf16_fused_norms and device.type == "cuda":  # the stricter baseline: bf16 with one-kernel norms
        undo = swap_norms_(model, OneKernelRMSNorm)
        with torch.no_grad():
            probe = torch.randint(0, model.config.vocab_size, (1, 64), device=device)
            a = model(probe, use_cache=False).logits.float()
            undo()
            b = model(probe, use_cache=False).logits.float()
            swap_norms_(model, OneKernelRMSNorm)
        result["bf16_fused_norms"] = measure_side(model, s, device)
        result["bf16_fused_norms"]["logits_max_abs_diff_vs_bf16"] = (a - b).abs().max().item()
        undo()
        print("bf16 with one-kernel RMSNorms", json.dumps({k: v for k, v in result["bf16_fused_norms"].items()
                                                          if not k.startswith("decode")}), flush=True)
    t = time.time()
    result["converted_linears"] = len(to_w4a4_(model))
    result["convert_s"] = time.time() - t
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.compare_unfused:  # the same kernels, no fusion (norms apart, siblings apart)
        result["w4a4_no_fusions"] = measure_side(model, s, device)
        result["ratios_no_fusions"] = ratios({"bf16": result["bf16"], "w4a4": result["w4a4_no_fusions"]})
        print(f"w4a4, no fusions: {json.dumps(result['ratios_no_fusions'])}", flush=True)
    # as `dartquant bench` and `--backend triton` run it
    result["fusions"] = apply_fusions_(model, device, norms=not args.no_fuse_norms, siblings=not args.no_merge_siblings)
    result["w4a4"] = measure_side(model, s, device)
    result["ratios"] = ratios(result)
    print(format_table(result))
    from dartquant.kernels.linear import W4A4Linear

    probe = torch.randint(0, model.config.vocab_size, (1, 96), device=device,
                          generator=torch.Generator(device).manual_seed(2))
    with torch.no_grad():
        ref_logits = model(probe, use_cache=False).logits.float() if args.gemm_backends else None
    for be in args.gemm_backends:  # the whole w4a4 side again with every linear on another GEMM backend
        for mod in model.modules():
            if isinstance(mod, W4A4Linear):
                mod.backend = be
        side = measure_side(model, s, device)
        with torch.no_grad():
            diff = (model(probe, use_cache=False).logits.float() - ref_logits).abs().max().item()
        result.setdefault("gemm_backends", {})[be] = {
            "side": side, "ratios": ratios({"bf16": result["bf16"], "w4a4": side}),
            "logits_max_abs_diff_vs_auto": diff}
        print(f"w4a4 with the {be} GEMM: {json.dumps(result['gemm_backends'][be]['ratios'])}", flush=True)
    for mod in model.modules():
        if isinstance(mod, W4A4Linear):
            mod.backend = "auto"
    # prefill again with the GEMM's activation operand as 1-byte planar codes (w4a4_gemm A8)
    from dartquant.kernels.bench import time_prefill

    ids = torch.randint(0, model.config.vocab_size, (1, s.prefill), device=device,
                        generator=torch.Generator(device).manual_seed(1))
    ref_logits = unfused_logits = None
    for operand in args.prefill_operands:
        for mod in model.modules():
            if isinstance(mod, W4A4Linear):
                mod.prefill_operand = operand
                if args.tiny:  # the tiny prefill is shorter than the planar threshold
                    mod.planar_min_tokens = 0
        if args.compare_unfused and unfuse_norm_quant_(model):  # this operand with the norms apart first
            u = measure_side(model, s, device) if operand in args.decode_operands else time_prefill(model, s, device)
            u["speedup_vs_bf16"] = result["bf16"]["prefill_ms"] / u["prefill_ms"]
            if operand in args.decode_operands:
                u["ratios"] = ratios({"bf16": result["bf16"], "w4a4": {**u, **weight_bytes(model)}})
            with torch.no_grad():
                unfused_logits = model(ids, use_cache=False).logits.float()
            result.setdefault("prefill_operands_unfused_norms", {})[operand] = u
            print(f"prefill, {operand}, norms not fused: {u['prefill_ms']:.2f} ms ({u['speedup_vs_bf16']:.2f}x bf16)"
                  + (f"; {json.dumps(u['ratios'])}" if "ratios" in u else ""), flush=True)
            fuse_norm_quant_(model)
            result.setdefault("norms_refused_verified", []).append(verify_fused_norms_(model, device))
        if operand in args.decode_operands:  # the whole side: prefill and every decode batch
            r = measure_side(model, s, device)
        else:
            r = time_prefill(model, s, device)
        result.setdefault("prefill_operands", {})[operand] = r
        r["speedup_vs_bf16"] = result["bf16"]["prefill_ms"] / r["prefill_ms"]
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits.float()
        ref_logits = logits if ref_logits is None else ref_logits
        r["logits_max_abs_diff_vs_first"] = (logits - ref_logits).abs().max().item()
        if args.compare_unfused:  # fused norms vs apart: the same model up to the mean's summation order
            r["logits_max_abs_diff_vs_unfused_norms"] = (logits - unfused_logits).abs().max().item()
            r["logits_max_abs"] = logits.abs().max().item()
        r.update(weight_bytes(model))  # scaled_mm adds its 1-byte weight copy (made on first use)
        if operand in args.decode_operands:  # after the bytes: the weight copy exists only once used
            r["ratios"] = ratios({"bf16": result["bf16"], "w4a4": r})
        print(f"prefill, {operand} activation operand: {r['prefill_ms']:.2f} ms ({r['speedup_vs_bf16']:.2f}x bf16), "
              f"logits vs {args.prefill_operands[0]}: {r['logits_max_abs_diff_vs_first']:.3g}", flush=True)
        if "ratios" in r:
            print(f"  {operand} on every planar-size linear, decode too: {json.dumps(r['ratios'])}", flush=True)
    for cfg in args.act_configs:  # the same prefill (last operand) with the blocks activation kernel
        restore = use_blocks_act_kernel(*map(int, cfg.split(",")))
        try:
            r = time_prefill(model, s, device)
            with torch.no_grad():
                logits = model(ids, use_cache=False).logits.float()
        finally:
            restore()
        r["speedup_vs_bf16"] = result["bf16"]["prefill_ms"] / r["prefill_ms"]
        r["logits_max_abs_diff_vs_default_act"] = (logits - ref_logits).abs().max().item() if ref_logits is not None else None
        result.setdefault("act_configs", {})[cfg] = r
        print(f"prefill, blocks activation kernel T,G,warps = {cfg}: {r['prefill_ms']:.2f} ms "
              f"({r['speedup_vs_bf16']:.2f}x bf16), logits vs the default kernel: "
              f"{r['logits_max_abs_diff_vs_default_act']}", flush=True)
    write_json(Path(args.out), result)
    if args.profile and device.type == "cuda":  # after the timings are written: a profile only adds
        for operand in args.prefill_operands or ["default"]:
            for mod in model.modules():
                if isinstance(mod, W4A4Linear) and operand != "default":
                    mod.prefill_operand = operand
            result.setdefault("profile", {})[f"w4a4 {operand}"] = profile_model(model, s, device, f"w4a4, {operand}")
        write_json(Path(args.out), result)
    return 0


class OneKernelRMSNorm(torch.nn.Module):
    """A stricter bf16 baseline (`--bf16-fused-norms`): the RMSNorm as one Triton kernel (one read,
    one write) instead of transformers' six elementwise kernels with fp32 intermediates, i.e. what
    a bf16 model gets from a fused norm (torch.compile, vLLM). Same expressions as LlamaRMSNorm."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm
        self.eps = getattr(norm, "variance_epsilon", None) or norm.eps

    def forward(self, x):
        n = x.shape[-1]
        x2 = x.reshape(-1, n)
        out = torch.empty_like(x2)
        _one_kernel_rmsnorm[(x2.shape[0],)](x2, self.norm.weight, out, x2.stride(0), float(self.eps), N=n,
                                             NP=triton.next_power_of_2(n), num_warps=4 if n <= 4096 else 8)
        return out.reshape(x.shape)


try:
    import triton
    import triton.language as tl

    @triton.jit
    def _one_kernel_rmsnorm(x_ptr, w_ptr, out_ptr, stride, eps, N: tl.constexpr, NP: tl.constexpr):
        row = tl.program_id(0)
        col = tl.arange(0, NP)
        x = tl.load(x_ptr + row.to(tl.int64) * stride + col, mask=col < N, other=0.0).to(tl.float32)
        r = tl.math.rsqrt(tl.sum(x * x, axis=0) * (1.0 / N) + eps)
        h = (x * r).to(tl.bfloat16).to(tl.float32)  # LlamaRMSNorm: cast, then times the gain in bf16
        w = tl.load(w_ptr + col, mask=col < N, other=0.0).to(tl.float32)
        tl.store(out_ptr + row.to(tl.int64) * stride + col, (w * h).to(tl.bfloat16), mask=col < N)
except ImportError:  # pragma: no cover
    triton = None


def swap_norms_(model, make):
    """Replace every module whose class name ends in RMSNorm by make(module). Returns the undo."""
    swapped = {name: m for name, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")}
    replace_modules_(model, {name: make(m) for name, m in swapped.items()})
    return lambda: replace_modules_(model, swapped)


def use_blocks_act_kernel(tokens: int, groups: int, warps: int):
    """Research switch: variant="auto" picks the blocks activation kernel with these parameters
    wherever it applies (act_quant.layout_blocks). Returns the function that undoes it."""
    from dartquant.kernels import act_quant

    auto = act_quant._auto_variant

    def patched(n, rotate, m=None):
        if rotate and act_quant.layout_blocks(n) is not None:
            return dict(variant="blocks", num_warps=warps, rows_per_program=tokens, groups=groups)
        return auto(n, rotate, m)

    act_quant._auto_variant = patched
    return lambda: setattr(act_quant, "_auto_variant", auto)


def write_char_tokenizer(out: Path, vocab: int) -> None:
    """Printable ASCII, one token per character (ids < vocab); needs no files."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)][: vocab - 1]
    tok = Tokenizer(models.WordLevel({"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>").save_pretrained(str(out))


def write_data_cache(folder: Path) -> None:
    """A DARTQUANT_CACHE holding only the two evaluation corpora (2.5 MB): what the quantize step
    reads, for a machine that cannot install the exllamav2 carrier."""
    import shutil

    from dartquant.data import _DATA_DIR, CORPORA, EVAL_CORPORA
    from dartquant.packages import EXLLAMAV2

    target = folder / "packages" / f"{EXLLAMAV2.dist}-{EXLLAMAV2.version}"
    (target / _DATA_DIR).mkdir(parents=True, exist_ok=True)
    for c in EVAL_CORPORA:
        shutil.copy(EXLLAMAV2.file(f"{_DATA_DIR}/{CORPORA[c]}"), target / _DATA_DIR / CORPORA[c])
    (target / ".complete").write_text(EXLLAMAV2.requirement + "\n")
    print(f"wrote {target}: export DARTQUANT_CACHE={folder.resolve()}")


def via_run_folder(args) -> int:
    """Steps 1-3 of the module docstring; each prints its seconds."""
    import subprocess

    sys.path.insert(0, os.path.dirname(__file__))
    import whole_job  # random sharded folders, one tensor in memory at a time

    # a character tokenizer written from nothing: a bare GPU machine has no SmolLM2 to cut one from
    whole_job.write_tokenizer = write_char_tokenizer

    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    model, run = base / args.run_shape, base / f"run-{args.run_shape}-quarot-rtn"
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "src")}
    if not (model / "model.safetensors.index.json").is_file():
        t = time.time()
        gb = whole_job.write_model(model, args.run_shape, None, args.device)
        print(f"wrote {model} ({gb:.1f} GB float16) in {time.time() - t:.0f} s", flush=True)
    if not (run / "metrics.json").is_file():
        cmd = [sys.executable, "-m", "dartquant.cli", "quantize", "--model", str(model), "--method", "quarot",
               "--w-quantizer", "rtn", "--stream", "true", "--device", args.device, "--out", str(run),
               "--overwrite", "--skip-fp-eval", "--eval-max-windows", "1", "--eval-seqlen", "512",
               "--guard-windows", "0", "--fail-on-collapse", "false", "--calib-samples", "2", "--calib-seqlen", "64"]
        t = time.time()
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, env=env, check=True)
        print(f"quantized -> {run} in {time.time() - t:.0f} s", flush=True)
    if args.prepare_only:
        return 0
    cmd = [sys.executable, "-m", "dartquant.cli", "bench", str(run), "--device", args.device,
           "--json", args.out, *args.bench_args]
    print(" ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env).returncode


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES), help="in memory: the model's shape")
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--out", default="kernels_e2e.json")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64], help="decode batch sizes (in memory)")
    ap.add_argument("--context", type=int, default=512, help="decode: tokens in the KV cache (in memory)")
    ap.add_argument("--write-data-cache", metavar="DIR", help="write a DARTQUANT_CACHE with the eval corpora, exit")
    ap.add_argument("--run-shape", default=None, help="through a run folder: llama2-7b, llama3-8b, tiny, ...")
    ap.add_argument("--dir", default="/tmp/kb", help="model and run folders (--run-shape)")
    ap.add_argument("--device", default="cuda", help="--run-shape: device of the quantize and bench steps")
    ap.add_argument("--prepare-only", action="store_true", help="--run-shape: steps 1-2 only (the run folder)")
    ap.add_argument("--gemm-backends", nargs="*", default=[], choices=["int8", "int8s"],
                    help="in memory: measure the w4a4 side again with every linear on these GEMM backends")
    ap.add_argument("--prefill-operands", nargs="*", default=[], choices=PREFILL_OPERAND_CHOICES,
                    help="in memory: time prefill again with these GEMM activation operands")
    ap.add_argument("--profile", action="store_true",
                    help="in memory, CUDA: GPU kernel time by category (prefill, one eager decode step per batch) "
                         "for bf16 and for the w4a4 side with each prefill operand")
    ap.add_argument("--decode-operands", nargs="*", default=[], choices=PREFILL_OPERAND_CHOICES,
                    help="in memory: of --prefill-operands, those to time at the decode batches too (the "
                         "planar operand above its token threshold, linear.PLANAR_MIN_TOKENS)")
    ap.add_argument("--act-configs", nargs="*", default=[], metavar="T,G,W",
                    help="in memory: time prefill again (last --prefill-operands) with the blocks activation "
                         "kernel, T tokens per tile, G tiles per program, W warps, wherever it applies")
    ap.add_argument("--no-fuse-norms", action="store_true",
                    help="in memory: keep each block norm and its readers' activation quantization apart")
    ap.add_argument("--bf16-fused-norms", action="store_true",
                    help="in memory, GPU: also time the bf16 side with each RMSNorm as one Triton kernel "
                         "(a stricter baseline than transformers' norm)")
    ap.add_argument("--no-merge-siblings", action="store_true",
                    help="in memory: q / k / v and gate / up as separate GEMMs")
    ap.add_argument("--compare-unfused", action="store_true",
                    help="in memory: also time the w4a4 side with no fusion (before fusing), and each "
                         "--prefill-operands entry with the norms not fused")
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: more `dartquant bench` flags")
    args = ap.parse_args()
    args.bench_args = [a for a in args.bench_args if a != "--"]
    if args.write_data_cache:
        write_data_cache(Path(args.write_data_cache))
        return 0
    if args.run_shape:
        return via_run_folder(args)
    return in_memory(args)


if __name__ == "__main__":
    sys.exit(main())
