"""Session 19 (GPU, one-off), run 17: what a decode step's small kernels cost, timed as the model
runs them (calls captured in one CUDA graph):
1. the Hadamard + quantize activation kernel at 1 and 8 tokens, every variant and warp count, at the
   R4 widths of the supported models (a decode step calls it on one token per sequence; session 19's
   profile: 16.5 us per call at 11008, 0.53 ms of a 7B step);
2. more per-lane GEMV configs at 1 and 2 tokens (longer K blocks, narrower tiles), beside the defaults.
Every timed output is first checked equal to the default's.
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session19_decode_sweep.py OUT.json
"""
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import ACT_KW, ACT_VARIANTS, act_input, act_variants, compile_all, gemm_inputs, write_result  # noqa: E402
from session19_gemv import graph_ms, warm_clocks  # noqa: E402
from dartquant.kernels.act_quant import hadamard_quantize_pack  # noqa: E402
from dartquant.kernels.w4a4_gemm import GemmConfig, default_config, w4a4_matmul  # noqa: E402

dev = torch.device("cuda")
ACT_WIDTHS = [4096, 4864, 8192, 8960, 11008, 14336, 28672]
EXTRA_BLOCKS = {f"blk t1 w{w}": ("blocks", w, 1, 1) for w in (1, 2)}
GEMV_SHAPES = {"L2-7B q+k+v": (12288, 4096), "L2-7B o": (4096, 4096), "L2-7B gate+up": (22016, 4096),
               "L2-7B down": (4096, 11008)}


def act_kwargs(name):
    return dict(zip(ACT_KW, {**ACT_VARIANTS, **EXTRA_BLOCKS}[name]))


def _warm_act(job):
    n, m, name = job
    try:
        kw = {} if name is None else act_kwargs(name)
        hadamard_quantize_pack(act_input(m, n, dev, 0), 0.9, rotate=True, **kw)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # recorded by the timing pass
        return repr(e)[:200]


def act_names(n):
    return act_variants(n) + (list(EXTRA_BLOCKS) if "blk t1 w4" in act_variants(n) else [])


def gemv_configs(m):
    if m == 1:
        grid = itertools.product((4, 8, 16), (2048, 4096), (2, 4, 8))
    else:
        grid = itertools.product((4, 8), (1024, 2048), (2, 4, 8))
    return [GemmConfig(1, bn, bk, nw, 1, dp4a=True, lanes=True) for bn, bk, nw in grid
            if bn * (bk // 8) // (32 * nw) >= 4 and m * bn * (bk // 8) // (32 * nw) <= 64]


def main(out_path):
    t0 = time.time()
    from concurrent.futures import ProcessPoolExecutor

    act_jobs = [(n, m, name) for n in ACT_WIDTHS for m in (1, 8) for name in [None] + act_names(n)
                if name is None or act_kwargs(name).get("rows_per_program", 1) <= m]
    with ProcessPoolExecutor(max_workers=15, mp_context=torch.multiprocessing.get_context("spawn")) as pool:
        act_errors = {str(j): e for j, e in zip(act_jobs, pool.map(_warm_act, act_jobs)) if e}
    print(f"compiled {len(act_jobs)} activation kernels ({len(act_errors)} failed) in {time.time() - t0:.0f} s",
          flush=True)
    jobs = [("gemm", (m, n, k, cfg, "gemv")) for (n, k) in GEMV_SHAPES.values() for m in (1, 2)
             for cfg in gemv_configs(m) + [default_config(m, n, k, "gemv")]]
    errors = compile_all(jobs, 15)
    warm_clocks()
    act_rows = []
    for n in ACT_WIDTHS:
        names = act_names(n)
        for m in (1, 8):
            xs = [act_input(m, n, dev, s) for s in range(32)]
            ref = hadamard_quantize_pack(xs[0], 0.9, rotate=True)
            res = {"auto": graph_ms([lambda x=x: hadamard_quantize_pack(x, 0.9, rotate=True) for x in xs])}
            for name in names:
                try:
                    kw = act_kwargs(name)
                    if kw.get("rows_per_program", 1) > m:
                        continue
                    got = hadamard_quantize_pack(xs[0], 0.9, rotate=True, **kw)
                    if not (torch.equal(got.codes, ref.codes) and torch.equal(got.scale, ref.scale)):
                        res[name] = {"differs": int((got.codes != ref.codes).sum())}
                        continue
                    res[name] = graph_ms([lambda x=x: hadamard_quantize_pack(x, 0.9, rotate=True, **kw) for x in xs])
                except Exception as e:  # recorded
                    res[name] = {"error": repr(e)[:200]}
            timed = {k: v for k, v in res.items() if isinstance(v, float)}
            best = min(timed, key=timed.get)
            act_rows.append({"n": n, "m": m, "us": {k: (v * 1e3 if isinstance(v, float) else v) for k, v in res.items()},
                             "best": best})
            print(f"| act {n} | {m} | auto {res['auto'] * 1e3:.1f} us | best {best} {timed[best] * 1e3:.1f} us |",
                  flush=True)
    gemv_rows = []
    for name, (n, k) in GEMV_SHAPES.items():
        nsets = max(2, min(48, int(240e6 // (n * k // 2))))
        sets = [gemm_inputs(2, n, k, dev, s) for s in range(nsets)]
        for m in (1, 2):
            outb = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
            default = default_config(m, n, k, "gemv")
            a, sa, za, w = sets[0]
            ref = w4a4_matmul(a[:m], sa[:m], za[:m], w, "gemv", default)
            res = {}
            for cfg in [default] + gemv_configs(m):
                kk = f"{cfg.block_n}x{cfg.block_k} w{cfg.num_warps}" + (" (default)" if cfg == default else "")
                try:
                    if not torch.equal(w4a4_matmul(a[:m], sa[:m], za[:m], w, "gemv", cfg), ref):
                        res[kk] = "differs"
                        continue
                    res[kk] = graph_ms([lambda s=s: w4a4_matmul(s[0][:m], s[1][:m], s[2][:m], s[3], "gemv", cfg,
                                                                out=outb) for s in sets]) * 1e3
                except Exception as e:  # recorded
                    res[kk] = repr(e)[:200]
            timed = {kk: v for kk, v in res.items() if isinstance(v, float)}
            best = min(timed, key=timed.get)
            gemv_rows.append({"linear": name, "n": n, "k": k, "m": m, "us": res, "best": best,
                              "best_weight_gbs": n * k / 2 / timed[best] / 1e3})
            dk = [kk for kk in res if kk.endswith("(default)")][0]
            print(f"| gemv {name} | {m} | default {res[dk]:.1f} us | best {best} {timed[best]:.1f} us "
                  f"({gemv_rows[-1]['best_weight_gbs']:.0f} GB/s) |", flush=True)
        del sets
        torch.cuda.empty_cache()
    out = {"device": torch.cuda.get_device_name(), "act": act_rows, "gemv": gemv_rows, "compile_errors": errors,
           "act_compile_errors": act_errors}
    write_result(out, out_path, t0)


if __name__ == "__main__":
    main(sys.argv[1])
