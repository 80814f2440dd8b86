"""One quantization run, end to end: load, rotate, calibrate, quantize, evaluate, save.

Stages and their timers ("seconds" in metrics.json):
  load       model + tokenizer (+ GGUF conversion on first use)
  capture    calibration windows (+ activation capture for DartQuant)
  calibrate  computing the rotations (QuaRot: a random Hadamard; DartQuant: training)
  quantize   weights (RTN or GPTQ, layer by layer)
  eval_fp    perplexity / zero-shot of the unquantized model (skipped with eval_fp=False)
  eval       perplexity / zero-shot of the quantized model
  save       the checkpoint
  guard      the quality check against the FP model on held-out calibration text (quant/guard.py)
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from pathlib import Path

import torch

from ..adapters import adapter_for
from ..data import calib_windows
from ..eval.ppl import evaluate_ppl
from ..runs import atomic_dir, check_out_dir, write_json, write_yaml
from ..transforms import RotationSet, rotate_, untie_embeddings_
from ..zoo import TRANSFORM_FILE, load_model
from .act import install_quantizers_
from .checkpoint import save_quantized
from .config import E2E_METHODS, QuantConfig
from .weights import quantize_weights_


class StageTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - t0, 3)


def peak_memory_bytes(device: str) -> dict:
    """Peak resident memory of this process (CPU) and, on CUDA, peak allocated device memory."""
    out = {"cpu_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        out["cuda"] = torch.cuda.max_memory_allocated()
    return out


def evaluate(model, tokenizer, cfg: QuantConfig, progress: bool) -> dict:
    model.to(cfg.device)
    res = {"ppl": evaluate_ppl(model, tokenizer, seqlen=cfg.eval_seqlen, max_windows=cfg.eval_max_windows,
                               progress=progress)}
    if cfg.tasks:
        from ..eval.zeroshot import evaluate_zeroshot

        res["zeroshot"] = evaluate_zeroshot(model, tokenizer, cfg.tasks, limit=cfg.zeroshot_limit,
                                            max_length=cfg.eval_seqlen, seed=cfg.seed, progress=progress)
    model.to("cpu")
    return res


def compute_rotations(model, cfg: QuantConfig, calib_ids, timer: StageTimer, out_dir: Path,
                      progress: bool, tokenizer=None) -> RotationSet | None:
    geo = adapter_for(model).geometry(model.config)
    if cfg.rotations:
        rotations = RotationSet.load(cfg.rotations)
        rotations.validate(geo)
        return rotations
    if cfg.method == "rtn":
        return None
    if cfg.method == "quarot":
        with timer("calibrate"):
            return RotationSet.quarot(geo, seed=cfg.seed, r3=cfg.r3, r4=cfg.r4)
    if cfg.method == "dartquant":
        from ..calib.dartquant import calibrate_dartquant

        return calibrate_dartquant(model, cfg, calib_ids, timer=timer, out_dir=out_dir, progress=progress)
    if cfg.method in E2E_METHODS:
        return train_end_to_end(model, cfg, tokenizer, timer, out_dir, progress)
    raise ValueError(f"unknown method {cfg.method!r}")


def train_end_to_end(model, cfg: QuantConfig, tokenizer, timer: StageTimer, out_dir: Path | None,
                     progress: bool) -> RotationSet:
    """SpinQuant / OSTQuant: training windows from the first 90% of the calibration half, held-out
    ones from the last 10% (never overlapping); the model trains on `cfg.device`."""
    from ..calib.e2e import train_e2e

    with timer("capture"):
        n = cfg.e2e_samples or cfg.e2e_steps * cfg.e2e_batch
        train_ids = calib_windows(tokenizer, cfg.calib_corpus, n, cfg.e2e_seqlen, cfg.seed + 1, span=(0.0, 0.9))
        eval_ids = (calib_windows(tokenizer, cfg.calib_corpus, cfg.e2e_eval_samples, cfg.e2e_seqlen, cfg.seed + 2,
                                  span=(0.9, 1.0)) if cfg.e2e_eval_samples else None)
    with timer("calibrate"):
        model.to(cfg.device)
        try:
            return train_e2e(model, cfg, train_ids, eval_ids, out_dir=out_dir, progress=progress)
        finally:
            model.to("cpu")


def run_quantize(cfg: QuantConfig, out: str | Path, *, overwrite: bool = False, eval_fp: bool = True,
                 progress: bool = True) -> dict:
    """Quantize `cfg.model` as `cfg` says; write the run folder `out`; return metrics."""
    cfg.validate()
    out = check_out_dir(out, overwrite)
    torch.manual_seed(cfg.seed)
    timer = StageTimer()
    log = (lambda *a: print("[dartquant]", *a, file=sys.stderr)) if progress else (lambda *a: None)
    with timer("load"):
        model, tokenizer = load_model(cfg.model, dtype=getattr(torch, cfg.dtype))
    adapter = adapter_for(model)
    geo = adapter.geometry(model.config)
    cfg.validate(geo)  # group sizes against the real dimensions, before any heavy work
    metrics: dict = {"method": cfg.method, "model": cfg.model, "seed": cfg.seed, "w_bits": cfg.w_bits,
                     "a_bits": cfg.a_bits, "kv_bits": cfg.kv_bits, "w_quantizer": cfg.weight_quantizer}
    if eval_fp:
        log("evaluating the full-precision model")
        with timer("eval_fp"):
            metrics["fp"] = evaluate(model, tokenizer, cfg, progress)
    with atomic_dir(out) as tmp:
        with timer("capture"):
            needs_data = cfg.weight_quantizer == "gptq" or (cfg.method == "dartquant" and not cfg.rotations)
            calib_ids = (calib_windows(tokenizer, cfg.calib_corpus, cfg.calib_samples, cfg.calib_seqlen, cfg.seed)
                         if needs_data else None)
        untie_embeddings_(model, adapter)
        rotations = compute_rotations(model, cfg, calib_ids, timer, tmp, progress, tokenizer)
        if rotations is not None:
            # what the calibration chose and its held-out numbers (learning rates, held-out loss /
            # SQNR before and after), so that a sweep's JSON says how every row was tuned
            calib = {k: v for k, v in rotations.meta.items()
                     if k.startswith(("eval_loss", "r1_", "r2_", "lr", "amp", "steps"))}
            if calib and not cfg.rotations:
                metrics["calibration"] = calib
            log(f"rotating ({rotations.meta.get('method', 'given')})")
            with timer("rotate"):
                rotate_(model, rotations, adapter)
        install_quantizers_(model, cfg, adapter)
        log(f"quantizing weights ({cfg.weight_quantizer}, {cfg.w_bits} bits)")
        with timer("quantize"):
            qtensors = quantize_weights_(model, cfg, calib_ids, adapter, progress)
        log("evaluating the quantized model")
        with timer("eval"):
            res = evaluate(model, tokenizer, cfg, progress)
        metrics["ppl"] = res["ppl"]
        if "zeroshot" in res:
            metrics["zeroshot"] = res["zeroshot"]
        with timer("save"):
            from ..transforms.online import online_spec

            tokenizer.save_pretrained(str(tmp))
            model.config.save_pretrained(str(tmp))
            save_quantized(model, qtensors, tmp)
            spec = online_spec(model, adapter)
            spec["quantization"] = cfg.to_dict()
            if rotations is not None:
                rotations.save(tmp / "rotations.safetensors")
                spec["rotations"] = {"file": "rotations.safetensors", **rotations.meta}
            write_json(tmp / TRANSFORM_FILE, spec)
            write_yaml(tmp / "config.yaml", cfg.to_dict())
        if cfg.guard_windows:  # never hand out a broken model silently (quant/guard.py)
            from .guard import run_guard

            with timer("guard"):
                metrics["quality_check"] = run_guard(model, tokenizer, cfg, rotations, log)
        metrics["seconds"] = timer.seconds
        metrics["peak_memory_bytes"] = peak_memory_bytes(cfg.device)
        write_json(tmp / "metrics.json", metrics)
    return metrics
