"""Quantization: primitives (specs, fake quantization, integer containers) and GPTQ."""

from .gptq import GPTQ
from .primitives import (
    QuantizedTensor,
    QuantSpec,
    compute_qparams,
    dequantize,
    fake_quantize,
    pack_int4,
    quantize,
    sqnr_db,
    unpack_int4,
)

__all__ = [
    "GPTQ",
    "QuantSpec",
    "QuantizedTensor",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "pack_int4",
    "quantize",
    "sqnr_db",
    "unpack_int4",
]
