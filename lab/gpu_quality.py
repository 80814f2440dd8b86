#!/usr/bin/env python3
"""benchmarks/quality.py with the rotation folded on the GPU (issue 12's device rows; lab one-off).

run_quantize folds rotations where the model lives, on the CPU: for Qwen2.5-Coder-1.5B the
float64 dense R4 (8960 x 8960) into 28 down_projs alone is ~7 TFLOP, 640-665 s on the device's
CPU (the layer-streaming issue). This wrapper moves the model to CUDA for `rotate_` only and back,
which computes the same float64 products, then runs quality.py unchanged with the same arguments.
"""

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import dartquant.pipeline as pipeline  # noqa: E402

_fold = pipeline.rotate_


def rotate_on_gpu_(model, rotations, adapter=None):
    model.to("cuda")
    try:
        _fold(model, rotations, adapter)
    finally:
        model.to("cpu")


pipeline.rotate_ = rotate_on_gpu_
sys.argv = [str(ROOT / "benchmarks" / "quality.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
