"""SpinQuant: R1 / R2 trained end to end on the cross-entropy of the fake-quantized model (Cayley SGD)."""

from __future__ import annotations

from ..calib.e2e import E2EConfig
from . import Method


def train_end_to_end(model, cfg, ctx):
    """SpinQuant / OSTQuant: training windows from the first 90% of the calibration half, held-out
    ones from the last 10% (never overlapping); the model trains on `cfg.device`."""
    from ..calib.e2e import train_e2e
    from ..data import calib_windows

    opts = cfg.section("e2e")
    with ctx.timer("capture"):
        n = opts.samples or opts.steps * opts.batch
        train_ids = calib_windows(ctx.tokenizer, cfg.data.corpus, n, opts.seqlen, cfg.seed + 1, span=(0.0, 0.9))
        eval_ids = (calib_windows(ctx.tokenizer, cfg.data.corpus, opts.eval_samples, opts.seqlen, cfg.seed + 2,
                                  span=(0.9, 1.0)) if opts.eval_samples else None)
    with ctx.timer("calibrate"):
        model.to(cfg.device)
        try:
            return train_e2e(model, cfg, train_ids, eval_ids, out_dir=ctx.out_dir, progress=ctx.progress)
        finally:
            model.to("cpu")


METHOD = Method("spinquant", "R1/R2 trained end to end (cross-entropy, Cayley SGD)", train_end_to_end,
                section="e2e", options=E2EConfig, flag_prefix="e2e")
