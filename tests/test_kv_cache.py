"""The 4-bit K/V cache kernels (kernels.kv_cache) through Triton's interpreter: the codes they store
are the fake-quant path's, the decode attention is SDPA over those values, and a model decodes on
them (`dartquant bench --kv kernels`)."""

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton / the kernels are imported

import pytest
import torch

pytest.importorskip("triton")

from dartquant.hadamard import fast_hadamard_transform  # noqa: E402
from dartquant.kernels.kv_cache import (  # noqa: E402
    Kv4Codes, decode_path, dots_words_step, kv4_decode_attention, kv4_fake_quant, kv4_scheme_problems,
    kv4_store)
from dartquant.quant.primitives import QuantSpec, fake_quantize  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="these tests run the kernels through Triton's interpreter")


def _kv(b, h, s, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(b, h, s, d, generator=g) for _ in range(2))
    k[0, 0, 1] *= 50.0  # a massive key: its row's range is wide
    k[-1, -1, -1] = 0.0  # a zero row: scale 1, every code the zero point
    return k.to(dtype), v.to(dtype)


STORE_CONFIGS = [None, (64, 4, True), (16, 4, False), (16, 4, True, True), (16, 4, True, False)]  # the default
# (butterflies; the compact grid, each role only its own row blocks, where the query has more rows), more rows, the
# tensor-core dot, the compact grid and the 2-D grid forced


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,rotate", [(64, True), (128, True), (256, True), (32, False)])
@pytest.mark.parametrize("config", STORE_CONFIGS)
def test_stored_codes_are_the_fake_quant_values(dtype, d, rotate, config):
    """Written in two calls (a prompt of 5, then one token) at the count's positions: the dequantized
    cache is bit for bit what AttentionTransform's quantizers give (R3 on K when rotating; as a tensor-core
    dot or as butterflies, whatever the rows a program)."""
    spec = QuantSpec(bits=4, symmetric=False, clip_ratio=0.9)
    k, v = _kv(2, 3, 6, d, dtype, seed=d)
    codes = Kv4Codes(2, 3, 9, d, "cpu")
    count = torch.tensor(0)
    for lo, hi in ((0, 5), (5, 6)):
        count.add_(hi - lo)
        kv4_store(codes, count, k[:, :, lo:hi], v[:, :, lo:hi], 0.9, rotate, config=config)
    kq, vq = codes.dequantize(dtype)
    want_k = fake_quantize(fast_hadamard_transform(k) if rotate else k, spec)
    assert torch.equal(kq[:, :, :6], want_k) and torch.equal(vq[:, :, :6], fake_quantize(v, spec))
    assert not kq[:, :, 6:].any() and not codes.v_codes[:, :, 6:].any()  # nothing past the count


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", STORE_CONFIGS)
def test_a_prompt_without_cache_gets_the_fake_quant_values_in_one_launch(dtype, config):
    """kv4_fake_quant (the no-cache forward): K (R3) and V quantized-dequantized and Q rotated, equal
    to the fake path's; GQA (6 query heads on 2 KV heads); 37 tokens, so a program's rows span heads and
    the last program is partly masked."""
    spec = QuantSpec(bits=4, symmetric=False, clip_ratio=0.9)
    k, v = _kv(2, 2, 37, 64, dtype, seed=3)
    q = torch.randn(2, 6, 37, 64, generator=torch.Generator().manual_seed(4)).to(dtype)
    kd, vd, qd = kv4_fake_quant(k, v, 0.9, True, q, config=config)
    assert torch.equal(kd, fake_quantize(fast_hadamard_transform(k), spec))
    assert torch.equal(vd, fake_quantize(v, spec)) and torch.equal(qd, fast_hadamard_transform(q))
    kd2, vd2, none = kv4_fake_quant(k, v, 0.9, False, config=config)
    assert none is None and torch.equal(kd2, fake_quantize(k, spec)) and torch.equal(vd2, vd)


@pytest.mark.parametrize("config", STORE_CONFIGS)
def test_a_prompt_into_a_cache_stores_and_returns_values_in_one_launch(config):
    """kv4_fake_quant with codes / count (a prompt into an empty cache): the values it returns are the fake-quant
    ones, and the codes it stores are kv4_store's, so the cache dequantizes to what the prompt attended."""
    k, v = _kv(2, 2, 37, 64, torch.bfloat16, seed=5)
    q = torch.randn(2, 6, 37, 64, generator=torch.Generator().manual_seed(6)).bfloat16()
    codes, ref = Kv4Codes(2, 2, 40, 64, "cpu"), Kv4Codes(2, 2, 40, 64, "cpu")
    count = torch.tensor(37)
    kd, vd, qd = kv4_fake_quant(k, v, 0.9, True, q, config=config, codes=codes, count=count)
    want = kv4_fake_quant(k, v, 0.9, True, q, config=config)
    assert all(torch.equal(a, b) for a, b in zip((kd, vd, qd), want))
    kv4_store(ref, count, k, v, 0.9, True, config=config)
    assert all(torch.equal(getattr(codes, f), getattr(ref, f)) for f in vars(ref) if f != "shape")
    kq, vq = codes.dequantize(torch.bfloat16)
    assert torch.equal(kq[:, :, :37], kd) and torch.equal(vq[:, :, :37], vd)
    with pytest.raises(ValueError, match="both"):
        kv4_fake_quant(k, v, 0.9, True, codes=codes)


