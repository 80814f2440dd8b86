"""Weight quantization of every decoder linear: RTN, or GPTQ layer by layer.

GPTQ sees the model as it will run: rotated, with the online R4 in front of down_proj (the
Hessian is collected from the exact input of each matmul, via QLinear.input_observer). By
default activations are *not* quantized while Hessians are collected (`gptq_act_quant`
false), as in QuaRot's and SpinQuant's pipelines, whose published numbers we compare against;
either way, each block's inputs are the outputs of the already-quantized blocks before it.
By default all linears of a block are quantized from one pass, which takes a quarter of the
calibration forwards; `gptq_true_sequential` quantizes them in SEQUENTIAL_STEPS instead (q/k/v,
then o, then gate/up, then down), each step's Hessians collected by a forward in which the
earlier steps' linears are already quantized, as the GPTQ paper and QuaRot do. A Hessian forward stops each block
call once the pass's linears have seen their inputs (`GPTQ_STOP_EARLY`): the q/k/v step never runs attention, the
o step never runs the MLP, so the four steps cost about one block's forward, not four. On a GPU the
calibration windows go through a block several per call (layerwise.forward_plan; the Hessian is
a token average, so only roundoff changes; the CPU path is unchanged). Linears that read the very same input tensor (q/k/v, gate/up, when
no per-linear quantizer or rotation sits in between) share one Hessian: the same matrix, built
once (`_SharedHessians`), so the result is bitwise what separate accumulators give.

Mixtures of experts: every expert's linears are quantized on their own, GPTQ's Hessian built
from the tokens routed to that expert only (its QLinear sees nothing else). An expert that no
calibration token reaches has no Hessian: it falls back to RTN, and its linears are logged
and listed in `rtn_fallbacks`. A Mixtral block's Hessians take 7 GB (8 experts' down_proj at
14336^2 in float32): when they would not fit a share of the GPU's free memory (or above
`gptq_hessian_mb`), a step's Hessians are collected in several forwards, each for a part of its
linears, and every result is committed after the last: each forward sees the same block, so the
codes are those of one pass (tested), at the cost of the extra forwards.

Every quantized weight is replaced by `QuantizedTensor.dequantize()`, so what is evaluated is
bit for bit what the checkpoint's integer codes and scales reload to.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import ModelAdapter, adapter_for
from ..layerwise import StopBlock, forward_plan, iterate_blocks
from ..log import log
from ..modules import as_qlinear
from .act import set_act_quant_enabled_
from .act_clip import ClipSearchRecord, stream_of
from .scheme import QuantScheme
from .gptq import GPTQ
from .primitives import QuantizedTensor, fake_quantize
from ..transforms.fuse import split_experts_


def _on_cpu(qt: QuantizedTensor) -> QuantizedTensor:
    return QuantizedTensor(qt.codes.cpu(), qt.scale.cpu(), qt.zero.cpu(), qt.spec, qt.shape)


class _SharedHessians:
    """One GPTQ accumulator per distinct input tensor of a block.

    A role's first observed input decides its accumulator: the one that has just consumed that
    very tensor object (q after the attention norm, then k and v on the same tensor), else a new
    one. A role that shares skips the add for a tensor its accumulator has already taken."""

    def __init__(self, holdout: bool = False):
        self.holdout = holdout  # asymmetric targets: keep every second window apart (GPTQ holdout)
        self.of_role: dict[str, GPTQ] = {}
        self._last: dict[int, torch.Tensor] = {}  # id(solver) -> last input it took (kept alive)
        self._newest: tuple[torch.Tensor, GPTQ] | None = None

    def observer(self, role: str, in_features: int, device, quantizer=None):
        """`quantizer` (asymmetric GPTQ): the linear's input quantizer, switched off during the
        forward; the Hessian then takes its output and the cross term the unquantized input."""
        def observe(x: torch.Tensor) -> None:
            solver = self.of_role.get(role)
            if solver is None:
                if self._newest is not None and self._newest[0] is x:
                    solver = self._newest[1]
                else:
                    solver = GPTQ(in_features, device=device, holdout=self.holdout and quantizer is not None)
                self.of_role[role] = solver
            if self._last.get(id(solver)) is x:
                return
            if quantizer is None:
                solver.add_batch(x)
            else:
                solver.add_batch(fake_quantize(x, quantizer.spec), reference=x)
            self._last[id(solver)] = x
            self._newest = (x, solver)

        return observe

    def free(self) -> None:
        for solver in self.of_role.values():
            solver.free()
        self._last.clear()
        self._newest = None


@torch.no_grad()
def quantize_weights_(model: nn.Module, scheme: QuantScheme, calib_ids: torch.Tensor | None = None,
                      adapter: ModelAdapter | None = None, progress: bool = True,
                      device: str = "cpu", rtn_fallbacks: list[str] | None = None,
                      clip_search: ClipSearchRecord | None = None, seed: int = 0) -> dict[str, QuantizedTensor]:
    """Quantize all decoder linears in place; returns {param name prefix: QuantizedTensor}.

    `rtn_fallbacks`, if given, receives the names of GPTQ linears that saw no calibration token
    (MoE experts nobody was routed to) and were quantized by RTN instead. With
    `scheme.a_clip_search`, each block's activation clip ratios are chosen right after its weights
    (before them under gptq_asymmetric: clip_search_first; quant/act_clip.py, sampled with `seed`),
    recorded in `clip_search` (a new record if None)."""
    adapter = adapter or adapter_for(model)
    split_experts_(model, adapter)  # MoE: one linear per expert
    spec = scheme.weight_spec()
    quantize = spec.bits < 16
    if not quantize and not scheme.a_clip_search:
        return {}
    names = {m: n for n, m in model.named_modules()}
    out: dict[str, QuantizedTensor] = {}

    def name_of(module: nn.Module) -> str:
        if module not in names:  # wrapped into a QLinear after `names` was built
            names.update({m: n for n, m in model.named_modules()})
        return names[module]

    def commit(linear: nn.Module, qt: QuantizedTensor) -> None:
        linear.weight.data.copy_(qt.dequantize().to(linear.weight.device, linear.weight.dtype))
        out[name_of(linear)] = qt

    if scheme.quantize_lm_head and quantize:  # RTN: GPTQ on a 49k-150k-row head costs more than it is worth here
        head = adapter.head(model)
        commit(head, QuantizedTensor.from_float(head.weight.data.float(), spec))
    clip_search = clip_search if clip_search is not None else ClipSearchRecord()
    gptq = quantize and scheme.weight_quantizer == "gptq"
    if not gptq:
        for layer in adapter.layers_of(model) if quantize else ():
            for linear in layer.linears().values():
                commit(linear, QuantizedTensor.from_float(linear.weight.data.float(), spec))
        if not scheme.a_clip_search:
            return out

    if calib_ids is None:
        raise ValueError("GPTQ and the activation clip search need calibration sequences")
    set_act_quant_enabled_(model, scheme.gptq_act_quant)
    unrouted: list[str] = []
    # on a GPU several windows per block call, states kept there if they fit (the CPU: as before)
    batch, resident = forward_plan(adapter.geometry(model.config), *calib_ids.shape,
                                   next(model.parameters()).dtype, device)
    try:
        for i, block, forward in iterate_blocks(model, adapter, calib_ids, device, progress,
                                                desc="GPTQ" if gptq else "clip search", batch=batch, resident=resident):
            unrouted += quantize_block_(block, adapter, forward, scheme, commit, name_of, gptq=gptq,
                                        clip_search=clip_search, layer=i, total_tokens=calib_ids.numel(), seed=seed)
            forward(update=True)
    finally:
        set_act_quant_enabled_(model, True)
    if unrouted:
        log.warning("GPTQ: %d expert linears received no calibration tokens and were quantized by RTN: %s",
                    len(unrouted), ", ".join(unrouted))
    if rtn_fallbacks is not None:
        rtn_fallbacks.extend(unrouted)
    return out


# true-sequential order: the linears of a step read inputs that depend only on earlier steps
SEQUENTIAL_STEPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))
# automatic Hessian budget on a GPU: this share of its free memory (GPTQ's solver needs about two
# more copies of the largest Hessian, and the block's forward its activations)
GPTQ_HESSIAN_SHARE = 0.4
# a Hessian forward ends once the step's linears have seen their inputs (_StopAfterInputs); False: whole blocks
GPTQ_STOP_EARLY = True


class _StopAfterInputs:
    """Ends each block call of a GPTQ Hessian forward (layerwise.StopBlock) once every linear of the pass has
    observed its input in that call: what the block computes after the pass's last input is discarded anyway
    (the forward does not update the stored states). True-sequential GPTQ runs four such forwards a block; its
    q / k / v step then stops at their input, o's before the MLP. A call in which some linear sees nothing (an
    expert no token was routed to) runs to the end. Same inputs, same Hessians, bit for bit."""

    def __init__(self, block: nn.Module, roles: list[str]):
        self.roles, self.pending = set(roles), set(roles)
        self.handle = block.register_forward_pre_hook(self._new_call)

    def _new_call(self, _module, _args) -> None:
        self.pending = set(self.roles)

    def wrap(self, role: str, observe):
        def observed(x: torch.Tensor) -> None:
            observe(x)
            self.pending.discard(role)
            if not self.pending:
                raise StopBlock

        return observed

    def close(self) -> None:
        self.handle.remove()


def _steps(keys: list[str], true_sequential: bool) -> list[list[str]]:
    """The linears' keys (a role, or "experts.<e>.<role>", "shared.<role>") grouped into the forwards
    that collect their Hessians: all in one, or one group per SEQUENTIAL_STEPS entry."""
    if not true_sequential:
        return [keys]
    steps = [[k for k in keys if k.rsplit(".", 1)[-1] in roles] for roles in SEQUENTIAL_STEPS]
    return [s for s in steps if s]


def _hessian_budget(scheme: QuantScheme, device: torch.device) -> float:
    """Bytes of Hessians one forward may collect (see gptq_hessian_mb)."""
    if scheme.gptq_hessian_mb is not None:
        return scheme.gptq_hessian_mb * 2**20
    if device.type == "cuda":
        return GPTQ_HESSIAN_SHARE * torch.cuda.mem_get_info(device)[0]
    return float("inf")


def _passes(step: list[str], in_features: dict[str, int], budget: float, matrices: int = 1) -> list[list[str]]:
    """`step`'s linears split into forwards whose Hessians (float32, in^2 each, `matrices` of them
    per input: 2 with asymmetric GPTQ's cross term, 4 with its holdout) fit `budget`
    bytes; linears reading one input (q/k/v, an expert's gate/up) stay together, since they share
    one Hessian; a group larger than the budget gets a forward of its own."""
    group_of = {key: stream_of(key) for key in step}  # the input tensor a linear reads (act_clip.py)
    pass_of, n, size = {}, 0, 0.0
    for key in step:  # groups in order of first appearance
        group = group_of[key]
        if group in pass_of:
            continue
        need = 4.0 * matrices * in_features[key] ** 2
        if size and size + need > budget:
            n, size = n + 1, 0.0
        pass_of[group] = n
        size += need
    return [[k for k in step if pass_of[group_of[k]] == i] for i in range(n + 1)]  # each in step's order


def clip_search_first(scheme: QuantScheme) -> bool:
    """Whether a block's activation clip search runs before its GPTQ rather than after.

    After, by default: each stream's ratio is chosen for the quantized weights that will read it.
    Before, under `gptq_asymmetric`: its weights are fitted to the activation quantizer's error at
    the ratio the quantizer has during GPTQ, so a ratio changed afterwards voids the fit (and the
    search, which scores ||(Q_c(x) - x) W_q^T||, takes x W_q^T for the output to keep, where the fit
    aimed at x W^T). The search then scores the block's unquantized weights and GPTQ fits the
    quantizer it chose."""
    return scheme.a_clip_search and scheme.gptq_asymmetric


def quantize_block_(block: nn.Module, adapter: ModelAdapter, forward, scheme: QuantScheme, commit, name_of, *,
                    gptq: bool, clip_search: ClipSearchRecord, layer: int, total_tokens: int, seed: int,
                    gptq_forward=None) -> list[str]:
    """One block's GPTQ (if `gptq`) and activation clip search (if the scheme's), in the order
    `clip_search_first` gives; `gptq_forward` (default `forward`) is the forward GPTQ collects its
    Hessians with. Returns gptq_block_'s RTN fallbacks. Shared by the in-memory and streamed paths."""
    first = clip_search_first(scheme)

    def search() -> None:
        clip_search.search_block_(block, adapter, forward, scheme, name_of, layer=layer,
                                  total_tokens=total_tokens, seed=seed)

    if first:
        search()
    unrouted = gptq_block_(block, adapter, gptq_forward or forward, scheme, commit, name_of) if gptq else []
    if scheme.a_clip_search and not first:
        search()
    return unrouted


