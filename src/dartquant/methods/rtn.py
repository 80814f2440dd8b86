"""RTN: no rotation (round-to-nearest weights by default), the floor every method must beat."""

from . import Method

METHOD = Method("rtn", "no rotation", lambda model, cfg, ctx: None, rotates=False)