def test_store_reads_strided_inputs_and_never_writes_past_the_end():
    k, v = _kv(1, 2, 4, 64, torch.bfloat16, seed=1)
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, S, D] view of a [B, S, H, D] tensor
    codes = Kv4Codes(1, 2, 3, 64, "cpu")  # room for 3 of the 4 tokens
    kv4_store(codes, torch.tensor(4), kt, v, 1.0, True)
    ref = Kv4Codes(1, 2, 4, 64, "cpu")
    kv4_store(ref, torch.tensor(4), k, v, 1.0, True)
    # the count says positions 0..3: position 3 does not exist in `codes` and is dropped
    assert torch.equal(codes.k_codes, ref.k_codes[:, :, :3]) and torch.equal(codes.v_scale, ref.v_scale[:, :, :3])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2 ** -7)])
@pytest.mark.parametrize("heads,kv_heads,cuda_cores,block_s,slots", [
    (4, 4, True, None, False), (4, 4, False, 32, False), (6, 2, None, None, False),
    (4, 4, None, 8, True), (4, 4, None, 16, True), (4, 4, None, 64, True), (4, 4, None, None, None), (6, 2, None, None, None),
    (4, 4, None, 16, "held k"), (4, 4, None, 64, "held k"), (4, 4, None, 16, "bytes"), (4, 4, None, 64, "bytes")])
def test_decode_attention_is_sdpa_over_the_cached_values(dtype, tol, heads, kv_heads, cuda_cores, block_s, slots):
    """Over two slices of the cache (100 of 130 slots filled, the rest ignored), GQA groups, R3 on
    the query in the kernel: SDPA over the dequantized cache, to the order of fp32 sums and, in
    bf16, the rounding of the dequantized values (the kernel multiplies the exact code - zero by
    the scale in fp32) and of the probabilities times V's scale (P V in bf16, as flash attention).
    The slots path (one softmax per step position, merged at the end): slots of 16 leave the second
    slice's last step partly empty, slots of 64 leave some slots with no position at all. The slots path takes
    the scales and zeros out of K's and V's per-element work by default, so its K is the exact one, not K
    rounded to the dtype ("held k": exact_k=False, the loop before session 42, K as the fake path holds it). Its
    default reads the codes as words (session 43); "bytes" is the factored loop byte by byte."""
    extra = dict(exact_k=False) if slots == "held k" else {}
    extra.update({"bytes": dict(words=False)}.get(slots, {}))
    slots = True if isinstance(slots, str) else slots
    d, n, smax = 32, 100, 130
    k, v = _kv(2, kv_heads, n, d, dtype, seed=heads)
    codes = Kv4Codes(2, kv_heads, smax, d, "cpu")
    count = torch.tensor(n)
    kv4_store(codes, count, k, v, 1.0, True)
    q = torch.randn(2, heads, 1, d, generator=torch.Generator().manual_seed(7)).to(dtype)
    out = kv4_decode_attention(q, codes, count, d ** -0.5, rotate_q=True, cuda_cores=cuda_cores, block_s=block_s,
                               slots=slots, **extra)
    kq, vq = (t[:, :, :n].float().repeat_interleave(heads // kv_heads, 1) for t in codes.dequantize(dtype))
    if extra.get("exact_k", True) and slots in (True, None) and heads == kv_heads and cuda_cores is None:
        # the factored loop (the slots path's default) attends over the exact K, not K rounded to the dtype
        kq = codes.dequantize(torch.float32)[0][:, :, :n].repeat_interleave(heads // kv_heads, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(fast_hadamard_transform(q).float(), kq, vq)
    assert out.shape == (2, 1, heads, d) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.transpose(1, 2), rtol=tol, atol=tol)  # bf16: 1-2 ulps of the output


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2 ** -7)])
@pytest.mark.parametrize("heads,kv_heads,d,block_s", [(6, 2, 64, None), (8, 2, 128, 16), (4, 4, 64, 32),
                                                      (12, 4, 64, 64)])
