"""One logger for the whole package: `log` (standard logging, "dartquant" namespace).

The command line sets it up once (`setup(verbose)`): messages go to stderr as
"[dartquant] ...", progress bars are tqdm's (also on stderr), results go to stdout. A library
user configures logging as for any other package; nothing is printed unless they do.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("dartquant")


def setup(verbose: bool = True) -> None:
    """Route the package's messages to stderr (info level when verbose, warnings otherwise)."""
    if not any(getattr(h, "_dartquant", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[dartquant] %(message)s"))
        handler._dartquant = True
        log.addHandler(handler)
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = False
