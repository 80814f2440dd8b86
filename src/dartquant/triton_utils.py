"""Small Triton helpers shared by the kernels: exact roundings that give the same bits compiled
and under the interpreter (whose fp32 -> bf16 cast truncates instead of rounding to nearest)."""

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None
try:  # Hopper's grid dependency control (PDL); only compiled in where a launch asks for it
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover
    gdc_launch_dependents = gdc_wait = None

if triton is not None:

    @triton.jit
    def wait_for_prior_grid(PDL: tl.constexpr):
        # programmatic dependent launch (kernels.pdl_launch): a kernel's first instructions, before any
        # global memory access: wait until the grid before it has finished (its writes visible), then let
        # the next one launch. Nothing without PDL (the interpreter runs no PTX).
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def round_to_bf16(y):
        # fp32 -> nearest bf16 (ties to even) -> fp32, by bits: same result compiled and in the
        # interpreter (whose own fp32 -> bf16 cast truncates)
        bits = y.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def round_half_even(v):
        # exact: v - floor(v) is exact in fp32, no v + 0.5 that could round
        fl = tl.math.floor(v)
        d = v - fl
        odd = (fl - 2.0 * tl.math.floor(fl * 0.5)) == 1.0
        up = (d > 0.5) | ((d == 0.5) & odd)
        return fl + up.to(tl.float32)
