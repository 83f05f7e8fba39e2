"""The chat data formats of SFT: Alpaca records as messages, prompt-completion, the training chat template with
generation markers (same text, assistant-only labels), length checks and the labelled-token view."""
import pytest

from lora_course.chat_format import (
    alpaca_to_messages,
    check_lengths,
    label_view,
    to_prompt_completion,
    training_chat_template,
)


def test_alpaca_to_messages():
    rec = {"instruction": "Convert 3 km to m.", "input": "Answer in JSON.", "output": '{"value": 3000}'}
    assert alpaca_to_messages(rec) == [{"role": "user", "content": "Convert 3 km to m.\n\nAnswer in JSON."},
                                       {"role": "assistant", "content": '{"value": 3000}'}]
    no_input = alpaca_to_messages({"instruction": "Say hi", "input": "  ", "output": "hi"}, system="Be brief.")
    assert [m["role"] for m in no_input] == ["system", "user", "assistant"] and no_input[1]["content"] == "Say hi"
    with pytest.raises(ValueError, match="'output'"):
        alpaca_to_messages({"instruction": "x"})


def test_prompt_completion_split():
    ex = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert to_prompt_completion(ex) == {"prompt": ex["messages"][:1], "completion": ex["messages"][1:]}
    with pytest.raises(ValueError, match="assistant"):
        to_prompt_completion({"messages": ex["messages"][:1]})


def test_check_lengths():
    check_lengths([10, 20], 20)
    with pytest.raises(ValueError, match="1 examples are longer than max_length=20 .longest 21"):
        check_lengths([10, 21], 20)


def test_training_template_renders_the_same_and_masks_only_assistant_replies(cpu_tokenizer):
    tok = cpu_tokenizer
    tmpl = training_chat_template(tok)
    assert "{% generation %}" in tmpl
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hello"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False,
                                                                                   chat_template=tmpl)
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                  chat_template=tmpl)
    trained = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(trained) == "Hello there<|im_end|>Hello<|im_end|>"
    labels = [t if m else -100 for t, m in zip(enc["input_ids"], enc["assistant_masks"])]
    assert "[Hello][ there][<|im_end|>]" in label_view(tok, enc["input_ids"], labels)
    assert training_chat_template(_with_template(tok, tmpl)) == tmpl  # already marked: unchanged


def test_training_template_refuses_an_unknown_template(cpu_tokenizer):
    odd = _with_template(cpu_tokenizer, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    with pytest.raises(ValueError, match="generation"):
        training_chat_template(odd)


def _with_template(tok, template):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = template
    return t
