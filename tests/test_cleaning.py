"""lora_course.cleaning: each check removes what it names, keeps the rest in order, and says why."""
import pytest

from lora_course.cleaning import REASONS, clean_examples, task_mix


def conv(user, assistant, task="t", system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": msgs, "task": task}


class WordTokenizer:
    """One token per whitespace-separated word of every turn (a stand-in for a chat template)."""

    def apply_chat_template(self, messages, tokenize=True):
        return {"input_ids": [0 for m in messages for _ in m["content"].split()]}


def test_each_reason_removes_its_example_and_the_rest_stay_in_order():
    good = [conv("Convert 1 km to m.", '{"value": 1000, "unit": "m"}', "technical"),
            conv("Write a poem.", "Line one\nLine two\nLine three", "creative", system="Be brief.")]
    dirty = [
        {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "?"}]},  # wrong order
        {"messages": [{"role": "user", "content": "only a question"}]},                           # no answer
        {"text": "not a conversation"},                                                             # no messages
        conv("Say something.", "   "),                                                              # empty turn
        conv("Convert  1 km to m.", '{"value": 1000,  "unit": "m"}', "technical"),                 # duplicate (spaces)
        conv("word " * 30, "short"),                                                                # too long
        conv("Held-out question?", "an answer seen in training"),                                   # leaked prompt
    ]
    held_out = [conv("Held-out question?", "the reference answer")]
    report = clean_examples([good[0], *dirty, good[1]], WordTokenizer(), max_length=20, held_out=held_out)
    assert report.kept == good
    assert report.counts() == {"malformed": 3, "empty turn": 1, "duplicate": 1, "too long": 1, "held-out prompt": 1}
    assert list(report.counts()) == list(REASONS) and report.n_in == 9
    assert report.removed["duplicate"] == [dirty[4]] and report.removed["held-out prompt"] == [dirty[6]]
    assert report.lengths == [9, 11]  # words of the kept examples' turns, system prompt included
    text = str(report)
    assert "9 examples in, 2 kept" in text and "removed    1  duplicate" in text and "max 11" in text
    assert task_mix(report.kept) == {"technical": 1, "creative": 1}


def test_without_a_tokenizer_lengths_are_not_checked_and_half_a_length_check_is_refused():
    long = conv("word " * 500, "ok")
    assert clean_examples([long]).kept == [long]
    with pytest.raises(ValueError, match="together"):
        clean_examples([long], WordTokenizer())
    with pytest.raises(ValueError, match="positive"):
        clean_examples([long], WordTokenizer(), max_length=0)


def test_the_course_code_task_holds_exact_repeats_that_cleaning_removes():
    from lora_course.data import load_task

    train = load_task("code", "train")
    report = clean_examples(train, held_out=load_task("code", "eval"))
    assert report.counts()["duplicate"] == 80 and len(report.kept) == 80  # its generator draws from a small pool
    assert report.counts()["held-out prompt"] == 0  # the eval split's prompts never occur in training
