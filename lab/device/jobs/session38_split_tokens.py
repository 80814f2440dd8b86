"""Session 38 (GPU, one-off, queued): the activation kernel between decode and throughput sizes. Up to
`act_quant.DECODE_TOKENS` = 8 tokens auto takes the split kernel (a token's rotation over several SMs, run 22,
docs/KERNELS.md 1d); from 9 tokens the throughput choice, which at 11008 puts two tokens in a program: 32 programs on
132 SMs at a batch-64 decode step, never timed there. Per width and token count (8-128): auto, the split kernel on 4
and 8 warps, the blocks kernel one token a program on 4 and 8 warps, each first checked against the torch reference,
then timed as a decode step runs it (32 calls in one CUDA graph, as run 22).
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session38_split_tokens.py OUT.json
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import act_input, write_result  # noqa: E402
from session19_gemv import graph_ms, warm_clocks  # noqa: E402
from dartquant.kernels.act_quant import _auto_variant, hadamard_quantize_pack, hadamard_quantize_pack_reference  # noqa: E402

dev = torch.device("cuda")
WIDTHS = [11008, 14336, 28672, 4096, 8192]
TOKENS = [8, 16, 32, 64, 128]
PATHS = [("auto", {}), ("split w4", dict(variant="split", num_warps=4)), ("split w8", dict(variant="split", num_warps=8)),
         ("blocks t1 w4", dict(variant="blocks", butterfly=True, num_warps=4, rows_per_program=1)),
         ("blocks t1 w8", dict(variant="blocks", butterfly=True, num_warps=8, rows_per_program=1))]


def main(out_path):
    t0, rows = time.time(), []
    warm_clocks()
    print("| N | tokens | path | us per call | codes != ref |\n|---|---|---|---|---|")
    for n, m in [(n, m) for n in WIDTHS for m in TOKENS]:
        xs = [act_input(m, n, dev, i) for i in range(4)]  # four inputs in turn: 32 calls a graph, as a decode step
        ref = hadamard_quantize_pack_reference(xs[0], 0.9)
        for name, kw in PATHS:
            try:
                got = hadamard_quantize_pack(xs[0], 0.9, **kw)
                bad = int((got.codes != ref.codes).sum())
                us = 1000 * graph_ms([lambda x=xs[i % 4]: hadamard_quantize_pack(x, 0.9, **kw) for i in range(32)])
            except Exception as e:  # noqa: BLE001 - refused or out of resources: recorded
                rows.append(dict(n=n, tokens=m, path=name, error=repr(e)[:300]))
                print(f"| {n} | {m} | {name} | error | {repr(e)[:100]} |", flush=True)
                continue
            cfg = _auto_variant(n, True, m) if name == "auto" else kw
            rows.append(dict(n=n, tokens=m, path=name, cfg=cfg, us=us, codes_differ=bad))
            print(f"| {n} | {m} | {name} | {us:.2f} | {bad} |", flush=True)
    write_result({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, out_path, t0)


if __name__ == "__main__":
    main(sys.argv[1])
