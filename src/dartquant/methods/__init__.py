"""Rotation methods as registered producers.

A method only *computes* rotations: `produce(model, cfg, ctx)` takes the norm-fused, unrotated
model (the pipeline fuses the norms once, before any method runs), the run config and the
calibration context, and returns a `RotationSet` (or None for no rotation); the pipeline folds it
with `transforms.rotate_`, quantizes and evaluates. A method may own a section of the run config
(a dataclass of its settings, e.g. `dartquant:` with flags `--dq-*`); methods that share
settings share a section (SpinQuant and OSTQuant: `e2e:`).

Adding a method: one file in this folder defining `METHOD = Method(...)`, and its line in
`_MODULES` below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class MethodContext:
    """What a producer may use besides the model and the config."""

    calib_ids: object  # [n, seqlen] calibration windows (None when the run needs none)
    tokenizer: object
    timer: Callable  # timer("stage") -> context manager adding to metrics' "seconds"
    out_dir: Path | None  # the run folder being written (curves, logs)
    progress: bool
    captured: object = None  # samples the streamed FP pass captured already (stream/), else None


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    produce: Callable  # (model, cfg, ctx: MethodContext) -> RotationSet | None
    rotates: bool = True  # False: no rotation at all (the norms are left as they are)
    section: str | None = None  # run-config key of its settings
    options: type | None = None  # the dataclass of those settings
    flag_prefix: str = ""  # flat names / flags of the settings: <prefix>_<field>, --<prefix>-<field>
    needs_calib_windows: bool = False  # the pipeline draws calibration windows for it
    r1_optional: bool = False  # runs with `r1: false` (its other rotations do not depend on R1)
    default_r4: bool = True  # the run's r4 when not given (duquant: its own online transform replaces R4)
    check: Callable | None = None  # (cfg, adapter, geometry) -> None; raises before the model is loaded
    export_refusal: str | None = None  # why `dartquant export` cannot write this method's runs
    trains_scalings: bool = False  # it trains the diagonal scalings ("qk" among them): no qk_balance on top


_MODULES = ("rtn", "quarot", "dartquant", "spinquant", "ostquant", "dfrot", "duquant")  # the registry: one line per method


def _load() -> dict[str, Method]:
    found = {}
    for mod in _MODULES:
        m = importlib.import_module(f".{mod}", __name__).METHOD
        found[m.name] = m
    return found


METHODS: dict[str, Method] = _load()


def calibration_summary(meta: dict) -> dict:
    """What a calibration chose and its held-out numbers (learning rates, held-out loss / SQNR
    before and after), from a RotationSet's metadata: metrics.json's "calibration", so that a
    sweep's JSON says how every row was tuned."""
    kept = ("eval_loss", "r1_", "r2_", "lr", "amp", "steps", "qk_balance")
    return {k: v for k, v in meta.items() if k.startswith(kept)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def option_sections() -> dict[str, tuple[type, str]]:
    """Run-config sections owned by methods: name -> (options dataclass, flag prefix)."""
    out: dict[str, tuple[type, str]] = {}
    for m in METHODS.values():
        if m.section is not None:
            prev = out.setdefault(m.section, (m.options, m.flag_prefix))
            if prev != (m.options, m.flag_prefix):
                raise RuntimeError(f"methods sharing section {m.section!r} must share its options and prefix")
    return out
