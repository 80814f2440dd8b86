"""The run configuration: nested, typed, and checked once, before any model work.

    RunConfig
      model, method, rotations, seed, r1, r3, r4, qk_balance,
      device, dtype                                               what, and where it runs
      stream, shard_mb                                            layer streaming (stream/)
      scheme: QuantScheme     weights / activations / KV cache            (quant/scheme.py)
      data:   DataConfig      calibration text
      eval:   EvalConfig      perplexity and zero-shot
      <method sections>       the settings a registered method owns, e.g.
                              dartquant: DartQuantConfig, e2e: E2EConfig  (methods/)

Every leaf also has one *flat* name, which is its command-line flag (`--w-bits`,
`--calib-samples`, `--dq-r1-lr`, `--e2e-steps`, `--eval-max-windows`): the section's prefix plus
the field name (the scheme's fields are flat already). A recipe YAML may be nested as above or
use flat names, or mix them; flags override it. Types are checked against the dataclass
annotations (a boolean only as a boolean, an int not as "4" or 4.5, ...), and an unknown key
fails with the nearest valid ones. The resolved config is written to the run folder as
`config.yaml` (nested) and reads back to the same object.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data import EVAL_CORPORA
from .methods import METHODS, get_method, option_sections
from .quant.scheme import QuantScheme
from .typecheck import check_type, check_types


@dataclass
class DataConfig:
    corpus: str = "wiki"  # calibration text: wiki | c4 (first half of each corpus; evaluation uses the second)
    samples: int = 32  # windows the rotations' calibration and the Q/K balance see
    seqlen: int = 2048
    # windows the quantize stage sees (GPTQ's Hessians, the activation clip search); None = samples. The
    # calibration's windows are the first `samples` of the same draw, so they do not change with it.
    quantize_samples: int | None = None

    def __post_init__(self):
        check_types(self)

    @property
    def windows(self) -> int:
        """How many calibration windows a run draws: enough for both uses."""
        return max(self.samples, self.quantize_samples or 0)

    @property
    def quantize_windows(self) -> int:
        return self.samples if self.quantize_samples is None else self.quantize_samples


@dataclass
class EvalConfig:
    seqlen: int = 2048
    max_windows: int | None = None  # perplexity windows per corpus; None = all held-out windows
    corpora: list[str] = field(default_factory=lambda: list(EVAL_CORPORA))  # perplexity corpora (wiki, c4)
    tasks: list[str] = field(default_factory=list)  # zero-shot tasks; empty = none
    zeroshot_limit: int | None = None
    # quality guard (quant/guard.py): FP vs quantized on held-out calibration text
    guard_windows: int = 4  # windows of calib_seqlen tokens; 0 = no check
    guard_max_ppl_ratio: float = 3.0  # above: "collapsed" (docs/RESULTS.md §7)
    fail_on_collapse: bool = True  # CLI: exit status 3 on a collapsed verdict

    def __post_init__(self):
        check_types(self)


# section -> (dataclass, flat-name prefix); flat names that do not follow the rule
_FIXED_SECTIONS = {"scheme": (QuantScheme, ""), "data": (DataConfig, "calib"), "eval": (EvalConfig, "eval")}
_FLAT_EXCEPTIONS = {("eval", name): name for name in ("tasks", "zeroshot_limit", "guard_windows",
                                                      "guard_max_ppl_ratio", "fail_on_collapse")}
_TOP = ("model", "method", "rotations", "seed", "r1", "r1_online", "r3", "r4", "qk_balance", "device", "dtype",
        "stream", "shard_mb")
DTYPES = ("float32", "float64", "bfloat16", "float16")


def sections() -> dict[str, tuple[type, str]]:
    return {**_FIXED_SECTIONS, **option_sections()}


def flat_name(section: str, name: str) -> str:
    if (section, name) in _FLAT_EXCEPTIONS:
        return _FLAT_EXCEPTIONS[(section, name)]
    prefix = sections()[section][1]
    return f"{prefix}_{name}" if prefix else name


@dataclass
class RunConfig:
    model: str = "smollm2-135m"
    method: str = "quarot"  # a registered method: rtn (no rotation), quarot, dartquant, spinquant, ostquant, dfrot
    rotations: str | None = None  # a rotations .safetensors to use instead of computing them
    seed: int = 0  # seeds the random Hadamard, calibration sampling and training
    r1: bool = True  # rotate the residual stream; false keeps R2/R3/R4 only (Gemma 3 cannot carry R1)
    r1_online: bool = False  # with r1 false: Hadamards on the q/k/v and gate/up inputs, online (R1's job, unfolded)
    r3: bool = True  # online Hadamard on Q/K (for the K cache)
    r4: bool | None = None  # online Hadamard on the down_proj input; None: the method's default (True but for duquant)
    # a diagonal Q/K scaling (RoPE pairs tied) from calibration statistics that gives q and k the same energy per
    # channel pair, so the 4-bit K cache loses less (calib/qk_balance.py); folded into q_proj / k_proj
    qk_balance: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    stream: str = "auto"  # layer streaming (stream/): auto | true | false; auto streams a model too big for memory
    shard_mb: int = 2048  # a streamed run's checkpoint: shards of about this many MB (one file if it fits)
    scheme: QuantScheme = field(default_factory=QuantScheme)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    options: dict = field(default_factory=dict)  # method section name -> its settings (all registered)

    def __post_init__(self):
        check_types(self)
        if self.r4 is None:  # an unknown method is reported by validate()
            self.r4 = METHODS[self.method].default_r4 if self.method in METHODS else True
        for name, (cls, _) in option_sections().items():
            self.options.setdefault(name, cls())

    # ---- access --------------------------------------------------------------------------
    def section(self, name: str):
        if name in _FIXED_SECTIONS:
            return getattr(self, name)
        if name not in self.options:
            raise KeyError(f"no config section {name!r}; sections: {', '.join(sections())}")
        return self.options[name]

    def with_section(self, name: str, **changes) -> RunConfig:
        """A copy with some fields of one section replaced."""
        new = dataclasses.replace(self, options=dict(self.options))
        if name in _FIXED_SECTIONS:
            setattr(new, name, dataclasses.replace(getattr(self, name), **changes))
        else:
            new.options[name] = dataclasses.replace(self.options[name], **changes)
        return new

    @property
    def method_spec(self):
        return get_method(self.method)

    @property
    def rotated(self) -> bool:
        return self.method_spec.rotates or self.rotations is not None

    def resolve(self) -> RunConfig:
        """Fill what defaults to "depends on the method": GPTQ weights for rotation methods, RTN for rtn."""
        if self.scheme.w_quantizer is None:
            self.scheme.w_quantizer = "gptq" if self.method_spec.rotates else "rtn"
        return self

    # ---- checks (run before any heavy work) ---------------------------------------------
    def validate(self, geometry=None) -> None:
        get_method(self.method)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.stream not in ("auto", "true", "false") or self.shard_mb <= 0:
            raise ValueError(f"stream must be auto, true or false (got {self.stream!r}) and shard_mb positive")
        self.scheme.validate(geometry)
        if not self.r1 and self.method_spec.rotates and not self.method_spec.r1_optional and not self.rotations:
            from .methods import METHODS

            able = [m.name for m in METHODS.values() if m.r1_optional]
            raise ValueError(f"r1: false (no residual-stream rotation) is supported by {', '.join(able)}, "
                             f"not by {self.method}: its other rotations are calibrated together with R1")
        if self.r1_online and (self.r1 or not self.method_spec.r1_optional) and not self.rotations:
            raise ValueError("r1_online (online Hadamards on the q/k/v and gate/up inputs) stands in for R1: use it "
                             "with r1: false (--r1 false) and a method that runs without R1 (quarot)")
        if self.qk_balance:
            self._check_qk_balance(geometry)
        for section in self.options.values():
            if hasattr(section, "validate"):
                section.validate()
        quantizer = self.scheme.w_quantizer or ("gptq" if self.method_spec.rotates else "rtn")
        if quantizer == "rtn" and self.scheme.w_mse_objective != "weight":
            how = "--w-quantizer rtn" if self.scheme.w_quantizer else f"method {self.method}'s default"
            raise ValueError(f"w_mse_objective: {self.scheme.w_mse_objective} weighs the clip search by GPTQ's Hessian, but "
                             f"the weights are quantized by RTN ({how}): use --w-quantizer gptq, or drop it")
        needs_data = (quantizer == "gptq" or self.qk_balance
                      or (self.method_spec.needs_calib_windows and not self.rotations))
        if self.data.samples <= 0 and needs_data:
            raise ValueError("calib_samples must be positive: GPTQ, DartQuant and the Q/K balance need "
                             "calibration data")
        if self.data.quantize_samples is not None and self.data.quantize_samples <= 0:
            raise ValueError(f"calib_quantize_samples must be positive (or null: calib_samples), got "
                             f"{self.data.quantize_samples}")
        if self.data.quantize_samples is not None and quantizer != "gptq" and not self.scheme.a_clip_search:
            raise ValueError("calib_quantize_samples sets the windows of GPTQ and the activation clip search, and this "
                             "run uses neither: use --w-quantizer gptq or --a-clip-search true, or drop it")
        if self.data.seqlen < 2 or self.eval.seqlen < 2:
            raise ValueError("sequence lengths must be at least 2")
        if self.eval.max_windows is not None and self.eval.max_windows <= 0:
            raise ValueError(f"eval_max_windows must be at least 1 (or null for all), got {self.eval.max_windows}")
        if not self.eval.corpora or len(set(self.eval.corpora)) != len(self.eval.corpora) or \
                set(self.eval.corpora) - set(EVAL_CORPORA):
            raise ValueError(f"eval_corpora must be one or more distinct of {', '.join(EVAL_CORPORA)}, "
                             f"got {self.eval.corpora}")
        if self.eval.zeroshot_limit is not None and self.eval.zeroshot_limit <= 0:
            raise ValueError(f"zeroshot_limit must be at least 1 (or null for all), got {self.eval.zeroshot_limit}")
        if self.eval.guard_windows < 0 or not self.eval.guard_max_ppl_ratio >= 1:
            raise ValueError("guard_windows must be >= 0 and guard_max_ppl_ratio >= 1")
        if self.eval.tasks:
            import importlib.util

            if importlib.util.find_spec("lm_eval") is None:
                raise ValueError("zero-shot tasks need lm-evaluation-harness: pip install 'dartquant[eval]' "
                                 "(or run without --tasks)")
            from .eval.zeroshot import SUPPORTED_TASKS

            unknown = [t for t in self.eval.tasks if t not in SUPPORTED_TASKS]
            if unknown:
                raise ValueError(f"unknown zero-shot task(s) {unknown}; supported: {', '.join(SUPPORTED_TASKS)}")

    def _check_qk_balance(self, geometry) -> None:
        if self.scheme.kv_bits >= 16:
            raise ValueError("qk_balance evens out what the 4-bit K cache sees, but the K/V cache is not quantized "
                             "(kv_bits 16): drop qk_balance or quantize the cache")
        if not self.method_spec.rotates and not self.rotations:
            raise ValueError(f"qk_balance is folded with a method's transforms; method {self.method} has none: use a "
                             "rotating method (e.g. quarot)")
        if self.method_spec.trains_scalings and not self.rotations:
            raise ValueError(f"qk_balance: method {self.method} trains its own Q/K scaling end to end; drop qk_balance")
        if geometry is not None and geometry.head_dim % 2:
            raise ValueError(f"qk_balance ties the two channels of each RoPE pair: head_dim {geometry.head_dim} is odd")

    # ---- I/O -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Nested, as config.yaml stores it."""
        out = {k: getattr(self, k) for k in _TOP}
        for name in _FIXED_SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        for name, opts in self.options.items():
            out[name] = dataclasses.asdict(opts)
        return out

    @classmethod
    def flat_fields(cls) -> dict[str, tuple[str | None, dataclasses.Field]]:
        """flat name -> (section or None for top level, the dataclass field)."""
        out = {f.name: (None, f) for f in dataclasses.fields(cls) if f.name in _TOP}
        for sec, (dc, _) in sections().items():
            for f in dataclasses.fields(dc):
                out[flat_name(sec, f.name)] = (sec, f)
        return out

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> RunConfig:
        """From nested and/or flat keys (kebab-case accepted); every value type-checked."""
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be a mapping of settings, got {type(d).__name__}")
        flat = cls.flat_fields()
        secs = sections()
        top: dict = {}
        per_section: dict[str, dict] = {s: {} for s in secs}
        for key, value in d.items():
            k = str(key).replace("-", "_")
            if k in secs and isinstance(value, dict):
                dc = secs[k][0]
                names = {f.name: f for f in dataclasses.fields(dc)}
                for sub, v in value.items():
                    sk = str(sub).replace("-", "_")
                    if sk not in names:
                        raise ValueError(_unknown(f"{k}.{sk}", [f"{k}.{n}" for n in names], where))
                    per_section[k][sk] = check_type(f"{k}.{sk}", v, names[sk].type, dc)
            elif k in flat:
                sec, f = flat[k]
                owner = cls if sec is None else secs[sec][0]
                v = check_type(k, value, f.type, owner)
                (top if sec is None else per_section[sec])[f.name] = v
            else:
                raise ValueError(_unknown(k, list(flat) + list(secs), where))
        cfg = cls(**top)
        for sec, values in per_section.items():
            if values:
                if sec in _FIXED_SECTIONS:
                    setattr(cfg, sec, secs[sec][0](**values))
                else:
                    cfg.options[sec] = secs[sec][0](**values)
        return cfg

    @classmethod
    def from_flat(cls, **settings) -> RunConfig:
        """RunConfig.from_flat(w_bits=8, dq_r1_lr=0.1, ...): keyword arguments by flat name (or section)."""
        return cls.from_dict(settings, where="settings")

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(load_yaml(path), where=f"recipe {path}")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-3 (no dot) as a string; recipes mean a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    __import__("re").compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_yaml(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    try:
        return yaml.load(path.read_text(), Loader=_Loader) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {path} is not valid YAML: {e}") from e


def _unknown(key: str, valid: list[str], where: str) -> str:
    near = difflib.get_close_matches(key, valid, n=3)
    hint = f" (did you mean {', '.join(near)}?)" if near else ""
    return f"{where}: unknown key {key!r}{hint}. Valid keys: {', '.join(sorted(valid))}"


__all__ = ["RunConfig", "DataConfig", "EvalConfig", "QuantScheme", "METHODS", "flat_name", "sections"]
