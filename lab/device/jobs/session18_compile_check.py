"""Session 18: the activation kernels after the shared-helper refactor, compiled on the GPU, against torch
(3d packed / planar with and without the Hadamard, auto variants, the fused norm kernel)."""
import torch

from dartquant.kernels.act_quant import (hadamard_quantize_pack, hadamard_quantize_pack_reference,
                                         rmsnorm_quantize_pack, rmsnorm_quantize_pack_reference)
from dartquant.kernels.w4a4_gemm import planar_centered
from dartquant.modules import RMSNorm

dev = torch.device("cuda")
g = torch.Generator(dev).manual_seed(0)
for n in (576, 4096, 11008, 14336):
    x = (torch.randn(300, n, device=dev, generator=g) * 2).bfloat16()
    for rotate in (False, True):
        ref = hadamard_quantize_pack_reference(x, 0.9, rotate=rotate)
        for variant in ("3d", "auto"):
            got = hadamard_quantize_pack(x, 0.9, rotate=rotate, variant=variant)
            pl = hadamard_quantize_pack(x, 0.9, rotate=rotate, variant=variant, planar=torch.float8_e4m3fn)
            same_pl = torch.equal(pl.codes.view(torch.uint8),
                                  planar_centered(got.codes, got.zero, n, torch.float8_e4m3fn).view(torch.uint8))
            print(n, rotate, variant, "codes differ", float((got.codes != ref.codes).float().mean()),
                  "planar consistent", same_pl, flush=True)
    norm = RMSNorm(torch.nn.Parameter(torch.ones(n, device=dev, dtype=torch.bfloat16)), 1e-6)
    got = rmsnorm_quantize_pack(x, None, 1e-6, 0.9)
    ref = rmsnorm_quantize_pack_reference(x, norm, 0.9)
    print(n, "rmsnorm codes differ", float((got.codes != ref.codes).float().mean()), flush=True)
