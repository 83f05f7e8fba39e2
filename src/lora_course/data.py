"""The course's three fine-tuning tasks: generated deterministically, stored as chat ``messages``, validated.

Each task is small enough to train on a CPU in about a minute, and built to test generalisation, not memory:
the eval split uses held-out numbers (``technical``), held-out topics (``creative``) and held-out constants
(``code``), so a rising score means the adapter learned the skill and the format.

- ``technical``: unit conversions answered as one JSON object ``{"value": <number>, "unit": "<unit>"}``.
- ``creative``: three-line poems in a fixed form (exactly three lines, 2-8 words each, the topic in line one).
- ``code``: short Python functions from a one-line description, scored by running unit tests in a separate
  process with a timeout (``lora_course.evaluate.run_code_tests``).

The ``test`` split draws 100 more held-out examples from the eval split's pools (prompts may repeat the eval split's
30, never the training split's): notebook 09's experiments score their exact-match metric on it, where 30 items leave
a resolution of 3.3 points and a sampling noise of up to 9. The technical task's pool holds 100 distinct test prompts;
the creative and code pools hold 30 (held-out topics and constants), so their test splits repeat prompts.

``python -m lora_course.data --write data`` regenerates ``data/<task>/{train,eval,test}.jsonl`` (committed).
"""
from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .paths import data_dir, write_text_atomic

TASKS: tuple[str, ...] = ("technical", "creative", "code")
SPLITS: tuple[str, ...] = ("train", "eval", "test")
SIZES: dict[str, int] = {"train": 160, "eval": 30, "test": 100}
SEED = 1234


class TaskDataError(ValueError):
    """A task file is missing or does not follow the schema; the message names the file, line and fix."""


# --------------------------------------------------------------------------------------------- technical
# (from unit, to unit, factor): answers stay integers or short decimals so "exact" is well defined.
CONVERSIONS: list[tuple[str, str, float]] = [
    ("km", "m", 1000), ("m", "cm", 100), ("cm", "mm", 10), ("m", "mm", 1000), ("kg", "g", 1000),
    ("g", "mg", 1000), ("L", "mL", 1000), ("h", "min", 60), ("min", "s", 60), ("d", "h", 24),
    ("wk", "d", 7), ("ft", "in", 12), ("yd", "ft", 3), ("t", "kg", 1000),
]


def _technical(rng: random.Random, values: list[float]) -> dict[str, Any]:
    src, dst, factor = rng.choice(CONVERSIONS)
    value = rng.choice(values)
    answer = round(value * factor, 6)
    answer = int(answer) if float(answer).is_integer() else answer
    shown = int(value) if float(value).is_integer() else value
    return {
        "messages": [
            {"role": "user", "content": f"Convert {shown} {src} to {dst}. Answer in JSON."},
            {"role": "assistant", "content": json.dumps({"value": answer, "unit": dst})},
        ],
        "meta": {"value": answer, "unit": dst},
    }


# ---------------------------------------------------------------------------------------------- creative
TOPICS_TRAIN = [
    "river", "moon", "lantern", "forest", "harbor", "winter", "candle", "mountain", "garden", "train",
    "library", "desert", "storm", "bridge", "island", "meadow", "violin", "market", "glacier", "orchard",
    "lighthouse", "kettle", "clock", "feather", "canyon", "comet", "village", "rain", "ember", "window",
    "anchor", "meadowlark", "tide", "compass", "attic", "pebble", "thunder", "bakery", "frost", "shadow",
]
TOPICS_EVAL = [
    "ocean", "star", "city", "snow", "bell", "garden gate", "road", "cloud", "mirror", "piano",
    "field", "fire", "valley", "ship", "owl", "autumn", "tower", "sunrise", "lake", "wind",
    "castle", "kite", "well", "flower", "stone", "rooftop", "harvest", "dawn", "cottage", "echo",
]
_ADJ = ["quiet", "silver", "old", "gentle", "golden", "restless", "pale", "bright", "patient", "distant"]
_VERB = ["hums", "waits", "glows", "drifts", "sleeps", "listens", "turns", "sings", "rests", "wakes"]
_PLACE = ["below the hills", "in the evening", "by the water", "under the sky", "near the road",
          "in the morning", "across the fields", "beyond the trees"]
