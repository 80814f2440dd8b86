"""Output folders: checked before any heavy work, written atomically, with the resolved config.

A run writes into a hidden temporary folder beside the target and renames it into place only
at the end, so an interrupted run leaves no folder that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml


class OutputExistsError(FileExistsError):
    pass


def check_out_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail fast if `out` already holds something (unless overwrite); its parent must be creatable."""
    out = Path(out)
    if out.exists() and not overwrite:
        if not out.is_dir() or any(out.iterdir()):
            raise OutputExistsError(f"output folder {out} already exists and is not empty (another run's "
                                    "results?); choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike):
    """Yield a temporary folder; on success it replaces `out`, on failure it is removed."""
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a result folder should be like any other
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_yaml(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(obj, sort_keys=False))
    os.replace(tmp, path)
