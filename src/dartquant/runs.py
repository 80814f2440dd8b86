"""Output folders: checked before any heavy work, written atomically, never replacing what we did not write.

Design choices:
* A run writes into a hidden temporary folder `.X.tmp-*` beside the target `X` and renames it
  into place only at the end, so an interrupted run leaves no folder that looks complete.
* Every folder we create carries a marker file (`.dartquant-run`, constant content so that two
  identical runs stay byte-identical). `--overwrite` only replaces a folder with that marker (or
  an empty one): a user's folder, a model, a home directory are never deleted.
* Never the current directory, an ancestor of it, an input of the run (model folder or file,
  rotations file, recipe) or a folder containing one: checked on resolved paths, before loading.
* The final step runs under an exclusive lock file (`X.lock`, O_EXCL) and re-checks the target:
  it only replaces the very folder (same inode) that `--overwrite` was allowed to replace when the
  run started; a folder that appeared meanwhile (a second run with the same --out) is left alone,
  and this run's results are kept beside it (`X.conflict-<pid>`) with a clear error. Without
  --overwrite the rename itself is the check: renaming onto a non-empty folder fails.
* A temporary folder holds an owner file (`host pid`) while the run works; a later run with the
  same --out removes temporary folders whose owner process is dead (it wrote them: marker) and
  reports the ones it cannot judge.
* Timings and memory peaks are not reproducible: `split_volatile` moves them out of every
  artifact into metrics.json, so identical runs give byte-identical folders apart from it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import yaml

MARKER = ".dartquant-run"
_MARKER_TEXT = "written by dartquant: `--overwrite` may replace this folder\n"
_OWNER = ".dartquant-owner"  # inside a temporary folder only: "host pid" of the writing process
# Keys whose values differ between identical runs (wall time, memory peaks).
VOLATILE_KEYS = frozenset({"seconds", "seconds_per_step", "stages", "peak_memory_bytes", "peak_raised_bytes",
                           "cuda_peak_so_far_bytes", "cuda_after_bytes", "cpu_rss_peak_so_far_bytes"})


class OutputExistsError(FileExistsError):
    """The output folder holds something this run may not replace."""


class OutputDirError(ValueError):
    """The output folder is unsafe (cwd, an ancestor, contains an input) or not writable."""


class OutputDir(type(Path())):
    """A checked output path (check_out_dir). It remembers what the final step may replace:
    `replaces` is the (device, inode) of a marked run folder --overwrite may replace, or None."""

    replaces: tuple[int, int] | None = None
    overwrite: bool = False


# ---- checks before any work -----------------------------------------------------------------
def check_out_dir(out: str | os.PathLike, overwrite: bool = False, inputs=()) -> OutputDir:
    """Fail fast unless `out` can receive this run's folder; `inputs` are paths the run reads."""
    out = OutputDir(Path(out).expanduser())
    where = out.resolve()
    cwd = Path.cwd().resolve()
    if where == cwd or where in cwd.parents:
        raise OutputDirError(f"--out {out} is the current directory or one of its parents; "
                             "give a new folder name, e.g. --out runs/my-run")
    for inp in inputs:
        if inp is None or not Path(inp).expanduser().exists():
            continue  # bundled names and missing files are not folders on disk
        inp = Path(inp).expanduser().resolve()
        if inp == where or where in inp.parents:
            raise OutputDirError(f"--out {out} is or contains an input of this run ({inp}); "
                                 "write the results somewhere else")
    if out.is_symlink():
        raise OutputDirError(f"--out {out} is a symbolic link; give a real folder path")
    if out.exists():
        if not out.is_dir():
            raise OutputExistsError(f"--out {out} is an existing file, not a folder; choose another --out")
        if any(out.iterdir()):
            if not overwrite:
                raise OutputExistsError(f"output folder {out} already exists and is not empty (another run's "
                                        "results?); choose another --out or pass --overwrite")
            if not (out / MARKER).is_file():
                raise OutputExistsError(f"output folder {out} is not a dartquant run folder (no {MARKER} "
                                        "marker): --overwrite only replaces folders dartquant wrote; "
                                        "remove it yourself or choose another --out")
            st = out.stat()
            out.replaces = (st.st_dev, st.st_ino)
    out.overwrite = overwrite
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=out.parent)
        os.rmdir(probe)
    except OSError as e:
        raise OutputDirError(f"cannot create the output folder {out}: {e.strerror or e} ({out.parent} "
                             "is not a writable folder)") from e
    clean_stale_tmp(out)
    return out


