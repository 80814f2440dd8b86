"""How far the 4-bit decode attention's loops are from exact attention and from the fake path (sessions 42-43,
docs/KERNELS.md 4g-4h), on the CPU through Triton's interpreter: bf16, head dim 128, 257 positions, one key 20x the
others, the query at two sizes. "exact": fp32 attention over K and V dequantized in fp32; "fake path": K and V
dequantized to bf16 (what the fake-quant model holds). Errors as a fraction of the largest output.
    TRITON_INTERPRET=1 PYTHONPATH=src python lab/kv4_factored_error.py
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from dartquant.hadamard import fast_hadamard_transform  # noqa: E402
from dartquant.kernels.kv_cache import Kv4Codes, kv4_decode_attention, kv4_store  # noqa: E402


def main(b=2, h=4, n=257, d=128):
    torch.manual_seed(0)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    print("| query scale | loop | vs exact | vs fake path |\n|---|---|---|---|")
    for scale_q in (1.0, 8.0):
        k, v = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
        k[:, :, 0] *= 20  # a sink-like key with a large norm: large logits
        codes, count = Kv4Codes(b, h, n, d, "cpu"), torch.tensor(n)
        kv4_store(codes, count, k.bfloat16(), v.bfloat16(), 1.0, True)
        q = (torch.randn(b, h, 1, d) * scale_q).bfloat16()
        qr = fast_hadamard_transform(q).float()
        (k32, v32), (kb, vb) = codes.dequantize(torch.float32), codes.dequantize(torch.bfloat16)
        exact = sdpa(qr, k32, v32).transpose(1, 2)
        fake = sdpa(qr, kb.float(), vb.float()).transpose(1, 2)
        top = exact.abs().max()
        print(f"| x{scale_q:g} | the fake path itself | {((fake - exact).abs().max() / top).item():.2e} | - |")
        # the words loop (the default since session 43), the factored loop byte by byte, the loop before (K as held)
        for name, kw in (("words (default)", {}), ("bytes", dict(words=False)), ("exact_k=False", dict(exact_k=False))):
            out = kv4_decode_attention(q, codes, count, d ** -0.5, True, slots=True, **kw).float()
            print(f"| x{scale_q:g} | {name} | {((out - exact).abs().max() / top).item():.2e} | "
                  f"{((out - fake).abs().max() / top).item():.2e} |")


if __name__ == "__main__":
    main()
