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
    from dartquant.config import RunConfig
    from dartquant.pipeline import run_quantize
    from tiny import save_kernel_llama_folder

    base = tmp_path_factory.mktemp("kernel_run")
    model = save_kernel_llama_folder(base / "model")
    cfg = RunConfig.from_flat(model=str(model), method="quarot", w_quantizer="rtn", calib_samples=2, calib_seqlen=16,
                              eval_seqlen=16, eval_max_windows=1, guard_windows=0)
    run_quantize(cfg, base / "run", progress=False, eval_fp=False)
    return base / "run"
