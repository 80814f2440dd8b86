"""The one stage timer: wall time per named stage, and (optionally) the memory peaks at its end.

`StageTimer` accumulates seconds per stage name (what `metrics.json` reports as "seconds");
`measure` records one stage's time and the peaks so far (CUDA allocated, host RSS), what
DartQuant's calibration writes into its rotations' metadata. Peaks are read, not reset: a
caller measuring a whole run keeps its peak; cost benchmarks reset CUDA's around each stage.
"""

from __future__ import annotations

import contextlib
import resource
import time

import torch


def _cuda(device) -> bool:
    return str(device).startswith("cuda") and torch.cuda.is_available()


def _peaks(cuda: bool) -> dict[str, int]:
    out = {"cpu_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if cuda:
        out["cuda"] = torch.cuda.max_memory_allocated()
    return out


def peak_memory_bytes(device) -> dict:
    """Peak resident memory of this process (CPU) and, on CUDA, peak allocated device memory."""
    return _peaks(_cuda(device))


class StageTimer:
    """timer("stage") is a context manager adding its wall time to seconds["stage"].

    With `device`, it also says which stages set the process's memory peaks: `peak_raised[kind]
    [stage]` sums, over the stage's occurrences, how far the peak so far (host RSS; CUDA allocated
    on a GPU) rose while it ran. Peaks are only read, never reset, so `peak_memory_bytes` and any
    caller's own readings keep their meaning; a nested stage's rise counts in the enclosing one too."""

    def __init__(self, device=None):
        self.seconds: dict[str, float] = {}
        self._device = device
        self.peak_raised: dict[str, dict[str, int]] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        track = self._device is not None
        cuda = track and _cuda(self._device)
        before = _peaks(cuda) if track else {}
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - t0, 3)
            if track:
                for kind, value in _peaks(cuda).items():
                    rise = value - before[kind]
                    if rise > 0:
                        raised = self.peak_raised.setdefault(kind, {})
                        raised[stage] = raised.get(stage, 0) + rise


@contextlib.contextmanager
def measure(device, record: dict):
    """Fill `record` with the stage's seconds and the memory peaks so far (synchronizing CUDA)."""
    cuda = _cuda(device)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        yield record
    finally:
        if cuda:
            torch.cuda.synchronize()
        peaks = _peaks(cuda)
        if cuda:
            record["cuda_peak_so_far_bytes"] = peaks["cuda"]
            record["cuda_after_bytes"] = torch.cuda.memory_allocated()
        record["seconds"] = round(time.perf_counter() - t0, 3)
        record["cpu_rss_peak_so_far_bytes"] = peaks["cpu_rss"]
