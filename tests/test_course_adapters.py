"""lora_course.course_adapters on the tiny random Llama: trained once, cached, rebuilt when damaged, one builder."""
import threading

import pytest
import torch
from peft.tuners.lora import LoraLayer

from lora_course.adapters import AdapterRegistry
from lora_course.course_adapters import AdapterRecipe, course_adapter, recipe_key
from lora_course.models import load_base

PROMPTS = [[{"role": "user", "content": "Convert 3 km to m. Answer in JSON."}],
           [{"role": "user", "content": "Write a three-line poem about the sea."}]]


def _lora_count(model):
    return sum(isinstance(m, LoraLayer) for m in model.modules())


RECIPE = AdapterRecipe("creative", steps=3, lr=1e-3, batch_size=2, max_length=64)


def test_course_adapter_is_trained_once_and_cached(tmp_path, monkeypatch):
    model, tok = load_base("tiny")
    monkeypatch.setenv("LORA_COURSE_CACHE", str(tmp_path))
    probe = AdapterRegistry(model, tok).next_token_logits(PROMPTS)
    first = course_adapter("creative", model, tok, recipe=RECIPE)
    assert first.trained_now and len(first.losses) == 3 and first.seconds > 0
    assert first.path.parent == tmp_path / "adapters" and (first.path / "COMPLETE.json").is_file()
    assert _lora_count(model) == 0  # training left the base as it was
    torch.testing.assert_close(AdapterRegistry(model, tok).next_token_logits(PROMPTS), probe)
    again = course_adapter("creative", model, tok, recipe=RECIPE)
    assert not again.trained_now and again.path == first.path and again.losses == first.losses
    other = AdapterRecipe("creative", steps=4, lr=1e-3, batch_size=2, max_length=64)
    assert recipe_key(other, model) != recipe_key(RECIPE, model)
    (first.path / "adapter_model.safetensors").write_bytes(b"")  # damaged: rebuilt, never used
    assert course_adapter("creative", model, tok, recipe=RECIPE).trained_now
    assert not list((tmp_path / "adapters").glob(".*tmp*"))
    reg = AdapterRegistry(model, tok)
    reg.load("creative", first.path)
    with pytest.raises(ValueError, match="already holds LoRA layers"):
        course_adapter("creative", model, tok, recipe=RECIPE)
    with pytest.raises(ValueError, match="unknown task"):
        course_adapter("poetry", model, tok)


def test_parallel_builders_train_once(tmp_path, monkeypatch):
    bases = [load_base("tiny") for _ in range(2)]
    monkeypatch.setenv("LORA_COURSE_CACHE", str(tmp_path))
    results, barrier = [], threading.Barrier(2)

    def build(m, t):
        barrier.wait()
        results.append(course_adapter("creative", m, t, recipe=RECIPE))

    threads = [threading.Thread(target=build, args=b) for b in bases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.trained_now for r in results) == [False, True]
    assert results[0].path == results[1].path
