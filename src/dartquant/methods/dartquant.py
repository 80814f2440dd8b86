"""DartQuant: R1 / R2 calibrated on captured activations (Whip loss through QR-Orth) — calib/dartquant.py."""

from __future__ import annotations

from ..calib.dartquant import DartQuantConfig
from . import Method


def produce(model, cfg, ctx):
    from ..calib.dartquant import calibrate_dartquant

    return calibrate_dartquant(model, cfg, ctx.calib_ids, timer=ctx.timer, out_dir=ctx.out_dir, progress=ctx.progress,
                               captured=ctx.captured)


METHOD = Method("dartquant", "R1/R2 calibrated from the activation distribution (Whip loss, QR-Orth)", produce,
                section="dartquant", options=DartQuantConfig, flag_prefix="dq", needs_calib_windows=True)
