"""Checked adapter I/O: safetensors-only atomic saves, reloads that give the same outputs, and clear errors for
an adapter of another base model, a missing weights file, and a save that fails half-way."""
import copy
import json

import pytest
import torch

from lora_course.adapters_io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FINGERPRINT,
    AdapterError,
    AdapterFilesError,
    AdapterMismatchError,
    atomic_directory,
    check_adapter_compatible,
    dir_bytes,
    load_adapter,
    model_bytes,
    save_adapter,
    save_merged_model,
)
from lora_course.targets import build_lora_config


def _peft_tiny(tiny, **kw):
    """A LoRA-wrapped copy of the tiny model whose B factors are non-zero, so the adapter changes outputs."""
    from peft import get_peft_model

    model = copy.deepcopy(tiny[0])
    kw.setdefault("target_modules", ["q_proj", "v_proj"])
    peft_model = get_peft_model(model, build_lora_config(model, r=4, **kw))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return peft_model.eval()


def _other_llama(hidden=32, name="tests/other-llama-hidden32"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    model.name_or_path = model.config._name_or_path = name
    return model


X = torch.tensor([[1, 20, 300, 4000, 17]])


def test_save_then_load_gives_the_same_outputs(tiny, tmp_path):
    peft_model = _peft_tiny(tiny)
    with torch.no_grad():
        want = peft_model(X).logits
        base_out = tiny[0](X).logits
    assert not torch.allclose(want, base_out, atol=1e-4)  # the adapter does something
    saved = save_adapter(peft_model, tmp_path / "adapter")
    names = {p.name for p in saved.path.iterdir()}
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS, FINGERPRINT} <= names and not any(n.endswith(".bin") for n in names)
    assert 0 < saved.weights_bytes <= saved.total_bytes == dir_bytes(saved.path)
    assert saved.weights_bytes < model_bytes(tiny[0]) / 50
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    fingerprint = json.loads((saved.path / FINGERPRINT).read_text())
    assert fingerprint["model_type"] == "llama" and fingerprint["hidden_size"] == 64

    fresh = copy.deepcopy(tiny[0])
    reloaded = load_adapter(fresh, saved.path)
    with torch.no_grad():
        got = reloaded(X).logits
    torch.testing.assert_close(got, want)
    assert not any(p.requires_grad for p in reloaded.parameters())  # loaded for inference
    trainable = load_adapter(copy.deepcopy(tiny[0]), saved.path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_an_existing_adapter_is_kept_unless_overwrite(tiny, tmp_path):
    peft_model = _peft_tiny(tiny)
    path = save_adapter(peft_model, tmp_path / "a").path
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_adapter(peft_model, path)
    save_adapter(peft_model, path, overwrite=True)
    assert (path / ADAPTER_WEIGHTS).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_a_failure_mid_save_leaves_nothing_behind(tiny, tmp_path, monkeypatch):
    peft_model = _peft_tiny(tiny)
    original = type(peft_model).save_pretrained

    def half_then_crash(self, save_directory, **kw):
        original(self, save_directory, **kw)  # the files are written ...
        (tmp_path / "seen").write_text(str(sorted(p.name for p in __import__("pathlib").Path(save_directory)
                                                  .iterdir())))
        raise OSError("disk full")  # ... then the save fails

    monkeypatch.setattr(type(peft_model), "save_pretrained", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(peft_model, tmp_path / "adapter")
    assert ADAPTER_WEIGHTS in (tmp_path / "seen").read_text()  # the failure really was mid-save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seen"]  # no adapter, no temporary folder


def test_a_failed_overwrite_keeps_the_previous_adapter(tiny, tmp_path):
    peft_model = _peft_tiny(tiny)
    path = save_adapter(peft_model, tmp_path / "a").path
    before = (path / ADAPTER_WEIGHTS).read_bytes()
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(path, overwrite=True) as tmp:
        (tmp / "partial").write_text("x")
        raise RuntimeError("boom")
    assert (path / ADAPTER_WEIGHTS).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_adapter_for_other_shapes_names_both_models(tiny, tmp_path):
    saved = save_adapter(_peft_tiny(tiny), tmp_path / "adapter")
    other = _other_llama(hidden=32)
    with pytest.raises(AdapterMismatchError) as e:
        load_adapter(other, saved.path)
    msg = str(e.value)
    assert "tiny-llama" in msg and "tests/other-llama-hidden32" in msg
    assert "hidden 64" in msg and "hidden 32" in msg
    assert "q_proj: adapter expects input size 64, loaded layer has 32" in msg
    assert not hasattr(other, "peft_config")  # nothing was loaded


def test_adapter_for_another_architecture_names_both_models(tiny, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    saved = save_adapter(_peft_tiny(tiny), tmp_path / "adapter")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_layer=1, n_head=2, n_embd=32, bos_token_id=0,
                                      eos_token_id=0))
    gpt2.name_or_path = "tests/gpt2-tiny"
    with pytest.raises(AdapterMismatchError) as e:
        check_adapter_compatible(gpt2, saved.path)
    msg = str(e.value)
    assert "'llama'" in msg and "'gpt2'" in msg and "tests/gpt2-tiny" in msg and "tiny-llama" in msg
    assert "no such layer" in msg


def test_same_shapes_other_name_is_a_warning_not_an_error(tiny, tmp_path):
    saved = save_adapter(_peft_tiny(tiny), tmp_path / "adapter")
    twin = copy.deepcopy(tiny[0])
    twin.name_or_path = "somewhere/else"
    result = check_adapter_compatible(twin, saved.path)
    assert result.tensors_checked == 8 and result.warnings and "somewhere/else" in result.warnings[0]
    with pytest.warns(UserWarning, match="somewhere/else"):
        load_adapter(twin, saved.path)


def test_missing_weights_file_names_the_expected_file(tiny, tmp_path):
    saved = save_adapter(_peft_tiny(tiny), tmp_path / "adapter")
    (saved.path / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(AdapterFilesError, match="adapter_model.safetensors"):
        load_adapter(copy.deepcopy(tiny[0]), saved.path)
    (saved.path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterFilesError, match="adapter_model.bin.*safe_serialization"):
        load_adapter(copy.deepcopy(tiny[0]), saved.path)
    with pytest.raises(AdapterFilesError, match="no adapter folder"):
        load_adapter(copy.deepcopy(tiny[0]), tmp_path / "nowhere")
    (saved.path / ADAPTER_CONFIG).unlink()
    with pytest.raises(AdapterFilesError, match="adapter_config.json"):
        check_adapter_compatible(tiny[0], saved.path)


def test_damaged_adapter_files_name_the_file_and_the_fix(tiny, tmp_path):
    saved = save_adapter(_peft_tiny(tiny), tmp_path / "adapter")
    weights = saved.path / ADAPTER_WEIGHTS
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])  # a copy cut short: the header promises more bytes than there are
    with pytest.raises(AdapterFilesError, match=r"adapter_model.safetensors is not a readable safetensors.*cut short"):
        load_adapter(copy.deepcopy(tiny[0]), saved.path)
    weights.write_bytes(whole)
    fingerprint = saved.path / FINGERPRINT
    fingerprint.write_text('{"model_type": "llama", ')
    with pytest.raises(AdapterFilesError, match=r"base_model.json is not valid JSON.*delete it"):
        load_adapter(copy.deepcopy(tiny[0]), saved.path)
    fingerprint.write_text("[1, 2]")
    with pytest.raises(AdapterFilesError, match=r"base_model.json holds a list"):
        load_adapter(copy.deepcopy(tiny[0]), saved.path)
    fingerprint.unlink()  # peft's own folders have no fingerprint: the shape check still runs
    assert check_adapter_compatible(tiny[0], saved.path).tensors_checked == 8
    config = saved.path / ADAPTER_CONFIG
    config.write_text("{not json")
    with pytest.raises(AdapterFilesError, match=r"adapter_config.json is not valid JSON.*save the adapter again"):
        load_adapter(copy.deepcopy(tiny[0]), saved.path)
    config.write_bytes(b'{"r": 4, "note": "\xff"}')
    with pytest.raises(AdapterFilesError, match=r"adapter_config.json is not valid JSON"):
        load_adapter(copy.deepcopy(tiny[0]), saved.path)
    config.write_text('"a string"')
    with pytest.raises(AdapterFilesError, match=r"holds a str"):
        load_adapter(copy.deepcopy(tiny[0]), saved.path)


