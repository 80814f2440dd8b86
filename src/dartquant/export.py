"""Export a quantized run folder to compressed-tensors, the format transformers and vLLM read.

`dartquant export RUN --out DIR` writes a Hugging Face folder that loads without dartquant:

  config.json          the model config + `quantization_config` (quant_method
                       "compressed-tensors", format "pack-quantized") whose `transform_config`
                       holds the online rotations
  model.safetensors    packed integer weights (`weight_packed` int32, `weight_scale`,
                       `weight_shape`), every other tensor (embeddings, norms, lm_head,
                       biases) in the export dtype, and the stored online Hadamard matrices
  tokenizer files, generation_config.json (copied), dartquant_export.json (provenance and
                       the settings the format could not say)

Design choices:
* The run is read through the library (`zoo.load_model`: dequantized weights plus the
  online modules), not through the private keys of `quantized.safetensors`, so that the
  checkpoint format may change without this module noticing. The integer codes are
  recovered from the dequantized weights: each row / group sits on a grid `q * s` with `q`
  in the code range, and we find that grid and then *check* that it reproduces the weight
  (to float round-off), failing loudly otherwise. Any grid that reproduces the weight gives
  the same function, so recovering `(q, s)` up to a common factor is enough.
* R1, R2 and learned scalings are already folded into the weights: nothing to export.
  R4 (online Hadamard on the down_proj input) becomes a `transform_config` entry at location
  `input`. R3 (Q and K after RoPE) is not exported: it cancels in Q K^T unless K is quantized,
  and the KV cache is not exported (below), so dropping it keeps the function exactly.
  Our Hadamard of order `n = k * 2^m` is `H_k (x) H_{2^m}` with our own base `H_k`;
  compressed-tensors' `hadamard` type only builds Sylvester matrices (powers of two) and its
  `random-hadamard` draws random signs on top of its own, different, bases (docs/EXPORT.md
  compares them). So: powers of two use type `hadamard` (our Sylvester matrix equals theirs,
  checked at export; vLLM runs it with its Hadacore kernel); other sizes use type
  `random-hadamard` with *our* unnormalized +-1 matrix stored in the safetensors (both
  compressed-tensors and vLLM divide the stored matrix by sqrt(n)). One copy per scheme
  (layer 0's key): the modules share it, as compressed-tensors' own writer does.
* DuQuant's online block rotations (block-diagonal x permutation x block-diagonal, per layer)
  are refused, not approximated: the format could only say them as dense per-module
  `random-matrix` transforms, which this export does not write (docs/DUQUANT.md).
* Activation quantization is described as far as the format can say it: dynamic per-token
  int, the run's bits and symmetry. What it cannot say (the activation clip ratio; symmetric
  activations use amax/8 there, amax/7 here) is listed in `dartquant_export.json` and in
  docs/EXPORT.md with its measured perplexity cost. The KV cache is never exported: with
  transformers 5.x compressed-tensors' KV hook does not run and vLLM takes only FP8 KV, so a
  run with a quantized KV cache needs `--drop-kv-quant`. Settings with no faithful description
  (2/3-bit activations, asymmetric or 2/3/5/6/7-bit weights, a quantized lm_head, activation
  groups) are refused before any work.
* Written atomically (`runs.atomic_dir`) after `runs.check_out_dir`: a failed export leaves
  nothing behind.
* transformers (5.x up to at least 5.24) does not apply `transform_config` when loading
  (huggingface/transformers#42887 is open): `zoo.load_export` applies it with
  compressed-tensors' own `apply_transform_config` when the loaded model has no transform
  modules yet, and loads the stored matrices. docs/EXPORT.md shows the same few lines for
  users who do not have dartquant.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch

from .zoo import EXPORT_WEIGHTS_FILE  # the reader (load_export) lives with the other loaders, in zoo

EXPORT_INFO_FILE = "dartquant_export.json"
EXPORT_DTYPES = ("bfloat16", "float16", "float32")
# names of the transform schemes in transform_config (and of the modules they create)
R4_SCHEME = "R4"


class ExportError(ValueError):
    """The folder cannot be exported (not a run, or settings the format cannot say)."""


# ---- what the format can say ----------------------------------------------------------------
def _role_suffixes(adapter) -> dict[str, str]:
    """role -> module path inside a decoder layer, e.g. "down" -> "mlp.down_proj"."""
    return {"q": f"{adapter.attn}.{adapter.q}", "k": f"{adapter.attn}.{adapter.k}",
            "v": f"{adapter.attn}.{adapter.v}", "o": f"{adapter.attn}.{adapter.o}",
            "gate": f"{adapter.mlp}.{adapter.gate}", "up": f"{adapter.mlp}.{adapter.up}",
            "down": f"{adapter.mlp}.{adapter.down}"}


def check_exportable(cfg, drop_kv_quant: bool = False) -> list[str]:
    """Raise ExportError for settings (a run's QuantScheme) the format cannot say; return the
    approximations made."""
    problems = []
    if cfg.w_bits not in (4, 8):
        problems.append(f"w_bits={cfg.w_bits}: pack-quantized int weights are exported at 4 or 8 bits only")
    if not cfg.w_symmetric:
        problems.append("asymmetric weights (w_symmetric: false): vLLM's int4 kernels take symmetric weights only")
    if cfg.quantize_lm_head:
        problems.append("quantize_lm_head: the export keeps lm_head (and the embeddings) unquantized")
    if cfg.a_group_size is not None:
        problems.append(f"a_group_size={cfg.a_group_size}: only per-token activation scales are exported")
    for role in ("q", "k", "v", "o", "gate", "up", "down"):
        bits = int(cfg.a_bits_overrides.get(role, cfg.a_bits))
        if bits not in (4, 8, 16):
            problems.append(f"{bits}-bit activations ({role}): the format's engines run int4/int8 "
                            "activations only (or 16 = none)")
    if cfg.kv_bits < 16 and not drop_kv_quant:
        problems.append(f"{cfg.kv_bits}-bit KV cache: not exportable. compressed-tensors 0.20 says a KV "
                        "scheme, but with transformers 5.x its KV hook never runs (the attention argument "
                        "is now `cache`) and vLLM has no int4 KV cache and no attention-side (R3) "
                        "transforms. Pass --drop-kv-quant to export without KV quantization (R3 then "
                        "cancels in Q K^T and is dropped too); docs/EXPORT.md gives its perplexity cost")
    if problems:
        raise ExportError("this run cannot be exported to compressed-tensors: " + "; ".join(problems))
    notes = []
    if cfg.a_bits < 16 and cfg.a_clip_search:
        notes.append("the activation clip ratios chosen per input stream (a_clip_search) are not expressible: "
                     "the export's dynamic activation quantizer uses the full per-token range (clip 1.0)")
    elif cfg.a_bits < 16 and cfg.a_clip != 1.0:
        notes.append(f"activation clip ratio {cfg.a_clip} is not expressible: the export's dynamic "
                     "activation quantizer uses the full per-token range (clip 1.0)")
    if cfg.a_bits < 16 and getattr(cfg, "a_sink_tokens", 0):
        notes.append(f"a_sink_tokens={cfg.a_sink_tokens} is not expressible: the export quantizes the activations "
                     "of every position, the first ones too")
    if cfg.kv_bits < 16:
        notes.append(f"{cfg.kv_bits}-bit KV cache quantization dropped (--drop-kv-quant); R3 dropped with it")
    if cfg.a_bits < 16 and cfg.a_symmetric:
        notes.append("symmetric activations: compressed-tensors' scale is amax/8 (codes -8..7), ours amax/7")
    if cfg.a_bits < 16 and not cfg.a_symmetric:
        notes.append("asymmetric zero point: compressed-tensors rounds the zero point after computing it "
                     "in its signed code range; ours is rounded half up (ties only)")
    return notes


def _act_args(bits: int, symmetric: bool, group_size: int | None = None) -> dict | None:
    if bits >= 16:
        return None
    args = {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": True,
            "strategy": "token" if group_size is None else "group"}
    if group_size is not None:
        args["group_size"] = group_size
    return args


def quantization_config(cfg, adapter, geo, transform_config: dict | None, weight_only: bool = False) -> dict:
    """The `quantization_config` entry of config.json (validated by compressed-tensors).

    weight_only: no `input_activations` (W4A16), the layout vLLM serves on Hopper (WNA16)."""
    suffixes = _role_suffixes(adapter)
    weights = {"num_bits": cfg.w_bits, "type": "int", "symmetric": True, "dynamic": False,
               "strategy": "channel" if cfg.w_group_size is None else "group"}
    if cfg.w_group_size is not None:
        weights["group_size"] = cfg.w_group_size
    # one config group per distinct activation setting; roles listed as regexes on module names
    groups: dict[tuple, list[str]] = {}
    for role, suffix in suffixes.items():
        bits = 16 if weight_only else int(cfg.a_bits_overrides.get(role, cfg.a_bits))
        group = geo.head_dim if (role == "o" and cfg.o_proj_per_head and bits < 16) else None
        key = json.dumps(_act_args(bits, cfg.a_symmetric, group), sort_keys=True)
        groups.setdefault(key, []).append(suffix)
    config_groups = {}
    for i, (key, sfx) in enumerate(groups.items()):
        pattern = "re:.*\\.(" + "|".join(s.replace(".", "\\.") for s in sfx) + ")$"
        config_groups[f"group_{i}"] = {"targets": [pattern], "weights": dict(weights), "format": "pack-quantized",
                                       "input_activations": json.loads(key), "output_activations": None}
    out = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
           "config_groups": config_groups, "kv_cache_scheme": None, "ignore": [adapter.lm_head],
           "global_compression_ratio": None, "sparsity_config": {}}
    if transform_config:
        out["transform_config"] = transform_config
    return out


def validate_configs(qconfig: dict) -> None:
    """Parse the configs with compressed-tensors' own models (raises on anything it rejects)."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.transform import TransformConfig

    QuantizationConfig.model_validate({k: v for k, v in qconfig.items() if k != "transform_config"})
    if qconfig.get("transform_config"):
        TransformConfig.model_validate(qconfig["transform_config"])


# ---- weights: codes and scales back from the dequantized run -------------------------------
def recover_codes(w: torch.Tensor, bits: int, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [out, in], scale float64 [out, n_groups]) with codes * scale == w (to round-off).

    Each row / group of a symmetric quantized weight is `q * s` with `q` in [-2^(b-1), 2^(b-1)-1];
    its largest magnitude is `|q_max| * s` for some `|q_max|` in 1..2^(b-1). We try each candidate,
    keep the first whose grid reproduces every entry, and raise if none does (not a quantized weight).
    """
    w = w.detach().to(torch.float64)
    out, n = w.shape
    g = n if group_size is None else group_size
    wg = w.reshape(out, n // g, g)
    amax = wg.abs().amax(-1, keepdim=True)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    tol = 1e-5 * amax.clamp_min(torch.finfo(torch.float64).tiny)  # float32 round-off of q * s, with margin
    best_scale = torch.zeros_like(amax)
    found = amax == 0  # an all-zero group: any scale, codes 0
    for k in range(1, 2 ** (bits - 1) + 1):
        s = amax / k
        q = torch.round(wg / torch.where(s > 0, s, torch.ones_like(s)))
        ok = ((q * s - wg).abs() <= tol).all(-1, keepdim=True) & (q >= lo).all(-1, keepdim=True) \
            & (q <= hi).all(-1, keepdim=True)
        take = ok & ~found
        best_scale = torch.where(take, s, best_scale)
        found |= ok
    if not bool(found.all()):
        bad = int((~found).sum())
        raise ExportError(f"{bad} weight row(s)/group(s) do not lie on a {bits}-bit symmetric grid: "
                          "the run folder's weights are not what its dartquant.json says")
    scale = torch.where(amax > 0, best_scale, torch.ones_like(amax))
    codes = torch.round(wg / scale).clamp_(lo, hi).to(torch.int8).reshape(out, n)
    return codes, scale.squeeze(-1)


# ---- transforms ------------------------------------------------------------------------------
def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _transform_scheme(n: int, apply: list[dict], dtype: torch.dtype) -> tuple[dict, torch.Tensor | None]:
    """(scheme dict, unnormalized +-1 matrix to store or None). See the module docstring."""
    from .hadamard import hadamard_matrix

    ours = hadamard_matrix(n, dtype=torch.float64) * math.sqrt(n)
    ours = ours.round()  # exactly +-1
    if _is_pow2(n):
        from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

        theirs = deterministic_hadamard_matrix(n, dtype=torch.float64)
        if not torch.equal(theirs, ours):  # would silently change the function
            raise ExportError(f"compressed-tensors' Sylvester matrix of order {n} differs from ours")
        return {"type": "hadamard", "apply": apply, "precision": "float32"}, ours.to(dtype)
    return {"type": "random-hadamard", "apply": apply, "randomize": False, "precision": "float32"}, ours.to(dtype)


def transform_config(online: dict, adapter, geo, dtype: torch.dtype, first_layer: str):
    """(transform_config dict or None, {state-dict key: stored matrix}); R4 only (see below for R3)."""
    groups, tensors = {}, {}
    if online.get("r4"):
        down = f"{first_layer}.{adapter.mlp}.{adapter.down}"
        scheme, matrix = _transform_scheme(
            geo.intermediate, [{"targets": [f"re:.*\\.{adapter.mlp}\\.{adapter.down}$"], "location": "input"}], dtype)
        groups[R4_SCHEME] = scheme
        tensors[f"{down}.{R4_SCHEME}_input.weight"] = matrix
    # R3 is not exported: it cancels in Q K^T unless K is quantized, and KV quantization is not
    # exported (check_exportable), so dropping it keeps the function exactly.
    return ({"config_groups": groups} if groups else None), tensors


# ---- the export ------------------------------------------------------------------------------
def read_run(run: Path) -> dict:
    from .zoo import read_transform_file

    run = Path(run)
    if not run.is_dir():
        raise ExportError(f"{run} is not a folder; export takes a run folder written by `dartquant quantize --out`")
    spec = read_transform_file(run)
    if spec is None or "quantization" not in spec:
        raise ExportError(f"{run} is not a quantized run folder (no dartquant.json with quantization settings); "
                          "export takes a folder written by `dartquant quantize --out`")
    return spec


def _generation_config(run: Path, model_spec: str) -> Path | None:
    """The run's generation_config.json, else the source model's (runs do not copy it)."""
    from .packages import MissingPackageError
    from .zoo import BUNDLED, ModelLoadError, resolve_model

    candidates = [run]
    try:
        if model_spec not in BUNDLED or BUNDLED[model_spec].installed():  # never convert a GGUF for this
            candidates.append(resolve_model(model_spec, install=False))
    except (ModelLoadError, MissingPackageError, OSError, ValueError):  # source gone / not installed
        pass
    return next((c / "generation_config.json" for c in candidates if (c / "generation_config.json").is_file()), None)


def export_run(run: str | Path, out: str | Path, *, dtype: str = "bfloat16", overwrite: bool = False,
               drop_kv_quant: bool = False, weight_only: bool = False, progress: bool = True) -> dict:
    """Write the compressed-tensors folder `out` for the run folder `run`; return a summary."""
    from safetensors.torch import save_file

    from .adapters import adapter_for
    from .config import RunConfig
    from .runs import atomic_dir, check_out_dir, write_json
    from .zoo import load_model

    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"export dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    run = Path(run)
    spec = read_run(run)
    run_cfg = RunConfig.from_dict(spec["quantization"], where=f"{run}/dartquant.json")
    if spec.get("online", {}).get("blocks"):  # DuQuant's online block rotations: refused, not approximated
        from .methods import METHODS

        why = getattr(METHODS.get(run_cfg.method), "export_refusal", None) or "online block rotations"
        raise ExportError(f"{run} cannot be exported to compressed-tensors: {why}")
    if spec.get("online", {}).get("r1_online"):
        raise ExportError(f"{run} cannot be exported to compressed-tensors yet: its online Hadamards on the q/k/v "
                          "and gate/up inputs (r1_online) are not written as transform_config entries")
    cfg = run_cfg.scheme  # what the export must say: weights / activations / KV cache
    notes = check_exportable(cfg, drop_kv_quant)
    if weight_only:
        notes = [n for n in notes if "activation" not in n]
        notes.append("activation quantization not exported (--weight-only: W4A16, served by vLLM's WNA16)")
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as e:
        raise ExportError("export needs compressed-tensors: pip install 'dartquant[export]'") from e
    out = check_out_dir(out, overwrite)
    if run.resolve() == out.resolve():
        raise ExportError("--out must differ from the run folder")
    t0 = time.perf_counter()
    torch_dtype = getattr(torch, dtype)
    model, tokenizer = load_model(run, dtype=torch.float32)  # the run stores float32: nothing lost
    adapter = adapter_for(model)
    geo = adapter.geometry(model.config)
    first_layer = f"{adapter.layers}.0"
    tconfig, state = transform_config(spec.get("online", {}), adapter, geo, torch_dtype, first_layer)
    qconfig = quantization_config(cfg, adapter, geo, tconfig, weight_only)
    validate_configs(qconfig)

    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    quantized = set()
    for i, layer in enumerate(adapter.layers_of(model)):
        for role, suffix in _role_suffixes(adapter).items():
            name = f"{adapter.layers}.{i}.{suffix}"
            linear = getattr(layer, role)
            codes, scale = recover_codes(linear.weight, cfg.w_bits, cfg.w_group_size)
            state[f"{name}.weight_packed"] = pack_to_int32(codes, cfg.w_bits)
            state[f"{name}.weight_scale"] = scale.to(torch_dtype).contiguous()
            state[f"{name}.weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
            quantized.add(f"{name}.weight")
    for key, tensor in model.state_dict().items():
        if key in quantized or not key.endswith(("weight", "bias")):
            continue
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        state[key] = tensor.detach().to(torch_dtype).contiguous()

    config = model.config.to_dict()
    for key in ("_attn_implementation", "_attn_implementation_autoset", "attn_implementation"):
        config.pop(key, None)
    config["quantization_config"] = qconfig
    config["dtype"] = dtype
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / EXPORT_WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(tmp / "config.json", config)
        tokenizer.save_pretrained(str(tmp))
        generation = _generation_config(run, run_cfg.model)
        if generation is not None:
            shutil.copyfile(generation, tmp / "generation_config.json")
        info = {"source_run": str(run.resolve()), "method": run_cfg.method, "dtype": dtype,
                "w_bits": cfg.w_bits, "a_bits": cfg.a_bits, "kv_bits": cfg.kv_bits,
                "weight_only": weight_only, "online": spec.get("online", {}), "not_expressible": notes,
                "seconds": round(time.perf_counter() - t0, 3)}
        write_json(tmp / EXPORT_INFO_FILE, info)
    info["bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    if progress:
        for n in notes:
            print(f"[dartquant] note: {n}")
    return info


# ---- loading an export -------------------------------------------------------------------------