def clean_stale_tmp(out: Path) -> list[Path]:
    """Remove `.X.tmp-*` folders of killed runs (marker + owner on this host, process dead) and
    empty ones; warn about the others that look abandoned. Returns the ones left in place."""
    left = []
    for tmp in Path(out).parent.glob(f".{Path(out).name}.tmp-*"):
        if not tmp.is_dir() or tmp.is_symlink():
            continue
        owner = _read_owner(tmp / _OWNER)
        if owner is not None and owner[0] == socket.gethostname() and not _alive(owner[1]):
            if (tmp / MARKER).is_file():
                shutil.rmtree(tmp, ignore_errors=True)
                continue
        if not any(tmp.iterdir()):
            with contextlib.suppress(OSError):
                tmp.rmdir()
                continue
        if owner is None or owner[0] != socket.gethostname():
            print(f"[dartquant] warning: {tmp} looks like the temporary folder of an interrupted run; "
                  "remove it if no run is writing it", file=sys.stderr)
            left.append(tmp)
    return left


# ---- the atomic write -------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike):
    """Yield a temporary folder; on success it replaces `out` (see the module doc), on failure it
    is removed. `out` should come from check_out_dir; a plain path is checked here (no overwrite)."""
    if not isinstance(out, OutputDir):
        out = check_out_dir(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a result folder should be like any other
        (tmp / MARKER).write_text(_MARKER_TEXT)
        (tmp / _OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        yield tmp
        (tmp / _OWNER).unlink()
        with _lock(out.parent / f"{out.name}.lock"):
            _move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, out: OutputDir) -> None:
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        st = None
    if st is not None and out.overwrite and (st.st_dev, st.st_ino) == out.replaces and (out / MARKER).is_file():
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, aside)  # onto the empty folder mkdtemp made
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(aside, out)
            raise
        shutil.rmtree(aside)  # our own run folder (marker checked above)
        return
    try:
        os.rename(tmp, out)  # atomic; fails if `out` is a non-empty folder or a file
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        kept = _unique_sibling(out, "conflict")
        os.rename(tmp, kept)
        raise OutputExistsError(f"{out} was created by someone else while this run worked (another run with the "
                                f"same --out?); it was left untouched and this run's results are in {kept}") from e


def _unique_sibling(out: Path, tag: str) -> Path:
    for i in range(1000):
        cand = out.with_name(f"{out.name}.{tag}-{os.getpid()}" + (f"-{i}" if i else ""))
        if not os.path.lexists(cand):
            return cand
    raise OutputExistsError(f"no free name beside {out}")


@contextlib.contextmanager
def _lock(path: Path, wait_s: float = 30.0):
    """Exclusive lock file (O_EXCL). A lock left by a dead process on this host is broken."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            owner = _read_owner(path)
            if owner is not None and owner[0] == socket.gethostname() and not _alive(owner[1]):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            if time.monotonic() > deadline:
                raise OutputExistsError(f"{path} is held by another run ({owner}); wait for it or remove the "
                                        "lock file if no run is writing there") from None
            time.sleep(0.1)
    try:
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        os.close(fd)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _read_owner(path: Path) -> tuple[str, int] | None:
    try:
        host, pid = path.read_text().split()
        return host, int(pid)
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, someone else's
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- reproducible artifacts -------------------------------------------------------------------
def split_volatile(obj):
    """(obj without VOLATILE_KEYS anywhere inside, the removed parts with their structure or None)."""
    if isinstance(obj, dict):
        stable, volatile = {}, {}
        for k, v in obj.items():
            if k in VOLATILE_KEYS:
                volatile[k] = v
                continue
            s, vol = split_volatile(v)
            stable[k] = s
            if vol is not None:
                volatile[k] = vol
        return stable, (volatile or None)
    if isinstance(obj, list):
        parts = [split_volatile(v) for v in obj]
        vols = [v for _, v in parts]
        return [s for s, _ in parts], (vols if any(v is not None for v in vols) else None)
    return obj, None


def move_volatile_json_(folder: Path) -> dict:
    """Rewrite the JSON files of `folder` without their timings; return them by file name.
    Only for folders of our own records (calibration curves): a key named like a timing inside a
    tokenizer's vocabulary is no timing."""
    moved = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        stable, volatile = split_volatile(data)
        if volatile is not None:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(stable, indent=1))
            os.replace(tmp, path)
            moved[path.name] = volatile
    return moved


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_yaml(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(obj, sort_keys=False))
    os.replace(tmp, path)
