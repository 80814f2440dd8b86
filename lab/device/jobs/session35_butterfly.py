"""Session 35 (GPU, one-off): the blocks activation kernel's right factor S_C as an fp32 butterfly in
registers (`act_quant._butterfly`, act_quant.RIGHT_BUTTERFLY = True) against the split fp16 dot on tensor
cores (the default), the same kernel and launch otherwise, in one run.

Per width: codes / scales / zero points of both against the torch reference (272 bf16 tokens with outlier
channels), then the time of variant="auto"'s blocks config (and one more warp count) at 32768 tokens
(bench, inputs rotating through more than the L2). GB/s counts 2 B read + 0.5 B written per element (+ 8 B
per token); "of copy" is over a device copy of the same bf16 tensor.
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session35_butterfly.py OUT.json
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import act_input, bench, rotating, time_copy, write_result  # noqa: E402
from dartquant.kernels import act_quant  # noqa: E402
from dartquant.kernels.act_quant import _auto_variant, hadamard_quantize_pack, hadamard_quantize_pack_reference  # noqa: E402

dev = torch.device("cuda")
WIDTHS = [4096, 8192, 11008, 14336, 28672, 16384, 4864, 8960, 1536]
SETTINGS = {"dot": False, "butterfly": True}


def main(out_path):
    t0 = time.time()
    rows, checks = [], []
    print("| N | config | dot ms | butterfly ms | speedup | butterfly of copy | codes != ref (dot / bfly) |")
    print("|---|---|---|---|---|---|---|")
    for n in WIDTHS:
        auto = _auto_variant(n, True)
        cfgs = [dict(variant="blocks", num_warps=auto["num_warps"], rows_per_program=auto["rows_per_program"],
                     groups=auto.get("groups", 1))]
        cfgs.append(dict(cfgs[0], num_warps=8 if cfgs[0]["num_warps"] == 4 else 4))
        x = act_input(272, n, dev, n)
        ref = hadamard_quantize_pack_reference(x, 0.9)
        m = 32768
        sets, nxt = rotating(lambda: act_input(m, n, dev, 1), m * n * 2)
        t_copy, copy_gbs = time_copy(m, n, dev)
        for cfg in cfgs:
            res, diff = {}, {}
            for name, on in SETTINGS.items():
                act_quant.RIGHT_BUTTERFLY = on
                try:
                    got = hadamard_quantize_pack(x, 0.9, **cfg)
                    diff[name] = dict(codes=int((got.codes != ref.codes).sum()), scale=int((got.scale != ref.scale).sum()),
                                      zero=int((got.zero != ref.zero).sum()))
                    res[name] = bench(lambda: hadamard_quantize_pack(nxt(), 0.9, **cfg))
                except Exception as e:  # noqa: BLE001 - recorded (e.g. out of shared memory)
                    res[name], diff[name] = None, repr(e)[:200]
            checks.append(dict(n=n, cfg=cfg, **diff))
            gbs = (m * n * 2.5 + 8 * m) / res["butterfly"] / 1e6 if res["butterfly"] else None
            rows.append(dict(n=n, cfg=cfg, tokens=m, dot_ms=res["dot"], butterfly_ms=res["butterfly"], copy_ms=t_copy,
                             copy_gbs=copy_gbs, butterfly_gbs=gbs, butterfly_of_copy=gbs / copy_gbs if gbs else None))
            sp = f"{res['dot'] / res['butterfly']:.2f}x" if res["dot"] and res["butterfly"] else "-"
            print(f"| {n} | w{cfg['num_warps']} t{cfg['rows_per_program']} g{cfg['groups']} | {res['dot']} | "
                  f"{res['butterfly']} | {sp} | {gbs / copy_gbs if gbs else '-'} | {diff} |", flush=True)
    act_quant.RIGHT_BUTTERFLY = None
    write_result({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "checks": checks},
                 out_path, t0)


if __name__ == "__main__":
    main(sys.argv[1])
