"""Task data: deterministic, committed, held-out, validated; metrics score references 1 and junk 0."""
import json

import pytest

from lora_course import data
from lora_course.evaluate import run_code_tests, score


@pytest.mark.parametrize("task", data.TASKS)
@pytest.mark.parametrize("split", data.SPLITS)
def test_committed_files_equal_the_generator(task, split):
    assert data.load_task(task, split) == data.generate_task(task, split), "run `make data` and commit data/"


@pytest.mark.parametrize("task", data.TASKS)
@pytest.mark.parametrize("split", ["eval", "test"])
def test_eval_prompts_are_held_out(task, split):
    train = {ex["messages"][0]["content"] for ex in data.load_task(task, "train")}
    ev = [ex["messages"][0]["content"] for ex in data.load_task(task, split)]
    assert len(ev) == data.SIZES[split] and not train & set(ev)


def test_eval_uses_unseen_topics_numbers_and_constants():
    assert not set(data.TOPICS_TRAIN) & set(data.TOPICS_EVAL)
    assert not set(data.K_TRAIN) & set(data.K_EVAL)
    pools = data._POOLS["technical"]
    assert not set(pools.train) & set(pools.eval)


@pytest.mark.parametrize("task", data.TASKS)
def test_references_score_perfectly_and_junk_scores_zero(task):
    ev = data.load_task(task, "eval")
    refs = [data.reference(ex) for ex in ev]
    assert all(v == 1.0 for v in score(task, refs, ev).values())
    junk = ["I am not sure."] * len(ev)
    from lora_course.evaluate import PRIMARY_METRIC
    assert score(task, junk, ev)[PRIMARY_METRIC[task]] == 0.0


def test_technical_metric_separates_format_from_exactness():
    ev = data.load_task("technical", "eval")[:2]
    wrong = [json.dumps({"value": ex["meta"]["value"] + 1, "unit": ex["meta"]["unit"]}) for ex in ev]
    assert score("technical", wrong, ev) == {"format": 1.0, "exact": 0.0}
    prose = ["The answer is " + data.reference(ex) for ex in ev]
    assert score("technical", prose, ev)["format"] == 0.0


def test_poem_form():
    assert data.poem_form_ok("The moon waits\nSilver and pale tonight\nNothing else is needed", "moon")
    assert not data.poem_form_ok("The moon waits\nSilver and pale tonight", "moon")
    assert not data.poem_form_ok("The sun waits\nSilver and pale tonight\nNothing else is needed", "moon")
    assert not data.poem_form_ok("The moon " + "very " * 8 + "\nb c\nd e", "moon")


def test_code_runs_in_a_separate_process_with_a_timeout():
    assert run_code_tests("def f(x):\n    return x + 1\n", "assert f(1) == 2")
    assert not run_code_tests("def f(x):\n    return x\n", "assert f(1) == 2")
    assert not run_code_tests("while True:\n    pass\n", "", timeout=1.0)
    assert not run_code_tests("import os\nos._exit(3)\n", "")
    assert data.extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"


def test_load_task_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        data.load_task("poetry")
    good = data.generate_task("technical", "eval", n=2)
    (tmp_path / "technical").mkdir()
    bad = dict(good[1])
    del bad["messages"]
    (tmp_path / "technical" / "eval.jsonl").write_text(json.dumps(good[0]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(data.TaskDataError, match=r"eval.jsonl:2: missing field 'messages'.*make data"):
        data.load_task("technical", "eval", root=tmp_path)
    (tmp_path / "technical" / "eval.jsonl").write_text('{"id": 1,\n')
    with pytest.raises(data.TaskDataError, match="not valid JSON"):
        data.load_task("technical", "eval", root=tmp_path)
    meta_less = dict(good[0], meta={"value": 1})
    (tmp_path / "technical" / "eval.jsonl").write_text(json.dumps(meta_less) + "\n")
    with pytest.raises(data.TaskDataError, match=r"lacks \['unit'\]"):
        data.load_task("technical", "eval", root=tmp_path)
    with pytest.raises(data.TaskDataError, match="does not exist"):
        data.load_task("code", "train", root=tmp_path)
    # a file saved in another encoding (latin-1 here): the line and byte, not a bare UnicodeDecodeError
    (tmp_path / "technical" / "eval.jsonl").write_bytes(json.dumps(good[0]).encode() + b'\n{"note": "caf\xe9"}\n')
    with pytest.raises(data.TaskDataError, match=r"eval.jsonl:2: not UTF-8 \(byte 0xe9.*save the file as UTF-8"):
        data.load_task("technical", "eval", root=tmp_path)


def test_tokenized_examples_train_only_on_the_answer(cpu_tokenizer):
    ex = data.load_task("technical", "train")[0]
    feat = data.tokenize_example(cpu_tokenizer, ex)
    answer_ids = [i for i, lab in zip(feat["input_ids"], feat["labels"]) if lab != -100]
    assert cpu_tokenizer.decode(answer_ids) == data.reference(ex) + "<|im_end|>"
    prompt = cpu_tokenizer.decode(feat["input_ids"][:len(feat["input_ids"]) - len(answer_ids)])
    assert prompt.endswith("<|im_start|>assistant\n") and ex["messages"][0]["content"] in prompt
    batch = data.collate([feat, data.tokenize_example(cpu_tokenizer, data.load_task("code", "train")[0])],
                         cpu_tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert int(batch["attention_mask"][0].sum()) == len(feat["input_ids"])
