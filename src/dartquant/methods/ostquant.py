"""OSTQuant: SpinQuant's rotations plus learned diagonal scalings, on the KL-Top loss (calib/e2e.py)."""

from __future__ import annotations

from ..calib.e2e import E2EConfig
from . import Method
from .spinquant import train_end_to_end

METHOD = Method("ostquant", "rotations + scalings trained end to end (KL-Top)", train_end_to_end,
                section="e2e", options=E2EConfig, flag_prefix="e2e", trains_scalings=True)
