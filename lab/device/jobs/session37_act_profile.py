"""Session 37 (GPU, one-off, under Nsight Compute): one launch of each activation kernel at auto's throughput
config, 32768 bf16 tokens, clip 0.9: the blocks kernel with the butterfly right factor (docs/KERNELS.md 1g) at
4096 / 11008 / 14336 / 28672 wide, and the quantize-only kernel at 4096 (0.80 of copy, section 1f) for contrast;
then the 4-bit K/V cache's decode attention (section 4e) at the Llama-2-7B shape, batch 8 and 64, 513 positions.
Each is called twice (compile + warm, then the profiled launch: ncu --launch-skip 1 per kernel name is not per
width, so the script syncs and the profile keeps every launch; the first of each pair is the compile's).
    ncu --set full -k regex:"hadamard_quant|kv4_decode" -o prof python3 lab/device/jobs/session37_act_profile.py
"""
import sys

import torch

from dartquant.kernels.act_quant import _auto_variant, hadamard_quantize_pack

dev = torch.device("cuda")
WIDTHS = [int(v) for v in sys.argv[1:]] or [4096, 11008, 14336, 28672]
m = 32768
for n in WIDTHS:
    x = (torch.randn(m, n, device=dev) * 3).to(torch.bfloat16)
    print(n, _auto_variant(n, True), flush=True)
    for _ in range(2):
        hadamard_quantize_pack(x, 0.9)
    torch.cuda.synchronize()
x = (torch.randn(m, 4096, device=dev) * 3).to(torch.bfloat16)
for _ in range(2):
    hadamard_quantize_pack(x, 0.9, rotate=False)
torch.cuda.synchronize()

from dartquant.kernels.kv_cache import Kv4Codes, kv4_decode_attention, kv4_store  # noqa: E402

D, CTX = 128, 513
for b in (8, 64):
    codes = Kv4Codes(b, 32, CTX, D, dev)
    count = torch.tensor(CTX, device=dev)
    kv4_store(codes, count, torch.randn(b, 32, CTX, D, device=dev).bfloat16(),
              torch.randn(b, 32, CTX, D, device=dev).bfloat16(), 1.0, True)
    q = torch.randn(b, 32, 1, D, device=dev).bfloat16()
    for _ in range(2):
        kv4_decode_attention(q, codes, count, D ** -0.5, True)
    torch.cuda.synchronize()
print("done")
