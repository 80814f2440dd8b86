"""Evaluation of (quantized) models: zero-shot tasks through lm-evaluation-harness (:mod:`.zeroshot`)."""
