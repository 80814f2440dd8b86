"""Calibration and evaluation text, offline: the corpora that the `exllamav2` wheel ships.

The files are read from the installed package's folder (the package is never imported).
`wiki.utf8` is 2.1 MB of English Wikipedia articles in `<doc>` tags (not WikiText-2: we call
its perplexity "wiki perplexity"); `c4.utf8` is 0.3 MB of C4 web text.

Each corpus is cut once, at a document (or line) boundary near its middle, into a calibration
half and an evaluation half *before* tokenization, so no calibration window can overlap an
evaluation window, whatever the tokenizer or sequence length. Evaluation windows are the
consecutive non-overlapping windows of the evaluation half (fixed: every run of every method
sees the same tokens); calibration windows start at seeded random offsets in the calibration half.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .packages import EXLLAMAV2

CORPORA = {
    "wiki": "wiki.utf8",
    "c4": "c4.utf8",
    "code": "code.utf8",
    "technical": "technical.utf8",
    "tiny": "tiny.utf8",
    "multilingual": "multilingual.utf8",
}
_DATA_DIR = "exllamav2/conversion/standard_cal_data"
EVAL_CORPORA = ("wiki", "c4")


def _check(name: str) -> None:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; available: {', '.join(CORPORA)}")


@lru_cache(maxsize=None)
def corpus_text(name: str) -> str:
    _check(name)
    return EXLLAMAV2.file(f"{_DATA_DIR}/{CORPORA[name]}").read_text(encoding="utf-8")


def split_point(text: str) -> int:
    """Index of a document (else line) start near the middle of `text`."""
    mid = len(text) // 2
    for marker in ("\n<doc", "\n\n", "\n"):
        after, before = text.find(marker, mid), text.rfind(marker, 0, mid)
        candidates = [i for i in (after, before) if i > 0]
        if candidates:
            return min(candidates, key=lambda i: abs(i - mid)) + 1
    return mid


def corpus_split(name: str, part: str) -> str:
    """The "calib" or "eval" half of a corpus."""
    text = corpus_text(name)
    cut = split_point(text)
    if part == "calib":
        return text[:cut]
    if part == "eval":
        return text[cut:]
    raise ValueError(f"part must be 'calib' or 'eval', not {part!r}")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """One long 1-D stream of token ids (no special tokens; windows are cut from it)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(tokenizer, corpus: str, seqlen: int = 2048, max_windows: int | None = None) -> torch.Tensor:
    """[n, seqlen] consecutive windows of the evaluation half (the first `max_windows` if given)."""
    stream = tokenize(tokenizer, corpus_split(corpus, "eval"))
    n = stream.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the {corpus} evaluation half has {stream.numel()} tokens: fewer than one window of "
                         f"{seqlen}; use a shorter sequence length")
    return stream[: n * seqlen].view(n, seqlen)


def run_windows(tokenizer, data, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the rotations' calibration windows, the quantize stage's) of a run whose `data` is a config.DataConfig:
    two prefixes of one draw of `data.windows` windows, so the first do not change with `quantize_samples`."""
    drawn = calib_windows(tokenizer, data.corpus, data.windows, data.seqlen, seed)
    return drawn[:data.samples], drawn[:data.quantize_windows]


def calib_windows(tokenizer, corpus: str = "wiki", n: int = 128, seqlen: int = 2048, seed: int = 0,
                  span: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """[n, seqlen] windows at seeded random offsets in the calibration half.

    `span` restricts the windows to a fraction of that half's token stream, e.g. (0, 0.9) for
    training and (0.9, 1) for held-out calibration sequences that never overlap them.
    """
    if n <= 0:
        raise ValueError(f"the number of calibration sequences must be positive (got {n})")
    if not 0.0 <= span[0] < span[1] <= 1.0:
        raise ValueError(f"span must satisfy 0 <= start < end <= 1, got {span}")
    stream = tokenize(tokenizer, corpus_split(corpus, "calib"))
    stream = stream[int(span[0] * stream.numel()): int(span[1] * stream.numel())]
    if stream.numel() <= seqlen:
        raise ValueError(f"the {corpus} calibration half (span {span}) has {stream.numel()} tokens: too few for "
                         f"windows of {seqlen}; use a shorter sequence length")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen, (n,), generator=g)
    return torch.stack([stream[s: s + seqlen] for s in starts.tolist()])
