"""The quantized checkpoint: integer codes and scales in safetensors, reloadable exactly.

Folder layout (written atomically by the pipeline):
  config.json, tokenizer files     the Hugging Face config and tokenizer
  quantized.safetensors            (or shards + quantized.safetensors.index.json from a streamed
                                   run, stream/) per quantized linear `<name>.codes/.scale/.zero/.qmeta`
                                   (4-bit codes packed two per byte); the embedding and an
                                   unquantized lm_head in `unquantized_dtype` (float16 by
                                   default: the papers keep them 16-bit); norms and biases as is
  dartquant.json                   online transforms + activation/KV quantizer settings (and the
                                   per-linear activation clip ratios of a_clip_search: "act_clips")
  rotations.safetensors            the rotation matrices used (reusable with --rotations)
`round_unquantized_` rounds the embedding and lm_head to that dtype in the model before the
in-run evaluation, so the stored values are exactly the evaluated ones.
Loading rebuilds the model from its config, dequantizes the codes into the weights, and
re-installs the online rotations and quantizers, so it computes exactly what was evaluated.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .primitives import QuantizedTensor

WEIGHTS_FILE = "quantized.safetensors"
TRANSFORM_FILE = "dartquant.json"  # online transforms + quantizer settings (zoo.py reads it for every folder)
# a streamed run (stream/) may shard: quantized-0000k-of-0000n.safetensors + this index
INDEX_FILE = "quantized.safetensors.index.json"
_QKEYS = ("codes", "scale", "zero", "qmeta")  # QuantizedTensor.to_state_dict's keys


def unquantized_names(model, qtensors: dict, adapter=None) -> list[str]:
    """State-dict names of the embedding and lm_head weights that were not quantized."""
    from ..adapters import adapter_for

    adapter = adapter or adapter_for(model)
    names = {m: n for n, m in model.named_modules()}
    mods = (adapter.embedding(model), adapter.head(model))
    return [f"{names[m]}.weight" for m in mods if names[m] not in qtensors]


@torch.no_grad()
def round_unquantized_(model, qtensors: dict, dtype: str, adapter=None) -> None:
    """Round the unquantized embedding / lm_head weights to `dtype` (values kept in the model's
    dtype), so that evaluation sees exactly what save_quantized stores."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = getattr(torch, dtype)
    for name in unquantized_names(model, qtensors, adapter):
        w = params[name]
        if target == torch.float16 and w.abs().max() > torch.finfo(torch.float16).max:
            raise ValueError(f"{name} has values beyond float16's range; set unquantized_dtype: bfloat16")
        w.data.copy_(w.data.to(target).to(w.dtype))


