"""`dartquant bench RUN`: a run folder on the W4A4 kernels vs the same model in bf16, one harness.

    dartquant bench RUN [--prefill 2048] [--batch 1 8 64] [--context 512] [--json OUT]

Design choices:
* The two sides come from one load of the run folder (`side_models`), so they have the same
  architecture and weights: `bf16` is plain transformers (SDPA attention), the run's dequantized
  weights as `nn.Linear`, no online Hadamard and no quantizer (the cost of the original,
  unrotated model); `w4a4` is what `--backend triton` runs: every decoder linear a `W4A4Linear`
  (activation kernel + GEMM; R4 fused into down_proj's activation kernel), bf16 elsewhere.
* Attention: `--kv plain` (default) runs SDPA on a bf16 cache on both sides (the kernels replace
  the linears; R3 is dropped, it cancels in Q K^T without a K quantizer); `--kv run` keeps the
  run's fake-quantized 4-bit K/V on the w4a4 side (torch ops over the whole cache every step);
  `--kv kernels` keeps it as 4-bit codes in the cache (`kv_cache.Kv4StaticCache`) and attends with the
  Triton decode kernel (W4A4KV4 against bf16 with a bf16 cache: the deployment comparison). There the
  w4a4 side's rotary embedding runs inside the K / V launch (`kv_cache.fuse_rope_`, checked by running;
  `--no-fuse-rope`: as transformers applies it); the bf16 side keeps transformers' own.
  SDPA on a bf16 cache is `PACKED_SDPA`: a one-token GQA query runs on the KV heads, its group as
  query rows, as transformers >= 5.2x does, whatever transformers is installed (5.17 repeats K and V
  group-fold every step: 18 of 33 ms of a Llama-3-8B batch-64 step on an H100, a straw baseline).
* Prefill: one forward of `--prefill` tokens at batch 1, last logits only (as generation does).
  Decode: one-token steps on a `StaticCache` holding `--context` tokens, batch by batch, the same
  step replayed (the steady-state step at that context length; the cache is rewound before each
  call, `_rewind_`). On CUDA the step is also captured in a CUDA graph on both sides (host
  overhead out; `--no-cuda-graphs`: eager only); the eager time is in the JSON too. A capture
  that fails is recorded in the JSON and the eager number stands.
* Times: median of `triton.testing.do_bench` on CUDA; on the CPU (tests, interpreter) a single
  wall-clock run, meaningless as speed, there to check the plumbing.
* Weight memory: bytes of the decoder linears (packed codes + scales + row sums + biases vs bf16
  weights + biases) and of the whole model (embedding and lm_head stay 16-bit on both sides).
"""

from __future__ import annotations

import inspect

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .backend import PREFILL_OPERAND_CHOICES

KV_MODES = ("plain", "run", "kernels")
PACKED_SDPA = "dartquant_sdpa_packed_gqa"


