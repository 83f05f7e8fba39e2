"""Notebook 12: what a training run changed on a held-out set, and whether the change is larger than its noise.

Every comparison of notebook 12 (full fine-tuning against LoRA, clean against corrupted data, few against many
examples) is a change of answer perplexity on the same held-out examples. Two numbers make such a change readable:

- ``answer_nlls``: each example's summed answer loss (nats) and its number of answer tokens, batched
  (the same loss as ``evaluate.perplexity``, which the tests check), and
- ``perplexity_change``: the change of log-perplexity between two such measurements on the same examples, with its
  **paired standard error** over the examples: the noise floor of the comparison. Log-perplexity is the
  token-weighted mean loss, a ratio of sums over examples, sum(nll) / sum(tokens); its change is the ratio
  sum(d_i) / sum(n_i) of the per-example differences d_i of summed loss. Its standard error, by the delta method for
  a ratio of means over k examples, is sd(d_i - delta * n_i) / (sqrt(k) * mean(n_i)). Paired, because both sides
  score the same examples: what the examples share (some answers are hard for every model) cancels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def answer_nlls(model: Any, tokenizer: Any, examples: list[dict[str, Any]],
                max_length: int = 256, batch_size: int = 12) -> list[tuple[float, int]]:
    """``(summed answer loss in nats, answer tokens)`` of each example, the output layer run only where an answer token
    is read (``practice.answer_logits``): log(perplexity) x tokens of ``evaluate.perplexity`` on that example, to float
    rounding (tests/test_forgetting.py checks each example and the sum against it).

    Examples are scored ``batch_size`` at a time, padded on the right: a causal model's real positions never attend to
    the padding after them, so each row's losses are the ones it has alone, up to the rounding of another matrix shape
    (measured on notebook 12's two held-out sets, 24 examples on a 2-core Intel Xeon: 3.4-3.7 s one at a time,
    2.5 s twelve at a time).
    """
    import torch

    from .data import collate, tokenize_example
    from .practice import answer_logits

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = next(model.parameters()).device
    feats = [tokenize_example(tokenizer, ex, max_length) for ex in examples]
    counts = [sum(label != -100 for label in f["labels"][1:]) for f in feats]
    for ex, n in zip(examples, counts):
        if n == 0:
            raise ValueError(f"example {ex.get('id', '?')} has no answer token within max_length={max_length}: "
                             "raise max_length or shorten the prompt")
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for i in range(0, len(feats), batch_size):
                batch = {k: v.to(device) for k, v in collate(feats[i:i + batch_size], tokenizer.pad_token_id).items()}
                logits, targets = answer_logits(model, batch)
                nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                        targets.reshape(-1), ignore_index=-100, reduction="none")
                sums = nll.reshape(targets.shape).sum(1).tolist()
                out.extend(zip(sums, counts[i:i + batch_size]))
    finally:
        model.train(was_training)
    return out


def log_perplexity(nlls: list[tuple[float, int]]) -> float:
    """The token-weighted mean answer loss of ``answer_nlls``: log of ``evaluate.perplexity`` over the same examples."""
    if not nlls:
        raise ValueError("no examples: measure answer_nlls on at least one example")
    return sum(s for s, _ in nlls) / sum(n for _, n in nlls)


@dataclass(frozen=True)
class PerplexityChange:
    """Answer perplexity before and after on the same examples, the change of its log and that change's standard
    error over the examples (paired)."""

    before: float  # perplexity
    after: float
    delta: float  # log(after) - log(before): < 0 the model got better on these answers, > 0 worse
    se: float  # standard error of delta over the examples
    n: int  # examples

    @property
    def ratio(self) -> float:
        """after / before: 0.5 halves the perplexity, 2.0 doubles it."""
        return math.exp(self.delta)


def perplexity_change(before: list[tuple[float, int]], after: list[tuple[float, int]]) -> PerplexityChange:
    """The change from ``before`` to ``after`` (``answer_nlls`` of two models, or of one model before and after
    training, on the same examples in the same order), with its paired standard error (module docstring)."""
    if len(before) != len(after):
        raise ValueError(f"{len(before)} and {len(after)} examples: compare measurements of the same examples")
    if len(before) < 2:
        raise ValueError("a standard error needs at least 2 examples")
    if [n for _, n in before] != [n for _, n in after]:
        raise ValueError("the examples' token counts differ: both measurements must score the same examples in the "
                         "same order with the same tokenizer and max_length")
    k = len(before)
    tokens = [n for _, n in before]
    d = [a - b for (b, _), (a, _) in zip(before, after)]
    delta = sum(d) / sum(tokens)
    resid = [di - delta * n for di, n in zip(d, tokens)]
    mean_r = sum(resid) / k  # 0 up to rounding, by the choice of delta
    sd = math.sqrt(sum((r - mean_r) ** 2 for r in resid) / (k - 1))
    se = sd / (math.sqrt(k) * (sum(tokens) / k))
    lb, la = log_perplexity(before), log_perplexity(after)
    return PerplexityChange(before=math.exp(lb), after=math.exp(la), delta=la - lb, se=se, n=k)


__all__ = ["PerplexityChange", "answer_nlls", "log_perplexity", "perplexity_change"]
