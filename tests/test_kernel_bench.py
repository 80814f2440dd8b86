"""benchmarks/kernel_bench.py's plumbing that runs without a GPU."""
import os
import sys

import pytest


@pytest.fixture
def kernel_bench(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    monkeypatch.syspath_prepend(os.path.dirname(__file__))  # sticky_worker, for the spawned children
    import kernel_bench

    return kernel_bench


def test_a_sticky_cuda_error_fails_only_its_own_job(kernel_bench):
    """One worker: after "bad" faults, every later job of that process fails with the same CUDA error. Rerun each in
    its own process, only "bad" (the fault) and "oom" (an error of its own) stay recorded."""
    import sticky_worker

    errors = kernel_bench.compile_all(["a", "bad", "b", "c", "oom", "d"], 1, warm=sticky_worker.warm)
    assert set(errors) == {"bad", "oom"}, errors
    assert "shared memory" in errors["oom"] and "CUDA error" in errors["bad"]
