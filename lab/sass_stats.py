"""Compile a kernel for sm_90 on the CPU (no GPU): registers, shared memory and static SASS counts (instructions,
barriers, MMA kinds, shared-memory loads / stores, shuffles, fp32 adds, MUFU) per launch config. Triton's wheel
carries ptxas and cuobjdump. docs/KERNELS.md 1g-1h and 4f quote these counts.

    PYTHONPATH=src python lab/sass_stats.py N,RIGHT,WARPS,TOKENS,GROUPS ...    # the blocks activation kernel
    PYTHONPATH=src python lab/sass_stats.py 14336,x,4,1,1 14336,512,4,1,2     # x: layout_blocks' own C
    PYTHONPATH=src python lab/sass_stats.py kv4,G,BS,WARPS,PATH ...           # the 4-bit K/V decode attention,
    PYTHONPATH=src python lab/sass_stats.py kv4,1,32,4,dots kv4,1,32,4,slots  # head dim 128, bf16; PATH dots|cc|slots
    PYTHONPATH=src python lab/sass_stats.py kv4,1,32,2,slots-held kv4,1,32,2,slots  # slots: exact K (default), -held: not
    PYTHONPATH=src python lab/sass_stats.py kv4,1,32,2,slots-bytes kv4,1,32,2,slots-words  # bytes / words (4h)
    PYTHONPATH=src python lab/sass_stats.py kv4,4,32,4,dots kv4,4,32,2,dots-words         # GQA: bytes / words (4i)
    PYTHONPATH=src python lab/sass_stats.py int8s,32,512,2,3,1 int8s,16,1024,2,3,2   # the int8s GEMM (BN,BK,W,ST,SK)
    PYTHONPATH=src python lab/sass_stats.py sliced,16,256,2,2,4                      # int8s with K slices (BN,BK,S,W,ST)
    PYTHONPATH=src python lab/sass_stats.py sliced,16,256,2,2,4,8 int8s,32,512,2,3,1,8   # ,TOKENS: tiles of 8 tokens
    OPCODES=1 ...                                                            # and each kernel's opcode histogram
    SASS_OUT=FILE ...                                                        # and the (last) kernel's SASS listing
    ROTATE_Q=0 ...                                                           # kv4: the query's R3 not in the kernel
    MAXNREG=128 PYTHONPATH=src python lab/sass_stats.py 14336,x,4,1,1        # registers capped (spills: local_bytes)

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
                  LOG_C=c.bit_length() - 1, LATE_LEFT=os.environ.get("LATE_LEFT") == "1")
    sig.update({k: "constexpr" for k in consts})
    # as the launch specializes them: 16-byte aligned pointers, row strides divisible by 16 (every supported width;
    # before session 43 this compile had no such hints, and its register counts were not the launch's)
    aligned = [k for k, v in sig.items() if v.startswith("*")] + ["stride_xm", "stride_cm"]
    attrs = {(KERNEL.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned}
    src = triton.compiler.ASTSource(fn=KERNEL, signature=sig, attrs=attrs,
                                    constexprs={(KERNEL.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=_options(warps))


def _options(warps: int) -> dict:
    """Compile options; MAXNREG=K in the environment caps the registers a thread (ptxas spills the rest)."""
    opts = dict(num_warps=warps, enable_fp_fusion=os.environ.get("FP_FUSION") == "1")  # FP_FUSION=1: FMA contraction
    if os.environ.get("MAXNREG"):
        opts["maxnreg"] = int(os.environ["MAXNREG"])
    return opts


def compile_kv4(g: int, block_s: int, warps: int, path: str):
    """`kv_cache._kv4_decode_kernel` as `kv4_decode_attention` launches it for bf16, head dim 128, 513 positions
    in one slice."""
    from dartquant.kernels import kv_cache

    kernel = kv_cache._kv4_decode_kernel
    f1, f2, _, _ = kv_cache._stages(128, "cpu")
    gp = max(16, 1 << (g - 1).bit_length())
    path, _, variant = path.partition("-")  # slots-held: `exact_k=False`; -words: `words`
    one_row = path in ("cc", "slots")
    ptrs = ["q_ptr", "count_ptr", "start_ptr", "s1_ptr", "s2_ptr", "kc_ptr", "ks_ptr", "kz_ptr", "vc_ptr", "vs_ptr",
            "vz_ptr", "po_ptr", "pm_ptr", "out_ptr"]
    code = "*i32" if "words" in variant else "*u8"
    types = ["*bf16", "*i64", "*i64", "*fp16", "*fp16", code, "*fp32", "*fp32", code, "*fp32", "*fp32", "*fp32",
             "*fp32", "*bf16"]  # start_ptr: the count as a stand-in (STARTS off), as the launch passes it
    sig = dict(zip(ptrs, types))
    sig.update({k: "i32" for k in ("HKV", "SMAX", "NSPLIT", "sq_b", "sq_h", "so_b", "so_h")})
    sig.update(sm_scale="fp32", inv_sqrt_d="fp32")
    chunk = -(-513 // block_s) * block_s
    consts = dict(CHUNK=chunk, G=g, GP=gp, GR=1 if one_row else gp, D=128, BS=block_s, CC=path == "cc", F1=f1, F2=f2,
                  ROTATE_Q=os.environ.get("ROTATE_Q", "1") == "1", SPLIT_FIRST=False, ROUND_BF16=True, ROUND_FP16=False,
                  LOW=1, SLOTS=path == "slots",
                  EXACT_K=path == "slots" and variant != "held", WORDS="words" in variant, DIRECT=True)
    sig.update({k: "constexpr" for k in consts})
    # as the launch specializes them (Llama-2-7B, batch 64): pointers 16-byte aligned, HKV = 32, q's strides 4096 / 128
    aligned = ptrs + ["HKV", "sq_b", "sq_h", "so_b", "so_h"]
    attrs = {(kernel.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, attrs=attrs,
                                    constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=_options(warps))


def compile_int8s(block_n: int, block_k: int, warps: int, stages: int, split_k: int, tokens: int = 16):
    """`w4a4_gemm._w4a4_swap_kernel` as `w4a4_matmul(..., "int8s")` launches it at 16 tokens on a 4096 x 4096 linear
    (the 7B o projection; session 46 found its split-K 1.3-9x slower than no split at these narrow tiles)."""
    from dartquant.kernels import w4a4_gemm

    kernel = w4a4_gemm._w4a4_swap_kernel
    ptrs = dict(a_ptr="*i8", w_ptr="*u8", sa_ptr="*fp32", sw_ptr="*fp32", y_ptr="*bf16", ws_ptr="*i32", cnt_ptr="*i32")
    ints = ["M", "N", "KH", "per_split", "stride_am", "stride_wn", "stride_ym"]
    sig = {**ptrs, **{k: "i32" for k in ints}}
    consts = dict(BLOCK_M=tokens, BLOCK_N=block_n, BLOCK_KH=block_k // 2, GROUP_N=8, SPLIT_K=split_k, STATIC_STEPS=0,
                  OUT_F32=False, ASM=True, PDL=False)
    return _compile_gemm(kernel, ptrs, sig, consts, warps, stages)


def _compile_gemm(kernel, ptrs: dict, sig: dict, consts: dict, warps: int, stages: int):
    """An int8s kernel for sm_90 with the launcher's alignment hints (the loop count, a few steps, unaligned)."""
    sig.update({k: "constexpr" for k in consts})
    aligned = list(ptrs) + ["M", "N", "KH", "stride_am", "stride_wn", "stride_ym"]
    attrs = {(kernel.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, attrs=attrs,
                                    constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
    opts = _options(warps)
    opts["num_stages"] = stages
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def compile_sliced(block_n: int, block_k: int, slices: int, warps: int, stages: int, tokens: int = 16):
    """`w4a4_gemm._w4a4_swap_sliced_kernel` as `w4a4_matmul(..., "int8s")` launches it with GemmConfig.slices at 16
    tokens (session 47's decode default where N <= 6144; block_k: the K codes of one slice a step)."""
    from dartquant.kernels import w4a4_gemm

    kernel = w4a4_gemm._w4a4_swap_sliced_kernel
    ptrs = dict(a_ptr="*i8", w_ptr="*u8", sa_ptr="*fp32", sw_ptr="*fp32", y_ptr="*bf16")
    ints = ["M", "N", "KH", "steps", "stride_am", "stride_wn", "stride_ym"]
    sig = {**ptrs, **{k: "i32" for k in ints}}
    consts = dict(BLOCK_M=tokens, BLOCK_N=block_n, SLICE_KH=block_k // 2, SLICES=slices, GROUP_N=8, STATIC_STEPS=0,
                  OUT_F32=False, ASM=True, PDL=False)
    return _compile_gemm(kernel, ptrs, sig, consts, warps, stages)


def sass_stats(compiled) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([BIN, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([BIN, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    if os.environ.get("SASS_OUT"):  # SASS_OUT=FILE: the whole listing, to read the loops
        with open(os.environ["SASS_OUT"], "w") as f:
            f.write(sass)
    regs = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    ins = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]

    def count(op):
        return sum(1 for line in ins if re.search(r"\s" + op + r"[\s.]", line))

    out = dict(regs=int(regs.group(1)), local_bytes=int(local.group(1)), dynamic_shared=compiled.metadata.shared,
               instructions=len(ins), barriers=count("BAR"), hgmma=count("HGMMA"), hmma=count("HMMA"),
               lds=count("LDS"), sts=count("STS"), shfl=count("SHFL"), fadd=count("FADD"), mufu=count("MUFU"))
    # the innermost loop: the instructions from a backward branch's target to the branch (static: once per trip)
    addr = [int(re.match(r"\s+/\*([0-9a-f]+)\*/", line).group(1), 16) for line in ins]
    loops = []
    for a, line in zip(addr, ins):
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)|0x)([0-9a-f]+)", line)
        if m and int(m.group(1), 16) < a:
            loops.append(sum(1 for b in addr if int(m.group(1), 16) <= b <= a))
    out["loop_instructions"] = min(loops) if loops else None
    if os.environ.get("OPCODES") == "1":  # every opcode's static count, most frequent first
        ops = {}
        for line in ins:
            m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
            if m:
                ops[m.group(1)] = ops.get(m.group(1), 0) + 1
        out["opcodes"] = dict(sorted(ops.items(), key=lambda kv: -kv[1]))
    return out


def main(specs):
    for spec in specs:
        if spec.startswith("sliced,"):
            print(spec, sass_stats(compile_sliced(*map(int, spec.split(",")[1:]))), flush=True)
            continue
        if spec.startswith("int8s,"):
            print(spec, sass_stats(compile_int8s(*map(int, spec.split(",")[1:]))), flush=True)
            continue
        if spec.startswith("kv4,"):
            _, g, bs, w, path = spec.split(",")
            print(spec, sass_stats(compile_kv4(int(g), int(bs), int(w), path)), flush=True)
            continue
        n, right, w, t, g = [None if v == "x" else int(v) for v in spec.split(",")]
        print(spec, act_quant.layout_blocks(n, right), sass_stats(compile_blocks(n, right, w, t, g)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