_CLOSE = ["and I remember home", "the night holds its breath", "soft light finds the way",
          "time walks slowly here", "we carry it along", "the world grows still", "a small song remains",
          "nothing else is needed"]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _creative(rng: random.Random, topics: list[str]) -> dict[str, Any]:
    topic = rng.choice(topics)
    lines = [
        f"The {rng.choice(_ADJ)} {topic} {rng.choice(_VERB)}",
        f"{_cap(rng.choice(_ADJ))} and {rng.choice(_ADJ)} {rng.choice(_PLACE)}",
        _cap(rng.choice(_CLOSE)),
    ]
    return {
        "messages": [
            {"role": "user", "content": f"Write a three-line poem about the {topic}."},
            {"role": "assistant", "content": "\n".join(lines)},
        ],
        "meta": {"topic": topic},
    }


def poem_form_ok(text: str, topic: str) -> bool:
    """The creative task's form: exactly three non-empty lines of 2-8 words, the topic named in line one."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) != 3:
        return False
    if not all(2 <= len(line.split()) <= 8 for line in lines):
        return False
    return topic.lower() in lines[0].lower()


# -------------------------------------------------------------------------------------------------- code
# Each family: (name template, signature, description, body, test cases (args, expected)).
CODE_FAMILIES: list[dict[str, Any]] = [
    {"name": "times_{k}", "args": "x", "desc": "returns x multiplied by {k}", "body": "return x * {k}",
     "cases": lambda k: [((3,), 3 * k), ((-2,), -2 * k), ((0,), 0)]},
    {"name": "add_{k}", "args": "x", "desc": "returns x plus {k}", "body": "return x + {k}",
     "cases": lambda k: [((1,), 1 + k), ((-5,), -5 + k), ((10,), 10 + k)]},
    {"name": "divisible_by_{k}", "args": "n", "desc": "returns True if n is divisible by {k}, else False",
     "body": "return n % {k} == 0", "cases": lambda k: [((k * 3,), True), ((k * 2 + 1,), (k * 2 + 1) % k == 0)]},
    {"name": "first_{k}_squares", "args": "", "desc": "returns a list of the squares of 1 to {k}",
     "body": "return [i * i for i in range(1, {k} + 1)]", "cases": lambda k: [((), [i * i for i in range(1, k + 1)])]},
    {"name": "repeat_{k}", "args": "s", "desc": "returns the string s repeated {k} times", "body": "return s * {k}",
     "cases": lambda k: [(("ab",), "ab" * k), (("",), "")]},
    {"name": "sum_above_{k}", "args": "xs", "desc": "returns the sum of the numbers in xs that are greater than {k}",
     "body": "return sum(x for x in xs if x > {k})",
     "cases": lambda k: [(([k - 1, k, k + 1, k + 5],), 2 * k + 6), (([],), 0)]},
    {"name": "power_{k}", "args": "xs", "desc": "returns a list with each number in xs raised to the power {k}",
     "body": "return [x ** {k} for x in xs]", "cases": lambda k: [(([1, 2, 3],), [1, 2 ** k, 3 ** k])]},
    {"name": "last_{k}", "args": "xs", "desc": "returns the last {k} items of the list xs",
     "body": "return xs[-{k}:]", "cases": lambda k: [((list(range(20)),), list(range(20))[-k:])]},
    {"name": "count_over_{k}", "args": "xs", "desc": "returns how many numbers in xs are greater than {k}",
     "body": "return sum(1 for x in xs if x > {k})", "cases": lambda k: [(([k, k + 1, k + 2, 0],), 2)]},
    {"name": "clamp_{k}", "args": "x", "desc": "returns x, but never more than {k}", "body": "return min(x, {k})",
     "cases": lambda k: [((k + 4,), k), ((k - 3,), k - 3)]},
]
K_TRAIN = [2, 3, 4, 5, 6, 8, 10, 12]
K_EVAL = [7, 9, 11]


def _code(rng: random.Random, ks: list[int]) -> dict[str, Any]:
    fam = rng.choice(CODE_FAMILIES)
    k = rng.choice(ks)
    name = fam["name"].format(k=k)
    body = fam["body"].format(k=k)
    code = f"def {name}({fam['args']}):\n    {body}\n"
    tests = "\n".join(f"assert {name}({', '.join(map(repr, args))}) == {expected!r}"
                      for args, expected in fam["cases"](k))
    signature = f"{name}({fam['args']})"
    return {
        "messages": [
            {"role": "user", "content": f"Write a Python function `{signature}` that {fam['desc'].format(k=k)}."},
            {"role": "assistant", "content": f"```python\n{code}```"},
        ],
        "meta": {"entry_point": name, "tests": tests},
    }


# ------------------------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class _Pools:
    train: Any
    eval: Any


_POOLS = {
    "technical": _Pools([float(v) for v in range(2, 60) if v % 5] + [2.5, 3.5, 4.5, 1.5, 7.5],
                        [float(v) for v in range(60, 100) if v % 5] + [0.5, 6.5, 8.5]),
    "creative": _Pools(TOPICS_TRAIN, TOPICS_EVAL),
    "code": _Pools(K_TRAIN, K_EVAL),
}
_MAKERS = {"technical": _technical, "creative": _creative, "code": _code}


def generate_task(task: str, split: str, n: int | None = None, seed: int = SEED) -> list[dict[str, Any]]:
    """Generate ``n`` examples of ``task``/``split`` deterministically (same seed, same bytes)."""
    _check_name(task, split)
    rng = random.Random(f"{seed}-{task}-{split}")
    pool = getattr(_POOLS[task], "eval" if split == "test" else split)  # test: more draws from the held-out pools
    n = SIZES[split] if n is None else n
    out, seen, tries = [], set(), 0
    while len(out) < n:
        ex = _MAKERS[task](rng, pool)
        key = ex["messages"][0]["content"]
        tries += 1
        if key in seen and tries < 50 * n:  # avoid exact duplicate prompts while the pool still allows it
            continue
        seen.add(key)
        out.append({"id": f"{task}-{split}-{len(out):04d}", "task": task, **ex})
    return out


def write_tasks(root: Path) -> list[Path]:
    """Write every task's splits as JSON lines under ``root/<task>/<split>.jsonl``; returns the paths."""
    paths = []
    for task in TASKS:
        for split in SPLITS:
            path = Path(root) / task / f"{split}.jsonl"
            write_text_atomic(path, "".join(json.dumps(ex, sort_keys=True) + "\n" for ex in generate_task(task, split)))
            paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------- validation
