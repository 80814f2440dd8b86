"""Compile the blocks activation kernel for sm_90 on the CPU (no GPU): registers, shared memory and static SASS
counts (instructions, barriers, MMA kinds, shared-memory loads / stores, shuffles, fp32 adds) per launch config.
Triton's wheel carries ptxas and cuobjdump. docs/KERNELS.md 1g-1h quote these counts.

    PYTHONPATH=src python lab/sass_stats.py N,RIGHT,WARPS,TOKENS,GROUPS ...
    PYTHONPATH=src python lab/sass_stats.py 14336,x,4,1,1 14336,512,4,1,2     # x: layout_blocks' own C

Each config takes 10-60 s to compile on one core. Static counts say what the code contains, not how often it
runs (a program's loop over GROUPS tiles counts once).
"""
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget

from dartquant.kernels import act_quant

KERNEL = act_quant._hadamard_quant_blocks_kernel
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_blocks(n: int, right: int | None, warps: int, tokens: int, groups: int):
    """The blocks kernel at auto's flags for bf16 input on an H100 / H200, butterfly right factor."""
    r, ka, kb, c = act_quant.layout_blocks(n, right)
    sig = {"x_ptr": "*bf16", "left_ptr": "*fp16", "right_ptr": "*fp16", "codes_ptr": "*u8", "scale_ptr": "*fp32",
           "zero_ptr": "*fp32", "M": "i32", "stride_xm": "i32", "stride_cm": "i32", "clip_ratio": "fp32",
           "inv_sqrt_n": "fp32"}
    consts = dict(R=r, KA=ka, KB=kb, C=c, T=tokens, GROUPS=groups, SPLIT_FIRST=False, ROUND_BF16=True,
                  ROUND_FP16=False, RECIP=True, USE_RINT=True, PLANAR=0, FMA_DIV=True, PDL=False,
                  LOG_C=c.bit_length() - 1)
    sig.update({k: "constexpr" for k in consts})
    src = triton.compiler.ASTSource(fn=KERNEL, signature=sig,
                                    constexprs={(KERNEL.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, enable_fp_fusion=False))


def sass_stats(compiled) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([BIN, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([BIN, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    ins = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]

    def count(op):
        return sum(1 for line in ins if re.search(r"\s" + op + r"[\s.]", line))

    return dict(regs=int(regs.group(1)), local_bytes=int(local.group(1)), dynamic_shared=compiled.metadata.shared,
                instructions=len(ins), barriers=count("BAR"), hgmma=count("HGMMA"), hmma=count("HMMA"),
                lds=count("LDS"), sts=count("STS"), shfl=count("SHFL"), fadd=count("FADD"))


def main(specs):
    for spec in specs:
        n, right, w, t, g = [None if v == "x" else int(v) for v in spec.split(",")]
        print(spec, act_quant.layout_blocks(n, right), sass_stats(compile_blocks(n, right, w, t, g)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
