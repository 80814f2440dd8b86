"""Triton kernels for a real W4A4 forward on Hopper (H100 / H200), each beside its torch reference.

* `act_quant.hadamard_quantize_pack`: online Hadamard (H_k (x) H_{2^m}, the same matrix as
  `dartquant.hadamard.fast_hadamard_transform`) fused with per-token asymmetric 4-bit
  quantization and packing, two codes per byte: one read of x, one write of codes + scale/zero.
* `w4a4_gemm.w4a4_matmul`: packed 4-bit activations x packed 4-bit weights with exact integer
  accumulation on INT8 (int32 accumulators) or FP8 e4m3 tensor cores (fp32 accumulators promoted
  per K block), scales and the activation zero point applied in the epilogue, bf16 out.

Codes and packing follow `dartquant.quant.primitives` (QuantSpec, quantize, pack_int4), so a
weight packed by the checkpoint writer (`QuantizedTensor.to_state_dict`) is read as is.

Triton is an optional dependency (extra `kernels`); importing this package without it works,
calling a kernel raises a clear error. On a machine without a GPU the kernels run through
Triton's interpreter (TRITON_INTERPRET=1), which is how the tests check them on the CPU.
"""

from __future__ import annotations

import importlib.util
import os

__all__ = ["triton_available", "require_triton", "pdl_launch", "pdl_kwargs"]

# Programmatic dependent launch (Hopper): a decode-size kernel is launched while the one before it runs
# and waits (griddepcontrol.wait) at its first instruction until that one has finished and its writes
# are visible; it saves the launch gap between two of our kernels. None: DARTQUANT_PDL=1 turns it on;
# True / False force it. Opt-in: run 51 (docs/KERNELS.md 2g) measured a 7B decode step 0.978x / 0.984x
# the time at batch 1 / 8, logits bit-equal; at batch 64 it was 1.03x slower, hence the token limit.
PDL: bool | None = None
PDL_MAX_TOKENS = 16  # decode sizes only: at prefill a waiting grid would hold SMs the running one needs


def pdl_launch(tokens: int, device) -> bool:
    """Whether kernels over `tokens` rows on `device` are launched with programmatic dependent launch
    (compiled, CUDA, compute capability >= 9, decode sizes, and switched on)."""
    on = os.environ.get("DARTQUANT_PDL") == "1" if PDL is None else PDL
    if not on or tokens > PDL_MAX_TOKENS or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    import torch

    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 9


def pdl_kwargs(tokens: int, device) -> dict:
    """A kernel launch's PDL constexpr and launch option (empty when `pdl_launch` says no)."""
    return dict(PDL=True, launch_pdl=True) if pdl_launch(tokens, device) else {}


def triton_available() -> bool:
    """Whether the `triton` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def require_triton() -> None:
    """Raise ImportError with the install hint when Triton is missing."""
    if not triton_available():
        raise ImportError(
            "dartquant.kernels needs Triton: pip install 'dartquant[kernels]' (or pip install triton)"
        )