_META_FIELDS = {"technical": {"value", "unit"}, "creative": {"topic"}, "code": {"entry_point", "tests"}}


def _check_name(task: str, split: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")


def validate_example(ex: Any, task: str, where: str = "example") -> None:
    """Raise :class:`TaskDataError` naming what is wrong with one example of ``task``."""
    if not isinstance(ex, dict):
        raise TaskDataError(f"{where}: expected a JSON object, got {type(ex).__name__}")
    for field in ("id", "task", "messages", "meta"):
        if field not in ex:
            raise TaskDataError(f"{where}: missing field {field!r}; every example needs id, task, messages, meta "
                                "(regenerate with `make data`)")
    if ex["task"] != task:
        raise TaskDataError(f"{where}: field 'task' is {ex['task']!r}, expected {task!r}")
    msgs = ex["messages"]
    if not isinstance(msgs, list) or len(msgs) < 2:
        raise TaskDataError(f"{where}: 'messages' must be a list of at least a user and an assistant turn")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in {"system", "user", "assistant"} or not isinstance(
                m.get("content"), str):
            raise TaskDataError(f"{where}: messages[{i}] must be {{'role': system|user|assistant, "
                                f"'content': str}}, got {m!r}")
    if msgs[-1]["role"] != "assistant":
        raise TaskDataError(f"{where}: the last message must be the assistant's answer, got {msgs[-1]['role']!r}")
    missing = _META_FIELDS[task] - set(ex["meta"])
    if missing:
        raise TaskDataError(f"{where}: 'meta' lacks {sorted(missing)} needed by the {task} metric")


def load_task(name: str, split: str = "train", root: Path | None = None) -> list[dict[str, Any]]:
    """Load and validate ``data/<name>/<split>.jsonl``: a list of examples with ``messages`` and ``meta``.

    Each line is checked, so a hand-edited or truncated file fails here with its path and line number rather
    than deep inside a trainer.
    """
    _check_name(name, split)
    path = Path(root or data_dir()) / name / f"{split}.jsonl"
    if not path.exists():
        raise TaskDataError(f"{path} does not exist: regenerate the task files with `make data`")
    out = []
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw[: e.start].count(b"\n") + 1
        raise TaskDataError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}): save the file "
                            "as UTF-8, or regenerate it with `make data`") from e
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path}:{lineno}: not valid JSON ({e.msg}); regenerate with `make data`") from e
        validate_example(ex, name, where=f"{path}:{lineno}")
        out.append(ex)
    if not out:
        raise TaskDataError(f"{path} holds no examples: regenerate with `make data`")
    return out


