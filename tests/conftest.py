"""Shared fixtures; the tiny model factories live in tiny.py."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run through Triton's interpreter where there is no GPU (CI, laptops); it is read
# when a kernel is defined, so it must be set before dartquant.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from tiny import TINY_CONFIGS


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_name(request):
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation, which costs seconds per test
    when the 2 cores are shared with other jobs. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
