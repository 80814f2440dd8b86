"""Zero-shot tasks on a streamed model: lm-eval runs twice over the skeleton, record then replay.

lm-eval (through HFLM) asks for the logits of one batch of requests at a time and scores it at
once; a streamed model has the last hidden states of a batch only after every block has gone
over it. So:
  1. record: lm-eval runs with a model call that keeps each input batch and answers zeros (its
     scores are thrown away). Its batching and order depend only on the requests, so this is the
     list of batches it will ask for.
  2. the streamed passes carry those batches through the blocks beside the perplexity windows
     (host-resident hidden states, right-padded rows: a causal model's real tokens never see the
     padding, as in HFLM's own forward);
  3. replay: lm-eval runs again, each call answered with head(norm(hidden)) of its recorded batch,
     checked to be the same tokens.
The tasks, prompts, tokenization and metrics stay lm-eval's (eval/zeroshot.py); the FP and the
quantized model each get a replay. Memory: the hidden states of every request, on the host.
"""

from __future__ import annotations

import torch

from ..eval.zeroshot import evaluate_zeroshot
from .passes import logits


class _Recorder:
    def __init__(self, vocab: int):
        self.vocab, self.batches = vocab, []

    def __call__(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        self.batches.append(inps.detach().cpu().clone())
        return torch.zeros((), dtype=torch.float32).expand(*inps.shape, self.vocab)


class _Replayer:
    def __init__(self, batches: list[torch.Tensor], hidden: list[torch.Tensor], norm, head, device):
        self.batches, self.hidden, self.norm, self.head, self.device = batches, hidden, norm, head, device
        self.i = 0

    def __call__(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if self.i >= len(self.batches) or not torch.equal(inps.cpu(), self.batches[self.i]):
            raise RuntimeError(f"zero-shot replay: lm-eval asked for a batch ({self.i}) it did not ask for when "
                               "recorded; its batching is expected to depend on the requests only")
        out = logits(self.norm, self.head, self.hidden[self.i], self.device).cpu()  # the model dtype, as in memory
        self.i += 1
        return out


class StreamedZeroShot:
    """The zero-shot part of a streamed run: `batches` (token ids) to carry through the blocks,
    then `results(hidden, norm, head)` as evaluate_zeroshot returns them."""

    def __init__(self, skeleton, tokenizer, tasks, *, limit, max_length: int, seed: int, dtype: torch.dtype):
        # dtype: the run's compute dtype (the log-softmax's, as in memory; the skeleton's meta
        # parameters do not say it)
        self.args = dict(tasks=tasks, limit=limit, max_length=max_length, seed=seed, progress=False, dtype=dtype)
        self.skeleton, self.tokenizer = skeleton, tokenizer
        recorder = _Recorder(skeleton.get_output_embeddings().out_features)
        evaluate_zeroshot(skeleton, tokenizer, model_call=recorder, **self.args)
        self.batches = recorder.batches

    def results(self, hidden: list[torch.Tensor], norm, head, device) -> dict:
        replayer = _Replayer(self.batches, hidden, norm, head, device)
        out = evaluate_zeroshot(self.skeleton, self.tokenizer, model_call=replayer, **self.args)
        if replayer.i != len(self.batches):
            raise RuntimeError(f"zero-shot replay: lm-eval asked for {replayer.i} of {len(self.batches)} batches")
        return out
