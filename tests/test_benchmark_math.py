"""The arithmetic behind the extrapolated cost tables (benchmarks/e2e_cost.py): a line through
costs measured at reduced depths, and ratios that skip only the costs that did not extrapolate."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from e2e_cost import add_ratios, extrapolate  # noqa: E402


def _row(method, layers, seconds, gpu, rss):
    return {"method": method, "layers": layers, "schedule": "s", "full_schedule_s": seconds,
            "peak_gpu_GiB": gpu, "peak_cpu_rss_GiB": rss}


def test_extrapolate_is_exact_for_a_cost_linear_in_depth():
    rows = [_row("spinquant", n, 30.0 + 2.5 * n, 4.0 + 0.5 * n, 3.0) for n in (4, 8, 12)]
    out = extrapolate(rows, 80)
    assert abs(out["full_schedule_s"] - 230.0) < 1e-9
    assert abs(out["peak_gpu_GiB"] - 44.0) < 1e-9
    assert abs(out["full_schedule_s_per_layer"] - 2.5) < 1e-9
    assert "not_extrapolable" not in out


def test_a_cost_that_shrinks_with_depth_is_flagged_and_only_its_ratio_is_withheld():
    dq = extrapolate([_row("dartquant", 4, 100.0, 6.0, 10.0), _row("dartquant", 8, 140.0, 7.0, 20.0)], 80)
    sq = extrapolate([_row("spinquant", 4, 500.0, 27.0, 3.01), _row("spinquant", 8, 950.0, 34.0, 2.98)], 80)
    assert sq["not_extrapolable"] == ["peak_cpu_rss_GiB"]
    rows = [dq, sq]
    add_ratios(rows)
    assert abs(sq["time_vs_dartquant"] - round(sq["full_schedule_s"] / dq["full_schedule_s"], 2)) < 1e-12
    assert abs(sq["memory_vs_dartquant"] - round(sq["peak_gpu_GiB"] / dq["peak_gpu_GiB"], 2)) < 1e-12
    # on a CPU the memory measure is the RSS: there the flagged key withholds the ratio
    for r in rows:
        r.pop("peak_gpu_GiB"), r.pop("time_vs_dartquant"), r.pop("memory_vs_dartquant")
    add_ratios(rows)
    assert "memory_vs_dartquant" not in sq and "time_vs_dartquant" in sq


def test_a_single_depth_cannot_be_extrapolated():
    assert "error" in extrapolate([_row("ostquant", 4, 1.0, 1.0, 1.0)], 80)


def test_whole_job_full_depth_is_a_line_through_the_cut_depths():
    """benchmarks/whole_job.py: per stage, t(32) from rows at 2 and 4 layers; falling costs flagged."""
    from whole_job import extrapolate as whole_job_extrapolate

    def row(layers, wall, quantize, save, method="quarot"):
        return {"shape": "mixtral-8x7b", "layers": layers, "method": method, "stream": "true", "wall_s": wall,
                "seconds": {"quantize": quantize, "save": save}, "host_rss_GB": 9.0, "gpu_GiB": 30.0}

    rows = [row(2, 100.0, 50.0, 3.0), row(4, 160.0, 90.0, 2.0), row(4, 1.0, 1.0, 1.0, method="dartquant"),
            {"shape": "mixtral-8x7b", "layers": 2, "method": "dartquant", "stream": "true", "error": "x"}]
    (e,) = whole_job_extrapolate(rows)  # dartquant: one depth that did not fail: no estimate
    assert (e["method"], e["layers"], e["from_layers"]) == ("quarot", 32, [2, 4])
    assert e["wall_s"] == 100.0 + 30 * 30 and e["seconds"]["quantize"] == 50.0 + 20 * 30
    assert e["not_extrapolable"] == ["save"] and e["gpu_GiB"] == [30.0, 30.0]


def test_whole_job_rows_are_saved_as_they_come(tmp_path):
    """benchmarks/whole_job.py writes its JSON after every row (a stopped batch keeps its rows) and
    merges with earlier invocations: same (shape, depth, method, stream) replaced, others kept."""
    import argparse

    from whole_job import save_rows

    out = tmp_path / "wj.json"
    args = argparse.Namespace(device="cpu")
    r = {"shape": "tiny", "layers": 2, "method": "rtn", "stream": "true", "wall_s": 1.0, "seconds": {}}
    save_rows(out, [r], args, final=False)
    saved = json.loads(out.read_text())
    assert saved["rows"] == [r] and saved["complete"] is False and len(saved["commands"]) == 1
    r2 = {**r, "method": "quarot"}
    save_rows(out, [r, r2], args, final=True)  # the same invocation: one command, both rows
    saved = json.loads(out.read_text())
    assert saved["rows"] == [r, r2] and saved["complete"] and len(saved["commands"]) == 1
    newer = {**r, "wall_s": 2.0}
    save_rows(out, [newer], args, final=True)
    assert json.loads(out.read_text())["rows"] == [r2, newer]
    assert not list(tmp_path.glob("*.tmp"))


def test_quality_config_strings_take_list_values():
    """benchmarks/quality.py --configs: key=value pairs split on commas, except inside [a,b] lists."""
    from quality import parse_config

    assert parse_config("quarot:gptq") == ("quarot", "gptq", {})
    assert parse_config("duquant:gptq:a_clip_search=true,dq_lr_grid=[0.01,0.1],seed_x=3") == (
        "duquant", "gptq", {"a_clip_search": True, "dq_lr_grid": [0.01, 0.1], "seed_x": 3})
