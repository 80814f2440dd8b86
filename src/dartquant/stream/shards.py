"""The quantized checkpoint written block by block: `quantized.safetensors`, or shards + an index.

Tensors arrive one block at a time and are written once a shard's worth has gathered, so host
memory holds at most one shard (`max_shard_bytes`) of codes and scales. The number of shards is
known only at the end: shards are written under provisional names and renamed by `close()`:
  one shard    -> quantized.safetensors (the in-memory layout, byte for byte the same format)
  several      -> quantized-0000k-of-0000n.safetensors + quantized.safetensors.index.json
                  ({"metadata": {"format", "total_size"}, "weight_map": {name: file}}, as
                  Hugging Face writes its own shards).
The run folder itself is a temporary folder renamed into place (runs.atomic_dir), so a killed
run never leaves a half-written checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..quant.checkpoint import INDEX_FILE, WEIGHTS_FILE

FORMAT = {"format": "dartquant-quantized-1"}


class ShardWriter:
    def __init__(self, folder: Path, max_shard_bytes: int = 4 << 30):
        self.folder, self.max = Path(folder), max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            if name in self.pending or any(name in ks for _, ks in self.written):
                raise ValueError(f"tensor {name} written twice")
            t = t.detach().to("cpu").contiguous()
            self.pending[name] = t
            self.pending_bytes += t.numel() * t.element_size()
        if self.pending_bytes >= self.max:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f".shard-{len(self.written):05d}.partial"
        save_file(self.pending, str(path), metadata=FORMAT)
        self.written.append((path, list(self.pending)))
        self.total += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write what is left, give the shards their final names (and the index); return the files."""
        self._flush()
        n = len(self.written)
        finals = [self.folder / WEIGHTS_FILE] if n == 1 else [
            self.folder / f"quantized-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        mask = os.umask(0)
        os.umask(mask)
        for (path, _), final in zip(self.written, finals):
            os.chmod(path, 0o666 & ~mask)  # safetensors writes 0600; a result is readable like any file
            os.replace(path, final)
        if n > 1:
            index = {"metadata": {**FORMAT, "total_size": self.total},
                     "weight_map": {k: final.name for (_, ks), final in zip(self.written, finals) for k in sorted(ks)}}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
        return finals
