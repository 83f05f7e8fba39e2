"""lora_course.forgetting (notebook 12): per-example answer losses that add up to evaluate.perplexity, and the paired
standard error of a perplexity change; data.corrupt_answers (label noise); practice.train_run's on_step hook."""
import copy
import math

import pytest
import torch

from lora_course.data import corrupt_answers, global_batches, load_task
from lora_course.evaluate import perplexity
from lora_course.forgetting import answer_nlls, log_perplexity, perplexity_change
from lora_course.practice import train_run


def test_answer_nlls_add_up_to_the_course_perplexity(tiny):
    model, tok = tiny
    exs = load_task("technical", "eval")[:5]
    nlls = answer_nlls(model, tok, exs)
    assert len(nlls) == 5 and all(n > 0 and s > 0 for s, n in nlls)
    # one batch of 5 (padding) vs 5 single examples: the same token losses, summed in another order (float32)
    assert math.exp(log_perplexity(nlls)) == pytest.approx(perplexity(model, tok, exs, batch_size=5), rel=1e-5)
    with pytest.raises(ValueError, match="no answer token"):
        answer_nlls(model, tok, exs[:1], max_length=4)


def test_perplexity_change_is_the_ratio_and_its_paired_standard_error():
    before = [(10.0, 5), (20.0, 10), (6.0, 3), (8.0, 4)]
    same_shift = [(s - 0.5 * n, n) for s, n in before]  # every token 0.5 nats better: no spread, no error
    ch = perplexity_change(before, same_shift)
    assert ch.delta == pytest.approx(-0.5) and ch.se == pytest.approx(0.0, abs=1e-12)
    assert ch.ratio == pytest.approx(math.exp(-0.5)) and ch.before == pytest.approx(math.exp(2.0)) and ch.n == 4
    # the delta-method standard error, written out for unequal per-token changes
    after = [(9.0, 5), (20.0, 10), (3.0, 3), (8.0, 4)]
    ch = perplexity_change(before, after)
    d, n = [-1.0, 0.0, -3.0, 0.0], [5, 10, 3, 4]
    delta = sum(d) / sum(n)
    r = [di - delta * ni for di, ni in zip(d, n)]
    want = math.sqrt(sum((x - sum(r) / 4) ** 2 for x in r) / 3) / (2 * sum(n) / 4)
    assert ch.delta == pytest.approx(delta) and ch.se == pytest.approx(want) and ch.se > 0
    # four times the examples, the same spread: half the standard error (x sqrt(12/15), the sd's k - 1 vs 4k - 1)
    assert perplexity_change(before * 4, after * 4).se == pytest.approx(want / 2 * math.sqrt(12 / 15), rel=1e-9)
    with pytest.raises(ValueError, match="same examples"):
        perplexity_change(before, after[:3])
    with pytest.raises(ValueError, match="token counts differ"):
        perplexity_change(before, [(9.0, 6)] + after[1:])
    with pytest.raises(ValueError, match="at least 2"):
        perplexity_change(before[:1], after[:1])


def test_corrupt_answers_moves_answers_to_other_prompts():
    exs = load_task("technical", "train")
    bad = corrupt_answers(exs, 0.5, seed=0)
    changed = [i for i, (a, b) in enumerate(zip(exs, bad)) if a["messages"][-1] != b["messages"][-1]]
    assert len(changed) == 80 and all(bad[i].get("corrupted") for i in changed)
    assert sum(bool(b.get("corrupted")) for b in bad) == 80
    # every answer is still one of the task's answers (well formed), now on another prompt; prompts, ids and meta kept
    assert sorted(exs[i]["messages"][-1]["content"] for i in changed) == sorted(bad[i]["messages"][-1]["content"]
                                                                               for i in changed)
    assert all(a["messages"][:-1] == b["messages"][:-1] and a["id"] == b["id"] and a["meta"] == b["meta"]
               for a, b in zip(exs, bad))
    assert exs == load_task("technical", "train")  # the input is not modified
    assert corrupt_answers(exs, 0.5, seed=0) == bad and corrupt_answers(exs, 0.5, seed=1) != bad
    assert corrupt_answers(exs, 0.0) == exs
    # a short run's batches see the corrupted share: the choice is not tied to the batch order of the same seed
    seen = [i for batch in global_batches(len(exs), 8, 8, 0) for i in batch]
    share = sum(bool(bad[i].get("corrupted")) for i in seen) / len(seen)
    assert 0.3 < share < 0.7, share  # 64 draws of a 50% share: sd 0.0625, so +-0.2 is beyond 3 sd
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corrupt_answers(exs, 1.5)
    with pytest.raises(ValueError, match="at least 2 examples"):
        corrupt_answers(exs[:1], 1.0)  # one example cannot take another's answer


def test_train_run_calls_on_step_after_the_step_with_gradients_present(tiny):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"]))
    seen = []

    def on_step(step):
        grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
        seen.append((step, all(g is not None for g in grads)))

    train_run(peft_model, tok, load_task("creative", "train")[:8], steps=3, batch_size=2, on_step=on_step)
    assert seen == [(0, True), (1, True), (2, True)]


def test_each_answer_nll_is_that_examples_course_perplexity(tiny):
    model, tok = tiny
    exs = load_task("code", "eval")[:3]
    for (s, n), ex in zip(answer_nlls(model, tok, exs), exs):
        assert s / n == pytest.approx(math.log(perplexity(model, tok, [ex], batch_size=1)), rel=1e-5)


def test_batched_answer_nlls_equal_one_example_at_a_time(tiny):
    # right padding: each row's losses are what the example has alone, up to another matrix shape's rounding
    model, tok = tiny
    exs = load_task("code", "eval")[:5] + load_task("technical", "eval")[:4]  # unequal lengths: padded rows
    one = answer_nlls(model, tok, exs, batch_size=1)
    for batch_size in (4, 12):
        many = answer_nlls(model, tok, exs, batch_size=batch_size)
        assert [n for _, n in many] == [n for _, n in one]
        for (s, _), (s1, _) in zip(many, one):
            assert s == pytest.approx(s1, rel=1e-5)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        answer_nlls(model, tok, exs, batch_size=0)