def _sdpa_packed_gqa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, but a one-token query of a GQA model attends on the KV heads with its
    group as query rows ([B, H, 1, D] -> [B, H_kv, G, D]; a mask shared by the heads broadcasts), instead of
    K and V repeated G times, a copy of the whole cache every step on older transformers. Same sums."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = getattr(module, "num_key_value_groups", 1)
    packable = (g > 1 and query.shape[2] == 1 and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
                and (attention_mask is None or attention_mask.shape[1] == 1))
    if not packable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    b, h, _, d = query.shape
    out = torch.nn.functional.scaled_dot_product_attention(query.reshape(b, h // g, g, d), key, value,
                                                           attn_mask=attention_mask, scale=kwargs.get("scaling"))
    return out.reshape(b, h, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def register_packed_sdpa() -> str:
    """Register `PACKED_SDPA` with transformers (idempotent)."""
    from ..modules import register_attention_function

    return register_attention_function(PACKED_SDPA, _sdpa_packed_gqa)


@dataclass
class BenchSettings:
    prefill: int = 2048
    batches: list[int] = field(default_factory=lambda: [1, 8, 64])
    context: int = 512  # tokens in the KV cache during decode
    cuda_graphs: bool = True
    kv: str = "plain"
    device: str = "cuda"
    sides: list[str] = field(default_factory=lambda: ["bf16", "w4a4"])
    rep_ms: int = 200  # do_bench's time budget per measurement
    prefill_operand: str = "int8s"  # linear.PREFILL_OPERANDS: the GEMM above 64 tokens (scaled_mm: cuBLAS FP8)
    fuse_norms: bool = True  # w4a4: block norms fused with their readers' quantization (kernels.fusions)
    merge_siblings: bool = True  # w4a4: q / k / v and gate / up as one GEMM each (kernels.fusions)
    fuse_rope: bool = True  # w4a4, --kv kernels: the rotary embedding in the K / V launch (kv_cache.fuse_rope_)

    def validate(self) -> None:
        if self.prefill < 1 or self.context < 1:
            raise ValueError("--prefill and --context must be at least 1")
        if not self.batches or any(b < 1 for b in self.batches):
            raise ValueError(f"--batch sizes must be positive, got {self.batches}")
        if self.kv not in KV_MODES:
            raise ValueError(f"--kv must be one of {KV_MODES}, not {self.kv!r}")
        if not set(self.sides) <= {"bf16", "w4a4"} or not self.sides:
            raise ValueError(f"sides must be bf16 and / or w4a4, got {self.sides}")
        from .linear import PREFILL_OPERANDS

        if self.prefill_operand not in PREFILL_OPERANDS:
            raise ValueError(f"--prefill-operand must be one of {sorted(PREFILL_OPERANDS)}, not {self.prefill_operand!r}")


# ---- the two models ------------------------------------------------------------------------
def _plain_linear(q) -> nn.Linear:
    """An nn.Linear sharing a QLinear's weight and bias: no rotation, no quantizer."""
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
    lin.weight, lin.bias = q.weight, q.bias
    return lin


def side_models(folder, sides, device, kv: str, prefill_operand: str = "int8s", fuse_norms: bool = True,
                merge_siblings: bool = True, fuse_rope: bool = True):
    """Yield ("bf16", model) and / or ("w4a4", model) from ONE load of the run (the slow part at
    7B: reading and dequantizing the codes on the CPU): the bf16 side is the fake-quant model with
    its QLinears swapped for plain linears sharing their weights and SDPA attention; then the
    QLinears go back and are converted to W4A4Linears (their dequantized weights are dropped)."""
    from ..modules import QLinear
    from ..zoo import load_model
    from .linear import convert_run_, replace_modules_

    model, _ = load_model(folder, dtype=torch.bfloat16, device="cpu")
    model.eval()
    run_attention = model.config._attn_implementation
    qlinears = {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}
    if "bf16" in sides:
        replace_modules_(model, {n: _plain_linear(q) for n, q in qlinears.items()})
        model.set_attn_implementation(register_packed_sdpa())  # the dartquant attention (R3, K/V quantizers) bypassed
        yield "bf16", model.to(device)
        replace_modules_(model, qlinears)
        model.set_attn_implementation(run_attention)
    if "w4a4" in sides:
        convert_run_(model, folder, prefill_operand=prefill_operand)
        del qlinears
        if kv == "plain":
            model.set_attn_implementation(register_packed_sdpa())
        elif kv == "kernels":
            from .kv_cache import check_kv4_support, register_kv4_attention

            check_kv4_support(model)
            model.set_attn_implementation(register_kv4_attention())
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model.to(device)
        from .fusions import apply_fusions_

        apply_fusions_(model, device, norms=fuse_norms, siblings=merge_siblings)
        if kv == "kernels" and fuse_rope:
            from .kv_cache import fuse_rope_

            fuse_rope_(model)
        yield "w4a4", model


def plain_bf16_model(folder, device) -> nn.Module:
    """The run's architecture and dequantized weights as plain transformers in bf16 (see side_models)."""
    return next(side_models(folder, ["bf16"], torch.device(device), "plain"))[1]


def weight_bytes(model: nn.Module) -> dict:
    """Bytes of the decoder linears (what the kernels replace) and of every parameter / buffer."""
    from .linear import W4A4Linear

    seen, total, linears = set(), 0, 0
    for name, m in model.named_modules():
        # by memory range, not by tensor object: tied weights count once, and merged siblings'
        # buffers (views of one concatenated tensor, kernels.fusions) count their own rows
        own = {(t.data_ptr(), t.numel() * t.element_size())
               for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))} - seen
        seen.update(own)
        size = sum(nbytes for _, nbytes in own)
        total += size
        if isinstance(m, W4A4Linear) or (isinstance(m, nn.Linear) and ".layers." in f".{name}"):
            linears += size
    return {"linear_bytes": linears, "model_bytes": total}


