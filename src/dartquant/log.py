"""One logger for the whole package: `log` (standard logging, "dartquant" namespace).

The command line sets it up once (`setup(verbose)`): messages go to stderr as
"[dartquant] ...", progress bars are tqdm's (also on stderr), results go to stdout. A library
user configures logging as for any other package; nothing is printed unless they do.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("dartquant")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is *now* (a test's capture, a redirected stream), never to a
    stream that was replaced and closed since the handler was made."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property always wins
        pass


def setup(verbose: bool = True) -> None:
    """Route the package's messages to stderr (info level when verbose, warnings otherwise)."""
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[dartquant] %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = False