def save_quantized(model, qtensors: dict[str, QuantizedTensor], folder: Path, unquantized_dtype: str = "float32",
                   adapter=None) -> None:
    state = {}
    quantized = {f"{name}.weight" for name in qtensors}
    narrow = {n: getattr(torch, unquantized_dtype) for n in unquantized_names(model, qtensors, adapter)}
    for name, tensor in model.state_dict().items():
        if name not in quantized and name.endswith(("weight", "bias")):
            t = tensor.detach().cpu()
            state[name] = (t.to(narrow[name]) if name in narrow else t).contiguous()
    for name, qt in qtensors.items():
        state.update(qt.to_state_dict(prefix=f"{name}."))
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "dartquant-quantized-1"})
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder / WEIGHTS_FILE, 0o666 & ~mask)  # safetensors writes 0600; a result is readable like any file


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files: quantized.safetensors, or the shards its index lists."""
    import json

    index = Path(folder) / INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a readable index ({type(e).__name__}: {e}); the folder is damaged") from e
        if any("/" in n or n.startswith(".") for n in names):
            raise ValueError(f"{index} names files outside the folder: {names}")
        return [Path(folder) / n for n in names]
    return [Path(folder) / WEIGHTS_FILE]


def read_quantized_state(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(where, every tensor of the checkpoint) for either layout (weight_files)."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys()})
        except Exception as e:
            raise ValueError(f"{path} is missing or not a readable safetensors file ({e}); the folder is damaged") from e
    return Path(folder) / WEIGHTS_FILE, state


def write_run_metadata(folder: Path, model, tokenizer, cfg, adapter, rotations, timings: dict,
                       act_clips: dict[str, float] | None = None) -> None:
    """Everything of a run folder but the weights: tokenizer, config.json, dartquant.json (online
    transforms, quantizer settings, the run's settings), rotations.safetensors, config.yaml.
    The rotations' volatile metadata (timings) moves to `timings`, for metrics.json."""
    from ..runs import split_volatile, write_json, write_yaml
    from ..transforms.online import online_spec

    tokenizer.save_pretrained(str(folder))
    model.config.save_pretrained(str(folder))
    spec = online_spec(model, adapter)
    spec["quantization"] = cfg.to_dict()  # the whole run's settings, for the record
    spec["scheme"] = cfg.to_dict()["scheme"]  # what load_model re-installs
    if act_clips:  # per-linear activation clip ratios a search chose (quant/act_clip.py)
        spec["act_clips"] = dict(sorted(act_clips.items()))
    if rotations is not None:
        rotations.meta, volatile = split_volatile(rotations.meta)
        if volatile:
            timings["rotations"] = volatile
        rotations.save(folder / "rotations.safetensors")
        spec["rotations"] = {"file": "rotations.safetensors", **rotations.meta}
    write_json(folder / TRANSFORM_FILE, spec)
    write_yaml(folder / "config.yaml", cfg.to_dict())


def load_quantized(folder: Path, spec: dict, dtype: torch.dtype = torch.float32):
    """Model with dequantized weights and its quantizers re-installed (see module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..transforms.fuse import split_experts_
    from ..transforms.rotation import install_from_spec_
    from .act import install_quantizers_
    from .act_clip import apply_act_clips_
    from ..adapters import adapter_for
    from ..modules import register_attention

    register_attention()  # config.json may name the "dartquant" attention implementation
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    split_experts_(model)  # MoE: the checkpoint holds one linear per expert
    path, state = read_quantized_state(folder)
    prefixes = {k[: -len(".qmeta")] for k in state if k.endswith(".qmeta")}
    # drop only the codes / scales of quantized linears: their biases (Qwen2's q/k/v) stay
    weights = {k: v for k, v in state.items()
               if not (k.rpartition(".")[0] in prefixes and k.rpartition(".")[2] in _QKEYS)}
    for p in prefixes:
        weights[f"{p}.weight"] = QuantizedTensor.from_state_dict(state, prefix=f"{p}.").dequantize()
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    missing = [k for k in missing if not k.startswith(adapter_for(model).rotary + ".")]
    if missing or unexpected:
        raise ValueError(f"{path} does not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}")
    # Non-persistent buffers (rotary inv_freq) were created on meta: rebuild them.
    adapter = adapter_for(model)
    adapter.rebuild_rotary_(model)
    model.eval()
    install_from_spec_(model, spec, folder)
    install_quantizers_(model, scheme_of(spec), adapter)
    apply_act_clips_(model, spec.get("act_clips"))
    return model


def scheme_of(spec: dict):
    """The QuantScheme a dartquant.json records: "scheme" (nested), or the scheme's fields of the
    flat "quantization" dict older run folders wrote (the scheme's field names are the flat ones)."""
    import dataclasses

    from .scheme import QuantScheme

    names = {f.name for f in dataclasses.fields(QuantScheme)}
    if "scheme" in spec:
        return QuantScheme(**spec["scheme"])
    # older folders: the flat settings; they quantized K with its bias (no kv_exclude_k_bias yet)
    return QuantScheme(**{"kv_exclude_k_bias": False,
                          **{k: v for k, v in spec.get("quantization", {}).items() if k in names}})
