"""Session 43 (GPU, one-off, under Nsight Compute): the 4-bit decode attention as the model runs it since session 43
(the words loop, R3 of the query in the store's launch, `rotate_q=False`), Llama-2-7B shape, 513 positions, batch 8
and 64; each called twice (compile + warm, then the profiled launch).
    RES=$OUT bash lab/device/jobs/session43_kv4_ncu.sh
"""
import torch

from dartquant.kernels.kv_cache import Kv4Codes, kv4_decode_attention, kv4_store

dev = torch.device("cuda")
D, CTX = 128, 513
for b in (8, 64):
    codes = Kv4Codes(b, 32, CTX, D, dev)
    count = torch.tensor(CTX, device=dev)
    kv4_store(codes, count, torch.randn(b, 32, CTX, D, device=dev).bfloat16(),
              torch.randn(b, 32, CTX, D, device=dev).bfloat16(), 1.0, True)
    q = torch.randn(b, 32, 1, D, device=dev).bfloat16()
    for _ in range(2):
        kv4_decode_attention(q, codes, count, D ** -0.5, False)
    torch.cuda.synchronize()
print("done")
