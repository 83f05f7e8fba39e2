"""Synthetic multi-turn chats of realistic, varied lengths: the data the SFT benchmark trains on.

- ``varied_lengths``: target lengths drawn from a log-normal distribution (as instruction-tuning sets look), seeded and
  clipped to [lo, hi];
- ``conversations``: tokenized chats of about those lengths, strung together from the course's three tasks' training
  examples (``data.load_task``), labels on the assistant replies and their end tokens only
  (``chat_format.training_chat_template``), cut at ``max_length``.

``bench.make_rows`` sizes them for a benchmark recipe; through it notebook 06's benchmark table, ``cpu_bench`` and
``make bench-gpu`` (docs/benchmarks.md, "Data": median 384 tokens, sigma 0.6, clipped to 32-1024) use them.
Sources: transformers' ``apply_chat_template(return_assistant_tokens_mask=True)``, which reads the template's
``{% generation %}`` markers, for the labels.
"""
from __future__ import annotations

import math
import random
from typing import Any


def varied_lengths(n: int, median: int, sigma: float = 0.6, lo: int = 32, hi: int = 1024, seed: int = 0) -> list[int]:
    """``n`` target lengths from a log-normal distribution (as instruction-tuning sets look), clipped to [lo, hi]."""
    if not 0 < lo <= median <= hi:
        raise ValueError(f"need 0 < lo <= median <= hi, got lo={lo} median={median} hi={hi}")
    rng = random.Random(seed)
    return [min(hi, max(lo, round(median * math.exp(rng.gauss(0.0, sigma))))) for _ in range(n)]


def conversations(tokenizer: Any, lengths: list[int], max_length: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Tokenized multi-turn chats of about the given lengths, built from the three tasks' training examples.

    Each chat strings together user/assistant exchanges until its target length; labels cover the assistant
    replies and their end tokens only (the chat template with generation markers,
    ``chat_format.training_chat_template``). Chats are cut at ``max_length`` tokens.
    """
    from .chat_format import training_chat_template
    from .data import TASKS, load_task

    template = training_chat_template(tokenizer)
    pool = [ex["messages"] for t in TASKS for ex in load_task(t, "train")]
    est = [len(tokenizer(m[0]["content"] + m[1]["content"], add_special_tokens=False)["input_ids"]) + 10 for m in pool]
    rng = random.Random(seed)
    rows = []
    for target in lengths:
        msgs: list[dict[str, str]] = []
        total = 20  # the default system prompt
        while not msgs or total < target:
            i = rng.randrange(len(pool))
            msgs += pool[i]
            total += est[i]
        enc = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                            chat_template=template)
        ids = list(enc["input_ids"])[:max_length]
        mask = list(enc["assistant_masks"])[:max_length]
        rows.append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]})
    return rows


__all__ = ["conversations", "varied_lengths"]
