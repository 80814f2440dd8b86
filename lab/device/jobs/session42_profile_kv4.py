"""Session 42 (issue 16, GPU, one-off): where one decode step's GPU time goes on a quantized 7B-shape run folder
with the 4-bit K/V cache on kernels (`dartquant bench --kv kernels`'s models), against bf16 with its bf16 cache.
Batch 64 is the target left (2x bf16; session 40 measured 1.53x on an H100, RESULTS §52).
    RES=$OUT STEP=prepare bash lab/device/jobs/session42_h200_e2e.sh      # builds /tmp/kb/run-llama2-7b-quarot-rtn
    PYTHONPATH=src:benchmarks DARTQUANT_CACHE=/tmp/kbdata python3 lab/device/jobs/session42_profile_kv4.py RUN OUT.json
"""
import sys
import time

import torch

import kernels_e2e
from dartquant.kernels.bench import BenchSettings, make_decode_step, side_models, time_decode
from kernel_bench import write_result

# the 4-bit cache's kernels by name: its attention and the K/V stores (codes written per step)
kernels_e2e.KERNEL_CATEGORIES.insert(0, ("4-bit K/V: attention", ("_kv4_decode", "_kv4_merge")))
kernels_e2e.KERNEL_CATEGORIES.insert(1, ("4-bit K/V: store", ("_kv4_store",)))


def main(run, out_path, batches=(1, 8, 64), context=512):
    t0, device = time.time(), torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "run": run, "context": context}
    s = BenchSettings(prefill=2048, batches=list(batches), context=context, device="cuda", kv="kernels")
    for side, model in side_models(run, ["bf16", "w4a4"], device, "kernels"):
        for b in batches:
            step = make_decode_step(model, b, context, device)
            prof = kernels_e2e.kernel_breakdown(step, reps=10)
            kernels_e2e.print_breakdown(f"{side}, one eager decode step, batch {b}", prof)
            print("| top kernels | ms | calls |\n|---|---|---|")
            for k in prof["top_kernels"]:
                print(f"| {k['kernel']} | {k['ms']:.3f} | {k['calls']} |")
            prof["graphed"] = time_decode(model, b, s, device)
            print(f"{side} batch {b}: graphed step {prof['graphed']}", flush=True)
            result.setdefault(side, {})[f"decode_b{b}"] = prof
            del step
            torch.cuda.empty_cache()
        write_result(result, out_path, t0)
        if side == "bf16":
            model.to("cpu")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