# ---- timing ----------------------------------------------------------------------------------
def _time_ms(fn, device, rep_ms: int) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms, return_mode="median"))
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def _forward_kwargs(model) -> dict:
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.no_grad()
def time_prefill(model, s: BenchSettings, device) -> dict:
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, s.prefill), device=device, generator=torch.Generator(device).manual_seed(0))
    kw = _forward_kwargs(model)
    logits = model(ids, use_cache=False, **kw).logits  # also compiles kernels and probes GEMM shapes
    out = {"prefill_eager_ms": _time_ms(lambda: model(ids, use_cache=False, **kw), device, s.rep_ms),
           "finite": bool(torch.isfinite(logits).all().item())}
    if s.cuda_graphs and device.type == "cuda":  # host launch overhead out, on both sides (as decode)
        try:
            graph = _capture(lambda: model(ids, use_cache=False, **kw))
            out["prefill_graph_ms"] = _time_ms(graph.replay, device, s.rep_ms)
            del graph
        except Exception as e:  # recorded, not hidden: the eager time stands
            out["prefill_graph_error"] = f"{type(e).__name__}: {e}"[:500]
    ms = out.get("prefill_graph_ms", out["prefill_eager_ms"])
    out.update(prefill_ms=ms, prefill_tok_s=s.prefill / ms * 1e3,
               prefill_timed="cuda_graph" if "prefill_graph_ms" in out else "eager")
    return out


def _capture(fn):
    """A CUDA graph of `fn` (warmed up on a side stream first, as capture requires)."""
    return capture_with_output(fn)[0]


def capture_with_output(fn):
    """(CUDA graph of `fn`, the output tensor(s) its replays write), warmed up on a side stream first."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _rewind_(cache, position: int) -> None:
    """Set every layer of a transformers StaticCache back to `position` tokens seen.

    transformers 5.x static layers count the tokens written (`cumulative_length`, a tensor, so the
    count lives on the device and a CUDA graph can replay it) and ignore `cache_position`: a
    replayed step would write past the cache's end. A device `fill_` rewinds it inside the step,
    so eager calls and graph replays all time the same step."""
    for layer in getattr(cache, "layers", []):
        count = getattr(layer, "cumulative_length", None)
        if isinstance(count, torch.Tensor):
            count.fill_(position)
        elif isinstance(count, int):
            layer.cumulative_length = position
        if isinstance(getattr(layer, "cumulative_length_int", None), int):
            layer.cumulative_length_int = position


@torch.no_grad()
def make_decode_step(model, batch: int, context: int, device):
    """A function running one decode step: `batch` sequences of `context` random tokens are in a
    StaticCache; each call feeds the token at position `context` (into the cache's last slot) and
    returns its logits [batch, 1, vocab]. Every call computes the same step."""
    from transformers import StaticCache

    from .kv_cache import ATTN_IMPLEMENTATION, Kv4StaticCache

    config = model.config
    vocab = config.get_text_config().vocab_size
    gen = torch.Generator(device).manual_seed(batch)
    ids = torch.randint(0, vocab, (batch, context + 1), device=device, generator=gen)
    four_bit = config._attn_implementation == ATTN_IMPLEMENTATION  # --kv kernels: codes in the cache
    cache = (Kv4StaticCache if four_bit else StaticCache)(config=config, max_cache_len=context + 1)
    kw = _forward_kwargs(model)
    # transformers >= 5.2x names the cache argument `cache` (`past_key_values` goes in 5.40); older: the old name
    kw[("cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values")] = cache
    positions = torch.arange(context + 1, device=device)
    model(ids[:, :context], use_cache=True, position_ids=positions[None, :context], cache_position=positions[:context],
          **kw)
    nxt, pos = ids[:, context:].clone(), positions[context:].clone()

    @torch.no_grad()
    def step():
        _rewind_(cache, context)
        return model(nxt, use_cache=True, position_ids=pos[None], cache_position=pos, **kw).logits

    step.ids = ids  # the whole sequences, for a reference forward (tests)
    step.cache_bytes = _cache_bytes(cache)
    return step


def _cache_bytes(cache) -> int:
    """Bytes the KV cache holds (bf16 K / V tensors, or 4-bit codes with fp32 scale / zero)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "codes"):
            total += layer.codes.nbytes()
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def time_decode(model, batch: int, s: BenchSettings, device) -> dict:
    """ms per one-token step with `s.context` tokens cached (eager, and in a CUDA graph)."""
    step = make_decode_step(model, batch, s.context, device)
    out = {"eager_ms": _time_ms(step, device, s.rep_ms), "kv_cache_bytes": step.cache_bytes}
    if s.cuda_graphs and device.type == "cuda":
        try:
            graph = _capture(step)
            out["graph_ms"] = _time_ms(graph.replay, device, s.rep_ms)
            del graph
        except Exception as e:  # recorded, not hidden: the eager time stands
            out["graph_error"] = f"{type(e).__name__}: {e}"[:500]
    best = out.get("graph_ms", out["eager_ms"])
    out.update(ms_per_step=best, tok_s=batch / best * 1e3, timed="cuda_graph" if "graph_ms" in out else "eager")
    return out