def test_gqa_decode_on_words_is_sdpa_over_the_exact_cache(dtype, tol, heads, kv_heads, d, block_s):
    """The dots path on words (session 44; the GQA default for bf16 / fp32 from head dim 64): each nibble masked
    where it sits is a bf16 number c * 2^-133 or c * 2^-129, q and P scaled by 2^64 / 2^60 so every product is
    normal. It attends over the exact K ((code - zero) * scale, as the slots path) and V: SDPA over those,
    within the order of fp32 sums and, in bf16, P V's weights rounded to the dtype. Two slices (100 of 130
    slots filled, a massive key, a zero row); groups of 3, 4 and 1 (MHA asked onto the dots)."""
    n, smax = 100, 130
    k, v = _kv(2, kv_heads, n, d, dtype, seed=heads + d)
    codes, count = Kv4Codes(2, kv_heads, smax, d, "cpu"), torch.tensor(n)
    kv4_store(codes, count, k, v, 1.0, True)
    q = torch.randn(2, heads, 1, d, generator=torch.Generator().manual_seed(9)).to(dtype)
    dots = dict(block_s=block_s, slots=False, cuda_cores=False)
    out = kv4_decode_attention(q, codes, count, d ** -0.5, True, **dots)
    held = kv4_decode_attention(q, codes, count, d ** -0.5, True, **dots, words=False, exact_k=False)
    kq = codes.dequantize(torch.float32)[0][:, :, :n].repeat_interleave(heads // kv_heads, 1)
    vq = codes.dequantize(dtype)[1][:, :, :n].float().repeat_interleave(heads // kv_heads, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(fast_hadamard_transform(q).float(), kq, vq).transpose(1, 2)
    assert out.shape == (2, 1, heads, d) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    if dtype == torch.float32:  # a different loop: not the bytes path's numbers to the last bit
        assert not torch.equal(out, held)


@pytest.mark.parametrize("heads,kv_heads,path", [
    (4, 4, dict(cuda_cores=True, slots=False)), (4, 4, dict(cuda_cores=False, slots=False, block_s=32)),
    (4, 4, dict(slots=True, block_s=16)), (4, 4, dict(slots=True, block_s=16, words=False)),
    (4, 4, dict(slots=True, block_s=16, exact_k=False)), (8, 2, dict(slots=False, cuda_cores=False, block_s=16))])
@pytest.mark.parametrize("start", [57, 80])
def test_decode_attention_skips_each_sequences_left_padding(heads, kv_heads, path, start):
    """`starts` (a left-padded batch): each sequence attends from its own first position, on every path. Two slices
    of the cache (100 of 130 slots filled); the second sequence starts at 57 (inside the first slice) or 80 (the
    whole first slice is its padding: an empty partial for the merge). SDPA over each sequence's own positions."""
    d, n, smax = 64, 100, 130
    k, v = _kv(2, kv_heads, n, d, torch.float32, seed=start)
    codes, count = Kv4Codes(2, kv_heads, smax, d, "cpu"), torch.tensor(n)
    kv4_store(codes, count, k, v, 1.0, True)
    q = torch.randn(2, heads, 1, d, generator=torch.Generator().manual_seed(11))
    starts = torch.tensor([0, start], dtype=torch.int32)
    out = kv4_decode_attention(q, codes, count, d ** -0.5, True, starts=starts, **path)
    kq, vq = (t.repeat_interleave(heads // kv_heads, 1) for t in codes.dequantize(torch.float32))  # fp32: K exact
    qr = fast_hadamard_transform(q)
    for b, lo in enumerate((0, start)):
        ref = torch.nn.functional.scaled_dot_product_attention(qr[b:b + 1], kq[b:b + 1, :, lo:n], vq[b:b + 1, :, lo:n])
        torch.testing.assert_close(out[b:b + 1], ref.transpose(1, 2), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="int32"):
        kv4_decode_attention(q, codes, count, d ** -0.5, True, starts=starts.long(), **path)


def test_decode_path_choice():
    """The measured choice (docs/KERNELS.md 4f, 4h): slots for every decode without GQA, 64 positions a step below 256
    programs, 8 from 1024; GQA keeps the tensor-core dots; an explicit path is kept, and two one-row paths at once
    refused."""
    assert decode_path(32, 1, None, None, None) == (True, False, 64)  # Llama-2-7B, batch 1
    assert decode_path(128, 1, None, None, None) == (True, False, 64)  # batch 4
    assert decode_path(256, 1, None, None, None) == (True, False, 32)  # batch 8
    assert decode_path(2048, 1, None, None, None) == (True, False, 8)  # batch 64 (session 43; on 1 warp)
    assert decode_path(8, 4, None, None, None) == (False, False, 64)  # Llama-3-8B, batch 1
    assert decode_path(64, 4, None, None, None) == (False, False, 32)
    assert decode_path(32, 1, None, True, None) == (False, True, 64)  # the CUDA cores when asked
    assert decode_path(256, 1, None, False, None) == (False, False, 32)  # the dots when asked
    assert decode_path(256, 1, False, None, None) == (False, False, 32)
    assert decode_path(16, 1, False, None, None) == (False, True, 64)  # run 33's batch-1 rule without slots
    with pytest.raises(ValueError, match="two paths"):
        decode_path(32, 1, True, True, None)
    # the dots on words (session 44): 64 a step on 4 warps below 256 programs, 32 on 2 from 256
    assert dots_words_step(8) == (64, 4) and dots_words_step(64) == (64, 4) and dots_words_step(512) == (32, 2)


def test_cuda_cores_path_refuses_gqa():
    codes = Kv4Codes(1, 2, 4, 16, "cpu")
    with pytest.raises(ValueError, match="one query row"):
        kv4_decode_attention(torch.zeros(1, 4, 1, 16), codes, torch.tensor(1), 0.25, False, cuda_cores=True)
    with pytest.raises(ValueError, match="the slots path takes one query row"):
        kv4_decode_attention(torch.zeros(1, 4, 1, 16), codes, torch.tensor(1), 0.25, False, slots=True)


def test_scheme_problems():
    from dartquant.quant.scheme import QuantScheme

    assert kv4_scheme_problems(QuantScheme()) == []
    bad = kv4_scheme_problems(QuantScheme(kv_bits=16, kv_symmetric=True))
    assert any("kv_bits=16" in b for b in bad) and any("kv_symmetric=True" in b for b in bad)
    assert kv4_scheme_problems(QuantScheme(kv_group_size=64), head_dim=64) == []  # one group per head
    assert "kv_group_size=32" in kv4_scheme_problems(QuantScheme(kv_group_size=32), head_dim=64)[0]


def test_a_model_decodes_on_the_4bit_cache(kernel_run):
    """float32, the run's fake-quant model (its linears in torch: only the attention changes here; the
    W4A4 linears with it run in test_bench_with_the_4bit_cache): a decode step over the 4-bit cache
    (codes written by the prompt's forward, then the step's token) gives the fake-quant attention's
    logits (its K / V quantizers over a float cache), step after step; the cache holds codes."""
    from dartquant.kernels.bench import make_decode_step
    from dartquant.kernels.kv_cache import check_kv4_support, register_kv4_attention
    from dartquant.zoo import load_model

    model, _ = load_model(kernel_run, dtype=torch.float32)
    fake_step = make_decode_step(model, batch=2, context=6, device=torch.device("cpu"))
    assert model.config._attn_implementation == "dartquant"  # the fake-quant K / V
    want = fake_step()
    check_kv4_support(model)
    model.set_attn_implementation(register_kv4_attention())
    step = make_decode_step(model, batch=2, context=6, device=torch.device("cpu"))
    for _ in range(2):
        torch.testing.assert_close(step(), want, rtol=0, atol=1e-5)
    assert 0 < step.cache_bytes < fake_step.cache_bytes
    from dartquant.kernels.kv_cache import Kv4StaticCache

    cache = Kv4StaticCache(model.config, max_cache_len=4)  # reset (transformers' generate reuses caches)
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        model(step.ids[:, :3], use_cache=True, **{name: cache})
    layer = cache.layers[0]
    assert int(layer.cumulative_length) == 3 and layer.codes.k_codes.any()
    cache.reset()
    assert int(layer.cumulative_length) == 0 and not layer.codes.k_codes.any() and not layer.codes.v_scale.any()
    with pytest.raises(NotImplementedError, match="beam search"):
        layer.reorder_cache(torch.tensor([0, 1]))


@pytest.mark.parametrize("fuse", [False, True])
def test_a_prompt_into_an_empty_cache_attends_over_its_own_values(kernel_run, monkeypatch, fuse):
    """A generation's prompt into an empty Kv4StaticCache (transformers passes no mask) takes one launch that
    stores the codes and hands back their values: the logits equal the no-cache forward's bit for bit, the codes
    equal kv4_store's, and the cache is never dequantized. A second prompt after it (a mask) attends over the
    positions written so far, dequantized (not the whole static cache), and gives the no-cache forward's logits of
    the whole sequence. With the RoPE in the launch (`fuse`) as without."""
    import inspect

    from dartquant.kernels.kv_cache import (Kv4Codes, Kv4StaticCache, check_kv4_support, fuse_rope_,
                                            register_kv4_attention)
    from dartquant.zoo import load_model

    model, _ = load_model(kernel_run, dtype=torch.float32)
    check_kv4_support(model)
    model.set_attn_implementation(register_kv4_attention())
    if fuse:
        assert fuse_rope_(model) == len(model.model.layers)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.arange(3, 12)[None].repeat(2, 1)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    dequantized = []
    real = Kv4Codes.dequantize
    monkeypatch.setattr(Kv4Codes, "dequantize",
                        lambda self, dt, length=None: dequantized.append(length) or real(self, dt, length))
    cache = Kv4StaticCache(model.config, max_cache_len=32)
    with torch.no_grad():
        got = model(ids[:, :6], use_cache=True, **{name: cache}).logits
    assert torch.equal(got, want[:, :6]) and not dequantized
    # the same codes as the store kernel writes: a decode step over them gives the no-cache logits of 7 tokens
    layer = cache.layers[0]
    assert int(layer.cumulative_length) == 6 and layer.codes.k_codes[:, :, :6].any()
    assert not layer.codes.k_codes[:, :, 6:].any()
    with torch.no_grad():
        step = model(ids[:, 6:7], use_cache=True, **{name: cache}).logits
        torch.testing.assert_close(step[:, 0], want[:, 6], rtol=0, atol=1e-4)
        more = model(ids[:, 7:], use_cache=True, **{name: cache}).logits  # two tokens after seven: a mask
    assert dequantized and set(dequantized) == {9}  # the nine positions written, not the cache's 32
    torch.testing.assert_close(more, want[:, 7:], rtol=0, atol=1e-4)


@pytest.mark.parametrize("fuse, traced", [(False, False), (True, False), (False, True)])
def test_a_left_padded_batch_generates_as_the_fake_path(kernel_run, fuse, traced, monkeypatch):
    """transformers' generate (greedy) on a left-padded batch of two: with a Kv4StaticCache (the decode kernels skip
    each sequence's pads) the logits of every step are the fake-quant attention's over transformers' own cache,
    and so are the tokens; the pads are recorded at the prompt and cleared by a reset. `traced`: as under
    torch.compile or a graph capture (no host reads), the pads go into `starts` on the device."""
    import inspect

    from dartquant.kernels import kv_cache
    from dartquant.kernels.kv_cache import Kv4StaticCache, check_kv4_support, fuse_rope_, register_kv4_attention
    from dartquant.zoo import load_model

    model, _ = load_model(kernel_run, dtype=torch.float32)
    ids = torch.arange(3, 11)[None].repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # the second sequence: three pad tokens on the left
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    want = model.generate(ids, **kw)  # the fake-quant K / V over transformers' dynamic cache
    check_kv4_support(model)
    model.set_attn_implementation(register_kv4_attention())
    if fuse:
        assert fuse_rope_(model) == len(model.model.layers)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = Kv4StaticCache(model.config, max_cache_len=16)
    if traced:
        monkeypatch.setattr(kv_cache, "_host_may_read", lambda t: False)
    got = model.generate(ids, **kw, **{name: cache})
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    layer = cache.layers[0]
    assert layer.padded and layer.starts.tolist() == [0, 3]
    cache.reset()
    assert not layer.padded and not layer.starts.any()


def test_held_and_padding_are_read_only_where_the_host_may_read_it(monkeypatch):
    """_held_and_padding: (the layer's count clamped to the cache, each sequence's left padding or None) for a 4-D mask
    over the whole static cache, bool or additive; (None, None) without a mask or for another mask shape; a ValueError
    where the mask hides other positions than a left padding from the last token. While torch.compile traces (where a
    host read would break the graph): (None, the leading hidden positions on the device, zeros included), unchecked."""
    from types import SimpleNamespace

    from dartquant.kernels.kv_cache import _held_and_padding

    layer = SimpleNamespace(codes=Kv4Codes(2, 2, 8, 4, "cpu"), cumulative_length=torch.tensor(5))
    mask = torch.ones(2, 1, 3, 8, dtype=torch.bool)
    assert _held_and_padding(layer, mask) == (5, None) and _held_and_padding(layer, None) == (None, None)
    assert _held_and_padding(layer, mask[..., :6]) == (None, None) and _held_and_padding(layer, mask[0]) == (None, None)
    layer.cumulative_length = torch.tensor(11)  # past the end: the store writes nothing there
    assert _held_and_padding(layer, mask) == (8, None)
    assert _held_and_padding(layer, torch.zeros(2, 1, 3, 8)) == (8, None)  # an additive mask: 0 where visible
    left = mask.clone()
    left[1, ..., :2] = False  # the second sequence left-padded by two
    for m in (left, torch.zeros(2, 1, 3, 8).masked_fill(~left, float("-inf"))):
        held, pads = _held_and_padding(layer, m)
        assert held == 8 and pads.dtype == torch.int32 and pads.tolist() == [0, 2]
    hole = mask.clone()
    hole[0, ..., 3] = False  # a hidden position after a seen one: not a left padding
    with pytest.raises(ValueError, match="left padding"):
        _held_and_padding(layer, hole)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # traced: the pads on the device, unchecked
    for m, want in ((left, [0, 2]), (mask, [0, 0]), (hole, [0, 0])):
        held, pads = _held_and_padding(layer, m)
        assert held is None and pads.dtype == torch.int32 and pads.tolist() == want
    assert _held_and_padding(layer, None) == (None, None)


def test_refused_without_kv_quantizers(kernel_run, tmp_path, capsys):
    from dartquant.kernels.backend import load_for_backend
    from dartquant.kernels.kv_cache import check_kv4_support

    model, _ = load_for_backend(kernel_run, "triton", dtype=torch.float32)
    for block in model.model.layers:
        block.self_attn.dq_attention.v_quantizer = None
    with pytest.raises(ValueError, match="no 4-bit K / V quantizers"):
        check_kv4_support(model)
    from test_kernels_backend import _variant

    from dartquant.cli import main as cli_main

    folder = _variant(kernel_run, tmp_path, "kv16", kv_bits=16)  # metadata only: refused before any weight
    assert cli_main(["bench", str(folder), "--device", "cpu", "--kv", "kernels", "--batch", "1"]) == 2
    assert "kv_bits=16" in capsys.readouterr().err


def test_sliding_window_is_refused_before_any_weight(kernel_run, tmp_path, capsys):
    """The kernels attend over every cached position: a model with a sliding window (Mistral-7B-v0.1's 4096, set
    for every layer without layer types) is refused from config.json alone, by the library check and by `bench`."""
    from transformers import MistralConfig, Qwen2Config
    from test_kernels_backend import _variant

    from dartquant.cli import main as cli_main
    from dartquant.kernels.kv_cache import kv4_config_problems

    assert kv4_config_problems(MistralConfig(sliding_window=4096)) == [
        "a sliding window of 4096 tokens (full attention only)"]
    assert kv4_config_problems(MistralConfig(sliding_window=None)) == []
    assert kv4_config_problems(Qwen2Config(sliding_window=4096)) == []  # use_sliding_window off: no window
    mixed = kv4_config_problems(Qwen2Config(sliding_window=64, use_sliding_window=True, max_window_layers=1,
                                            num_hidden_layers=2))
    assert len(mixed) == 1 and "layer types" in mixed[0]
    folder = _variant(kernel_run, tmp_path, "windowed")  # metadata only: refused before any weight is read
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "sliding_window": 4096}))
    assert cli_main(["bench", str(folder), "--device", "cpu", "--kv", "kernels", "--batch", "1"]) == 2
    assert "sliding window of 4096 tokens" in capsys.readouterr().err


def test_bench_with_the_4bit_cache(kernel_run, tmp_path, capsys):
    """`dartquant bench --kv kernels` runs the w4a4 side on the 4-bit cache and reports its bytes:
    2 layers x (K + V) x 2 KV heads x 4 slots x (8 bytes of codes + 8 of fp32 scale / zero)."""
    from dartquant.cli import main as cli_main

    out = tmp_path / "bench.json"
    assert cli_main(["bench", str(kernel_run), "--device", "cpu", "--prefill", "4", "--batch", "1", "--context", "3",
                     "--kv", "kernels", "--sides", "w4a4", "--no-fuse-norms", "--no-merge-siblings",  # (time)
                     "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["w4a4"]["finite"] and res["settings"]["kv"] == "kernels"
    assert res["w4a4"]["decode_b1"]["kv_cache_bytes"] == 2 * 2 * 2 * 4 * (8 + 8)  # bf16 would be 2 * 2 * 2 * 4 * 32
    assert "KV cache: kernels" in capsys.readouterr().out


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_default_decode_attention_stays_near_the_fake_path_with_large_logits(kv_heads):
    """The default loops (slots without GQA, the dots on words with it) attend over the exact K, not K rounded to
    bf16 as the fake path holds it (docs/KERNELS.md 4g, 4i). With large logits (a key 20x the others, the query
    x8) that moves the output by up to ~2e-2 of the largest one from the fake path (2.2e-2 with groups of 2 at
    this seed): the stated tolerance, checked at 3e-2. Against SDPA over that exact K the kernels stay within 1e-2
    (P V's weights and the output rounded to bf16), as the loops before (exact_k=False) stay within 1e-2 of the
    fake path whose K they keep."""
    torch.manual_seed(0)
    b, h, n, d = 2, 4, 129, 128
    k, v = torch.randn(b, kv_heads, n, d), torch.randn(b, kv_heads, n, d)
    k[:, :, 0] *= 20
    codes, count = Kv4Codes(b, kv_heads, n, d, "cpu"), torch.tensor(n)
    kv4_store(codes, count, k.bfloat16(), v.bfloat16(), 1.0, True)
    q = (torch.randn(b, h, 1, d) * 8).bfloat16()
    kb, vb = (t.repeat_interleave(h // kv_heads, 1) for t in codes.dequantize(torch.bfloat16))
    fake = torch.nn.functional.scaled_dot_product_attention(fast_hadamard_transform(q).float(), kb.float(),
                                                            vb.float()).transpose(1, 2)
    exact_k = codes.dequantize(torch.float32)[0].repeat_interleave(h // kv_heads, 1)
    exact = torch.nn.functional.scaled_dot_product_attention(fast_hadamard_transform(q).float(), exact_k,
                                                             vb.float()).transpose(1, 2)
    top = fake.abs().max()
    default = kv4_decode_attention(q, codes, count, d ** -0.5, True).float()
    before = kv4_decode_attention(q, codes, count, d ** -0.5, True, exact_k=False).float()
    assert ((default - fake).abs().max() / top) < 3e-2
    assert ((default - exact).abs().max() / top) < 1e-2
    assert ((before - fake).abs().max() / top) < 1e-2


def test_words_is_refused_where_it_does_not_apply():
    codes = Kv4Codes(1, 2, 4, 16, "cpu")
    with pytest.raises(ValueError, match="exact K"):
        kv4_decode_attention(torch.zeros(1, 2, 1, 16), codes, torch.tensor(1), 0.25, False, exact_k=False, words=True)
    with pytest.raises(ValueError, match="not the CUDA-core path"):
        kv4_decode_attention(torch.zeros(1, 2, 1, 16), codes, torch.tensor(1), 0.25, False, cuda_cores=True, words=True)
    with pytest.raises(ValueError, match="at least 64"):  # the dots on words: 16-deep dots of a quarter of the dims
        kv4_decode_attention(torch.zeros(1, 4, 1, 16), codes, torch.tensor(1), 0.25, False, words=True)
    codes = Kv4Codes(1, 2, 4, 64, "cpu")
    with pytest.raises(ValueError, match="not fp16"):  # fp16 cannot hold the codes' bf16 numbers (2^-133)
        kv4_decode_attention(torch.zeros(1, 4, 1, 64).half(), codes, torch.tensor(1), 0.25, False, words=True)
    codes = Kv4Codes(1, 2, 4, 12, "cpu")
    with pytest.raises(ValueError, match="head dim 12"):
        kv4_decode_attention(torch.zeros(1, 2, 1, 12), codes, torch.tensor(1), 0.25, False, words=True)


def test_store_rotates_the_query_as_the_decode_kernel_does():
    """The model's decode rotates the query in `kv4_store`'s launch and asks the attention for no R3: the same
    output, bit for bit, as R3 in the attention kernel."""
    torch.manual_seed(3)
    k, v = _kv(2, 4, 9, 64, torch.bfloat16, seed=3)
    q = torch.randn(2, 4, 1, 64).bfloat16()
    codes, count = Kv4Codes(2, 4, 9, 64, "cpu"), torch.tensor(8)
    kv4_store(codes, count, k[:, :, :8], v[:, :, :8], 1.0, True)
    count += 1
    qr = kv4_store(codes, count, k[:, :, 8:], v[:, :, 8:], 1.0, True, query=q)
    assert qr.shape == q.shape and qr.dtype == q.dtype and not torch.equal(qr, q)
    assert torch.equal(kv4_decode_attention(qr, codes, count, 0.125, False),
                       kv4_decode_attention(q, codes, count, 0.125, True))


@pytest.mark.parametrize("heads,kv_heads,path", [(4, 4, {}), (4, 4, dict(words=False)), (4, 4, dict(slots=False)),
                                                 (6, 2, {})])
def test_one_slice_writes_the_output_itself(heads, kv_heads, path):
    """A cache no longer than one slice (one program per sequence and KV head): the kernel normalizes and writes
    the output in place of partials and a merge launch; still SDPA over the cached values (fp32)."""
    d, n, smax = 32, 50, 60
    k, v = _kv(2, kv_heads, n, d, torch.float32, seed=5)
    codes, count = Kv4Codes(2, kv_heads, smax, d, "cpu"), torch.tensor(n)
    kv4_store(codes, count, k, v, 1.0, True)
    q = torch.randn(2, heads, 1, d, generator=torch.Generator().manual_seed(8))
    out = kv4_decode_attention(q, codes, count, d ** -0.5, True, block_s=64, **path)
    kq, vq = (t[:, :, :n].repeat_interleave(heads // kv_heads, 1) for t in codes.dequantize(torch.float32))
    ref = torch.nn.functional.scaled_dot_product_attention(fast_hadamard_transform(q), kq, vq).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_the_device_check_runs_every_path(tmp_path, monkeypatch):
    """`benchmarks/kernel_bench.py --kv4` (the GPU's check of every decode-attention path against fp32 SDPA), on two
    small shapes through the interpreter: every path runs and passes, a left-padded batch too, so the device script
    does not rot."""
    import sys

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import kernel_bench

    monkeypatch.setattr(kernel_bench, "KV4_SHAPES", [(2, 8, 8, 64, 40, 50), (2, 16, 4, 64, 40, 50)])
    monkeypatch.setattr(sys, "argv", ["kernel_bench.py", "--kv4", "--out", str(tmp_path / "kv4.json")])
    assert kernel_bench.main() == 0
    rows = json.loads((tmp_path / "kv4.json").read_text())["kv4_checks"]
    assert {r["path"] for r in rows if r["heads"] == r["kv_heads"]} == set(kernel_bench.KV4_PATHS)
    assert {r["path"] for r in rows if r["heads"] != r["kv_heads"]} == {"default", "held K"}
    assert len(rows) == 3 * (5 + 2) and all(r["ok"] and r["max_rel_err"] <= 2 ** -7 for r in rows)
    assert sum(r["left_padded"] for r in rows) == 5 + 2  # every path once more on a left-padded batch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rotate,config", [(False, None), (True, None), (True, (64, 4, True))])
def test_rope_in_the_launch_is_transformers_rope(dtype, rotate, config):
    """K and Q before the rotary embedding, cos / sin of a batch of 1 for 2 sequences: the launch applies it as
    transformers' apply_rotary_pos_emb does, rounding for rounding (without R3 every value equal, fp32 included),
    then R3 and the quantizer as without it; the cache store's codes too."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    spec = QuantSpec(bits=4, symmetric=False, clip_ratio=0.9)
    g = torch.Generator().manual_seed(5)
    k, v = _kv(2, 2, 21, 64, dtype, seed=6)
    q = torch.randn(2, 6, 21, 64, generator=g).to(dtype)
    angle = torch.rand(1, 21, 32, generator=g) * 100
    cos, sin = (f(torch.cat([angle, angle], -1)).to(dtype) for f in (torch.cos, torch.sin))
    qr, kr = apply_rotary_pos_emb(q, k, cos, sin)
    kd, vd, qd = kv4_fake_quant(k, v, 0.9, rotate, q, config=config, rope=(cos, sin))
    r3 = fast_hadamard_transform if rotate else (lambda t: t)
    want_q = r3(qr)
    if dtype == torch.float32 and rotate:  # fp32 R3 differs from torch's by summation order only
        torch.testing.assert_close(qd, want_q, rtol=0, atol=1e-5)
    else:
        assert torch.equal(qd, want_q) or (rotate and (qd != want_q).float().mean() < 1e-3)
        assert torch.equal(kd, fake_quantize(r3(kr), spec))
    assert torch.equal(vd, fake_quantize(v, spec))
    codes, ref = Kv4Codes(2, 2, 21, 64, "cpu"), Kv4Codes(2, 2, 21, 64, "cpu")
    kv4_store(codes, torch.tensor(21), k, v, 0.9, rotate, query=q, rope=(cos, sin), config=config)
    kv4_store(ref, torch.tensor(21), kr, v, 0.9, rotate, config=config)
    assert torch.equal(codes.k_codes, ref.k_codes) and torch.equal(codes.k_scale, ref.k_scale)
    with pytest.raises(ValueError, match="rotary cos / sin"):
        kv4_fake_quant(k, v, 0.9, rotate, q, rope=(cos[:, :3], sin[:, :3]))


@pytest.fixture(scope="module")
def qwen3_kernel_run(tmp_path_factory):
    """kernel_run's recipe on a Qwen3 (QK-norm) twin of the kernel Llama."""
    from tiny import quantized_kernel_run, save_kernel_qwen3_folder

    return quantized_kernel_run(tmp_path_factory.mktemp("qwen3_kernel_run"), save_kernel_qwen3_folder)


@pytest.mark.parametrize("family,dtype", [("llama", torch.float32), ("llama", torch.bfloat16),
                                          ("qwen3", torch.bfloat16)])
def test_rope_fusion_gives_the_unfused_model(request, family, dtype):
    """fuse_rope_ on the run's model (fake-quant linears; the attention on the 4-bit cache): a prompt without cache
    and decode steps over the 4-bit cache give the unfused logits exactly, through the fused forward (Qwen3: its
    QK-norms before RoPE); another cache (transformers' dynamic one) runs the original forward, also exactly."""
    from dartquant.kernels.bench import make_decode_step
    from dartquant.kernels.kv_cache import check_kv4_support, fuse_rope_, register_kv4_attention
    from dartquant.zoo import load_model

    run = request.getfixturevalue("kernel_run" if family == "llama" else "qwen3_kernel_run")
    model, _ = load_model(run, dtype=dtype)
    check_kv4_support(model)
    model.set_attn_implementation(register_kv4_attention())
    ids = torch.arange(7)[None]
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    step = make_decode_step(model, batch=2, context=6, device=torch.device("cpu"))
    want_steps = [step(), step()]
    assert fuse_rope_(model) == len(model.model.layers)
    with pytest.raises(ValueError, match="already"):
        fuse_rope_(model)
    attn = model.model.layers[0].self_attn
    unfused = attn.dq_unfused_forward
    calls = []
    attn.dq_unfused_forward = lambda *a, **kw: calls.append(1) or unfused(*a, **kw)
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, want)
    step = make_decode_step(model, batch=2, context=6, device=torch.device("cpu"))
    assert torch.equal(step(), want_steps[0]) and torch.equal(step(), want_steps[1])
    assert not calls  # the fused forward ran every time
    with torch.no_grad():  # transformers' own cache: the original forward
        assert torch.equal(model(ids, use_cache=True).logits, want) and calls


def test_generate_on_the_4bit_cache_with_rope_fused(kernel_run):
    """transformers' generate (greedy) with a Kv4StaticCache: the same tokens with the RoPE fusion as without, and
    the fused forward is what ran (the prompt into the cache, then the decode steps)."""
    from dartquant.kernels.kv_cache import Kv4StaticCache, check_kv4_support, fuse_rope_, register_kv4_attention
    from dartquant.zoo import load_model

    model, _ = load_model(kernel_run, dtype=torch.bfloat16)
    check_kv4_support(model)
    model.set_attn_implementation(register_kv4_attention())
    ids = torch.arange(3, 9)[None].repeat(2, 1)
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # transformers 5.2x

    def generate():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                              **{name: Kv4StaticCache(model.config, max_cache_len=16)})

    want = generate()
    assert fuse_rope_(model) == len(model.model.layers)
    calls = []
    for block in model.model.layers:
        unfused = block.self_attn.dq_unfused_forward
        block.self_attn.dq_unfused_forward = lambda *a, f=unfused, **kw: calls.append(1) or f(*a, **kw)
    assert torch.equal(generate(), want) and not calls
