"""StageTimer's attribution of the memory peaks to stages (metrics.json `peak_raised_bytes`)."""

from __future__ import annotations

import json
import subprocess
import sys

from dartquant.stages import StageTimer

SCRIPT = r"""
import json, resource, torch
from dartquant.stages import StageTimer
t = StageTimer("cpu")
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with t("small"):
    a = torch.ones(1000)
with t("big"):
    with t("inner"):
        b = torch.ones(100 * 2**20)  # 400 MB, touched
    del b
with t("after"):  # below the peak already reached: raises nothing
    c = torch.ones(10 * 2**20)
end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"raised": t.peak_raised, "start": start, "end": end, "seconds": t.seconds}))
"""


def test_the_stage_that_allocates_is_the_one_that_raised_the_peak():
    # a fresh process: this one's peak may already stand above anything a test allocates
    out = json.loads(subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                                    check=True).stdout)
    raised = out["raised"]["cpu_rss"]
    assert raised["big"] >= 350 * 2**20 and raised["inner"] >= 350 * 2**20  # nested: counted in both
    assert raised["big"] >= raised["inner"]
    assert raised.get("after", 0) == 0 and raised.get("small", 0) < 50 * 2**20
    assert raised["big"] + raised.get("small", 0) <= out["end"] - out["start"]
    assert set(out["seconds"]) == {"small", "big", "inner", "after"}
    assert "cuda" not in out["raised"]


def test_without_a_device_only_time_is_kept():
    t = StageTimer()
    with t("a"):
        pass
    assert set(t.seconds) == {"a"} and t.peak_raised == {}
