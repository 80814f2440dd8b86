"""Session 28 (GPU, one-off): the activation kernels with the division by the row scale as a reciprocal and
two FMAs (`act_quant._quotient`, FMA_DIV) and the rounding + clamp as one cvt.rni.u32, against the IEEE
division (act_quant.FMA_DIVISION = False; the same kernels otherwise) in the same run.

Per width: codes / scales / zero points against the torch reference on the GPU (both settings; 16-bit
and fp32 inputs, with a tiny row and an outlier row), then the time of `variant="auto"` at 32768 and
2048 tokens (bench, inputs rotating through more than the L2) and at 1 / 8 tokens (32 calls in one CUDA
graph), quantize-only at the powers of two, and the RMSNorm + quantize kernel. GB/s counts 2 B read +
0.5 B written per element (+ 8 B per token); "of copy" is over a device copy of the same bf16 tensor.
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session28_act_fma.py OUT.json
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import act_input, bench, rotating, time_copy, write_result  # noqa: E402
from session19_gemv import graph_ms, warm_clocks  # noqa: E402
from dartquant.kernels import act_quant  # noqa: E402
from dartquant.kernels.act_quant import (  # noqa: E402
    hadamard_quantize_pack,
    hadamard_quantize_pack_reference,
    rmsnorm_quantize_pack,
    rmsnorm_quantize_pack_reference,
)

dev = torch.device("cuda")
ROTATED = [1536, 4096, 4864, 8192, 8960, 11008, 14336, 16384, 28672]
QUANT_ONLY = [2048, 4096, 5120, 8192, 16384]
SETTINGS = {"ieee": False, "fma": True}


def check(n, rotate, dtype):
    x = act_input(272, n, dev, n).to(dtype)
    x[5] *= 2.0 ** -100 if dtype == torch.float32 else 2.0 ** -12  # small rows (fp32: scale below 2^-80)
    x[6, :7] = 3e4 if dtype != torch.float32 else 1e30
    ref = hadamard_quantize_pack_reference(x, 0.9, rotate=rotate)
    out = {}
    for name, on in SETTINGS.items():
        act_quant.FMA_DIVISION = on
        got = hadamard_quantize_pack(x, 0.9, rotate=rotate)
        out[name] = dict(codes_differ=int((got.codes != ref.codes).sum()), scale_differ=int((got.scale != ref.scale).sum()),
                         zero_differ=int((got.zero != ref.zero).sum()), codes=got.codes)
    same = torch.equal(out["ieee"].pop("codes"), out["fma"].pop("codes"))
    return dict(out, fma_equals_ieee=same)


def timed(fn_of_x, m, n):
    sets, nxt = rotating(lambda: act_input(m, n, dev, 1), m * n * 2)
    res = {}
    for name, on in SETTINGS.items():
        act_quant.FMA_DIVISION = on
        fn_of_x(sets[0])  # compile
        if m <= 8:
            res[name] = graph_ms([lambda x=sets[i % len(sets)]: fn_of_x(x) for i in range(32)])
        else:
            res[name] = bench(lambda: fn_of_x(nxt()))
    return res


def main(out_path):
    t0 = time.time()
    warm_clocks()
    rows, checks = [], []
    for n in ROTATED + QUANT_ONLY:
        rotate = n in ROTATED
        for dtype in (torch.bfloat16, torch.float16, torch.float32) if n in (4096, 11008) else (torch.bfloat16,):
            c = dict(n=n, rotate=rotate, dtype=str(dtype), **check(n, rotate, dtype))
            checks.append(c)
            print(c, flush=True)
    print("\n| kernel | N | tokens | IEEE div ms | FMA ms | speedup | FMA GB/s | of copy |")
    print("|---|---|---|---|---|---|---|---|")
    kernels = [("hadamard+quant", n, lambda x: hadamard_quantize_pack(x, 0.9)) for n in ROTATED]
    kernels += [("quant-only", n, lambda x: hadamard_quantize_pack(x, 0.9, rotate=False)) for n in QUANT_ONLY]
    kernels += [("rmsnorm+quant", n, lambda x: rmsnorm_quantize_pack(x, None, 1e-5, 0.9)) for n in (4096, 8192)]
    for kname, n, fn in kernels:
        for m in (32768, 2048, 8, 1):
            if n <= 2048 and m == 32768:
                continue
            t = timed(fn, m, n)
            t_copy, copy_gbs = time_copy(m, n, dev)
            gbs = (m * n * 2.5 + 8 * m) / t["fma"] / 1e6
            row = dict(kernel=kname, n=n, tokens=m, ieee_ms=t["ieee"], fma_ms=t["fma"], copy_ms=t_copy,
                       copy_gbs=copy_gbs, fma_gbs=gbs, of_copy=gbs / copy_gbs)
            rows.append(row)
            print(f"| {kname} | {n} | {m} | {t['ieee']:.4f} | {t['fma']:.4f} | {t['ieee'] / t['fma']:.2f}x | "
                  f"{gbs:.0f} | {gbs / copy_gbs:.2f} |", flush=True)
    # the fused norm: bit-equal to the IEEE kernel (the torch norm may differ by its summation order)
    from dartquant.modules import RMSNorm
    for n in (4096, 8192):
        x = act_input(272, n, dev, 2)
        norm = RMSNorm(torch.nn.Parameter(torch.ones(n, device=dev, dtype=torch.bfloat16)), 1e-5)
        got = {}
        for name, on in SETTINGS.items():
            act_quant.FMA_DIVISION = on
            got[name] = rmsnorm_quantize_pack(x, None, 1e-5, 0.9)
        ref = rmsnorm_quantize_pack_reference(x, norm, 0.9)
        c = dict(n=n, kernel="rmsnorm+quant", fma_equals_ieee=torch.equal(got["fma"].codes, got["ieee"].codes),
                 codes_differ_torch=int((got["fma"].codes != ref.codes).sum()))
        checks.append(c)
        print(c)
    act_quant.FMA_DIVISION = None
    write_result({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "checks": checks},
                 out_path, t0)


if __name__ == "__main__":
    main(sys.argv[1])
