"""Session 48 (issue 16): which activation-kernel launches raise "misaligned address" on the GPU. kernel_bench's act
sweep on an H200 (docs/results/act_h200_session48.json) hit it first at 14336 wide with "blk t2 w4" (the blocks
kernel, its right factor as the split dot, two tokens a tile); the error is sticky, so every later launch of that
process failed. Here each suspect case runs in its own process (CUDA_LAUNCH_BLOCKING=1; codes against the
torch reference's), then the product's own choice (variant="auto") at each width and token count, a process a width.

    PYTHONPATH=src:benchmarks python3 lab/device/jobs/session48_act_probe.py OUT.json
"""
import json
import os
import shutil
import subprocess
import sys

CASE = r'''
import sys, torch
from dartquant.kernels.act_quant import hadamard_quantize_pack, hadamard_quantize_pack_reference
n, m, kw = int(sys.argv[1]), int(sys.argv[2]), eval(sys.argv[3])
x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16) * 3
ref = hadamard_quantize_pack_reference(x, 0.9) if kw else None  # torch ops: no Triton launch before the case
got = hadamard_quantize_pack(x, 0.9, **kw)
torch.cuda.synchronize()
if ref is not None:
    differ = (got.codes != ref.codes).float().mean().item()
    print("codes_differ_frac", differ)
print("ok")
'''


SANITIZER = shutil.which("compute-sanitizer") or next(
    (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)


def run(n, m, kw, sanitize=False):
    """One case in its own process; sanitize: under compute-sanitizer's memcheck (the faulting access's kernel,
    address and size), where the image has it."""
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    cmd = [sys.executable, "-c", CASE, str(n), str(m), repr(kw)]
    if sanitize:
        cmd = [SANITIZER, "--tool", "memcheck", "--show-backtrace", "no", *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    lines = (p.stdout + p.stderr).strip().splitlines()
    tail = [ln for ln in lines if "Invalid" in ln or "misaligned" in ln.lower() or "at 0x" in ln or "by thread" in ln][:12] \
        if sanitize else lines[-3:]
    return {"n": n, "m": m, "kw": kw, "rc": p.returncode, "sanitized": sanitize, "tail": tail}


def main():
    out = sys.argv[1]
    rows = []
    widths = [4864, 11008, 14336, 16384, 28672]
    auto_ms = [1, 8, 16, 64, 2048]
    cases = [(n, 64, dict(variant="blocks", num_warps=w, rows_per_program=t, groups=1, butterfly=b))
             for n, w, t, b in ((14336, 4, 2, False), (14336, 4, 2, True), (14336, 4, 1, False), (28672, 8, 2, False),
                                (16384, 8, 2, False), (11008, 4, 2, False))]
    sanitized = False
    for n, m, kw in cases:
        r = run(n, m, kw)
        rows.append(r)
        print(json.dumps(r), flush=True)
        if r["rc"] and SANITIZER and not sanitized:  # the first faulting case once more, under memcheck
            sanitized = True
            rows.append(run(n, m, kw, sanitize=True))
            print(json.dumps(rows[-1]), flush=True)
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    for n in widths:  # the product's choice: one process a width, all token counts
        code = CASE
        body = "\n".join(f"x = torch.randn({m}, n, device='cuda', dtype=torch.bfloat16); "
                         f"hadamard_quantize_pack(x, 0.9); torch.cuda.synchronize()" for m in auto_ms)
        p = subprocess.run([sys.executable, "-c", code.split("x = torch.randn")[0] + body + "\nprint('ok')",
                            str(n), "0", "{}"], capture_output=True, text=True,
                           env=dict(os.environ, CUDA_LAUNCH_BLOCKING="1"), timeout=300)
        r = {"n": n, "m": auto_ms, "kw": "auto", "rc": p.returncode, "tail": (p.stdout + p.stderr).strip().splitlines()[-2:]}
        rows.append(r)
        print(json.dumps(r), flush=True)
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