def measure_side(model, s: BenchSettings, device) -> dict:
    from .fusions import NormQuant
    from .linear import W4A4Linear

    res = {**weight_bytes(model), **time_prefill(model, s, device),
           "fused_norms": sum(isinstance(m, NormQuant) for m in model.modules()),
           "merged_linears": sum(isinstance(m, W4A4Linear) and m.merged is not None for m in model.modules())}
    for b in s.batches:
        res[f"decode_b{b}"] = time_decode(model, b, s, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def bench_run(folder, s: BenchSettings, progress=print) -> dict:
    """Both sides, one after the other (never both on the device at once). Returns the result."""
    from .backend import check_run_for_kernels, check_triton_device

    s.validate()
    spec = check_run_for_kernels(folder)  # refusals before any weight is read
    if s.kv == "kernels" and "w4a4" in s.sides:
        from ..adapters import adapter_for
        from ..pipeline import model_config
        from ..quant.checkpoint import scheme_of
        from .kv_cache import kv4_config_problems, kv4_scheme_problems

        config = model_config(folder)
        bad = kv4_scheme_problems(scheme_of(spec), adapter_for(config).geometry(config).head_dim)
        bad += kv4_config_problems(config)
        if bad:
            raise ValueError(f"--kv kernels: {folder} has " + "; ".join(bad))
    check_triton_device(s.device)
    device = torch.device(s.device)
    result = {"run": str(folder), "settings": dataclasses.asdict(s), "machine": _machine(device)}
    progress(f"loading {folder} (CPU; both sides from one load), timing on {device}")
    t = time.perf_counter()
    from .kv_cache import rope_fused_layers

    for side, model in side_models(folder, [x for x in ("bf16", "w4a4") if x in s.sides], device, s.kv,
                                   s.prefill_operand, s.fuse_norms, s.merge_siblings, s.fuse_rope):
        load_s = time.perf_counter() - t
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result[side] = {"load_s": load_s, "attention": model.config._attn_implementation,
                        "rope_in_kv_launch": rope_fused_layers(model),
                        **measure_side(model, s, device)}
        if device.type == "cuda":
            result[side]["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
        progress(f"{side}: {json.dumps({k: v for k, v in result[side].items() if not k.startswith('decode')})}")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        t = time.perf_counter()
    if {"bf16", "w4a4"} <= set(result):
        result["ratios"] = ratios(result)
    return result


def ratios(result: dict) -> dict:
    """w4a4 speed-up over bf16 (> 1: faster) and memory ratio (w4a4 / bf16)."""
    b, w = result["bf16"], result["w4a4"]
    out = {"prefill_speedup": b["prefill_ms"] / w["prefill_ms"],
           "linear_bytes_ratio": w["linear_bytes"] / b["linear_bytes"],
           "model_bytes_ratio": w["model_bytes"] / b["model_bytes"]}
    if "prefill_eager_ms" in b and "prefill_eager_ms" in w:  # eager too: the host's launch cost included
        out["prefill_eager_speedup"] = b["prefill_eager_ms"] / w["prefill_eager_ms"]
    for key in b:
        if key.startswith("decode_b"):
            out[f"{key}_speedup"] = b[key]["ms_per_step"] / w[key]["ms_per_step"]
    return out


def merge_sides(old: dict, new: dict) -> dict:
    """`new` plus the sides only `old` has (the same run and settings but `sides`): one side per
    command where a command's time is limited."""
    same = lambda r: {k: v for k, v in r["settings"].items() if k != "sides"}  # noqa: E731
    if old.get("run") != new["run"] or same(old) != same(new):
        raise ValueError("--merge: the JSON holds another run or other settings; write to a new file")
    merged = {**new, **{side: old[side] for side in ("bf16", "w4a4") if side in old and side not in new}}
    merged["settings"] = {**new["settings"], "sides": [s for s in ("bf16", "w4a4") if s in merged]}
    if {"bf16", "w4a4"} <= set(merged):
        merged["ratios"] = ratios(merged)
    return merged


def _machine(device) -> dict:
    import platform

    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import transformers
        import triton

        info.update(transformers=transformers.__version__, triton=triton.__version__)
    except ImportError:
        pass
    return info


def format_table(result: dict) -> str:
    sides = [s for s in ("bf16", "w4a4") if s in result]
    rows = [("prefill ms (batch 1, %d tokens)" % result["settings"]["prefill"], "prefill_ms", None)]
    rows += [(f"decode batch {b}: ms / step (ctx {result['settings']['context']})", f"decode_b{b}", "ms_per_step")
             for b in result["settings"]["batches"]]
    rows += [(f"decode batch {b}: tokens / s", f"decode_b{b}", "tok_s") for b in result["settings"]["batches"]]
    rows += [("decoder linear weights (GB)", "linear_bytes", 1e9), ("all weights (GB)", "model_bytes", 1e9)]
    head = f"{'':<44}" + "".join(f"{s:>12}" for s in sides) + ("   w4a4 vs bf16" if len(sides) == 2 else "")
    lines = [head]
    for label, key, sub in rows:
        vals = []
        for s in sides:
            v = result[s][key]
            vals.append(v[sub] if isinstance(sub, str) else v / sub if sub else v)
        line = f"{label:<44}" + "".join(f"{v:>12.3f}" for v in vals)
        if len(vals) == 2:
            if key.endswith("bytes"):
                line += f"   {vals[1] / vals[0]:.3f}x memory"
            elif sub == "tok_s":
                line += f"   {vals[1] / vals[0]:.2f}x speed"
            else:
                line += f"   {vals[0] / vals[1]:.2f}x speed"
        lines.append(line)
    timed = {s: sorted({result[s][f'decode_b{b}']['timed'] for b in result['settings']['batches']}) for s in sides}
    prefill_timed = {s: result[s].get("prefill_timed", "eager") for s in sides}
    lines.append(f"prefill timed as: {prefill_timed}; decode timed as: {timed}; KV cache: {result['settings']['kv']}")
    attention = {s: result[s]["attention"] for s in sides if "attention" in result[s]}  # results before session 44: none
    if attention:
        rope = {s: result[s]["rope_in_kv_launch"] for s in sides if result[s].get("rope_in_kv_launch")}
        lines.append(f"attention: {attention}" + (f"; RoPE in the K / V launch (layers): {rope}" if rope else ""))
    errors = {f"{s} b{b}": result[s][f"decode_b{b}"]["graph_error"] for s in sides
              for b in result["settings"]["batches"] if "graph_error" in result[s][f"decode_b{b}"]}
    if errors:
        lines.append(f"CUDA graph capture failed: {errors}")
    return "\n".join(lines)


# ---- command line --------------------------------------------------------------------------
def cmd_bench(args) -> int:
    from ..runs import write_json

    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    s = BenchSettings(prefill=args.prefill, batches=args.batch, context=args.context,
                      cuda_graphs=not args.no_cuda_graphs, kv=args.kv, device=args.device or default_device,
                      sides=args.sides, rep_ms=args.rep_ms, prefill_operand=args.prefill_operand,
                      fuse_norms=not args.no_fuse_norms, merge_siblings=not args.no_merge_siblings,
                      fuse_rope=not args.no_fuse_rope)
    s.validate()
    if args.json_out:  # the output's folder must exist before the (long) measurement
        parent = Path(args.json_out).resolve().parent
        if not parent.is_dir():
            raise FileNotFoundError(f"--json {args.json_out}: folder {parent} does not exist")
    old = None
    if args.merge and args.json_out and Path(args.json_out).is_file():
        old = json.loads(Path(args.json_out).read_text())
        merge_sides(old, {"run": str(args.run), "settings": dataclasses.asdict(s)})  # refuses before the work
    result = bench_run(args.run, s)
    if old is not None:
        result = merge_sides(old, result)
    print(format_table(result))
    if args.json_out:
        write_json(Path(args.json_out), result)
        print(f"wrote {args.json_out}")
    return 0


def add_bench_command(subparsers) -> None:
    """Register `bench` on cli.build_parser's subparsers."""
    s = subparsers.add_parser("bench", help="prefill and decode speed + weight memory of a run folder on the "
                                            "W4A4 kernels vs the same model in bf16")
    s.add_argument("run", help="run folder written by `dartquant quantize --out` (W4 per-channel, A4 per-token)")
    s.add_argument("--prefill", type=int, default=2048, help="prefill tokens (batch 1)")
    s.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64], help="decode batch sizes")
    s.add_argument("--context", type=int, default=512, help="tokens in the KV cache during decode")
    s.add_argument("--kv", choices=KV_MODES, default="plain",
                   help="plain: bf16 KV cache on both sides (default); run: the run's fake-quant 4-bit K/V on w4a4; "
                        "kernels: w4a4 holds the K/V as 4-bit codes and attends with the Triton decode kernel")
    s.add_argument("--no-cuda-graphs", action="store_true", help="time prefill and decode eagerly only")
    s.add_argument("--sides", nargs="+", choices=["bf16", "w4a4"], default=["bf16", "w4a4"])
    s.add_argument("--device", default=None, help="default: cuda if available (cpu: TRITON_INTERPRET=1, tests only)")
    s.add_argument("--rep-ms", type=int, default=200, help="time budget of each CUDA measurement (do_bench)")
    s.add_argument("--prefill-operand", default="int8s", choices=PREFILL_OPERAND_CHOICES,
                   help="the GEMM of multi-token inputs: int8s (Triton, packed weight; default) or scaled_mm (cuBLAS "
                        "FP8 on a 1-byte copy of the weight codes, exactness probed per shape)")
    s.add_argument("--no-fuse-norms", action="store_true",
                   help="w4a4: run each block norm and its readers' activation quantization as separate kernels")
    s.add_argument("--no-merge-siblings", action="store_true",
                   help="w4a4: q / k / v and gate / up as separate GEMMs (default: one GEMM each)")
    s.add_argument("--no-fuse-rope", action="store_true",
                   help="w4a4 with --kv kernels: apply the rotary embedding as transformers does (default: in the "
                        "4-bit K / V launch, checked by running)")
    s.add_argument("--json", dest="json_out", metavar="OUT", help="write the result as JSON")
    s.add_argument("--merge", action="store_true",
                   help="with --sides: add the measured side to OUT's other side (same run and settings)")
    s.set_defaults(func=cmd_bench)
