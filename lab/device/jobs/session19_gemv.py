"""Session 19 (GPU, one-off): the per-lane dp4a GEMV (`GemmConfig(lanes=True)`) against the
current dp4a GEMV, bf16 F.linear and cuBLAS FP8 at decode sizes (1 / 4 / 8 tokens), Llama-2-7B's
merged decode shapes and two larger ones. Timed as the model runs them: many calls captured in one
CUDA graph, each on another weight (sets rotating through more than the L2), so host overhead and
launch gaps are out on every side. Every config is first checked bit-equal to the reference.
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session19_gemv.py OUT.json
"""
import itertools
import statistics
import sys
import time

import torch

from kernel_bench import compile_all, gemm_inputs, planar_weight, write_result
from dartquant.kernels.w4a4_gemm import GemmConfig, default_config, w4a4_matmul, w4a4_matmul_reference

dev = torch.device("cuda")
SHAPES = {"L2-7B q+k+v": (12288, 4096), "L2-7B o": (4096, 4096), "L2-7B gate+up": (22016, 4096),
          "L2-7B down": (4096, 11008), "L3-8B down": (4096, 14336), "L2-70B gate/up": (28672, 8192)}
MS = (1, 4, 8)
ROTATE = 240e6  # bytes of weights per graph: 4x the 60 MB L2


