"""Shared evaluation: batched greedy generation, each task's metric, and answer perplexity.

Every chapter measures "before and after" the same way, so numbers compare across notebooks:

- ``generate``: left-padded batched greedy decoding through the chat template;
- ``score``: the task metric (``technical``: JSON format rate and exact answers; ``creative``: poem-form rate;
  ``code``: share of functions that pass their unit tests, run in a separate Python process with a timeout);
- ``perplexity``: exp of the mean loss over the reference answers' tokens (assistant tokens only).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .data import extract_code, poem_form_ok, prompt_messages, reference

PRIMARY_METRIC: dict[str, str] = {"technical": "exact", "creative": "form", "code": "pass"}
MAX_NEW_TOKENS: dict[str, int] = {"technical": 24, "creative": 40, "code": 48}


@dataclass
class EvalResult:
    """One evaluation: the task metric(s), perplexity, and the generations (for inspection)."""

    task: str
    metrics: dict[str, float]
    perplexity: float | None = None
    outputs: list[str] = field(default_factory=list)

    @property
    def primary(self) -> float:
        """The task's headline metric (exact answers, poem form, or tests passed)."""
        return self.metrics[PRIMARY_METRIC[self.task]]

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, **self.metrics, "perplexity": self.perplexity}


# ------------------------------------------------------------------------------------------- generation
def chat_prompts(tokenizer: Any, conversations: list[list[dict[str, str]]]) -> list[str]:
    """Render conversations through the model's chat template, ending with the assistant's turn opener."""
    return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]


def generate(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], max_new_tokens: int = 32,
             batch_size: int = 16, **gen_kwargs: Any) -> list[str]:
    """Greedy replies to chat conversations, in batches with left padding (as decoder-only generation needs)."""
    import torch

    tokenizer.padding_side = "left"
    texts = chat_prompts(tokenizer, conversations)
    device = next(model.parameters()).device
    out: list[str] = []
    gen_kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
                  **gen_kwargs}
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            ids = model.generate(**batch, **gen_kwargs)
            new = ids[:, batch["input_ids"].shape[1]:]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    model.train(was_training)
    return [o.strip() for o in out]


# ---------------------------------------------------------------------------------------------- metrics
def _technical_scores(outputs: list[str], examples: list[dict[str, Any]]) -> dict[str, float]:
    fmt = exact = 0
    for text, ex in zip(outputs, examples):
        try:
            obj = json.loads(text)
        except ValueError:
            continue
        if not (isinstance(obj, dict) and set(obj) == {"value", "unit"} and isinstance(obj["value"], (int, float))
                and isinstance(obj["unit"], str)):
            continue
        fmt += 1
        want = ex["meta"]
        exact += obj["unit"] == want["unit"] and math.isclose(obj["value"], want["value"], rel_tol=1e-6)
    n = max(len(examples), 1)
    return {"format": fmt / n, "exact": exact / n}


def _creative_scores(outputs: list[str], examples: list[dict[str, Any]]) -> dict[str, float]:
    form = sum(poem_form_ok(t, ex["meta"]["topic"]) for t, ex in zip(outputs, examples))
    lines3 = sum(len([x for x in t.splitlines() if x.strip()]) == 3 for t in outputs)
    n = max(len(examples), 1)
    return {"form": form / n, "three_lines": lines3 / n}


def run_code_tests(code: str, tests: str, timeout: float = 5.0) -> bool:
    """Run ``code`` then its ``tests`` in a fresh isolated Python process; True when every assert passes.

    A separate process with a timeout, never ``exec`` in the notebook: generated code may loop forever, crash
    the interpreter or touch files.
    """
    program = code + "\n\n" + tests + "\n"
    try:
        proc = subprocess.run([sys.executable, "-I", "-c", program], capture_output=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def _code_scores(outputs: list[str], examples: list[dict[str, Any]]) -> dict[str, float]:
    codes = [extract_code(t) for t in outputs]
    syntax = 0
    for c in codes:
        try:
            compile(c, "<generated>", "exec")
            syntax += 1
        except (SyntaxError, ValueError):
            pass
    with ThreadPoolExecutor(max_workers=2) as pool:
        passed = list(pool.map(lambda ce: run_code_tests(ce[0], ce[1]["meta"]["tests"]), zip(codes, examples)))
    n = max(len(examples), 1)
    return {"pass": sum(passed) / n, "syntax": syntax / n}


_SCORERS = {"technical": _technical_scores, "creative": _creative_scores, "code": _code_scores}


def score(task: str, outputs: list[str], examples: list[dict[str, Any]]) -> dict[str, float]:
    """The task metric(s) of generated ``outputs`` against ``examples`` (same order)."""
    if task not in _SCORERS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(_SCORERS)}")
    if len(outputs) != len(examples):
        raise ValueError(f"{len(outputs)} outputs for {len(examples)} examples: they must pair one to one")
    return _SCORERS[task](outputs, examples)


# ------------------------------------------------------------------------------------------- perplexity
def perplexity(model: Any, tokenizer: Any, examples: list[dict[str, Any]], batch_size: int = 16,
               max_length: int = 256) -> float:
    """exp(mean token loss) over the reference answers given their prompts (assistant tokens only)."""
    import torch

    from .data import collate, tokenize_example

    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(examples), batch_size):
            feats = [tokenize_example(tokenizer, ex, max_length) for ex in examples[i:i + batch_size]]
            batch = {k: v.to(device) for k, v in collate(feats, tokenizer.pad_token_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     labels.reshape(-1), ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((labels != -100).sum())
    model.train(was_training)
    return math.exp(total / max(count, 1))


def evaluate_task(model: Any, tokenizer: Any, task: str, examples: list[dict[str, Any]],
                  with_perplexity: bool = True, batch_size: int = 16, **gen_kwargs: Any) -> EvalResult:
    """Generate answers for ``examples`` of ``task``, score them, and (optionally) measure answer perplexity."""
    outputs = generate(model, tokenizer, [prompt_messages(ex) for ex in examples],
                       max_new_tokens=gen_kwargs.pop("max_new_tokens", MAX_NEW_TOKENS[task]),
                       batch_size=batch_size, **gen_kwargs)
    ppl = perplexity(model, tokenizer, examples, batch_size=batch_size) if with_perplexity else None
    return EvalResult(task, score(task, outputs, examples), ppl, outputs)


__all__ = [
    "PRIMARY_METRIC",
    "EvalResult",
    "evaluate_task",
    "generate",
    "perplexity",
    "reference",
    "run_code_tests",
    "score",
]
