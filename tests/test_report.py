"""benchmarks/report.py: the headline tables of docs/RESULTS.md are generated from the JSON in
docs/results/, so a RESULTS.md whose headlines no longer match the JSON fails here."""

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402


def test_committed_results_md_matches_the_json():
    assert report.main(["--check"]) == 0, "docs/RESULTS.md is stale: run python benchmarks/report.py"


def test_check_fails_on_a_stale_file_and_a_rewrite_restores_it(tmp_path):
    md = tmp_path / "RESULTS.md"
    original = report.RESULTS_MD.read_text()
    cell = "| 14.257 ± 0.162 |"  # SmolLM2 QuaRot : GPTQ wiki; the sections below the block may quote it too
    begin, at, end = original.index(report.BEGIN), original.index(cell), original.index(report.END)
    assert begin < at < end  # its first occurrence is inside the generated block: change only that one
    md.write_text(original[:at] + "| 14.250 ± 0.162 |" + original[at + len(cell):])
    assert report.main(["--check", "--md", str(md)]) == 1
    assert report.main(["--md", str(md)]) == 0
    assert md.read_text() == original
    assert report.main(["--check", "--md", str(md)]) == 0  # idempotent


def test_text_outside_the_markers_is_kept_and_missing_markers_are_refused(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# T\n\nbefore\n{report.BEGIN}\nSTALE LINE\n{report.END}\nafter\n")
    report.main(["--md", str(md)])
    text = md.read_text()
    assert text.startswith("# T\n\nbefore\n" + report.BEGIN) and text.endswith(report.END + "\nafter\n")
    assert "STALE LINE" not in text
    md.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="headlines:begin"):
        report.main(["--md", str(md)])


def test_runs_measured_differently_are_not_pooled(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(report.RESULTS_DIR, results, ignore=shutil.ignore_patterns("*.log"))
    path = results / "smollm2_e2e_h200_session3.json"
    data = json.loads(path.read_text())
    data["runs"][0]["ppl"]["tokens"] -= 2048  # one run scored one window less
    path.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="measured different things"):
        report.render(results)