def prompt_messages(ex: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation up to (not including) the reference answer: what the model is asked."""
    return ex["messages"][:-1]


def reference(ex: dict[str, Any]) -> str:
    """The reference answer of an example."""
    return ex["messages"][-1]["content"]


def tokenize_example(tokenizer: Any, ex: dict[str, Any], max_length: int = 256) -> dict[str, list[int]]:
    """Token ids and labels of one example for assistant-only training.

    The prompt (everything up to the assistant's turn opener, rendered by the chat template) and the answer
    (the reference plus the eos token, so the model learns to stop) are tokenized separately and concatenated:
    exactly the tokens the model sees at generation time. Prompt tokens get label -100 (no loss).
    """
    prompt = tokenizer.apply_chat_template(prompt_messages(ex), tokenize=False, add_generation_prompt=True)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(reference(ex) + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    ids = (p_ids + a_ids)[:max_length]
    labels = ([-100] * len(p_ids) + a_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


def collate(features: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad tokenized examples into a batch of tensors (input_ids, attention_mask, labels)."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(f["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def corrupt_answers(examples: list[dict[str, Any]], fraction: float, seed: int = 0) -> list[dict[str, Any]]:
    """A copy of ``examples`` in which ``fraction`` of them (chosen by ``seed``) carry another chosen example's answer.

    Label noise, as in a scraped data set: every answer is still a well-formed answer of the task, but it answers
    another prompt. The chosen answers are rotated by one place among the chosen examples, so every chosen example
    gets a different example's answer (a derangement); each keeps its own prompt and ``meta``, gets ``"corrupted":
    True`` and keeps its id. The choice does not depend on the batch order of ``global_batches`` with the same
    seed. The others are unchanged copies. ``fraction`` 0 changes nothing; at least 2 examples are
    chosen otherwise (one cannot swap with itself).
    """
    import copy

    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    out = copy.deepcopy(examples)
    k = round(fraction * len(out))
    if k == 0:
        return out
    if len(out) < 2:
        raise ValueError("corrupting answers needs at least 2 examples (an answer moves to another prompt)")
    # A stream of its own: random.Random(seed).sample draws the same numbers as the batches' shuffle of the same seed
    # (global_batches), which puts exactly the chosen examples last, out of a short run's batches.
    chosen = sorted(random.Random(f"corrupt-answers-{seed}").sample(range(len(out)), max(k, 2)))
    answers = [examples[i]["messages"][-1]["content"] for i in chosen]
    for j, i in enumerate(chosen):
        out[i]["messages"][-1]["content"] = answers[(j + 1) % len(chosen)]
        out[i]["corrupted"] = True
    return out


_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(text: str) -> str:
    """The Python code of a reply: the first fenced block if there is one, else the whole text."""
    m = _FENCE.search(text)
    return (m.group(1) if m else text).strip() + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, required=True, help="folder to write <task>/<split>.jsonl into")
    args = parser.parse_args(argv)
    for p in write_tasks(args.write):
        print(p)


if __name__ == "__main__":
    main()


def global_batches(n_examples: int, global_batch: int, steps: int, seed: int) -> list[list[int]]:
    """Example indices of every step's (global) batch: a seeded shuffle, reshuffled when used up; the same on every
    rank of a distributed run (notebook 10) and the order of practice.train_run (notebook 11)."""
    rng = random.Random(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        while len(order) < global_batch:
            more = list(range(n_examples))
            rng.shuffle(more)
            order += more
        out.append(order[:global_batch])
        order = order[global_batch:]
    return out
