"""`QuantConfig`: every setting of a quantization run, flat, typed, saved with the run.

A recipe YAML holds any subset of these fields (snake_case or kebab-case keys); command-line
flags override it; the resolved config is written to the run folder as `config.yaml`.
Defaults follow the papers' W4A4KV4 setting (REFERENCE.md §1): weights 4-bit symmetric per
output channel with MSE clip search and GPTQ; activations 4-bit asymmetric per token, clip 0.9,
at every decoder linear's input; K and V 4-bit asymmetric in groups of head_dim, clip 1.0;
embeddings and lm_head in full precision.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..adapters import LINEAR_ROLES
from .primitives import QuantSpec

METHODS = ("rtn", "quarot", "dartquant", "spinquant", "ostquant")
E2E_METHODS = ("spinquant", "ostquant")
WEIGHT_QUANTIZERS = ("rtn", "gptq")
SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


@dataclass
class QuantConfig:
    # what
    model: str = "smollm2-135m"
    method: str = "quarot"  # rotation method: rtn (no rotation), quarot, dartquant, spinquant, ostquant
    rotations: str | None = None  # a rotations .safetensors to use instead of computing them
    seed: int = 0  # seeds the random Hadamard, calibration sampling and training
    r3: bool = True  # online Hadamard on Q/K (for the K cache)
    r4: bool = True  # online Hadamard on the down_proj input
    # weights
    w_bits: int = 4
    w_quantizer: str | None = None  # rtn | gptq; None: gptq for rotation methods, rtn for method rtn
    w_symmetric: bool = True
    w_group_size: int | None = None  # None = per output channel
    w_mse_search: bool = True
    w_mse_grid: int = 20  # clip ratios tried, evenly from 1.0 down to w_mse_min_ratio
    w_mse_min_ratio: float = 0.5
    gptq_damp: float = 0.01
    gptq_act_order: bool = False
    gptq_static_groups: bool = False
    gptq_blocksize: int = 128
    gptq_act_quant: bool = False  # quantize activations of earlier layers while collecting Hessians
    # activations
    a_bits: int = 4
    a_symmetric: bool = False
    a_clip: float = 0.9
    a_group_size: int | None = None  # None = per token
    o_proj_per_head: bool = False  # o_proj input quantized in groups of head_dim
    a_bits_overrides: dict = field(default_factory=dict)  # role -> bits, e.g. {"down": 8}
    # KV cache
    kv_bits: int = 4
    kv_symmetric: bool = False
    kv_clip: float = 1.0
    kv_group_size: int | None = None  # None = head_dim
    kv_exclude_k_bias: bool = True  # quantize K minus its RoPE'd k_proj bias (Qwen2; modules.AttentionTransform)
    quantize_lm_head: bool = False  # lm_head weights (RTN) and its input at a_bits, if true
    # calibration data
    calib_corpus: str = "wiki"
    calib_samples: int = 32
    calib_seqlen: int = 2048
    # DartQuant (method dartquant)
    dq_r1_lr: float = 1e-3
    dq_r2_lr: float = 1e-3
    dq_epochs: int = 10
    dq_batch_tokens: int = 4096
    dq_token_fraction: float = 0.1
    dq_loss: str = "whip"
    dq_param: str = "qr"
    dq_optimizer: str = "sgd"
    dq_r2_normalize: str = "none"
    dq_lr_grid: list = field(default_factory=list)  # non-empty: fit R1 / R2 at each lr, keep the best held-out
    # SpinQuant / OSTQuant (end-to-end training; defaults: SpinQuant's published schedule)
    e2e_steps: int = 100
    e2e_batch: int = 8  # sequences per optimizer step
    e2e_micro_batch: int = 1  # sequences per forward/backward (gradients accumulate)
    e2e_seqlen: int = 2048
    e2e_samples: int | None = None  # distinct training sequences; None = steps x batch
    e2e_eval_samples: int = 2  # held-out calibration sequences scored before/after training
    e2e_lr: float = 1.5  # Cayley SGD on R1/R2
    e2e_momentum: float = 0.0
    e2e_scale_lr: float = 1e-2  # Adam on OSTQuant's log-scales
    e2e_kl_topk: int = 1024  # OSTQuant's KL-Top: teacher's top-k vocabulary entries
    e2e_w_bits: int | None = None  # weight bits while training; None: 16 before GPTQ, else w_bits
    e2e_checkpointing: bool = True
    e2e_amp: str = "auto"  # training matmuls: bf16 autocast ("bf16"), fp32 ("off"); auto = bf16 on CUDA
    # evaluation
    eval_seqlen: int = 2048
    eval_max_windows: int | None = None
    tasks: list = field(default_factory=list)  # zero-shot tasks; empty = none
    zeroshot_limit: int | None = None
    # quality guard (quant/guard.py): FP vs quantized on held-out calibration text
    guard_windows: int = 4  # windows of calib_seqlen tokens; 0 = no check
    guard_max_ppl_ratio: float = 3.0  # above: "collapsed" (docs/RESULTS.md, Quality guard)
    fail_on_collapse: bool = True  # CLI: exit status 3 on a collapsed verdict
    # where
    device: str = "cpu"
    dtype: str = "float32"

    # ---- derived -----------------------------------------------------------------------
    @property
    def weight_quantizer(self) -> str:
        return self.w_quantizer or ("rtn" if self.method == "rtn" else "gptq")

    @property
    def train_w_bits(self) -> int:
        """Weight bits during end-to-end training: 16 when GPTQ follows (as SpinQuant does)."""
        if self.e2e_w_bits is not None:
            return self.e2e_w_bits
        return 16 if self.weight_quantizer == "gptq" else self.w_bits

    @property
    def rotated(self) -> bool:
        return self.method != "rtn" or self.rotations is not None

    def weight_spec(self) -> QuantSpec:
        return QuantSpec(bits=self.w_bits, symmetric=self.w_symmetric, group_size=self.w_group_size,
                         mse_search=self.w_mse_search, mse_grid=self.w_mse_grid,
                         mse_min_ratio=self.w_mse_min_ratio)

    def act_spec(self, role: str, head_dim: int) -> QuantSpec:
        bits = int(self.a_bits_overrides.get(role, self.a_bits))
        group = head_dim if (role == "o" and self.o_proj_per_head) else self.a_group_size
        return QuantSpec(bits=bits, symmetric=self.a_symmetric, group_size=group, clip_ratio=self.a_clip)

    def kv_spec(self, head_dim: int) -> QuantSpec:
        return QuantSpec(bits=self.kv_bits, symmetric=self.kv_symmetric,
                         group_size=self.kv_group_size or head_dim, clip_ratio=self.kv_clip)

    # ---- checks (run before any heavy work) ---------------------------------------------
    def validate(self, geometry=None) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.w_quantizer not in (None, *WEIGHT_QUANTIZERS):
            raise ValueError(f"w_quantizer must be one of {WEIGHT_QUANTIZERS}, not {self.w_quantizer!r}")
        for name in ("w_bits", "a_bits", "kv_bits"):
            if getattr(self, name) not in SUPPORTED_BITS:
                raise ValueError(f"{name}={getattr(self, name)} is not supported; use one of {SUPPORTED_BITS} "
                                 "(16 = keep in full precision)")
        for role, bits in self.a_bits_overrides.items():
            if role not in LINEAR_ROLES + ("lm_head",):
                raise ValueError(f"a_bits_overrides: unknown role {role!r}; roles are {', '.join(LINEAR_ROLES)}")
            if int(bits) not in SUPPORTED_BITS:
                raise ValueError(f"a_bits_overrides[{role}]={bits} is not supported; use one of {SUPPORTED_BITS}")
        for name in ("a_clip", "kv_clip"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.calib_samples <= 0 and (self.weight_quantizer == "gptq" or self.method == "dartquant"):
            raise ValueError("calib_samples must be positive: GPTQ and DartQuant need calibration data")
        if self.guard_windows < 0 or not self.guard_max_ppl_ratio >= 1:
            raise ValueError("guard_windows must be >= 0 and guard_max_ppl_ratio >= 1")
        if self.calib_seqlen < 2 or self.eval_seqlen < 2:
            raise ValueError("sequence lengths must be at least 2")
        if not isinstance(self.dq_lr_grid, (list, tuple)) or not all(
                isinstance(lr, (int, float)) and lr > 0 for lr in self.dq_lr_grid):
            raise ValueError(f"dq_lr_grid must be a list of positive learning rates, got {self.dq_lr_grid!r}")
        if self.method in E2E_METHODS:
            from ..calib.e2e import E2EConfig  # the training settings check themselves

            E2EConfig.from_quant_config(self).validate()
            if self.e2e_seqlen < 2 or (self.e2e_samples is not None and self.e2e_samples <= 0):
                raise ValueError("e2e_seqlen must be at least 2 and e2e_samples positive")
            if self.e2e_w_bits is not None and self.e2e_w_bits not in SUPPORTED_BITS:
                raise ValueError(f"e2e_w_bits={self.e2e_w_bits} is not supported; use one of {SUPPORTED_BITS}")
        if self.gptq_act_order and self.w_group_size and not self.gptq_static_groups:
            raise ValueError("act-order with groups needs static groups (gptq_static_groups: true)")
        if self.tasks:
            import importlib.util

            if importlib.util.find_spec("lm_eval") is None:
                raise ValueError("zero-shot tasks need lm-evaluation-harness: pip install 'dartquant[eval]' "
                                 "(or run without --tasks)")
            from ..eval.zeroshot import SUPPORTED_TASKS

            unknown = [t for t in self.tasks if t not in SUPPORTED_TASKS]
            if unknown:
                raise ValueError(f"unknown zero-shot task(s) {unknown}; supported: {', '.join(SUPPORTED_TASKS)}")
        if geometry is not None:
            g = geometry
            dims = {"w_group_size": (self.w_group_size, [g.hidden, g.intermediate, g.n_heads * g.head_dim]),
                    "a_group_size": (self.a_group_size, [g.hidden, g.intermediate, g.n_heads * g.head_dim]),
                    "kv_group_size": (self.kv_group_size, [g.head_dim])}
            for name, (size, ds) in dims.items():
                if size is None or size == -1:
                    continue
                if size <= 0:
                    raise ValueError(f"{name} must be positive (or null for per-channel/per-token), got {size}")
                bad = [d for d in ds if d % size]
                if bad:
                    raise ValueError(f"{name}={size} does not divide the model dimension(s) {bad}; "
                                     f"choose a divisor of {', '.join(map(str, ds))}")

    # ---- I/O -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        norm = {k.replace("-", "_"): v for k, v in d.items()}
        unknown = set(norm) - cls.field_names()
        if unknown:
            raise ValueError(f"unknown recipe keys: {', '.join(sorted(unknown))}")
        return cls(**norm)

    @classmethod
    def from_yaml(cls, path: str | Path) -> QuantConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"recipe {path} must be a mapping of settings")
        return cls.from_dict(data)
