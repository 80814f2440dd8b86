"""Where a run folder's linears execute: `torch` (the fake-quant model) or `triton` (the kernels).

    model, tokenizer = load_for_backend(folder, "triton", dtype=torch.bfloat16, device="cuda")

Design choices:
* Every refusal comes before any weight is read: `check_run_for_kernels` decides from the
  folder's `dartquant.json` (the run's scheme and online transforms) and `config.json` (the
  widths of the online Hadamards) alone, and names the setting that the kernels cannot run.
  `linear._check_scheme` checks each linear again at conversion (a damaged or hand-edited folder).
* Supported: the papers' W4A4 scheme, weights 4-bit symmetric per output channel (RTN or GPTQ,
  MSE-searched scales are fine: the codes and scales are what the checkpoint stores), inputs
  4-bit asymmetric per token; online Hadamards (R4; r1_online's on the q/k/v and gate/up inputs)
  whose power-of-two factor is 16..2^15.
* Only the linears change. Embeddings, norms, lm_head (unquantized) and attention run as in the
  fake-quant model: the K/V cache stays fake-quantized (4-bit values held in the model dtype), so
  `eval --backend triton` computes the run's own function, W4A4KV4.
* Triton on a machine without CUDA runs only through its interpreter (TRITON_INTERPRET=1, set
  before Triton is imported): slow, meant for tests; without it the CPU is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

BACKENDS = ("torch", "triton")
# the GEMM operands of multi-token inputs (linear.PREFILL_OPERANDS; listed here so that the command
# line can offer them without importing torch)
PREFILL_OPERAND_CHOICES = ("int8s", "int8", "fp8", "packed", "scaled_mm")
PREFILL_OPERAND_HELP = ("with --backend triton: the GEMM of inputs above a few tokens (default int8s; scaled_mm: above 64 "
                        "tokens, cuBLAS FP8 on 1-byte codes, exactness probed per shape: docs/KERNELS.md 2d)")


class KernelSupportError(ValueError):
    """A run whose scheme or transforms the W4A4 kernels cannot execute."""


def _scheme_problems(scheme) -> list[str]:
    """Settings of a QuantScheme that the kernels do not implement (empty: supported)."""
    bad = []
    wants = {"w_bits": 4, "w_symmetric": True, "w_group_size": None, "a_bits": 4, "a_symmetric": False,
             "a_group_size": None, "o_proj_per_head": False}
    for name, value in wants.items():
        if getattr(scheme, name) != value:
            bad.append(f"{name}={getattr(scheme, name)!r} (the kernels need {value!r})")
    if getattr(scheme, "a_sink_tokens", 0):
        bad.append(f"a_sink_tokens={scheme.a_sink_tokens} (the activation kernels quantize every position)")
    for role, bits in sorted(scheme.a_bits_overrides.items()):
        if bits != 4:
            bad.append(f"a_bits_overrides[{role}]={bits} (every linear input must be 4-bit)")
    return bad


def check_run_for_kernels(folder) -> dict:
    """The folder's dartquant.json if the kernels can execute this run; KernelSupportError naming
    every unsupported setting otherwise. Reads two small JSON files, no weights."""
    from ..pipeline import model_config
    from ..adapters import adapter_for
    from ..hadamard import hadamard_factorization
    from ..quant.checkpoint import scheme_of
    from ..zoo import read_transform_file
    from .act_quant import stage_sizes

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such run folder (--backend triton needs a `dartquant quantize --out` folder)")
    spec = read_transform_file(folder)
    if spec is None or "quantization" not in spec:
        raise KernelSupportError(f"{folder} is not a quantized run folder (no quantization in dartquant.json): "
                                 "--backend triton executes the integer codes of `dartquant quantize --out RUN`")
    problems = _scheme_problems(scheme_of(spec))
    online = spec.get("online", {})
    if online.get("blocks"):
        problems.append(f"online block rotations {sorted(online['blocks'])} (DuQuant: the kernels fuse only a "
                        "Hadamard into the activation quantizer)")
    if online.get("r4") or online.get("r1_online"):  # the online Hadamards the activation kernel fuses
        config = model_config(folder)
        geo = adapter_for(config).geometry(config)
        sizes = {n: "r4" for n in geo.mlp_widths} if online.get("r4") else {}
        if online.get("r1_online"):  # q/k/v and gate/up inputs
            sizes.setdefault(geo.hidden, "r1_online")
        for n, name in sorted(sizes.items()):
            try:
                stage_sizes(hadamard_factorization(n)[1])
            except ValueError as e:
                problems.append(f"{name}=true with an online Hadamard of size {n}: {e}")
    if problems:
        raise KernelSupportError(f"{folder}: the W4A4 kernels run W4 symmetric per-channel weights with A4 "
                                 "asymmetric per-token inputs; this run has " + "; ".join(problems))
    return spec


def check_triton_device(device: str) -> None:
    """Triton present, and a device it can run on (CUDA, or the CPU through the interpreter)."""
    from . import require_triton

    require_triton()
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
    elif os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"--backend triton on --device {device} runs only through Triton's interpreter "
                         "(set TRITON_INTERPRET=1; slow, for tests): use a CUDA device")


def load_for_backend(spec, backend: str = "torch", *, dtype=None, device: str = "cpu", prefill_operand: str | None = None,
                     fuse_norms: bool = True, merge_siblings: bool = True):
    """(model, tokenizer): `torch` is `zoo.load_model`; `triton` checks the run and the device
    first, then `linear.load_w4a4` (the fake-quant model with its linears on the kernels;
    `prefill_operand`: linear.PREFILL_OPERANDS, the GEMM of multi-token inputs, default int8s) with
    `fusions.apply_fusions_`: q / k / v and gate / up as one GEMM each (`merge_siblings`), each block
    norm fused with its readers' quantization (`fuse_norms`), where that is safe."""
    import torch

    dtype = dtype or torch.float32
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if backend == "torch":
        if prefill_operand is not None:
            raise ValueError("--prefill-operand chooses a W4A4 kernel: it needs --backend triton")
        from ..zoo import load_model

        return load_model(spec, dtype=dtype, device=device)
    from .linear import PREFILL_OPERANDS

    if prefill_operand is not None and prefill_operand not in PREFILL_OPERANDS:
        raise ValueError(f"prefill_operand must be one of {sorted(PREFILL_OPERANDS)}, not {prefill_operand!r}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"--backend triton runs in float32 (exact epilogue) or bfloat16 (the fast path), not {dtype}")
    check_run_for_kernels(spec)
    check_triton_device(device)
    from .linear import DEFAULT_PREFILL_OPERAND, load_w4a4

    model, tokenizer = load_w4a4(spec, device=device, dtype=dtype,
                                 prefill_operand=prefill_operand or DEFAULT_PREFILL_OPERAND)
    from .fusions import apply_fusions_

    apply_fusions_(model, device, norms=fuse_norms, siblings=merge_siblings)
    return model, tokenizer
