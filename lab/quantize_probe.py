"""What the linear-by-linear probes share (lab/gptq_asym_layers.py, lab/magr_layers.py): run `dartquant quantize`
in this process, with GPTQ's methods already patched by the probe, stop it once the probe has seen enough
linears, and write the probe's JSON however the run ended."""

from __future__ import annotations

import json
import sys
from pathlib import Path


class Enough(Exception):
    """Raised by a probe's patched GPTQ method to end the run early."""


def run_quantize(args: list[str], out: str | None, payload, label: str, stop_after: int) -> None:
    """`dartquant quantize ARGS`; then `payload()` (a dict) as JSON to `out`, if given."""
    from dartquant.cli import main as cli_main

    try:
        cli_main(["quantize", *args])
    except Enough:
        print(f"[{label}] stopped after {stop_after} linears", file=sys.stderr)
    finally:
        if out:
            Path(out).write_text(json.dumps(payload(), indent=1))
