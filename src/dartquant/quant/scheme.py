"""`QuantScheme`: what is quantized and how — weights, activations, KV cache.

Defaults follow the papers' W4A4KV4 setting (REFERENCE.md §1): weights 4-bit symmetric per
output channel with MSE clip search and GPTQ (damping 0.01); activations 4-bit asymmetric per
token, clip 0.9, at every decoder linear's input; K and V 4-bit asymmetric in groups of
head_dim, clip 1.0; embeddings and lm_head in full precision. Field names are the flat names of
the command-line flags (`--w-bits`, `--a-clip`, ...). The scheme knows nothing of rotation
methods: the run config (dartquant.config) resolves `w_quantizer` when it is left unset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..adapters import LINEAR_ROLES
from ..typecheck import check_types
from .primitives import QuantSpec

WEIGHT_QUANTIZERS = ("rtn", "gptq")
W_MSE_OBJECTIVES = ("weight", "output", "gptq")
UNQUANTIZED_DTYPES = ("float16", "bfloat16", "float32")
SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


@dataclass
class QuantScheme:
    # weights
    w_bits: int = 4
    w_quantizer: str | None = None  # rtn | gptq; None: gptq for rotation methods, rtn for method rtn
    w_symmetric: bool = True
    w_group_size: int | None = None  # None = per output channel
    w_mse_search: bool = True
    w_mse_grid: int = 20  # clip ratios tried, evenly from 1.0 down to w_mse_min_ratio
    w_mse_min_ratio: float = 0.5
    w_mse_norm: float = 2.0  # the search minimises sum |w - w_hat|^norm: 2 = MSE; 2.4 = GPTQ's / QuaRot's search
    # what the per-row clip search minimises: "weight" (sum |w - w_hat|^w_mse_norm), "output" (the row's
    # output error on the calibration inputs, (w - w_hat) H (w - w_hat)^T with GPTQ's Hessian H, of RTN at
    # each candidate, as AWQ's clip search) or "gptq" (that error of GPTQ's own result at each candidate:
    # one column loop per candidate). The last two need GPTQ and one scale per row.
    w_mse_objective: str = "weight"
    gptq_damp: float = 0.01
    gptq_act_order: bool = False
    gptq_static_groups: bool = False
    gptq_blocksize: int = 128
    gptq_act_quant: bool = False  # quantize activations of earlier layers while collecting Hessians
    # within a block, q/k/v, then o, then gate/up, then down, each from inputs computed with the
    # ones before already quantized (GPTQ's / QuaRot's "true sequential"; one forward per step)
    gptq_true_sequential: bool = False
    # GPTQ against the unquantized-activation output: each linear's Hessian from its 4-bit-quantized
    # inputs and its target weight W C H^-1 (gptq.GPTQ.asymmetric_target), so the weights absorb what
    # they can of the activation quantizer's error ("asymmetric calibration", GPTAQ)
    gptq_asymmetric: bool = False
    # false: q/k/v keep plain GPTQ under gptq_asymmetric. Their outputs go on to the 4-bit K/V
    # quantizer, which the target does not see (RESULTS §25a: not why Qwen collapses with it)
    gptq_asymmetric_qkv: bool = True
    # with gptq_asymmetric: shrink each target towards W by the ridge strength that two-fold
    # cross-validation over the calibration windows picks (gptq.GPTQ._shrunk_target; RESULTS §26c)
    gptq_asymmetric_holdout: bool = False
    # a block's Hessians are collected in passes holding at most this many MB of them (one forward
    # per pass; the results do not change). None: all at once, except on a GPU where they would
    # take more than GPTQ_HESSIAN_SHARE of its free memory (a Mixtral block: 8 experts x 14336^2)
    gptq_hessian_mb: int | None = None
    # activations
    a_bits: int = 4
    a_symmetric: bool = False
    a_clip: float = 0.9
    # one clip ratio per input stream, chosen on calibration data once a block's weights are
    # quantized, on the grid 1.0, 0.95, ... a_clip_search_min (quant/act_clip.py)
    a_clip_search: bool = False
    a_clip_search_min: float = 0.6
    a_clip_search_rows: int = 2048  # rows sampled per stream from the calibration tokens
    a_group_size: int | None = None  # None = per token
    # the first N positions of every sequence skip the decoder linears' input quantizers (the attention
    # sink's massive activations; RESULTS §30). Off by default: the papers' protocol quantizes them.
    a_sink_tokens: int = 0
    o_proj_per_head: bool = False  # o_proj input quantized in groups of head_dim
    a_bits_overrides: dict[str, int] = field(default_factory=dict)  # role -> bits, e.g. {"down": 8}
    # KV cache
    kv_bits: int = 4
    kv_symmetric: bool = False
    kv_clip: float = 1.0
    kv_group_size: int | None = None  # None = head_dim
    # quantize K minus its RoPE'd k_proj bias, added back exactly (modules.AttentionTransform): a
    # large bias (Qwen2.5-1.5B layer 0: |b| 354) otherwise takes the whole 4-bit range (RESULTS §7)
    kv_exclude_k_bias: bool = True
    # keep the K/V of the first N positions of every sequence unquantized (IntactKV's "pivot tokens").
    # Position 0 is the attention sink, where these models put their massive activations (residual
    # norm ~1000 against 12-48 elsewhere on Qwen2.5-Coder-0.5B); with a_sink_tokens it closes ~12 % of
    # QuaRot's W4A4KV4 gap there (RESULTS §30). Off by default: the papers' protocol quantizes it.
    kv_sink_tokens: int = 0
    quantize_lm_head: bool = False  # lm_head weights (RTN) and its input at a_bits, if true
    # embeddings and the unquantized lm_head, stored (and evaluated) in this dtype; the papers keep
    # them 16-bit; float16 (10 mantissa bits) is 8x finer than bfloat16 at their small magnitudes
    unquantized_dtype: str = "float16"

    def __post_init__(self):
        check_types(self)

    @property
    def weight_quantizer(self) -> str:
        if self.w_quantizer is None:
            raise ValueError("w_quantizer is unresolved: RunConfig.resolve() picks it from the method")
        return self.w_quantizer

    def weight_spec(self) -> QuantSpec:
        return QuantSpec(bits=self.w_bits, symmetric=self.w_symmetric, group_size=self.w_group_size,
                         mse_search=self.w_mse_search, mse_grid=self.w_mse_grid, mse_min_ratio=self.w_mse_min_ratio,
                         mse_norm=self.w_mse_norm)

    def act_spec(self, role: str, head_dim: int) -> QuantSpec:
        bits = int(self.a_bits_overrides.get(role, self.a_bits))
        group = head_dim if (role == "o" and self.o_proj_per_head) else self.a_group_size
        return QuantSpec(bits=bits, symmetric=self.a_symmetric, group_size=group, clip_ratio=self.a_clip)

    def kv_spec(self, head_dim: int) -> QuantSpec:
        return QuantSpec(bits=self.kv_bits, symmetric=self.kv_symmetric,
                         group_size=self.kv_group_size or head_dim, clip_ratio=self.kv_clip)

    # ---- checks (before any heavy work) ---------------------------------------------------
    def validate(self, geometry=None) -> None:
        if self.w_quantizer not in (None, *WEIGHT_QUANTIZERS):
            raise ValueError(f"w_quantizer must be one of {WEIGHT_QUANTIZERS}, not {self.w_quantizer!r}")
        for name in ("w_bits", "a_bits", "kv_bits"):
            if getattr(self, name) not in SUPPORTED_BITS:
                raise ValueError(f"{name}={getattr(self, name)} is not supported; use one of {SUPPORTED_BITS} "
                                 "(16 = keep in full precision)")
        for role, bits in self.a_bits_overrides.items():
            if role not in LINEAR_ROLES + ("lm_head",):
                raise ValueError(f"a_bits_overrides: unknown role {role!r}; roles are {', '.join(LINEAR_ROLES)}")
            if bits not in SUPPORTED_BITS:
                raise ValueError(f"a_bits_overrides[{role}]={bits} is not supported; use one of {SUPPORTED_BITS}")
        if self.unquantized_dtype not in UNQUANTIZED_DTYPES:
            raise ValueError(f"unquantized_dtype must be one of {UNQUANTIZED_DTYPES}, not {self.unquantized_dtype!r}")
        if self.a_sink_tokens < 0:
            raise ValueError(f"a_sink_tokens must be >= 0 (0: quantize every position), got {self.a_sink_tokens}")
        if self.kv_sink_tokens < 0:
            raise ValueError(f"kv_sink_tokens must be >= 0 (0: quantize every position), got {self.kv_sink_tokens}")
        if self.kv_sink_tokens and self.kv_bits >= 16:
            raise ValueError("kv_sink_tokens keeps positions out of the K/V quantizer, but the K/V cache is not "
                             "quantized (kv_bits 16): drop kv_sink_tokens or quantize the cache")
        for name in ("a_clip", "kv_clip"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0 < self.a_clip_search_min <= 1 or self.a_clip_search_rows <= 0:
            raise ValueError(f"a_clip_search_min must be in (0, 1] (got {self.a_clip_search_min}) and "
                             f"a_clip_search_rows positive (got {self.a_clip_search_rows})")
        if self.a_clip_search and self.a_bits >= 16 and not any(b < 16 for b in self.a_bits_overrides.values()):
            raise ValueError("a_clip_search chooses activation clip ratios, but no activation is quantized "
                             "(a_bits 16): drop a_clip_search or quantize activations")
        if not 0 < self.w_mse_min_ratio <= 1 or self.w_mse_grid <= 0 or not self.w_mse_norm > 0:
            raise ValueError("w_mse_min_ratio must be in (0, 1], w_mse_grid and w_mse_norm positive")
        if self.w_mse_objective not in W_MSE_OBJECTIVES:
            raise ValueError(f"w_mse_objective must be one of {W_MSE_OBJECTIVES}, not {self.w_mse_objective!r}")
        # (that it needs GPTQ is checked by RunConfig.validate, which knows the method's default quantizer)
        if self.w_mse_objective != "weight" and (self.w_group_size is not None or not self.w_mse_search):
            raise ValueError(f"w_mse_objective: {self.w_mse_objective} searches one clip ratio per weight row: "
                             "it needs w_mse_search true and w_group_size unset (per output channel)")
        if self.gptq_damp <= 0 or self.gptq_blocksize <= 0:
            raise ValueError("gptq_damp and gptq_blocksize must be positive")
        if self.gptq_hessian_mb is not None and self.gptq_hessian_mb <= 0:
            raise ValueError(f"gptq_hessian_mb must be positive (or unset: automatic), got {self.gptq_hessian_mb}")
        if self.gptq_asymmetric_holdout and not self.gptq_asymmetric:
            raise ValueError("gptq_asymmetric_holdout only applies with gptq_asymmetric: true (set both, or drop it)")
        if not self.gptq_asymmetric_qkv and not self.gptq_asymmetric:
            raise ValueError("gptq_asymmetric_qkv: false only applies with gptq_asymmetric: true "
                             "(set both, or drop gptq_asymmetric_qkv)")
        if self.gptq_asymmetric and self.gptq_act_quant:
            raise ValueError("gptq_asymmetric quantizes each linear's own inputs for its Hessian and needs the "
                             "unquantized ones as its target: drop gptq_act_quant")
        if self.gptq_act_order and self.w_group_size and not self.gptq_static_groups:
            raise ValueError("act-order with groups needs static groups (gptq_static_groups: true)")
        if geometry is not None:
            g = geometry
            if self.a_sink_tokens and g.moe_widths:
                raise ValueError("a_sink_tokens is not supported for mixture-of-experts models (their experts see "
                                 "routed tokens, not positions): drop it")
            inputs = [g.hidden, *g.mlp_widths, g.n_heads * g.head_dim]  # every linear's input width
            dims = {"w_group_size": (self.w_group_size, inputs),
                    "a_group_size": (self.a_group_size, inputs),
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
