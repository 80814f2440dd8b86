"""Queued in session 35 (GPU, one-off): the decode-size split activation kernel with its right factor as fp32
butterflies (act_quant.RIGHT_BUTTERFLY = True) against the split fp16 dot (the default), at 1 and 8 tokens the
way a decode step runs it (32 calls in one CUDA graph, as run 22), plus the codes of both against the torch
reference. Section 1g measured the butterfly at throughput sizes only.
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session35_split_butterfly.py OUT.json
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import act_input, write_result  # noqa: E402
from session19_gemv import graph_ms, warm_clocks  # noqa: E402
from dartquant.kernels import act_quant  # noqa: E402
from dartquant.kernels.act_quant import hadamard_quantize_pack, hadamard_quantize_pack_reference  # noqa: E402

dev = torch.device("cuda")
WIDTHS = [11008, 14336, 28672, 4864, 8192, 8960]


def main(out_path):
    t0 = time.time()
    warm_clocks()
    rows = []
    print("| N | tokens | dot us | butterfly us | speedup | codes != ref (dot / butterfly) |")
    print("|---|---|---|---|---|---|")
    for n in WIDTHS:
        for m in (1, 8):
            xs = [act_input(m, n, dev, i) for i in range(4)]
            ref = hadamard_quantize_pack_reference(xs[0], 0.9)
            res, bad = {}, {}
            for name, on in (("dot", False), ("butterfly", True)):
                act_quant.RIGHT_BUTTERFLY = on
                got = hadamard_quantize_pack(xs[0], 0.9, variant="split")
                bad[name] = int((got.codes != ref.codes).sum())
                res[name] = 1000 * graph_ms([lambda x=xs[i % 4]: hadamard_quantize_pack(x, 0.9, variant="split")
                                             for i in range(32)])
            rows.append(dict(n=n, tokens=m, dot_us=res["dot"], butterfly_us=res["butterfly"], codes_differ=bad))
            print(f"| {n} | {m} | {res['dot']:.2f} | {res['butterfly']:.2f} | {res['dot'] / res['butterfly']:.2f}x | "
                  f"{bad['dot']} / {bad['butterfly']} |", flush=True)
    act_quant.RIGHT_BUTTERFLY = None
    write_result({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, out_path, t0)


if __name__ == "__main__":
    main(sys.argv[1])
