"""QuaRot: a random Hadamard R1 (seeded), Hadamard R2 per head, online R3 / R4. Nothing learned."""

from __future__ import annotations

from . import Method


def produce(model, cfg, ctx):
    from ..adapters import adapter_for
    from ..transforms import RotationSet

    with ctx.timer("calibrate"):
        return RotationSet.quarot(adapter_for(model).geometry(model.config), seed=cfg.seed, r1=cfg.r1, r3=cfg.r3,
                                  r4=cfg.r4, r1_online=cfg.r1_online)


METHOD = Method("quarot", "random Hadamard R1, Hadamard R2/R3/R4", produce, r1_optional=True)
