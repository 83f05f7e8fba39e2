"""Clean a chat dataset before fine-tuning: the checks the references ask for, each removal with its reason.

``clean_examples`` keeps an example only when it is a well-formed conversation (user then assistant turns, in
order, the last one the assistant's, no empty turn), is not an exact repeat of an earlier one, fits the context
(``max_length`` tokens through the model's chat template), and does not share a prompt with the held-out set
(a leaked eval prompt makes the held-out metric measure memory). ``CleanReport`` lists what was removed and why.

Used by notebook 13 (the capstone), on the course's three tasks: the code task's 160 training examples hold 80
exact repeats (its generator draws from a small pool of functions), which cleaning removes.

Sources: the references' data-quality guidance ("1,000 high-quality examples beat 10,000 noisy ones"; deduplicate,
check the format, keep the eval set apart), TRL's conversational dataset format (``{"messages": [...]}``).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

REASONS: tuple[str, ...] = ("malformed", "empty turn", "duplicate", "too long", "held-out prompt")


@dataclass
class CleanReport:
    """The examples kept, and those removed grouped by reason (``REASONS``), in input order."""

    kept: list[dict[str, Any]]
    removed: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {r: [] for r in REASONS})
    lengths: list[int] = field(default_factory=list)  # tokens of each kept example through the chat template

    @property
    def n_in(self) -> int:
        return len(self.kept) + sum(len(v) for v in self.removed.values())

    def counts(self) -> dict[str, int]:
        return {r: len(v) for r, v in self.removed.items()}

    def __str__(self) -> str:
        lines = [f"{self.n_in} examples in, {len(self.kept)} kept"]
        lines += [f"  removed {n:4d}  {r}" for r, n in self.counts().items()]
        if self.lengths:
            s = sorted(self.lengths)
            lines.append(f"  kept lengths (tokens): min {s[0]}, median {s[len(s) // 2]}, max {s[-1]}")
        return "\n".join(lines)


def _turns(ex: Any) -> list[dict[str, str]] | None:
    messages = ex.get("messages") if isinstance(ex, dict) else None
    if not isinstance(messages, list) or not messages:
        return None
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        return None
    return messages


def _well_formed(messages: list[dict[str, str]]) -> bool:
    """An optional system turn, then user/assistant alternating, starting with user and ending with assistant."""
    roles = [m.get("role") for m in messages]
    if roles and roles[0] == "system":
        roles = roles[1:]
    return (len(roles) >= 2 and len(roles) % 2 == 0 and roles[-1] == "assistant"
            and all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)))


def _key(messages: list[dict[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((m["role"], " ".join(m["content"].split())) for m in messages)  # whitespace-insensitive


def clean_examples(examples: list[dict[str, Any]], tokenizer: Any = None, max_length: int | None = None,
                   held_out: list[dict[str, Any]] = ()) -> CleanReport:
    """Keep the usable examples of ``examples`` (``{"messages": [...]}`` dicts); see the module docstring.

    ``tokenizer`` and ``max_length`` go together: an example whose chat-template rendering is longer than
    ``max_length`` tokens is removed (training would cut its answer). Duplicates compare role and content with
    whitespace collapsed; the first occurrence is kept. ``held_out`` examples' prompts (every turn but the last) may
    not appear in a kept example.
    """
    if (tokenizer is None) != (max_length is None):
        raise ValueError("give tokenizer and max_length together (the length check renders each example with the "
                         "tokenizer's chat template), or neither")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive number of tokens, got {max_length!r}")
    leaked = {_key(t[:-1]) for t in (_turns(ex) for ex in held_out) if t}
    report = CleanReport([])
    seen: set[tuple[tuple[str, str], ...]] = set()
    for ex in examples:
        messages = _turns(ex)
        if messages is None or not _well_formed(messages):
            report.removed["malformed"].append(ex)
            continue
        if any(not m["content"].strip() for m in messages):
            report.removed["empty turn"].append(ex)
            continue
        key = _key(messages)
        if key in seen:
            report.removed["duplicate"].append(ex)
            continue
        seen.add(key)
        if _key(messages[:-1]) in leaked:
            report.removed["held-out prompt"].append(ex)
            continue
        if tokenizer is not None:
            ids = tokenizer.apply_chat_template(messages, tokenize=True)
            n = len(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5 returns a BatchEncoding
            if n > max_length:
                report.removed["too long"].append(ex)
                continue
            report.lengths.append(n)
        report.kept.append(ex)
    return report


def task_mix(examples: list[dict[str, Any]]) -> dict[str, int]:
    """How many examples of each ``task`` field (``"?"`` when absent)."""
    return dict(Counter(ex.get("task", "?") for ex in examples))


__all__ = ["REASONS", "CleanReport", "clean_examples", "task_mix"]
