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

# Under pytest-xdist (README's test command runs two workers, `-n 2`) each worker computes on one
# thread: two workers of two intra-op threads each on two cores only wait on each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


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


@pytest.fixture(scope="session")
def kernel_run(tmp_path_factory):
    """A tiny QuaRot / RTN W4A4KV4 run folder (tiny.save_kernel_llama_folder) for the kernel tests."""
    from tiny import quantized_kernel_run, save_kernel_llama_folder

    return quantized_kernel_run(tmp_path_factory.mktemp("kernel_run"), save_kernel_llama_folder)
