"""A quantized run folder executed on the W4A4 kernels: `--backend triton`, `dartquant bench`, refusals.

One tiny QuaRot/RTN run folder (Llama, hidden 64, MLP 192 = 12 * 16 so that R4's Hadamard is one
the kernel fuses, GQA) serves every test; the kernels run through Triton's interpreter.
"""

import json
import os
import shutil

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton / the kernels are imported

import pytest
import torch

pytest.importorskip("triton")

from dartquant.cli import main as cli_main  # noqa: E402
from dartquant.kernels.act_quant import hadamard_quantize_pack, hadamard_quantize_pack_reference  # noqa: E402
from dartquant.kernels.bench import PACKED_SDPA  # noqa: E402
from dartquant.kernels.backend import KernelSupportError, check_run_for_kernels, load_for_backend  # noqa: E402
from dartquant.kernels.linear import W4A4Linear  # noqa: E402
from dartquant.modules import QLinear  # noqa: E402
from dartquant.quant.primitives import unpack_int4  # noqa: E402
from tiny import save_kernel_llama_folder  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="these tests run the kernels through Triton's interpreter")


def _exact_linear(lin: W4A4Linear, codes, scale, zero, weight_codes, weight_scale):
    """The fake-quant linear on these codes in float64: (q_a - z_a) s_a @ (q_w s_w)^T + b."""
    xq = (unpack_int4(codes, lin.in_features, signed=False).double() - zero.double()[:, None]) * scale.double()[:, None]
    w = weight_codes.double() * weight_scale.double().reshape(-1, 1)
    y = xq @ w.T
    return y if lin.bias is None else y + lin.bias.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_linear_codes_and_output(kernel_run, dtype):
    """Per linear of the run: the activations' integer codes equal the fake-quant path's, and the
    kernel's output is the exact float64 value of those codes up to the epilogue's rounding."""
    from dartquant.quant.checkpoint import read_quantized_state
    from dartquant.quant.primitives import QuantizedTensor
    from dartquant.zoo import load_model

    fake, _ = load_model(kernel_run, dtype=dtype)
    model, _ = load_for_backend(kernel_run, "triton", dtype=dtype)
    assert sum(isinstance(m, W4A4Linear) for m in model.modules()) == 14  # 2 layers x 7 linears
    seen = {}

    def keep(name):
        def hook(module, args):  # returns None: the input is left as it is
            seen[name] = args[0].detach().reshape(-1, args[0].shape[-1]).clone()
        return hook

    hooks = [m.register_forward_pre_hook(keep(n)) for n, m in fake.named_modules() if isinstance(m, QLinear)]
    ids = torch.randint(0, 89, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fake(ids)
    for h in hooks:
        h.remove()
    state = read_quantized_state(kernel_run)[1]
    kernels = dict(model.named_modules())
    worst = 0.0
    for name, x in seen.items():
        lin = kernels[name]
        got = hadamard_quantize_pack(x, lin.clip_ratio, rotate=lin.rotate)
        ref = hadamard_quantize_pack_reference(x, lin.clip_ratio, rotate=lin.rotate)  # = QLinear's own path
        a, b = unpack_int4(got.codes, lin.in_features, False).int(), unpack_int4(ref.codes, lin.in_features, False).int()
        if lin.rotate and dtype == torch.float32:  # the Hadamard's summation order may move a value
            # across a rounding boundary (bf16 rounds the rotated values first: exact there)
            assert (a - b).abs().max() <= 1 and (a != b).float().mean() < 1e-2, name
            torch.testing.assert_close(got.scale, ref.scale, rtol=1e-6, atol=0)
        else:
            assert torch.equal(a, b) and torch.equal(got.scale, ref.scale) and torch.equal(got.zero, ref.zero), name
        qt = QuantizedTensor.from_state_dict(state, prefix=f"{name}.")
        assert torch.equal(lin.codes, state[f"{name}.codes"])  # the kernel's operand is the checkpoint's bytes
        with torch.no_grad():
            y = lin(x).double()
        y64 = _exact_linear(lin, got.codes, got.scale, got.zero, qt.codes, qt.scale)
        err = ((y - y64).abs() / (y64.abs() + 1e-6 * y64.abs().max())).max().item()
        worst = max(worst, err)
    # fp32: two multiplies (s_a s_w) after the exact integer part (measured 2^-23.1); bf16: the
    # output's rounding (measured 2^-8.0 = half a bf16 ulp at the bottom of a binade)
    assert worst < (4 * 2.0**-23 if dtype == torch.float32 else 2.0**-7), worst


def test_eval_and_ppl_on_the_kernels_equal_the_fake_quant_path(kernel_run, capsys):
    """`dartquant eval / ppl RUN --backend triton` score what the fake-quant model scores (fp32)."""
    args = [str(kernel_run), "--max-windows", "1", "--seqlen", "16", "--json"]
    assert cli_main(["eval", *args]) == 0
    fake = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli_main(["eval", *args, "--backend", "triton"]) == 0
    kern = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert kern["ppl"]["tokens"] == fake["ppl"]["tokens"] > 0
    for corpus in ("wiki", "c4"):  # measured: equal to all digits on this model; stated tolerance 1e-5
        assert abs(kern["ppl"][corpus] - fake["ppl"][corpus]) <= 1e-5 * fake["ppl"][corpus]
    # ppl with the multi-token GEMM on cuBLAS's FP8 path (torch's CPU implementation here): same sums
    assert cli_main(["ppl", str(kernel_run), "--corpora", "wiki", "--max-windows", "1", "--seqlen", "16",
                     "--backend", "triton", "--prefill-operand", "scaled_mm", "--json"]) == 0
    ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(ppl["wiki"] - fake["ppl"]["wiki"]) <= 1e-5 * fake["ppl"]["wiki"]
    assert cli_main(["ppl", str(kernel_run), "--prefill-operand", "scaled_mm"]) == 2  # not silently ignored
    assert "needs --backend triton" in capsys.readouterr().err
    # the command line's list (no torch import) is the kernels' own
    from dartquant.kernels.backend import PREFILL_OPERAND_CHOICES
    from dartquant.kernels.linear import PREFILL_OPERANDS

    assert set(PREFILL_OPERAND_CHOICES) == set(PREFILL_OPERANDS)


def _variant(kernel_run, tmp_path, name, **scheme):
    """A copy of the run's metadata alone (no weights: a refusal must not read any) with scheme edits."""
    out = tmp_path / name
    out.mkdir()
    for f in ("config.json", "dartquant.json"):
        shutil.copy(kernel_run / f, out / f)
    spec = json.loads((out / "dartquant.json").read_text())
    online = scheme.pop("online", None)
    spec["scheme"].update(scheme)
    if online:
        spec["online"].update(online)
    (out / "dartquant.json").write_text(json.dumps(spec))
    return out


@pytest.mark.parametrize("edit, named", [
    ({"w_group_size": 32}, "w_group_size=32"),
    ({"w_bits": 8}, "w_bits=8"),
    ({"a_bits_overrides": {"down": 8}}, r"a_bits_overrides\[down\]=8"),
    ({"a_symmetric": True}, "a_symmetric=True"),
    ({"o_proj_per_head": True}, "o_proj_per_head=True"),
    ({"online": {"blocks": ["D1"]}}, "online block rotations"),
])
def test_unsupported_runs_are_refused_before_loading(kernel_run, tmp_path, edit, named):
    folder = _variant(kernel_run, tmp_path, "v", **dict(edit))
    assert check_run_for_kernels(kernel_run)["scheme"]["w_bits"] == 4  # the real run passes
    with pytest.raises(KernelSupportError, match=named):
        load_for_backend(folder, "triton")


def test_refusals_for_folders_and_hadamard_sizes(kernel_run, tmp_path, capsys):
    plain = save_kernel_llama_folder(tmp_path / "plain")  # an unquantized model folder
    with pytest.raises(KernelSupportError, match="not a quantized run folder"):
        check_run_for_kernels(plain)
    odd = _variant(kernel_run, tmp_path, "odd")  # MLP 80 = 20 * 4: R4's power-of-two factor < 16
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
    with pytest.raises(KernelSupportError, match="size 80"):
        check_run_for_kernels(odd)
    narrow = _variant(kernel_run, tmp_path, "narrow", online={"r1_online": True})  # hidden 48 = 12 * 4
    cfg = json.loads((narrow / "config.json").read_text())
    (narrow / "config.json").write_text(json.dumps({**cfg, "hidden_size": 48}))
    with pytest.raises(KernelSupportError, match="r1_online=true with an online Hadamard of size 48"):
        check_run_for_kernels(narrow)
    # the CLI: exit status 2 and the setting named, before anything is loaded
    bad = _variant(kernel_run, tmp_path, "grouped", w_group_size=32)
    assert cli_main(["eval", str(bad), "--backend", "triton", "--json"]) == 2
    assert "w_group_size=32" in capsys.readouterr().err
    assert cli_main(["bench", str(bad), "--device", "cpu"]) == 2
    assert "w_group_size=32" in capsys.readouterr().err
    with pytest.raises(ValueError, match="float32 .* or bfloat16"):
        load_for_backend(kernel_run, "triton", dtype=torch.float64)


def test_cpu_without_the_interpreter_is_refused(kernel_run, monkeypatch):
    from dartquant.kernels.backend import check_triton_device

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        check_triton_device("cpu")


def test_bench_prints_and_writes_both_sides(kernel_run, tmp_path, capsys):
    """The plumbing of `dartquant bench` (CPU times mean nothing; the GPU command is in docs/KERNELS.md)."""
    out = tmp_path / "bench.json"
    assert cli_main(["bench", str(kernel_run), "--device", "cpu", "--prefill", "8", "--batch", "3",
                     "--context", "4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "prefill ms" in text and "decode batch 3" in text and "memory" in text
    assert "attention: {'bf16': 'dartquant_sdpa_packed_gqa', 'w4a4': 'dartquant_sdpa_packed_gqa'}" in text
    res = json.loads(out.read_text())
    for side in ("bf16", "w4a4"):
        assert res[side]["finite"] and res[side]["prefill_ms"] > 0 and res[side]["decode_b3"]["ms_per_step"] > 0
    # packed 4-bit codes + fp32 scale and row sum per output channel, vs bf16 weights (no biases here)
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (192, 64), (192, 64), (64, 192)]  # q k v o gate up down
    assert res["w4a4"]["linear_bytes"] == 2 * sum(n * k // 2 + 8 * n for n, k in shapes)
    assert res["bf16"]["linear_bytes"] == 2 * sum(2 * n * k for n, k in shapes)
    assert res["ratios"]["linear_bytes_ratio"] < 0.35
    # one side per command (--sides X --merge): the halves merge back into the same result
    from dartquant.kernels.bench import merge_sides

    halves = [{k: v for k, v in res.items() if k not in (other, "ratios")} for other in ("w4a4", "bf16")]
    assert merge_sides(halves[0], halves[1])["ratios"] == res["ratios"]
    with pytest.raises(ValueError, match="other settings"):
        merge_sides(res, {**halves[1], "settings": {**res["settings"], "context": 99}})
    with pytest.raises(SystemExit):  # bad settings fail in argparse / validate, before loading
        cli_main(["bench", str(kernel_run), "--kv", "fp8"])
    assert cli_main(["bench", str(kernel_run), "--device", "cpu", "--batch", "0"]) == 2


def test_the_decode_step_is_a_real_repeatable_decode_step(kernel_run):
    """The timed step (a StaticCache rewound before each call) gives the logits that a full
    forward of the same sequence gives at its last position, call after call."""
    from dartquant.kernels.bench import make_decode_step, plain_bf16_model

    model = plain_bf16_model(kernel_run, "cpu").float()
    assert not any(isinstance(m, (QLinear, W4A4Linear)) for m in model.modules())  # plain transformers
    assert model.config._attn_implementation == PACKED_SDPA
    step = make_decode_step(model, batch=2, context=5, device=torch.device("cpu"))
    with torch.no_grad():
        ref = model(step.ids).logits[:, -1:]
    for _ in range(3):  # on the GPU do_bench and the graph replay call it hundreds of times
        torch.testing.assert_close(step(), ref, rtol=1e-5, atol=1e-5)


def test_the_bf16_side_attends_gqa_decode_on_the_kv_heads(kernel_run, monkeypatch):
    """The baseline's decode attention takes the GQA group as query rows of the KV heads (no K / V repeated
    per step), with the logits of K / V repeated per query head, in float64."""
    from dartquant.kernels.bench import make_decode_step, plain_bf16_model

    model = plain_bf16_model(kernel_run, "cpu").double()
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    assert groups > 1  # the tiny run is GQA
    step = make_decode_step(model, batch=3, context=6, device=torch.device("cpu"))
    shapes = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: shapes.append((tuple(q.shape), tuple(k.shape))) or sdpa(q, k, v, **kw))
    packed = step()
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    kv = (3, model.config.num_key_value_heads, 7, head_dim)
    assert shapes and all(s == ((3, model.config.num_key_value_heads, groups, head_dim), kv) for s in shapes)

    def repeated(module, q, k, v, mask, **kw):  # the reference: K / V repeated per query head
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return sdpa(q, k, v, attn_mask=mask, scale=kw.get("scaling")).transpose(1, 2).contiguous(), None

    from dartquant.modules import register_attention_function

    model.set_attn_implementation(register_attention_function("test_repeated_kv", repeated))
    torch.testing.assert_close(packed, step(), rtol=1e-12, atol=1e-12)


def test_siblings_share_one_activation_quantization(kernel_run, monkeypatch):
    """q / k / v (and gate / up) read one tensor: it is quantized once per layer, with the same result."""
    import dartquant.kernels.linear as linear_mod

    calls = []
    real = linear_mod.hadamard_quantize_pack
    monkeypatch.setattr(linear_mod, "hadamard_quantize_pack", lambda x, *a, **k: calls.append(x.shape) or real(x, *a, **k))
    model, _ = load_for_backend(kernel_run, "triton", fuse_norms=False, merge_siblings=False)
    ids = torch.randint(0, 89, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        shared = model(ids).logits
    assert len(calls) == 4 * 2  # per layer: q/k/v, o, gate/up, down (2 layers)
    # the memo dies with its input tensor: no layer keeps its codes after the forward
    assert all(m.shared_input._act is None for m in model.modules() if isinstance(m, W4A4Linear))
    for m in model.modules():
        if isinstance(m, W4A4Linear):
            m.shared_input = None
    calls.clear()
    with torch.no_grad():
        alone = model(ids).logits
    assert len(calls) == 7 * 2
    assert torch.equal(shared, alone)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norms_quantize_once_and_compute_the_same_model(kernel_run, monkeypatch, dtype):
    """Each block norm and its readers' quantization as one kernel (the default): the norm's output
    is never written, only o_proj and down_proj still run the activation kernel, and the logits
    are the unfused model's (same codes on this model: the fused mean of squares sums in another
    order, which could move a code by one on a rounding boundary)."""
    import dartquant.kernels.linear as linear_mod
    from dartquant.kernels.fusions import NormQuant

    calls = []
    real = linear_mod.hadamard_quantize_pack
    monkeypatch.setattr(linear_mod, "hadamard_quantize_pack", lambda x, *a, **k: calls.append(x.shape) or real(x, *a, **k))
    fused, _ = load_for_backend(kernel_run, "triton", dtype=dtype)
    plain, _ = load_for_backend(kernel_run, "triton", dtype=dtype, fuse_norms=False)
    assert sum(isinstance(m, NormQuant) for m in fused.modules()) == 4  # 2 layers x (input, post-attention)
    assert not any(isinstance(m, NormQuant) for m in plain.modules())
    ids = torch.randint(0, 89, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        calls.clear()
        got = fused(ids).logits
        assert len(calls) == 2 * 2  # per layer: o_proj and down_proj
        want = plain(ids).logits
    if dtype == torch.float32:  # scales 1 ulp apart where the mean of squares rounds differently
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(got, want)


def test_fused_norms_are_undone_when_something_else_reads_the_norm(kernel_run):
    """A reader of the normalised stream besides the fused linears (here an extra op before the
    attention) would read the never-written placeholder: the check at load finds it and unfuses."""
    from dartquant.kernels.fusions import NormQuant, fuse_norm_quant_, verify_fused_norms_

    model, _ = load_for_backend(kernel_run, "triton", fuse_norms=False)
    ids = torch.randint(0, 89, (1, 7), generator=torch.Generator().manual_seed(5))
    attn = model.model.layers[1].self_attn
    attn.register_forward_pre_hook(lambda mod, args, kw: (args, {**kw, "hidden_states": kw["hidden_states"] * 1.0}),
                                   with_kwargs=True)
    with torch.no_grad():
        want = model(ids).logits
    assert len(fuse_norm_quant_(model)) == 4
    assert not verify_fused_norms_(model, "cpu")
    assert not any(isinstance(m, NormQuant) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)


def test_fused_norms_are_undone_when_the_kernel_computes_another_norm(kernel_run):
    """A fused kernel that disagrees with its norm (here: another epsilon, as a wrong gain
    convention would) is found at load by comparing codes per norm, and every fusion undone."""
    from dartquant.kernels.fusions import NormQuant, fuse_norm_quant_, verify_fused_norms_

    model, _ = load_for_backend(kernel_run, "triton", fuse_norms=False)
    assert len(fuse_norm_quant_(model)) == 4
    assert verify_fused_norms_(model, "cpu")  # the right norms pass
    fused = [m for m in model.modules() if isinstance(m, NormQuant)]
    fused[2].norm = type(fused[2].norm)(fused[2].norm.weight, 0.5)  # eps 0.5 instead of 1e-6
    assert not verify_fused_norms_(model, "cpu")
    assert not any(isinstance(m, NormQuant) for m in model.modules())


def test_fused_norm_refuses_readers_with_other_settings(kernel_run):
    """Changing one reader's operand after fusion raises instead of quantizing the placeholder."""
    model, _ = load_for_backend(kernel_run, "triton")
    model.model.layers[0].self_attn.k_proj.backend = "int8s"  # planar int8 at every size; q / v: packed
    with pytest.raises(RuntimeError, match="different activation operands"):
        with torch.no_grad():
            model(torch.zeros(1, 2, dtype=torch.long))  # 2 tokens: q / v packed (the GEMV)


@pytest.mark.parametrize("tokens", [1, 9])  # 2 x 1 tokens: the GEMV on packed codes; 2 x 9: int8s (planar)
def test_merged_siblings_are_one_gemm_with_the_same_output(kernel_run, tokens):
    """q / k / v and gate / up as one GEMM each over the concatenated weights: the same logits bit
    for bit, the members' buffers views of the merged ones (weight memory unchanged)."""
    from dartquant.kernels.bench import weight_bytes
    import dartquant.kernels.linear as linear_mod

    merged, _ = load_for_backend(kernel_run, "triton", dtype=torch.bfloat16, fuse_norms=False)
    plain, _ = load_for_backend(kernel_run, "triton", dtype=torch.bfloat16, fuse_norms=False, merge_siblings=False)
    members = [m for m in merged.modules() if isinstance(m, W4A4Linear) and m.merged is not None]
    assert len(members) == 2 * 5  # q, k, v, gate, up per layer
    assert weight_bytes(merged) == weight_bytes(plain)
    ids = torch.randint(0, 89, (2, tokens), generator=torch.Generator().manual_seed(6))
    calls = []
    real = linear_mod.w4a4_matmul
    linear_mod.w4a4_matmul = lambda *a, **k: calls.append(a[3].scale.shape[0]) or real(*a, **k)
    try:
        with torch.no_grad():
            got = merged(ids).logits
            gemms_merged = len(calls)
            want = plain(ids).logits
    finally:
        linear_mod.w4a4_matmul = real
    assert gemms_merged == 2 * 4 and len(calls) - gemms_merged == 2 * 7  # per layer: qkv, o, gate/up, down
    assert sorted(set(calls[:4])) == [64, 64 + 2 * 32, 2 * 192]  # o / down, q+k+v (GQA), gate+up
    assert torch.equal(got, want)
    # above MERGED_MAX_TOKENS (prefill) each member runs its own GEMM on its views: the same output
    calls.clear()
    linear_mod.w4a4_matmul = lambda *a, **k: calls.append(a[3].scale.shape[0]) or real(*a, **k)
    old_max, linear_mod.MERGED_MAX_TOKENS = linear_mod.MERGED_MAX_TOKENS, 0
    try:
        with torch.no_grad():
            assert torch.equal(merged(ids).logits, want)
    finally:
        linear_mod.w4a4_matmul, linear_mod.MERGED_MAX_TOKENS = real, old_max
    assert len(calls) == 2 * 7
