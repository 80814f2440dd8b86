"""Session 28 (GPU, one-off): programmatic dependent launch at decode (`kernels.PDL`, docs/KERNELS.md 2g).

The Llama-2-7B-shape model in memory (kernels_e2e.build_w4a4, int8s operand, every fusion), one decode
step at batch 1 / 8 / 64 with 512 tokens cached: its logits eager and from a CUDA graph replay with PDL
off and on (they must be bit-equal: the same kernels, only launched earlier), and the graph's time per
step, alternating off / on / off / on.
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session28_pdl.py OUT.json
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernels_e2e import build_w4a4  # noqa: E402
from dartquant import kernels  # noqa: E402
from dartquant.kernels.bench import _time_ms, capture_with_output, make_decode_step  # noqa: E402

dev = torch.device("cuda")


def main(out_path):
    t0 = time.time()
    model = build_w4a4(dev, prefill_operand="int8s")
    print(f"built in {time.time() - t0:.0f} s; pdl_launch(8) with PDL on:", end=" ")
    kernels.PDL = True
    print(kernels.pdl_launch(8, dev), flush=True)
    rows = []
    for batch in (1, 8, 64):
        ref = None
        for i, pdl in enumerate((False, True, False, True)):
            kernels.PDL = pdl
            step = make_decode_step(model, batch, 512, dev)
            eager = step().float().clone()
            g, static = capture_with_output(step)
            g.replay()
            torch.cuda.synchronize()
            replay = static.float().clone()
            ms = _time_ms(g.replay, dev, 400)
            if ref is None:
                ref = eager
            row = dict(batch=batch, pdl=pdl, round=i // 2, graph_ms=ms, eager_equal_ref=torch.equal(eager, ref),
                       replay_equal_ref=torch.equal(replay, ref), finite=bool(torch.isfinite(replay).all()))
            rows.append(row)
            print(row, flush=True)
            del g, static, step
            torch.cuda.empty_cache()
    kernels.PDL = None
    print("\n| batch | PDL off ms | PDL on ms | on / off | logits equal |")
    print("|---|---|---|---|---|")
    for b in (1, 8, 64):
        off = [r["graph_ms"] for r in rows if r["batch"] == b and not r["pdl"]]
        on = [r["graph_ms"] for r in rows if r["batch"] == b and r["pdl"]]
        eq = all(r["eager_equal_ref"] and r["replay_equal_ref"] for r in rows if r["batch"] == b)
        print(f"| {b} | {' / '.join(f'{v:.3f}' for v in off)} | {' / '.join(f'{v:.3f}' for v in on)} | "
              f"{min(on) / min(off):.3f} | {eq} |")
    with open(out_path + ".tmp", "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
                   "wall_s": time.time() - t0}, f, indent=1)
    os.replace(out_path + ".tmp", out_path)


if __name__ == "__main__":
    main(sys.argv[1])
