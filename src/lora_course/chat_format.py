"""Chat data formats for SFT (notebooks 05 and 06): from a dataset's records to the messages TRL trains on, and
which of their tokens carry a label.

- ``alpaca_to_messages``: an Alpaca-style record (``instruction``, optional ``input``, ``output``) as chat messages;
- ``to_prompt_completion``: a course example (``data``'s ``messages``) as TRL's conversational prompt-completion
  format, for completion-only loss;
- ``training_chat_template``: the tokenizer's chat template with ``{% generation %}`` markers around each assistant
  reply and its end token, which TRL's ``assistant_only_loss`` needs and SmolLM2's ChatML template lacks (checked to
  render exactly the same text as the original);
- ``check_lengths``: a clear error when tokenized examples exceed ``max_length`` (padding-free batches are not cut);
- ``label_view``: one example's tokens with the trained ones in [brackets].

Notebook 05 uses all of them but ``check_lengths`` (which ``sft.SFTRecipe`` points to); notebook 06 and
``scripts/gpu_precision_check.py`` use ``to_prompt_completion``; ``bench.conversations`` (labels on the assistant
replies only) uses ``training_chat_template``. The recipe, backend and trainer that consume these formats live in
``lora_course.sft``; the course's own tasks and their tokenization in ``lora_course.data``.

Sources: the Stanford Alpaca data format (https://github.com/tatsu-lab/stanford_alpaca, "### Input:"); TRL 1.15's
dataset formats (conversational prompt-completion) and ``SFTConfig.assistant_only_loss``/``completion_only_loss``;
``trl.chat_template_utils.get_training_chat_template``/``has_generation_markers``; transformers'
``apply_chat_template(return_assistant_tokens_mask=True)``, which reads the ``{% generation %}`` markers.
"""
from __future__ import annotations

import re
from typing import Any


def alpaca_to_messages(record: dict[str, str], system: str | None = None) -> list[dict[str, str]]:
    """An Alpaca-style record (``instruction``, optional ``input``, ``output``) as chat messages.

    The input, when present, follows the instruction in the user turn after a blank line (as Alpaca's own prompt
    puts it under "### Input:"); the output becomes the assistant turn.
    """
    missing = {"instruction", "output"} - set(record)
    if missing:
        raise ValueError(f"an Alpaca record needs 'instruction' and 'output' (and may have 'input'); "
                         f"missing {sorted(missing)} in {record!r}")
    user = record["instruction"].strip()
    if record.get("input", "").strip():
        user += "\n\n" + record["input"].strip()
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def to_prompt_completion(example: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    """A course example as TRL's conversational prompt-completion format (loss on the completion only)."""
    msgs = example["messages"]
    if not msgs or msgs[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's answer to split it into prompt and completion")
    return {"prompt": msgs[:-1], "completion": msgs[-1:]}


_NL = r"'(?:\\n|\n)'"  # a newline string literal, written as an escape or as a real line break
_CHATML_MESSAGE = re.compile(
    r"\{\{\s*'<\|im_start\|>'\s*\+\s*message\['role'\]\s*\+\s*" + _NL + r"\s*\+\s*message\['content'\]\s*\+\s*"
    r"'<\|im_end\|>'\s*\+\s*" + _NL + r"\s*\}\}")
_CHATML_TRAINING = ("{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
                    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
                    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
                    "{% endif %}")


def training_chat_template(tokenizer: Any) -> str:
    """The tokenizer's chat template with ``{% generation %}`` markers around each assistant reply and its end token.

    TRL's ``assistant_only_loss`` reads those markers (``return_assistant_tokens_mask``) to label only the assistant's
    tokens. TRL patches the templates it knows; SmolLM2's ChatML template is not among them, so it is rewritten
    here, and the result is checked to render exactly the same text as the original.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    original = tokenizer.chat_template
    if not original:
        raise ValueError("the tokenizer has no chat template: set tokenizer.chat_template first")
    if has_generation_markers(original):
        return original
    try:
        patched = get_training_chat_template(tokenizer)
    except ValueError:
        patched = None
    if patched is None:
        if not _CHATML_MESSAGE.search(original):
            raise ValueError("this chat template is neither known to TRL nor ChatML: add {% generation %} ... "
                             "{% endgeneration %} around the assistant content and end token by hand")
        patched = _CHATML_MESSAGE.sub(lambda _: _CHATML_TRAINING, original, count=1)
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]
    a = tokenizer.apply_chat_template(probe, tokenize=False)
    b = tokenizer.apply_chat_template(probe, tokenize=False, chat_template=patched)
    if a != b:
        raise ValueError(f"the training template renders differently from the original:\n{a!r}\n{b!r}")
    return patched


def check_lengths(lengths: list[int], max_length: int) -> None:
    """Raise when any tokenized example exceeds ``max_length`` (padding-free batches are not truncated by TRL)."""
    over = [n for n in lengths if n > max_length]
    if over:
        raise ValueError(f"{len(over)} examples are longer than max_length={max_length} (longest {max(over)}): "
                         "truncate them, or use batching='packed', which truncates while packing")


def label_view(tokenizer: Any, input_ids: list[int], labels: list[int]) -> str:
    """The tokens of one example, the ones that carry a label (are trained on) in [brackets]."""
    parts = []
    for tid, lab in zip(input_ids, labels):
        text = tokenizer.decode([tid]).replace("\n", "\\n")
        parts.append(f"[{text}]" if lab != -100 else text)
    return "".join(parts)


__all__ = ["alpaca_to_messages", "check_lengths", "label_view", "to_prompt_completion", "training_chat_template"]
