"""DuQuant: smoothing, greedy block rotations, a zigzag permutation and a second block rotation
per linear input, built from calibration activations (calib/duquant.py). The o_proj input's
transform and every smoothing are folded; the q/k/v, gate/up and down_proj inputs' block
rotations run online (counted in metrics' `online_cost`)."""

from __future__ import annotations

from ..calib.duquant import DuQuantConfig
from . import Method

EXPORT_REFUSAL = ("DuQuant's online block rotations (block-diagonal R1, a permutation, block-diagonal R2, "
                  "different in every layer) have no compressed-tensors form we have validated: the format "
                  "could only carry each as a dense per-module `random-matrix` at the linear's input "
                  "(n^2 FLOPs per token instead of 2 n B, one copy for each of q/k/v), which this export "
                  "does not write; the run stays usable through dartquant (zoo.load_model)")


def check(cfg, adapter, geo) -> None:
    if cfg.r4:
        raise ValueError("--method duquant puts its own online transform on the down_proj input in place of R4: "
                         "leave r4 unset or false")
    if adapter.moe is not None:
        raise ValueError(f"{adapter.family}: duquant does not cover mixture-of-experts blocks")


def produce(model, cfg, ctx):
    from ..calib.duquant import calibrate_duquant

    return calibrate_duquant(model, cfg, ctx.calib_ids, timer=ctx.timer, progress=ctx.progress)


METHOD = Method("duquant", "smoothing + greedy block rotations, zigzag permutation, second block rotation "
                "(online on the q/k/v, gate/up and down_proj inputs)", produce, section="duquant",
                options=DuQuantConfig, flag_prefix="duq", needs_calib_windows=True, default_r4=False, check=check,
                r1_optional=True,  # it never rotates the residual stream: r1 changes nothing
                export_refusal=EXPORT_REFUSAL)
