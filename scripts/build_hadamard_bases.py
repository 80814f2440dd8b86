#!/usr/bin/env python
"""Regenerate ``src/dartquant/data/hadamard_bases.npz`` from exllamav2's text files.

``dartquant.hadamard`` builds Hadamard matrices of order ``k * 2**m`` from a
small "base" matrix of order ``k``.  Most bases come from the Paley
constructions, computed on the fly; the orders listed in ``ORDERS`` below have
no Paley construction for a prime ``q`` and are read from a data file instead.

Source of the matrices: the PyPI package ``exllamav2==0.3.2``
(https://github.com/turboderp/exllamav2, by turboderp), folder
``exllamav2/hadamard/``, files ``hadamard_<n>.txt``: ``n`` lines of ``n``
characters, ``+`` for +1 and ``-`` for -1.  exllamav2 is distributed under the
MIT License, whose notice follows and is also stored in the npz (key
``README``):

    MIT License

    Permission is hereby granted, free of charge, to any person obtaining a copy
    of this software and associated documentation files (the "Software"), to deal
    in the Software without restriction, including without limitation the rights
    to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
    copies of the Software, and to permit persons to whom the Software is
    furnished to do so, subject to the following conditions:

    The above copyright notice and this permission notice shall be included in all
    copies or substantial portions of the Software.

    THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
    IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
    FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
    AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
    LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
    OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
    SOFTWARE.

Output format (read by ``dartquant.hadamard._data_file_bases``): one entry per
order ``n``, key ``"h<n>"``, a ``uint8`` array of shape ``[n, ceil(n / 8)]`` made
by ``numpy.packbits(H > 0, axis=1)`` (bit 1 = +1, bit 0 = -1, big-endian bit
order, rows kept in the file's order), plus a key ``"README"`` holding a text
description with the attribution above.

Usage (the exllamav2 package need not be importable, only present on disk):

    python scripts/build_hadamard_bases.py \
        --src /path/to/site-packages/exllamav2/hadamard \
        --out src/dartquant/data/hadamard_bases.npz

Without ``--src`` the script looks for an installed ``exllamav2`` package
(without importing it).  Each matrix is checked (entries +-1, ``H H^T = n I``)
and the written file is read back and compared before the script reports success.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

# Orders that dartquant needs and cannot build with Paley I / II for a prime q.
ORDERS = (52, 92, 100, 116, 156, 172, 188, 236, 244, 428)

LICENSE_NOTICE = __doc__[__doc__.index("    MIT License") : __doc__.index("Output format")].strip()

README = (
    "Hadamard base matrices for dartquant.hadamard, orders "
    + ", ".join(str(n) for n in ORDERS)
    + ". Key 'h<n>': uint8 [n, ceil(n/8)] = numpy.packbits(H > 0, axis=1) "
    "(bit 1 = +1, bit 0 = -1); unpack with numpy.unpackbits(a, axis=1, count=n). "
    "Converted by scripts/build_hadamard_bases.py from the text files "
    "exllamav2/hadamard/hadamard_<n>.txt of the PyPI package exllamav2==0.3.2 "
    "(https://github.com/turboderp/exllamav2, by turboderp), used under the MIT License:\n\n"
    + "\n".join(line.strip() for line in LICENSE_NOTICE.splitlines())
)


def read_text_matrix(path: Path) -> np.ndarray:
    """Read a '+'/'-' text matrix into an int8 array of +-1."""
    rows = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    n = len(rows)
    if any(len(r) != n for r in rows) or set("".join(rows)) - {"+", "-"}:
        raise ValueError(f"{path}: expected {n} rows of {n} characters '+'/'-'")
    return np.array([[1 if c == "+" else -1 for c in r] for r in rows], dtype=np.int8)


def check_hadamard(h: np.ndarray, n: int, what: str) -> None:
    h64 = h.astype(np.int64)
    if h.shape != (n, n) or not np.all(np.abs(h64) == 1):
        raise ValueError(f"{what}: not an {n}x{n} matrix of +-1")
    if not np.array_equal(h64 @ h64.T, n * np.eye(n, dtype=np.int64)):
        raise ValueError(f"{what}: H H^T != {n} I")


def default_src() -> Path | None:
    spec = importlib.util.find_spec("exllamav2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "hadamard"


def main(argv: list[str] | None = None) -> int:
    repo = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=None, help="folder with hadamard_<n>.txt files")
    ap.add_argument(
        "--out", type=Path, default=repo / "src" / "dartquant" / "data" / "hadamard_bases.npz"
    )
    args = ap.parse_args(argv)
    src = args.src or default_src()
    if src is None or not src.is_dir():
        ap.error("exllamav2 not found; pass --src <.../exllamav2/hadamard>")

    arrays: dict[str, np.ndarray] = {}
    for n in ORDERS:
        h = read_text_matrix(src / f"hadamard_{n}.txt")
        check_hadamard(h, n, f"hadamard_{n}.txt")
        arrays[f"h{n}"] = np.packbits(h > 0, axis=1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, README=np.array(README), **arrays)

    # Read back and compare.
    with np.load(args.out, allow_pickle=False) as z:
        for n in ORDERS:
            bits = np.unpackbits(z[f"h{n}"], axis=1, count=n)
            back = np.where(bits == 1, 1, -1).astype(np.int8)
            if not np.array_equal(back, read_text_matrix(src / f"hadamard_{n}.txt")):
                raise RuntimeError(f"round trip failed for order {n}")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes), orders {ORDERS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