def lane_configs(m):
    out = []
    if m == 1:
        grid = itertools.product((8, 16, 32), (512, 1024, 2048), (1, 2, 4, 8), (4, 8))
    else:
        grid = itertools.product((4, 8, 16), (512, 1024), (1, 2, 4, 8), (2, 4))
    for bn, bk, sk, nw in grid:
        words_per_thread = bn * (bk // 8) // (32 * nw)
        if words_per_thread < 4 or max(1, m) * words_per_thread > 64:  # < one 16-byte load, or > 64 acc regs
            continue
        out.append(GemmConfig(1, bn, bk, nw, 1, split_k=sk, dp4a=True, lanes=True))
    return out


def key(cfg):
    return f"{'lanes' if cfg.lanes else 'dp4a'} {cfg.block_n}x{cfg.block_k} w{cfg.num_warps} sk{cfg.split_k}"


def warm_clocks(seconds=5):
    """bf16 matmuls until the clocks are up, before anything is timed."""
    x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    t = time.time()
    while time.time() - t < seconds:
        x @ x
    torch.cuda.synchronize()


def decode_operand_sets(n, k, dev, rotate=240e6):
    """Operand sets for timing an [n, k] linear at up to 16 tokens with its weights rotating through `rotate` bytes
    (4x the L2): [(a, a_scale, a_zero, weight)] and the planar centered int8 activations beside them."""
    from dartquant.kernels.w4a4_gemm import planar_centered

    sets = [gemm_inputs(16, n, k, dev, s) for s in range(max(2, min(48, int(rotate // (n * k // 2)))))]
    return sets, [planar_centered(a, za, k, torch.int8) for (a, _, za, _) in sets]


def decode_cases(shapes, tokens, dev):
    """(name, n, k, m, sets, planar, want, out) for each linear of `shapes` ({name: (n, k)}) and each count of
    `tokens(n)`: the operand sets built once a linear, `want` the integer reference at m tokens, `out` a bf16 [m, n]."""
    from dartquant.kernels.w4a4_gemm import w4a4_matmul_reference

    for name, (n, k) in shapes.items():
        sets, planar = decode_operand_sets(n, k, dev)
        a0, sa0, za0, w0 = sets[0]
        for m in tokens(n):
            yield (name, n, k, m, sets, planar, w4a4_matmul_reference(a0[:m], sa0[:m], za0[:m], w0),
                   torch.empty(m, n, dtype=torch.bfloat16, device=dev))
        del sets, planar
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def product_matmul(cfg):
    """The product's int8s GEMM at `cfg` as `check_and_time` takes a decode GEMM."""
    from dartquant.kernels.w4a4_gemm import w4a4_matmul

    return lambda p, sa, w, out=None: w4a4_matmul(p, sa, None, w, "int8s", cfg, out=out)


def check_and_time(matmul, sets, planar, m, want, out):
    """A decode GEMM `matmul(planar [m, K], a_scale [m], weight, out=None)` at m tokens over decode_operand_sets:
    (bit-equal to `want` on the first set, µs a call with every set's call in one CUDA graph)."""
    exact = torch.equal(matmul(planar[0][:m], sets[0][1][:m], sets[0][3]), want)
    us = graph_ms([lambda s=s, p=p: matmul(p[:m], s[1][:m], s[3], out=out) for s, p in zip(sets, planar)]) * 1e3
    return exact, us


def graph_ms(calls, reps=15):
    """Median time per call of `calls` (closures), all captured in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) / len(calls))
    del g
    return statistics.median(times)


def main(out_path):
    t0 = time.time()
    jobs = [("gemm", (m, n, k, cfg, "gemv")) for (n, k) in SHAPES.values() for m in MS
            for cfg in lane_configs(m) + [default_config(m, n, k, "gemv")]]
    errors = compile_all(jobs, 15)
    warm_clocks()
    rows = []
    for name, (n, k) in SHAPES.items():
        nsets = max(2, min(48, int(ROTATE // (n * k // 2))))
        sets = [gemm_inputs(8, n, k, dev, s) for s in range(nsets)]
        bf16_w = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(max(2, min(48, int(ROTATE // (n * k * 2)) + 1)))]
        fp8_w = [planar_weight(w, torch.float8_e4m3fn) for (_, _, _, w) in sets[:max(2, min(48, int(ROTATE // (n * k)) + 1))]]
        for m in MS:
            res = {}
            xb = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            res["bf16"] = graph_ms([lambda w=w: torch.nn.functional.linear(xb, w) for w in bf16_w])
            if m > 1:  # cuBLAS FP8 on the 1-byte weight (the scaled_mm operand's decode path above the GEMV)
              try:
                xa = torch.randint(-8, 8, (m, k), device=dev).to(torch.float32).to(torch.float8_e4m3fn)
                sa = torch.ones(m, 1, device=dev)
                sw = torch.ones(1, n, device=dev)
                res["scaled_mm"] = graph_ms([lambda w=w: torch._scaled_mm(xa, w.t(), sa, sw, out_dtype=torch.bfloat16)
                                             for w in fp8_w])
              except RuntimeError as e:
                res["scaled_mm"] = None
                print("scaled_mm:", repr(e)[:200])
            outb = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
            default = default_config(m, n, k, "gemv")
            checks = {}
            for cfg in [default] + lane_configs(m):
                kk = key(cfg)
                if str(("gemm", (m, n, k, cfg, "gemv"))) in errors:
                    res[kk] = None
                    continue
                try:
                    a, sa_, za, w = sets[0]
                    ref = w4a4_matmul_reference(a[:m], sa_[:m], za[:m], w)
                    got = w4a4_matmul(a[:m], sa_[:m], za[:m], w, "gemv", cfg)
                    checks[kk] = bool(torch.equal(got, ref))
                    if not checks[kk]:
                        res[kk] = None
                        continue
                    res[kk] = graph_ms([lambda s=s: w4a4_matmul(s[0][:m], s[1][:m], s[2][:m], s[3], "gemv", cfg, out=outb)
                                        for s in sets])
                except Exception as e:  # recorded
                    res[kk] = None
                    checks[kk] = repr(e)[:200]
            res["bf16 again"] = graph_ms([lambda w=w: torch.nn.functional.linear(xb, w) for w in bf16_w])
            lanes = {kk: v for kk, v in res.items() if kk.startswith("lanes") and v}
            best = min(lanes, key=lanes.get)
            wbytes = n * k / 2
            row = {"linear": name, "n": n, "k": k, "m": m, "ms": res, "checks": checks, "default": key(default),
                   "best_lanes": best, "best_lanes_ms": lanes[best], "best_lanes_weight_gbs": wbytes / lanes[best] / 1e6,
                   "bf16_over_best": res["bf16"] / lanes[best], "bf16_over_default": res["bf16"] / res[key(default)]
                   if res.get(key(default)) else None}
            rows.append(row)
            print(f"| {name} | {m} | {res['bf16'] * 1e3:.1f} ({res['bf16 again'] * 1e3:.1f}) | "
                  f"{(res.get('scaled_mm') or float('nan')) * 1e3:.1f} | {(res.get(key(default)) or float('nan')) * 1e3:.1f} | "
                  f"{best} {lanes[best] * 1e3:.1f} | {row['bf16_over_best']:.2f}x | {row['best_lanes_weight_gbs']:.0f} |",
                  flush=True)
        del sets, bf16_w, fp8_w
        torch.cuda.empty_cache()
    # copy bandwidth, same timing method
    src = [torch.empty(64 << 20, dtype=torch.uint8, device=dev) for _ in range(4)]
    dst = [torch.empty_like(s) for s in src]
    copy_ms = graph_ms([lambda s=s, d=d: d.copy_(s) for s, d in zip(src, dst)])
    out = {"device": torch.cuda.get_device_name(), "copy_gbs": 2 * (64 << 20) / copy_ms / 1e6, "rows": rows,
           "compile_errors": errors}
    print(f"copy {out['copy_gbs']:.0f} GB/s")
    write_result(out, out_path, t0)


if __name__ == "__main__":
    main(sys.argv[1])
