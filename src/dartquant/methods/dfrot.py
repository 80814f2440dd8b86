"""DFRot: QuaRot's R1 refined by alternating 4-bit quantization and orthogonal Procrustes, with
massive-activation tokens weighted up (calib/dfrot.py); R2 / R3 / R4 as QuaRot."""

from __future__ import annotations

from ..calib.dfrot import DFRotConfig
from . import Method


def produce(model, cfg, ctx):
    from ..calib.dfrot import calibrate_dfrot

    return calibrate_dfrot(model, cfg, ctx.calib_ids, timer=ctx.timer, out_dir=ctx.out_dir, progress=ctx.progress)


METHOD = Method("dfrot", "QuaRot's R1 refined by quantize / Procrustes alternation, massive tokens weighted",
                produce, section="dfrot", options=DFRotConfig, flag_prefix="dfrot", needs_calib_windows=True)
