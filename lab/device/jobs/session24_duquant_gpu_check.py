"""DuQuant's capture reduces on the device since session 24 (calib/duquant.py _Observer): its
rotations on CUDA against the CPU's, on a tiny random model (not run yet: the session's device time
was spent). One call, no staging: PYTHONPATH=src python3 lab/device/jobs/session24_duquant_gpu_check.py
Expect the same permutations and rotations to float64 rounding (top-k ties may pick other rows)."""

import sys

import torch

sys.path.insert(0, "tests")
from tiny import make_tiny_model  # noqa: E402

from dartquant.calib.duquant import calibrate_duquant  # noqa: E402
from dartquant.config import RunConfig  # noqa: E402

ids = torch.randint(0, 89, (3, 24), generator=torch.Generator().manual_seed(0))
out = {}
for dev in ("cpu", "cuda"):
    model = make_tiny_model("qwen2-bias-gqa", dtype=torch.float32)
    cfg = RunConfig.from_flat(method="duquant", duq_block_size=8, duq_steps=4, device=dev)
    out[dev] = calibrate_duquant(model, cfg, ids, progress=False)
for key in sorted(out["cpu"].blocks):
    a, b = out["cpu"].blocks[key].double(), out["cuda"].blocks[key].double()
    print(key, "max |cpu - cuda|:", (a - b).abs().max().item())
