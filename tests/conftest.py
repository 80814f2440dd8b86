"""Shared fixtures; the tiny model factories live in tiny.py."""

from __future__ import annotations

import pytest
from tiny import TINY_CONFIGS


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_name(request):
    return request.param
