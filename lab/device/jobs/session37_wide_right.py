"""Session 37 (GPU, one-off): the blocks activation kernel with a wide butterfly right factor
(`hadamard_quantize_pack(..., right_width=C)`, docs/KERNELS.md 1h): the token tile [R, C] with C the whole
power-of-two factor of N (or part of it) instead of at most 128, so the dense left factor shrinks (14336 =
28 * 512: H_28 alone, 32 padded MACs an element instead of 128; 28672: 32 instead of 256).

Per width: auto's config today, then each candidate (right width, warps, tokens a tile, tiles a program),
then auto again (drift); codes / scales / zero points against the torch reference (272 bf16 tokens with outlier
channels); time at 32768 tokens (bench, inputs rotating through more than the L2). GB/s counts 2 B read +
0.5 B written per element (+ 8 B per token); "of copy" is over a device copy of the same bf16 tensor.
    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session37_wide_right.py OUT.json
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_bench import act_input, bench, rotating, time_copy, write_result  # noqa: E402
from dartquant.kernels.act_quant import _auto_variant, hadamard_quantize_pack, hadamard_quantize_pack_reference  # noqa: E402

dev = torch.device("cuda")
# width: [(right width, warps, tokens a tile, tiles a program)]
CANDIDATES = {
    14336: [(512, 8, 1, 1), (512, 4, 1, 1), (512, 8, 2, 1), (256, 8, 1, 1), (256, 4, 1, 1), (512, 4, 1, 2)],
    28672: [(1024, 8, 1, 1), (1024, 4, 1, 1), (512, 8, 1, 1), (256, 8, 1, 1)],
    16384: [(1024, 8, 1, 1), (1024, 4, 1, 1), (512, 8, 1, 1), (256, 8, 1, 1), (256, 4, 1, 1)],
    8192: [(512, 4, 1, 4), (512, 4, 1, 1), (512, 8, 1, 1), (256, 4, 1, 4), (256, 4, 1, 1)],
    4096: [(256, 4, 1, 4), (256, 4, 1, 1), (256, 2, 1, 4), (128, 4, 1, 4), (128, 2, 1, 4)],
}


def time_configs(n: int, cfgs: list[tuple[str, dict]], rows: list, m: int = 32768) -> None:
    """Each (name, hadamard_quantize_pack kwargs) at width n: codes / scales / zero points against the torch
    reference (272 bf16 tokens with outlier channels), then the time at m tokens (inputs rotating through more
    than the L2) and the ratio to a device copy; a row each in `rows`, printed as a table line."""
    x = act_input(272, n, dev, n)
    ref = hadamard_quantize_pack_reference(x, 0.9)
    sets, nxt = rotating(lambda: act_input(m, n, dev, 1), m * n * 2)
    t_copy, copy_gbs = time_copy(m, n, dev)
    for name, cfg in cfgs:
        try:
            got = hadamard_quantize_pack(x, 0.9, **cfg)
            diff = [int((got.codes != ref.codes).sum()), int((got.scale != ref.scale).sum()),
                    int((got.zero != ref.zero).sum())]
            ms = bench(lambda: hadamard_quantize_pack(nxt(), 0.9, **cfg))
        except Exception as e:  # noqa: BLE001 - refused or out of resources: recorded
            rows.append(dict(n=n, name=name, cfg=cfg, error=repr(e)[:300]))
            print(f"| {n} | {name} | error | {repr(e)[:120]} |", flush=True)
            continue
        gbs = (m * n * 2.5 + 8 * m) / ms / 1e6
        rows.append(dict(n=n, name=name, cfg=cfg, tokens=m, ms=ms, copy_ms=t_copy, copy_gbs=copy_gbs, gbs=gbs,
                         of_copy=gbs / copy_gbs, differ=diff))
        print(f"| {n} | {name} | {ms:.4f} | {gbs / copy_gbs:.3f} | {diff} |", flush=True)
    del sets
    torch.cuda.empty_cache()


def main(out_path):
    t0 = time.time()
    rows = []
    print("| N | config | ms | of copy | codes / scales / zeros != ref |")
    print("|---|---|---|---|---|")
    for n, cands in CANDIDATES.items():
        auto = _auto_variant(n, True)
        base = dict(variant="blocks", butterfly=True, num_warps=auto["num_warps"],
                    rows_per_program=auto["rows_per_program"], groups=auto.get("groups", 1))
        cfgs = [("auto", base)] + [(f"right {c} w{w} t{t} g{g}", dict(variant="blocks", butterfly=True, right_width=c,
                                    num_warps=w, rows_per_program=t, groups=g)) for c, w, t, g in cands]
        cfgs.append(("auto again", base))
        time_configs(n, cfgs, rows)
    write_result({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, out_path, t0)


if __name__ == "__main__":
    main(sys.argv[1])
