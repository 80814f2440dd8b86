"""Run one measurement per subprocess, so that a peak-memory figure (peak RSS, CUDA peak) is that
measurement's alone: the child prints one `RESULT {json}` line, the parent collects it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

TAG = "RESULT "


def emit(result: dict) -> None:
    """In the child: hand the measurement to the parent."""
    print(TAG + json.dumps(result), flush=True)


def run(cmd: list[str], error_row: dict) -> dict:
    """In the parent: run the child `cmd` and return its result, or `error_row` plus the exit
    status (the child's stderr tail goes to our stderr) when it failed or printed none."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(TAG)]
    if proc.returncode or not lines:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {**error_row, "error": f"exit {proc.returncode}"}
    return json.loads(lines[-1][len(TAG):])
