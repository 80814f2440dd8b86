"""The whole quantization job, streamed: two passes over the blocks, never the whole model.

    skeleton on meta (source.py); untie, exact norms: structure only
    FP pass (if needed)  embed -> per block: load raw -> eval / guard windows through it (the FP
                         reference) -> fuse its norms -> qk_balance's statistics over the first
                         calibration windows (calib/qk_balance.QKCollector) -> DartQuant capture over
                         calibration windows, that layer's R2 fitted at once (one layer's samples
                         held) -> release; then the raw final norm + head: FP perplexity
    rotations            the method's producer (QuaRot from the geometry; DartQuant fits R1 on the
                         captured samples, as in memory, and takes the R2s fitted in the pass),
                         or the --rotations file
    structure            online R3 / R4 and the quantizers installed on the skeleton
    quantize pass        embedding folded -> calibration hidden states (GPTQ), rounded to
                         unquantized_dtype -> eval / guard hidden states; per block: load raw ->
                         fuse norms + fold rotations (float64, on the device) -> RTN or GPTQ
                         (Hessians from the calibration hidden states, activations quantized as
                         in memory: gptq_act_quant) -> calibration / eval / guard windows through
                         the quantized block -> write it (shards.py) -> release
    head                 final norm fused + R1 folded into lm_head, rounded or quantized; the
                         perplexity and the quality guard (ratio and KL against the FP pass)

Every step per module is the in-memory pipeline's own code (fuse_layer_norms_, fold_layer_,
quantize_block_, ActivationCapture), applied in the same order, so a streamed run computes the same
tensors as an in-memory one (tests/test_stream.py holds them equal). Host memory: the
embedding while it is used, one block, the hidden states of the window sets (compute dtype),
one output shard; the device: one block in float64 while folding, one window's activations.

Stage timers are those of pipeline.py, each stage's share of a pass added to its own timer
("load" is reading blocks from disk). The quality guard (guard.py) takes quant/guard.py's FP
reference in the FP pass and scores the quantize pass's outputs against it; its per-role
attribution (8 extra whole-model forwards) is left out and says so.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import RunConfig
from ..data import eval_windows, run_windows
from ..layerwise import forward_plan
from ..log import log
from ..methods import MethodContext, calibration_summary
from ..modules import register_attention
from ..quant.act import install_quantizers_, set_act_quant_enabled_
from ..quant.act_clip import ClipSearchRecord
from ..quant.checkpoint import write_run_metadata
from ..quant.primitives import QuantizedTensor
from ..quant.weights import quantize_block_
from ..runs import atomic_dir, move_volatile_json_, write_json
from ..stages import StageTimer, peak_memory_bytes
from ..transforms import RotationSet, untie_embeddings_
from ..transforms.fuse import exact_norms_, fuse_final_norm_, fuse_layer_norms_
from ..transforms.online import install_online_
from ..transforms.rotation import check_foldable, fold_layer_, fold_outer_, fold_values
from ..zoo import resolve_model
from .passes import BlockRunner, RoutedTokens, ppl_metrics
from .shards import ShardWriter
from .source import StreamedModel

MB = 1 << 20  # shard_mb's unit (tests shrink it to get many shards from a tiny model)


def _round_(w: torch.Tensor, dtype: str, name: str) -> None:
    """As checkpoint.round_unquantized_: the stored 16-bit value is the evaluated one."""
    target = getattr(torch, dtype)
    if target == torch.float16 and w.abs().max() > torch.finfo(torch.float16).max:
        raise ValueError(f"{name} has values beyond float16's range; set unquantized_dtype: bfloat16")
    w.data.copy_(w.data.to(target).to(w.dtype))


def _module_state(module: torch.nn.Module, prefix: str, quantized: set[str]) -> dict:
    """What save_quantized stores of a module: weights and biases, not those of quantized linears."""
    return {f"{prefix}.{n}": t for n, t in module.state_dict().items()
            if n.endswith(("weight", "bias")) and f"{prefix}.{n}" not in quantized}


def run_streamed(cfg: RunConfig, out: Path, *, eval_fp: bool = True, progress: bool = True) -> dict:
    """pipeline.run_quantize, streamed (cfg and `out` checked by pipeline.check_before_load)."""
    from transformers import AutoTokenizer

    from ..quant.guard import guard_windows
    from . import guard

    torch.manual_seed(cfg.seed)
    timer = StageTimer(cfg.device)
    device = torch.device(cfg.device)
    sc = cfg.scheme
    with timer("load"):
        folder = resolve_model(cfg.model)
        sm = StreamedModel(folder, dtype=getattr(torch, cfg.dtype))
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    model, adapter = sm.model, sm.adapter
    geo = adapter.geometry(model.config)
    n_layers = geo.n_layers
    metrics: dict = {"method": cfg.method, "model": cfg.model, "seed": cfg.seed, "w_bits": sc.w_bits,
                     "a_bits": sc.a_bits, "kv_bits": sc.kv_bits, "w_quantizer": sc.weight_quantizer}
    model.set_attn_implementation(register_attention())  # blocks run without a mask: SDPA is causal
    runner = BlockRunner(model, adapter, device)
    gptq = sc.weight_quantizer == "gptq" and sc.weight_spec().bits < 16
    calib_pass = gptq or sc.a_clip_search  # the quantize pass carries calibration hidden states
    capture_needed = cfg.method_spec.needs_calib_windows and not cfg.rotations
    qk = None  # calib/qk_balance.QKCollector: the Q/K balance's statistics, taken in the FP pass
    if cfg.qk_balance:
        from ..calib.qk_balance import QKCollector

        r3 = RotationSet.load(cfg.rotations).r3 if cfg.rotations else cfg.r3
        qk = QKCollector(geo, adapter.rotary_embedding(model), kv_spec=sc.kv_spec(geo.head_dim), r3=r3,
                         exclude_k_bias=sc.kv_exclude_k_bias, sink_tokens=sc.kv_sink_tokens)
    with atomic_dir(out) as tmp:
        with timer("capture"):
            calib_ids, quantize_ids = (run_windows(tokenizer, cfg.data, cfg.seed)
                                       if calib_pass or capture_needed or qk is not None else (None, None))
        with timer("eval"):
            windows = {c: eval_windows(tokenizer, c, cfg.eval.seqlen, cfg.eval.max_windows) for c in cfg.eval.corpora}
        g_ids = (guard_windows(tokenizer, cfg.data.corpus, cfg.eval.guard_windows, cfg.data.seqlen)
                 if cfg.eval.guard_windows else None)
        zs = None
        if cfg.eval.tasks:  # lm-eval's batches, recorded on the skeleton (zeroshot.py)
            from .zeroshot import StreamedZeroShot

            with timer("eval"):
                zs = StreamedZeroShot(model, tokenizer, cfg.eval.tasks, limit=cfg.eval.zeroshot_limit,
                                      max_length=cfg.eval.seqlen, seed=cfg.seed, dtype=getattr(torch, cfg.dtype))
        untie_embeddings_(model, adapter)
        if cfg.rotated:
            exact_norms_(model, adapter)  # structure only: the values come block by block

        # ---- FP pass: FP perplexity, the guard's FP reference, DartQuant's capture -------------
        captured = ref = None
        if eval_fp or g_ids is not None or capture_needed or qk is not None:
            cap = r2_fitter = None
            if capture_needed:
                from ..calib.capture import ActivationCapture
                from ..calib.dartquant import R2Fitter

                # each layer's R2 is fitted as soon as its rows are captured: one layer's rows in memory
                cap = ActivationCapture(geo, calib_ids.shape[0], calib_ids.shape[1],
                                        fraction=cfg.section("dartquant").token_fraction, seed=cfg.seed,
                                        r2_one_layer=True)
                r2_fitter = R2Fitter(geo, cfg)
            with timer("load"):
                sm.load_(adapter.embed, device)  # on the device: the host keeps no copy of it
            with timer("eval_fp"):  # (the guard's and the capture's few windows too)
                fp_eval = {c: runner.embed(ids) for c, ids in windows.items()} if eval_fp else None
                fp_zs = [runner.embed(b) for b in zs.batches] if eval_fp and zs else []
                fp_guard, cap_hidden = runner.embed(g_ids), runner.embed(calib_ids) if cap else None
                if qk is not None:
                    from ..calib.qk_balance import MAX_WINDOWS

                    qk_hidden = runner.embed(calib_ids[:MAX_WINDOWS])
                    qk_batch = forward_plan(geo, *qk_hidden.shape[:2], qk_hidden.dtype, device)[0]
            if cap is not None:  # the capture's forwards batched, its states on the device if they fit (forward_plan)
                cap_batch, resident = forward_plan(geo, *cap_hidden.shape[:2], cap_hidden.dtype, device)
                cap_hidden = cap_hidden.to(device) if resident else cap_hidden
            fp_trace = guard.GuardTrace(g_ids) if g_ids is not None else None
            sm.release_(adapter.embed)
            for i in tqdm(range(n_layers), desc="FP pass", disable=not progress, leave=False):
                path = sm.block_path(i)
                with timer("load"):
                    block = sm.load_(path, device)
                if eval_fp:
                    with timer("eval_fp"):
                        for h in [*fp_eval.values(), *fp_zs]:
                            runner.run_(block, h)
                if g_ids is not None:
                    with timer("guard"):
                        runner.run_(block, fp_guard)
                        fp_trace.record(fp_guard)
                if qk is not None:
                    with timer("calibrate"):
                        fuse_layer_norms_(adapter.layer(block))  # as in memory: the norm-fused, unrotated block
                        qk.attach(i, adapter.layer(block))
                        try:
                            runner.run_(block, qk_hidden, batch=qk_batch)
                        finally:
                            qk.finish()
                if cap is not None:
                    with timer("capture"):
                        fuse_layer_norms_(adapter.layer(block))  # capture sees the norm-fused, unrotated block
                        cap.attach(i, block, adapter)
                        runner.run_(block, cap_hidden, batch=cap_batch)
                        cap.detach()
                    with timer("calibrate"):
                        r2_fitter.fit_layer_(i, cap.r2[0])
                sm.release_(path)
            if eval_fp or g_ids is not None:  # the raw final norm and lm_head
                with timer("load"):
                    norm = sm.load_(adapter.final_norm, device)
                    head = sm.load_(adapter.lm_head, device)
                if eval_fp:
                    with timer("eval_fp"):
                        metrics["fp"] = {"ppl": ppl_metrics(norm, head, fp_eval, windows, device)}
                        if zs:
                            metrics["fp"]["zeroshot"] = zs.results(fp_zs, norm, head, device)
                if g_ids is not None:  # the guard's FP reference (quant/guard.FPReference)
                    with timer("guard"):
                        ref = guard.fp_reference(norm, head, fp_guard, g_ids, fp_trace, device)
                sm.release_(adapter.final_norm)
                sm.release_(adapter.lm_head)
            del fp_eval, fp_guard, fp_zs
            captured = cap.result() if cap is not None else None
            if captured is not None:
                captured.r2_fitter = r2_fitter
            del cap_hidden

        # ---- rotations ---------------------------------------------------------------------------
        ctx = MethodContext(calib_ids=calib_ids, tokenizer=tokenizer, timer=timer, out_dir=tmp, progress=progress,
                            captured=captured)
        if cfg.rotations:
            rotations = RotationSet.load(cfg.rotations)
            rotations.validate(geo)
        else:
            rotations = cfg.method_spec.produce(model, cfg, ctx)
        del captured, ctx
        if qk is not None:  # as pipeline.add_qk_balance_
            from ..calib.qk_balance import MAX_WINDOWS, scaling_from

            rotations.scales["qk"], meta = scaling_from(qk.result(), windows=min(len(calib_ids), MAX_WINDOWS))
            rotations.meta.update(meta)
            del qk_hidden
        timings = move_volatile_json_(tmp)
        values = None
        if rotations is not None:
            calib = calibration_summary(rotations.meta)
            if calib and not cfg.rotations:
                metrics["calibration"] = calib
            log.info("rotating (%s), streamed", rotations.meta.get("method", "given"))
            check_foldable(model, rotations, adapter)
            values = fold_values(rotations, geo, device)
            install_online_(model, adapter, r3=rotations.r3, r4=rotations.r4, r1_online=rotations.r1_online)
        if rotations is not None:  # what the online transforms cost per token (read off the skeleton's modules)
            from ..transforms.online import online_cost

            metrics["online_cost"] = online_cost(model, adapter)
        install_quantizers_(model, sc, adapter)
        spec = sc.weight_spec()
        names = {m: n for n, m in model.named_modules()}
        writer = ShardWriter(tmp, cfg.shard_mb * MB)

        # ---- quantize pass -----------------------------------------------------------------------
        with timer("load"):
            sm.load_(adapter.embed, device)
        if values is not None:
            with timer("rotate"):
                fold_outer_(model, adapter, values, geo, roles=("embed",))
        with timer("quantize"):
            q_calib = runner.embed(quantize_ids) if calib_pass else None  # GPTQ sees the unrounded embedding, as in memory
            gptq_batch, resident = (forward_plan(geo, *q_calib.shape[:2], q_calib.dtype, device) if calib_pass
                                    else (1, False))
            q_calib = q_calib.to(device) if resident else q_calib
            embed_w = adapter.embedding(model).weight
            _round_(embed_w, sc.unquantized_dtype, f"{adapter.embed}.weight")
        with timer("eval"):  # (and the guard's windows)
            q_eval = {c: runner.embed(ids) for c, ids in windows.items()}
            q_zs = [runner.embed(b) for b in zs.batches] if zs else []
            q_guard = runner.embed(g_ids)
        q_trace = guard.GuardTrace(g_ids) if g_ids is not None else None
        with timer("save"):
            writer.add({f"{adapter.embed}.weight": embed_w.data.to(getattr(torch, sc.unquantized_dtype))})
        sm.release_(adapter.embed)
        del embed_w

        unrouted: list[str] = []
        routed: list[list[int]] = []
        clip_search = ClipSearchRecord()  # the activation clip search's choices (quant/act_clip.py), if on
        log.info("quantizing weights (%s, %d bits), streamed", sc.weight_quantizer, sc.w_bits)
        for i in tqdm(range(n_layers), desc="quantize pass", disable=not progress, leave=False):
            path = sm.block_path(i)
            with timer("load"):
                block = sm.load_(path, device)
            layer = adapter.layer(block)
            if values is not None:
                with timer("rotate"):
                    fuse_layer_norms_(layer)
                    fold_layer_(layer, i, values, geo)
            qtensors: dict[str, QuantizedTensor] = {}

            def commit(linear, qt: QuantizedTensor, qtensors=qtensors) -> None:
                linear.weight.data.copy_(qt.dequantize().to(linear.weight.device, linear.weight.dtype))
                qtensors[names[linear]] = qt

            with timer("quantize"):
                if spec.bits < 16 and not gptq:
                    for linear in layer.linears().values():
                        commit(linear, QuantizedTensor.from_float(linear.weight.data.float(), spec))
                if calib_pass:
                    set_act_quant_enabled_(block, sc.gptq_act_quant)
                    try:
                        forward = runner.forward_fn(block, q_calib, gptq_batch)
                        # MoE: each expert's tokens in GPTQ's forward
                        counter = RoutedTokens(block, adapter) if gptq else None

                        def counted(update, forward=forward, counter=counter) -> None:
                            # the experts' Hessians come from GPTQ's last forward (true-sequential: one per step)
                            counter.reset_()
                            forward(update)

                        unrouted += quantize_block_(block, adapter, forward, sc, commit, names.__getitem__, gptq=gptq,
                                                    clip_search=clip_search, layer=i, total_tokens=quantize_ids.numel(),
                                                    seed=cfg.seed, gptq_forward=counted)
                        if counter is not None:
                            routed += counter.close()
                        if i + 1 < n_layers:
                            forward(True)  # the next block's inputs: this quantized block's outputs
                    finally:
                        set_act_quant_enabled_(block, True)
            with timer("eval"):
                for h in [*q_eval.values(), *q_zs]:
                    runner.run_(block, h)
            if g_ids is not None:
                with timer("guard"):
                    runner.run_(block, q_guard)
                    q_trace.record(q_guard)
            with timer("save"):
                state = _module_state(block, path, {f"{n}.weight" for n in qtensors})
                for name, qt in qtensors.items():
                    state.update(qt.to_state_dict(prefix=f"{name}."))
                writer.add(state)
            del state, layer, block  # this block's values go with release_
            sm.release_(path)
        del q_calib
        if unrouted:
            metrics["gptq_rtn_fallbacks"] = unrouted
        if sc.a_clip_search:
            metrics["act_clip_search"] = clip_search.summary(sc.a_clip)
        if routed:  # how the calibration tokens reached the experts (streamed runs only)
            metrics["moe_routed_tokens"] = {"calib_tokens": int(quantize_ids.numel()), "min": min(map(min, routed)),
                                            "max": max(map(max, routed)), "per_moe_layer": routed}

        # ---- head: final norm, lm_head, perplexity, guard ------------------------------------------
        with timer("load"):
            norm = sm.load_(adapter.final_norm, device)
            head = sm.load_(adapter.lm_head, device)
        if values is not None:
            with timer("rotate"):
                fuse_final_norm_(model, adapter)
                fold_outer_(model, adapter, values, geo, roles=("lm_head",))
        head_q = {}
        with timer("quantize"):
            if sc.quantize_lm_head and spec.bits < 16:  # RTN, as quantize_weights_ does
                qt = QuantizedTensor.from_float(head.weight.data.float(), spec)
                head.weight.data.copy_(qt.dequantize().to(head.weight.device, head.weight.dtype))
                head_q = qt.to_state_dict(prefix=f"{adapter.lm_head}.")
            else:
                _round_(head.weight, sc.unquantized_dtype, f"{adapter.lm_head}.weight")
        log.info("evaluating the quantized model (streamed)")
        with timer("eval"):
            metrics["ppl"] = ppl_metrics(norm, head, q_eval, windows, device)
            if zs:
                metrics["zeroshot"] = zs.results(q_zs, norm, head, device)
        del q_eval, q_zs
        with timer("save"):
            state = _module_state(norm, adapter.final_norm, set())
            if head_q:
                state.update(head_q)
            else:
                state[f"{adapter.lm_head}.weight"] = head.weight.data.to(getattr(torch, sc.unquantized_dtype))
            writer.add(state)
            files = writer.close()
            write_run_metadata(tmp, model, tokenizer, cfg, adapter, rotations, timings, clip_search.act_clips())
        if g_ids is not None:
            with timer("guard"):
                metrics["quality_check"] = guard.check(ref, norm, head, q_guard, q_trace, cfg,
                                                       getattr(rotations, "r1", None), device)
        metrics["stream"] = {"blocks": n_layers, "shards": len(files), "stored_dtype": sm.stored_dtype(),
                             "compute_dtype": cfg.dtype,
                             # GPU: were the host <-> device copies overlapped (self-check passed)?
                             "copies_overlapped": runner.copies_overlapped}
        metrics["seconds"] = timer.seconds
        metrics["peak_memory_bytes"] = peak_memory_bytes(cfg.device)
        metrics["peak_raised_bytes"] = timer.peak_raised  # which stages set those peaks
        if timings:
            metrics["calibration_timings"] = timings
        write_json(tmp / "metrics.json", metrics)
    return metrics