def test_resized_vocabulary_must_be_resized_before_loading(tiny, tmp_path):
    from peft import get_peft_model

    model = copy.deepcopy(tiny[0])
    model.resize_token_embeddings(model.get_input_embeddings().weight.shape[0] + 1, mean_resizing=False)
    peft_model = get_peft_model(model, build_lora_config(model, r=2, target_modules=["q_proj"],
                                                         trainable_token_indices=[49152]))
    full = save_adapter(peft_model, tmp_path / "full")  # peft saves the whole resized embedding ("auto")
    rows = save_adapter(peft_model, tmp_path / "rows", save_embedding_layers=False)  # only the trained row
    assert rows.weights_bytes < full.weights_bytes
    for saved in (full, rows):
        with pytest.raises(AdapterMismatchError) as e:
            check_adapter_compatible(copy.deepcopy(tiny[0]), saved.path)
        msg = str(e.value)
        assert "resize_token_embeddings(49153)" in msg and "49152" in msg, msg
        assert "trained token id 49152" in msg
    resized = copy.deepcopy(tiny[0])
    resized.resize_token_embeddings(49153, mean_resizing=False)
    assert check_adapter_compatible(resized, rows.path).tensors_checked > 0


def test_only_peft_models_save_adapters_and_only_plain_models_save_merged(tiny, tmp_path):
    with pytest.raises(AdapterError, match="get_peft_model"):
        save_adapter(tiny[0], tmp_path / "x")
    peft_model = _peft_tiny(tiny)
    with pytest.raises(AdapterError, match="merge_and_unload"):
        save_merged_model(peft_model, tmp_path / "y")
    with torch.no_grad():
        want = peft_model(X).logits
    merged = peft_model.merge_and_unload()
    path = save_merged_model(merged, tmp_path / "merged", tokenizer=tiny[1])
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(X).logits, want, atol=1e-4, rtol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_an_adapter_saved_in_bf16_loads_onto_an_fp16_base_as_fp32(tiny, tmp_path):
    """Adapter dtype vs base dtype: an adapter trained on a bf16 GPU and loaded onto a T4's fp16 base is not a
    problem to refuse: peft (autocast_adapter_dtype=True) upcasts the saved bf16 tensors to fp32, the dtype the
    course trains adapters in, and the fp16 GradScaler needs."""
    peft_model = _peft_tiny(tiny).to(torch.bfloat16)
    saved = save_adapter(peft_model, tmp_path / "bf16-adapter")
    from safetensors import safe_open

    with safe_open(str(saved.path / ADAPTER_WEIGHTS), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    loaded = load_adapter(copy.deepcopy(tiny[0]).half(), saved.path)
    lora = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert lora and {p.dtype for p in lora.values()} == {torch.float32}
    want = {n: p.float() for n, p in peft_model.named_parameters() if "lora_" in n}
    assert all(torch.equal(lora[n], want[n]) for n in lora), "bf16 -> fp32 is exact"
