"""StageTimer's attribution of the memory peaks to stages (metrics.json `peak_raised_bytes`).

The peaks are read through `stages._peaks`, faked here with a scripted "peak so far": a real
process's ru_maxrss can start high (Linux carries a forked parent's resident size into the
child's maximum), so the logic is tested on known numbers, and the real readers once."""

from __future__ import annotations

import torch

from dartquant import stages
from dartquant.stages import StageTimer


class FakePeaks:
    """A peak-so-far that the test raises by hand (host RSS and, if asked, CUDA)."""

    def __init__(self):
        self.now = {"cpu_rss": 1000, "cuda": 10}

    def __call__(self, cuda: bool) -> dict:
        return {k: v for k, v in self.now.items() if cuda or k == "cpu_rss"}

    def raise_to(self, kind: str, value: int) -> None:
        self.now[kind] = max(self.now[kind], value)


def test_each_stage_is_credited_with_the_rise_of_the_peak_while_it_ran(monkeypatch):
    fake = FakePeaks()
    monkeypatch.setattr(stages, "_peaks", fake)
    monkeypatch.setattr(stages, "_cuda", lambda device: True)
    t = StageTimer("cuda")
    with t("load"):
        fake.raise_to("cpu_rss", 1500)
    with t("quantize"):
        with t("gptq"):  # nested: its rise counts in the enclosing stage too
            fake.raise_to("cuda", 50)
        fake.raise_to("cuda", 70)
    with t("load"):  # a second occurrence adds up
        fake.raise_to("cpu_rss", 1600)
    with t("eval"):  # below the peak reached: raises nothing
        fake.raise_to("cpu_rss", 1200)
    assert t.peak_raised == {"cpu_rss": {"load": 600}, "cuda": {"gptq": 40, "quantize": 60}}
    assert set(t.seconds) == {"load", "quantize", "gptq", "eval"}


def test_on_the_cpu_only_the_host_peak_and_without_a_device_nothing(monkeypatch):
    fake = FakePeaks()
    monkeypatch.setattr(stages, "_peaks", fake)
    t = StageTimer("cpu")
    with t("a"):
        fake.raise_to("cpu_rss", 2000)
        fake.raise_to("cuda", 99)
    assert t.peak_raised == {"cpu_rss": {"a": 1000}}
    t = StageTimer()
    with t("a"):
        fake.raise_to("cpu_rss", 3000)
    assert t.peak_raised == {} and set(t.seconds) == {"a"}


def test_the_real_readers_are_the_ones_peak_memory_bytes_reports():
    got = stages._peaks(False)
    assert set(got) == {"cpu_rss"} and got["cpu_rss"] > 0
    assert got["cpu_rss"] <= stages.peak_memory_bytes("cpu")["cpu_rss"]
    if torch.cuda.is_available():  # pragma: no cover (CPU CI)
        assert "cuda" in stages._peaks(True)