@torch.no_grad()
def gptq_block_(block: nn.Module, adapter: ModelAdapter, forward, scheme: QuantScheme, commit, name_of) -> list[str]:
    """GPTQ of one decoder block's linears from `forward(update=False)` over its calibration inputs
    (one, or one per true-sequential step); `commit(linear, qt)` stores each result (and puts the
    dequantized weight in place, so later steps see it). Returns the names (`name_of(linear)`) of
    the linears no token reached, quantized by RTN. Shared by the in-memory and streamed (stream/) paths."""
    spec = scheme.weight_spec()
    for role, linear in adapter.layer(block).linears().items():
        q = as_qlinear(linear)
        if q is not linear:
            adapter.set_linear(block, role, q)
    linears = adapter.layer(block).linears()
    unrouted = []
    budget = _hessian_budget(scheme, next(iter(linears.values())).weight.device)
    in_features = {key: q.in_features for key, q in linears.items()}
    for step in _steps(list(linears), scheme.gptq_true_sequential):
        done, fallbacks = [], []  # (linear, result), committed once every pass of the step has seen the same block
        matrices = (4 if scheme.gptq_asymmetric_holdout else 2) if scheme.gptq_asymmetric else 1
        for keys in _passes(step, in_features, budget, matrices):
            hessians = _SharedHessians(holdout=scheme.gptq_asymmetric_holdout)
            stop = _StopAfterInputs(block, keys) if GPTQ_STOP_EARLY else None
            for role in keys:
                q = linears[role]
                asymmetric = scheme.gptq_asymmetric and (scheme.gptq_asymmetric_qkv or stream_of(role) != "attn_in")
                quantizer = q.input_quantizer if asymmetric else None
                observe = hessians.observer(role, q.in_features, q.weight.device, quantizer)
                q.input_observer = stop.wrap(role, observe) if stop else observe
            try:
                forward(update=False)
            finally:
                if stop:
                    stop.close()
                for q in map(linears.__getitem__, keys):
                    q.input_observer = None
            left = [hessians.of_role.get(role) for role in keys]  # each role's solver, in quantize order
            targets: dict[str, torch.Tensor] = {}  # asymmetric: the targets of a shared input's later linears
            for k, role in enumerate(keys):
                q = linears[role]
                solver = left[k]
                if solver is None or solver.nsamples == 0:  # an expert no calibration token was routed to
                    done.append((q, QuantizedTensor.from_float(q.weight.data.float(), spec)))
                    fallbacks.append(q)
                    continue
                # its last role drops the Hessian inside the call: a 70B down_proj needs the memory
                last = all(s is not solver for s in left[k + 1:])
                w = q.weight.data.float()
                if solver.C is not None:  # asymmetric: the weight that undoes the input quantizer's error
                    if role not in targets:  # every linear of this input at once: one set of solves
                        group = [r for r, s in zip(keys, left) if s is solver and r not in targets]
                        targets.update(zip(group, solver.asymmetric_targets(
                            [linears[r].weight.data.float() for r in group])))
                        if solver.holdout:
                            log.debug("GPTQ %s: asymmetric targets shrunk by %s", group, solver.shrink)
                    w = targets.pop(role)
                qt = solver.quantize(w, spec, blocksize=scheme.gptq_blocksize,
                                     percdamp=scheme.gptq_damp, act_order=scheme.gptq_act_order,
                                     static_groups=scheme.gptq_static_groups, release_hessian=last,
                                     clip_objective=scheme.w_mse_objective)
                done.append((q, _on_cpu(qt)))
            hessians.free()
        for q, qt in done:
            commit(q, qt)
        unrouted += [name_of(q) for q in fallbacks]  # after commit, which may learn the wrapped linears' names
    return unrouted
