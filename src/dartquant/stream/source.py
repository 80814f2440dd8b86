"""A model that is never materialized whole: a Hugging Face skeleton on "meta" plus its safetensors.

Design choices:
* The skeleton is the ordinary transformers model built from config.json on the "meta"
  device: every structural change the pipeline makes (untying, exact norms, QLinear wrappers,
  online Hadamards, quantizers) works on it unchanged, because none of them reads a value. Only
  the rotary embedding's buffers are real (rebuilt from the config).
* `StreamedModel.load_(path, device)` reads one submodule's parameters (a decoder block, the
  embedding, the final norm, lm_head) with safetensors' `safe_open`, only those keys, straight
  from the file (single or sharded with `model.safetensors.index.json`), converts them to the
  compute dtype *on the target device* (a bf16 file is never upcast on the host), and puts them
  into the skeleton; `release_(path)` swaps them back for meta tensors. Parameter names are the
  skeleton's own: dartquant's wrappers keep `weight` / `bias` at the wrapped module's path.
* Every key and shape is checked against config.json before any work (`check()`): a damaged or
  foreign folder fails with the missing names, not in block 27 of 32.
* A tied lm_head (no `lm_head.weight` in the files) reads the embedding's key.
* Mixtures of experts: transformers 5 fuses a block's experts into 3-D tensors when it loads a
  checkpoint, but checkpoints (the hub's, and its own save_pretrained's) keep one tensor per
  expert linear under the family's names. The skeleton is split at once into one nn.Linear per
  expert (transforms.fuse.split_experts_, structure only, as the in-memory pipeline splits), and
  each split name maps to one file key (`key()`, MOE_FILE_NAMES): a block reads only its own
  experts, and no fused [E, 2I, H] copy is ever built.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..adapters import adapter_for

INDEX_FILE = "model.safetensors.index.json"

# model_type -> (the MoE block's name in the files, file names of the experts' linears): the
# skeleton's split expert `<mlp>.experts.<e>.<role>.weight` is `<block>.experts.<e>.<file role>.weight`
# on disk (roles as modules.GatedMLP names them); families not listed use the skeleton's names.
MOE_FILE_NAMES = {"mixtral": ("block_sparse_moe", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"})}


class SafetensorsFiles:
    """name -> file of a Hugging Face folder's weights: `model.safetensors` or the shards of its index."""

    def __init__(self, folder: Path):
        from ..zoo import ModelLoadError

        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ModelLoadError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from e
            self.where = {k: self.folder / f for k, f in weight_map.items()}
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            files = [f for f in files if f.name == "model.safetensors"] or files
            if not files:
                raise ModelLoadError(f"{self.folder} has no safetensors weights (model.safetensors or {INDEX_FILE}); "
                                     "streaming reads safetensors only")
            self.where = {}
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    self.where.update({k: f for k in h.keys()})
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for f in sorted(set(self.where.values())):
            if not f.is_file():
                raise ModelLoadError(f"{f} is listed in {INDEX_FILE} but missing")
            try:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        if self.where.get(k) != f:  # only what the index maps to this file
                            continue
                        sl = h.get_slice(k)
                        self.shapes[k], self.dtypes[k] = tuple(sl.get_shape()), sl.get_dtype()
            except Exception as e:  # safetensors raises its own SafetensorError on damaged files
                raise ModelLoadError(f"{f} is not a readable safetensors file ({type(e).__name__}: {e})") from e

    def read(self, keys: list[str], device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors `keys`, each moved to `device` in its stored dtype, then cast to `dtype` there."""
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.where[k], []).append(k)
        out = {}
        for f, ks in by_file.items():
            with safe_open(str(f), framework="pt") as h:
                for k in ks:
                    out[k] = h.get_tensor(k).to(device).to(dtype)
        return out


class StreamedModel:
    """The skeleton (`.model`, on meta) of the folder's model and the files its values come from."""

    def __init__(self, folder: Path, dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoModelForCausalLM

        from ..modules import register_attention
        from ..zoo import ModelLoadError

        self.folder, self.dtype = Path(folder), dtype
        try:
            config = AutoConfig.from_pretrained(str(self.folder), trust_remote_code=False)
        except Exception as e:  # transformers raises OSError / ValueError / KeyError on bad configs
            raise ModelLoadError(f"could not read {self.folder}/config.json: {type(e).__name__}: {e}") from e
        self.adapter = adapter_for(config)
        self.files = SafetensorsFiles(self.folder)
        register_attention()
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.adapter.rebuild_rotary_(self.model)  # real rotary buffers (and Gemma's embedding scale)
        if self.adapter.moe is not None:  # one linear per expert, as the files (and the checkpoint) hold them
            from ..transforms.fuse import split_experts_

            split_experts_(self.model, self.adapter)
            self._moe_names = MOE_FILE_NAMES.get(config.model_type, (self.adapter.mlp, {}))
        self.model.eval()
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.check()

    # ---- names -------------------------------------------------------------------------------
    def key(self, name: str) -> str:
        """The file key of skeleton parameter `name` (a tied lm_head reads the embedding)."""
        head = f"{self.adapter.lm_head}.weight"
        if name == head and name not in self.files.where and self.tied:
            return f"{self.adapter.embed}.weight"
        if self.adapter.moe is not None:
            return self._moe_key(name)
        return name

    def _moe_key(self, name: str) -> str:
        """A MoE block's parameter's file key: the family's block name and expert linear names."""
        block_mlp = re.match(rf"({re.escape(self.adapter.layers)}\.\d+)\.{re.escape(self.adapter.mlp)}\.(.+)$", name)
        if block_mlp is None:
            return name
        file_mlp, roles = self._moe_names
        rest = block_mlp.group(2)
        expert = re.match(rf"{re.escape(self.adapter.moe.experts)}\.(\d+)\.(\w+)\.weight$", rest)
        if expert is not None and expert.group(2) in roles:
            rest = f"{self.adapter.moe.experts}.{expert.group(1)}.{roles[expert.group(2)]}.weight"
        return f"{block_mlp.group(1)}.{file_mlp}.{rest}"

    def check(self) -> None:
        """Every parameter of the skeleton is in the files with its shape (before any work)."""
        from ..zoo import ModelLoadError

        missing, bad = [], []
        for name, p in self.model.named_parameters(remove_duplicate=False):
            k = self.key(name)
            if k not in self.files.shapes:  # (only keys the index maps, where a file holds them)
                missing.append(name)
            elif self.files.shapes[k] != tuple(p.shape):
                bad.append(f"{name} {self.files.shapes[k]} (config.json says {tuple(p.shape)})")
        if missing or bad:
            raise ModelLoadError(f"{self.folder}: the weights do not match config.json: missing {missing[:5]}"
                                 f"{' ...' if len(missing) > 5 else ''}, wrong shape {bad[:3]}")

    def stored_dtype(self) -> str:
        """The dtype most weights are stored in (e.g. "F16", "BF16", "F32")."""
        counts: dict[str, int] = {}
        for k, s in self.files.shapes.items():
            counts[self.files.dtypes[k]] = counts.get(self.files.dtypes[k], 0) + int(torch.Size(s).numel())
        return max(counts, key=counts.get)

    # ---- values in, values out ------------------------------------------------------------------
    def load_(self, path: str, device, dtype: torch.dtype | None = None) -> nn.Module:
        """Read submodule `path`'s parameters from the files into the skeleton, on `device`."""
        module = self.model.get_submodule(path)
        names = [n for n, _ in module.named_parameters()]
        full = {n: f"{path}.{n}" for n in names}
        values = self.files.read([self.key(f) for f in full.values()], device, dtype or self.dtype)
        for n in names:
            _set_param(module, n, values[self.key(full[n])])
        if path == self.adapter.embed:  # a scaled embedding's (Gemma) scale buffer: on the weight's device
            self.adapter.rebuild_rotary_(self.model)
        return module

    def release_(self, path: str) -> None:
        """Swap submodule `path`'s parameters back for meta tensors (their memory is freed)."""
        module = self.model.get_submodule(path)
        for n, p in list(module.named_parameters()):
            _set_param(module, n, torch.empty(p.shape, dtype=p.dtype, device="meta"))

    def block_path(self, i: int) -> str:
        return f"{self.adapter.layers}.{i}"


def _set_param(root: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    module._parameters[attr] = nn.Parameter(value, requires_grad=False)
