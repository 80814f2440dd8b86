"""The quantized checkpoint: integer codes and scales in safetensors, reloadable exactly.

Folder layout (written atomically by the pipeline):
  config.json, tokenizer files     the Hugging Face config and tokenizer
  quantized.safetensors            per quantized linear `<name>.codes/.scale/.zero/.qmeta`
                                   (4-bit codes packed two per byte); every other parameter
                                   (embeddings, norms, lm_head, biases) as is
  dartquant.json                   online transforms + activation/KV quantizer settings
  rotations.safetensors            the rotation matrices used (reusable with --rotations)
Loading rebuilds the model from its config, dequantizes the codes into the weights, and
re-installs the online rotations and quantizers, so it computes exactly what was evaluated.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .primitives import QuantizedTensor

WEIGHTS_FILE = "quantized.safetensors"


def save_quantized(model, qtensors: dict[str, QuantizedTensor], folder: Path) -> None:
    state = {}
    quantized = {f"{name}.weight" for name in qtensors}
    for name, tensor in model.state_dict().items():
        if name not in quantized and name.endswith(("weight", "bias")):
            state[name] = tensor.detach().cpu().contiguous()
    for name, qt in qtensors.items():
        state.update(qt.to_state_dict(prefix=f"{name}."))
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "dartquant-quantized-1"})


def load_quantized(folder: Path, spec: dict, dtype: torch.dtype = torch.float32):
    """Model with dequantized weights and its quantizers re-installed (see module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..transforms.online import install_from_spec_
    from .act import install_quantizers_
    from .config import QuantConfig

    from ..modules import register_attention

    register_attention()  # config.json may name the "dartquant" attention implementation
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    path = folder / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path} is missing or not a readable safetensors file ({e}); the folder is damaged") from e
    prefixes = {k[: -len(".qmeta")] for k in state if k.endswith(".qmeta")}
    # only the quantized tensor's own keys: a quantized linear's bias (Qwen2's q/k/v) stays
    weights = {k: v for k, v in state.items() if k.rpartition(".")[0] not in prefixes
               or k.rpartition(".")[2] not in ("codes", "scale", "zero", "qmeta")}
    for p in prefixes:
        weights[f"{p}.weight"] = QuantizedTensor.from_state_dict(state, prefix=f"{p}.").dequantize()
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise ValueError(f"{path} does not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}")
    # Non-persistent buffers (rotary inv_freq) were created on meta: rebuild them.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.eval()
    install_from_spec_(model, spec, folder)
    install_quantizers_(model, QuantConfig.from_dict(spec["quantization"]))
    return model
