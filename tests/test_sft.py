"""The SFT recipe builder (hardware-dependent defaults, backend choice, errors), the CPU trainer, padding-free
batches (same loss as padded ones), and the benchmark's presets and step accounting. The data formats:
tests/test_chat_format.py; the benchmark's FLOPs and chats: tests/test_flops.py, tests/test_synthetic_chats.py."""
import math

import pytest

from lora_course import bench
from lora_course.sft import BackendUnavailableError, Hardware, build_recipe, choose_backend, import_unsloth

H100 = Hardware("cuda", "NVIDIA H100 80GB HBM3", 79.1, True, (9, 0), "2026.10.9")
H100_NO_UNSLOTH = Hardware("cuda", "NVIDIA H100 80GB HBM3", 79.1, True, (9, 0), None)
A10G = Hardware("cuda", "NVIDIA A10G", 22.0, True, (8, 6), "2026.10.9")
T4 = Hardware("cuda", "Tesla T4", 14.7, False, (7, 5), "2026.10.9")
P100 = Hardware("cuda", "Tesla P100-PCIE-16GB", 15.9, False, (6, 0), "2026.10.9")
LAPTOP = Hardware("cpu", "cpu", 16.0)


# ------------------------------------------------------------------------------------------------ hardware
@pytest.mark.parametrize("kwargs, match", [
    ({"device": "mps", "name": "m1", "memory_gib": 8.0}, "device must be"),
    ({"device": "cpu", "name": "cpu", "memory_gib": 0}, "memory_gib"),
    ({"device": "cpu", "name": "cpu", "memory_gib": 8.0, "bf16": True}, "bf16"),
])
def test_hardware_rejects_impossible_descriptions(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Hardware(**kwargs)


# ------------------------------------------------------------------------------------------------- backend
@pytest.mark.parametrize("hw, name, reason", [
    (H100, "unsloth", "unsloth 2026.10.9 found"),
    (LAPTOP, "transformers", "no CUDA GPU"),
    (H100_NO_UNSLOTH, "transformers", "not installed"),
    (P100, "transformers", "compute capability 6.0"),
])
def test_auto_backend_and_its_reason(hw, name, reason):
    choice = choose_backend(hw, "auto")
    assert choice.name == name
    assert reason in choice.reason
    assert ("Unsloth" if name == "unsloth" else "transformers + peft") in str(choice)


def test_explicit_backends():
    assert choose_backend(H100, "transformers").name == "transformers"
    assert choose_backend(H100, "unsloth").name == "unsloth"
    for hw in (LAPTOP, H100_NO_UNSLOTH, P100):
        with pytest.raises(BackendUnavailableError, match="backend='auto'"):
            choose_backend(hw, "unsloth")
    with pytest.raises(ValueError, match="unknown backend 'vllm'"):
        choose_backend(H100, "vllm")


def test_build_recipe_prints_the_backend_and_why(capsys):
    build_recipe(LAPTOP)
    out = capsys.readouterr().out
    assert out.startswith("backend: transformers + peft (no CUDA GPU")
    build_recipe(LAPTOP, quiet=True)
    assert capsys.readouterr().out == ""


def test_import_unsloth_fails_with_the_fix_where_it_cannot_run():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may import unsloth")
    with pytest.raises(BackendUnavailableError, match="import unsloth failed"):
        import_unsloth()


# -------------------------------------------------------------------------------------- recipe by hardware
@pytest.mark.parametrize("hw, precision, optim, batch, accum, ckpt, nf4, batching", [
    (H100, "bf16", "adamw_8bit", 8, 1, True, True, "padding_free"),
    (H100_NO_UNSLOTH, "bf16", "adamw_8bit", 8, 1, True, True, "packed"),
    (A10G, "bf16", "adamw_8bit", 4, 2, True, True, "padding_free"),
    (T4, "fp16", "adamw_8bit", 2, 4, True, True, "padding_free"),
    (LAPTOP, "fp32", "adamw_torch", 8, 1, False, False, "packed"),
])
def test_defaults_follow_the_hardware(hw, precision, optim, batch, accum, ckpt, nf4, batching):
    r = build_recipe(hw, effective_batch_size=8, quiet=True)
    assert (r.precision, r.optim, r.per_device_train_batch_size, r.gradient_accumulation_steps) == (
        precision, optim, batch, accum)
    assert (r.gradient_checkpointing, r.load_in_4bit, r.batching) == (ckpt, nf4, batching)
    assert r.effective_batch_size == 8
    for key in ("backend", "precision", "optim", "gradient_checkpointing", "load_in_4bit", "batching"):
        assert r.reasons[key], key
    assert key in r.describe()


def test_same_lora_hyperparameters_for_both_backends():
    a = build_recipe(H100, "unsloth", r=32, lora_dropout=0.05, quiet=True)
    b = build_recipe(H100, "transformers", r=32, lora_dropout=0.05, quiet=True)
    assert a.lora_kwargs() == b.lora_kwargs() == {
        "r": 32, "lora_alpha": 64.0, "lora_dropout": 0.05, "bias": "none",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


@pytest.mark.parametrize("effective, cap_hw, batch, accum", [(6, T4, 2, 3), (7, A10G, 1, 7), (16, H100, 8, 2),
                                                             (3, LAPTOP, 3, 1)])
def test_accumulation_makes_the_effective_batch_exact(effective, cap_hw, batch, accum):
    r = build_recipe(cap_hw, effective_batch_size=effective, quiet=True)
    assert (r.per_device_train_batch_size, r.gradient_accumulation_steps) == (batch, accum)


@pytest.mark.parametrize("kwargs, match", [
    ({"effective_batch_size": 0}, "effective_batch_size"),
    ({"effective_batch_size": 2.5}, "effective_batch_size"),
    ({"r": 0}, "r must be a positive integer"),
    ({"max_length": 8}, "max_length"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"batching": "bucketed"}, "unknown batching"),
    ({"load_in_4bit": True}, "needs a CUDA GPU"),
])
def test_bad_recipe_values_raise_with_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_recipe(LAPTOP, quiet=True, **kwargs)


def test_sft_kwargs_turn_off_trls_gpu_defaults_on_cpu_and_drop_max_length_when_padding_free():
    cpu = build_recipe(LAPTOP, max_length=256, quiet=True).sft_kwargs("/tmp/out", 10)
    assert cpu["bf16"] is False and cpu["fp16"] is False and cpu["gradient_checkpointing"] is False
    assert cpu["packing"] is True and cpu["padding_free"] is False and cpu["max_length"] == 256
    gpu = build_recipe(H100, max_length=256, quiet=True).sft_kwargs("/tmp/out", 10, logging_steps=5)
    assert gpu["bf16"] is True and gpu["gradient_checkpointing"] is True and gpu["optim"] == "adamw_8bit"
    assert gpu["padding_free"] is True and gpu["packing"] is False and gpu["max_length"] is None
    assert gpu["logging_steps"] == 5
    t4 = build_recipe(T4, quiet=True).sft_kwargs("/tmp/out", 1)
    assert t4["fp16"] is True and t4["bf16"] is False
    with pytest.raises(ValueError, match="max_steps"):
        build_recipe(LAPTOP, quiet=True).sft_kwargs("/tmp/out", 0)


def test_sft_config_builds_on_cpu(tmp_path):
    cfg = build_recipe(LAPTOP, max_length=128, quiet=True).sft_config(str(tmp_path), 3)
    assert (cfg.bf16, cfg.gradient_checkpointing, cfg.packing, cfg.max_length, cfg.max_steps) == (
        False, False, True, 128, 3)


# ---------------------------------------------------------------------------------------- training on CPU
def test_padding_free_batch_gives_the_padded_loss(tiny):
    """Flattened sequences with restarting position_ids (no attention mask) get a block-diagonal causal mask from
    transformers, so the loss equals the padded batch's: no example attends to another. Only without a KV cache
    (training): with ``use_cache=True`` transformers skips the packed-sequence detection and examples mix."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model, tok = tiny
    rows = [{"input_ids": list(range(5, 5 + n)), "labels": [-100] * 3 + list(range(8, 5 + n))} for n in (7, 12, 4)]
    padded = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(rows)
    flat = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(rows)
    assert "attention_mask" not in flat and flat["input_ids"].shape == (1, 23)
    with torch.no_grad():
        a = model(**padded, use_cache=False).loss.item()
        b = model(**flat, use_cache=False).loss.item()
        mixed = model(**flat, use_cache=True).loss.item()
    assert math.isclose(a, b, rel_tol=1e-5), (a, b)
    assert not math.isclose(a, mixed, rel_tol=1e-5), (a, mixed)


def test_cpu_recipe_trains_through_trl_and_the_loss_falls(tmp_path):
    from datasets import Dataset

    from lora_course.diagnostics import check_loss_falling
    from lora_course.models import cpu_model_dir
    from lora_course.sft import fused_loss_available, load_for_sft, make_trainer

    # the real cpu model: a random-init tiny model's frozen, tied output head barely lets the loss move
    recipe = build_recipe(LAPTOP, effective_batch_size=4, max_length=64, learning_rate=5e-3, quiet=True)
    model, tok = load_for_sft(recipe, str(cpu_model_dir()))
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"Say {w}"}],
                               "completion": [{"role": "assistant", "content": f"{w} {w}"}]}
                              for w in ("red", "green", "blue", "gold")])
    trainer = make_trainer(model, recipe.sft_config(str(tmp_path), 6), data, tok, quiet=True)
    assert type(trainer).__name__ == ("SFTTrainer" if fused_loss_available() else "FullLogitsSFTTrainer")
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6
    check_loss_falling(losses, min_drop=0.3, window=2)


# -------------------------------------------------------------------------------------------- benchmark
def test_side_by_side_configs():
    assert [c.name for c in bench.side_by_side(False)] == [
        "transformers padded", "transformers padding_free", "transformers packed"]
    gpu = bench.side_by_side(True, warmup_steps=3)
    assert {(c.backend, c.batching) for c in gpu} == {(b, m) for b in ("transformers", "unsloth")
                                                     for m in ("padded", "padding_free")}
    assert all(c.warmup_steps == 3 and c.load_in_4bit for c in gpu)
    assert bench.BASELINE.optim == "paged_adamw_8bit" and bench.BASELINE.batching == "padded"
    assert bench.FAST.backend == "unsloth" and bench.FAST.batching == "padding_free"


def test_detect_hardware_reads_the_compute_capability(monkeypatch):
    """A T4 answers is_bf16_supported() == True (emulated bf16); the recipe must still train it in fp16."""
    import types

    import torch

    from lora_course import hardware
    from lora_course.sft import detect_hardware

    monkeypatch.delenv(hardware.EMULATE_ENV, raising=False)
    props = types.SimpleNamespace(name="Tesla T4", major=7, minor=5, total_memory=15 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    hw = detect_hardware()
    assert (hw.device, hw.name, hw.bf16, hw.compute_capability, hw.memory_gib) == ("cuda", "Tesla T4", False,
                                                                                    (7, 5), 15.0)
    r = build_recipe(hw, quiet=True)
    assert r.precision == "fp16" and "fp32 adapters" in r.reasons["precision"]


@pytest.mark.gpu
def test_auto_backend_on_a_cuda_machine_with_unsloth_imports_it():
    from lora_course.sft import detect_hardware

    hw = detect_hardware()
    if hw.unsloth_version is None:
        pytest.skip("unsloth is not installed here")
    assert choose_backend(hw).name == "unsloth"
    assert import_unsloth().__name__ == "FastLanguageModel"


def test_recipe_builder_is_reachable_from_train():
    from lora_course import sft, train

    assert train.build_recipe is sft.build_recipe and train.SFTRecipe is sft.SFTRecipe


def test_length_grouped_keeps_each_window_and_cuts_padding(tmp_path):
    from transformers import AutoTokenizer

    from lora_course.models import tiny_model_dir

    cfg = bench.parse_configs("fast@batching=padded@batch_size=4@group_by_length=true", warmup_steps=1,
                              measure_steps=2)[0]
    assert cfg.group_by_length and "group_by_length=True" in cfg.name
    rows = [{"input_ids": [1] * n, "labels": [1] * n} for n in (5, 50, 7, 40, 9, 30, 11, 20, 3, 60, 8, 1, 99)]
    out = bench.length_grouped(rows, warmup_rows=4, used_rows=12)
    assert [len(r["input_ids"]) for r in out] == [50, 40, 7, 5, 60, 30, 20, 11, 9, 8, 3, 1, 99]
    with pytest.raises(ValueError, match="warmup_rows"):
        bench.length_grouped(rows, 8, 4)
    # On the tiny model: the same measured sequences, much less padding than in the unsorted order.
    source = str(tiny_model_dir())
    tok = AutoTokenizer.from_pretrained(source)
    base = bench.BenchConfig("padded", "transformers", "padded", "adamw_torch", False, False, batch_size=4,
                             max_length=128, warmup_steps=1, measure_steps=4)
    rows = bench.make_rows(tok, base, median=48)  # padding: 27% in their order, 9% length-grouped
    plain = bench.run_config(base, source, rows)
    grouped = bench.run_config(bench.replace(base, group_by_length=True), source, rows)
    assert grouped.real_tokens == plain.real_tokens
    assert grouped.padding_share < plain.padding_share / 2, (plain.padding_share, grouped.padding_share)
    # widths rounded up to a multiple of 64 (fewer distinct shapes): more padding, the same real tokens
    bucketed = bench.run_config(bench.replace(base, group_by_length=True, pad_to_multiple_of=64), source, rows)
    assert bucketed.real_tokens == plain.real_tokens and bucketed.padding_share > grouped.padding_share


def test_token_budget_is_an_unsloth_override_checked_on_construction():
    cfg = bench.parse_configs("fast@batching=padded@batch_size=16@token_budget=7168")[0]
    assert cfg.token_budget == 7168 and "token_budget=7168" in cfg.name
    assert bench.FAST.token_budget == 0 and bench.BASELINE.token_budget == 0
    tuned = bench.parse_configs("tuned", warmup_steps=8)[0]  # the course's fast recipe keeps its own batch of 16
    assert (tuned.backend, tuned.batching, tuned.batch_size, tuned.group_by_length, tuned.token_budget,
            tuned.pad_to_multiple_of, tuned.warmup_steps) == ("unsloth", "padded", 16, True, 7168, 128, 8)
    assert bench.parse_configs("baseline@grad_accum=2")[0].batch_size * 2 == tuned.batch_size  # same chats a step
    with pytest.raises(ValueError, match="needs the unsloth backend"):
        bench.parse_configs("baseline@token_budget=4096")
    with pytest.raises(ValueError, match="integer >= 0"):
        bench.parse_configs("fast@token_budget=-1")
    assert bench.parse_configs("baseline@pad_to_multiple_of=64")[0].pad_to_multiple_of == 64
    with pytest.raises(ValueError, match="pad_to_multiple_of must be an integer >= 0"):
        bench.parse_configs("baseline@pad_to_multiple_of=-8")


def test_unsloth_token_budget_is_set_only_while_trainers_are_built(monkeypatch):
    import os

    from lora_course.sft import UNSLOTH_TOKEN_BUDGET_ENV, unsloth_token_budget

    monkeypatch.delenv(UNSLOTH_TOKEN_BUDGET_ENV, raising=False)
    with unsloth_token_budget(0):
        assert UNSLOTH_TOKEN_BUDGET_ENV not in os.environ
    with unsloth_token_budget(7168):
        assert os.environ[UNSLOTH_TOKEN_BUDGET_ENV] == "7168"
    assert UNSLOTH_TOKEN_BUDGET_ENV not in os.environ
    monkeypatch.setenv(UNSLOTH_TOKEN_BUDGET_ENV, "2048")  # a value the learner set survives, even after an error
    with pytest.raises(RuntimeError, match="boom"), unsloth_token_budget(512):
        assert os.environ[UNSLOTH_TOKEN_BUDGET_ENV] == "512"
        raise RuntimeError("boom")
    assert os.environ[UNSLOTH_TOKEN_BUDGET_ENV] == "2048"
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="integer >= 0"), unsloth_token_budget(bad):
            pass


def test_measured_passes_checks_the_forward_count_of_every_step():
    calls = [(0, 10, [5]), (0, 10, [4]), (1, 8, [8]), (1, 8, [7])]
    assert bench.measured_passes(calls, steps=2, warmup_steps=1, grad_accum=2) == [(8, [8]), (8, [7])]
    split = calls + [(1, 8, [2])]  # a token budget split step 1 into three passes
    assert bench.measured_passes(split, 2, 1, 2, split=True) == [(8, [8]), (8, [7]), (8, [2])]
    with pytest.raises(RuntimeError, match=r"steps \[1\] ran \[3\]"):
        bench.measured_passes(split, 2, 1, 2)
    with pytest.raises(RuntimeError, match=r"steps \[1\] ran \[1\].*at least 2"):
        bench.measured_passes(calls[:3], 2, 1, 2, split=True)
    with pytest.raises(RuntimeError, match="outside the 2 steps"):
        bench.measured_passes(calls + [(2, 1, [1])], 2, 1, 2)


def test_budget_passes_follow_the_longest_row():
    assert bench.budget_passes([1024] + [100] * 15, 7168) == 3  # 7 rows of width 1024 a pass
    assert bench.budget_passes([400] * 16, 7168) == 1
    assert bench.budget_passes([2048, 5], 1024) == 2  # a row over the budget still runs, alone
    assert bench.budget_passes([300] * 4, 0) == 1
    with pytest.raises(ValueError, match="positive lengths"):
        bench.budget_passes([], 10)


def test_unsloth_fused_layers_reads_what_get_peft_model_patched(tiny_dir):
    """A peft model that Unsloth never touched has no fused layer; one whose layers carry Unsloth's kernel functions
    (installed as its ``get_peft_model`` does: ``apply_qkv``/``apply_o`` on the attention, a bound ``forward`` or a
    tiled ``_unsloth_forward`` on the MLP) counts each kind per layer; a module without decoder layers is refused."""
    import functools
    import types

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_course.sft import unsloth_fused_layers

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                           LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"]))
    layers = model.get_base_model().model.layers
    assert unsloth_fused_layers(model) == {"layers": len(layers), "qkv": 0, "o": 0, "mlp": 0}

    def apply_lora_qkv(self, X):  # the names Unsloth's kernels carry (unsloth.kernels.fast_lora)
        return X

    def apply_lora_o(self, X):
        return X

    def apply_lora_mlp_swiglu(self, X):
        return X

    def original_apply_qkv(self, X):  # what an unfused layer keeps
        return X

    for i, layer in enumerate(layers):
        layer.self_attn.apply_qkv = apply_lora_qkv if i else original_apply_qkv   # layer 0 left unfused
        layer.self_attn.apply_o = apply_lora_o
        if i % 2:
            layer.mlp.forward = types.MethodType(apply_lora_mlp_swiglu, layer.mlp)
        else:
            layer.mlp._unsloth_forward = functools.partial(apply_lora_mlp_swiglu, inplace=False)
    n = len(layers)
    assert unsloth_fused_layers(model) == {"layers": n, "qkv": n - 1, "o": n, "mlp": n}
    with pytest.raises(ValueError, match="no .model.layers"):
        unsloth_fused_layers(__import__("torch").nn.Linear(2, 2))


def test_unsloth_fuses_lora_dropout_reads_the_installed_unsloths_flag(monkeypatch):
    """2026.10's ``FUSED_LORA_DROPOUT`` (on by default) decides whether a ``lora_dropout > 0`` model is fused; a version
    without the flag never fused one; without Unsloth imported the call says how to get it."""
    import sys
    import types

    from lora_course.sft import BackendUnavailableError, unsloth_fuses_lora_dropout

    monkeypatch.delitem(sys.modules, "unsloth", raising=False)
    with pytest.raises(BackendUnavailableError, match="import_unsloth"):
        unsloth_fuses_lora_dropout()
    fast_lora = types.ModuleType("unsloth.kernels.fast_lora")
    for name, mod in (("unsloth", types.ModuleType("unsloth")),
                      ("unsloth.kernels", types.ModuleType("unsloth.kernels")),
                      ("unsloth.kernels.fast_lora", fast_lora)):
        monkeypatch.setitem(sys.modules, name, mod)
    assert unsloth_fuses_lora_dropout() is False          # 2026.8 and before: no flag
    fast_lora.FUSED_LORA_DROPOUT = True                   # 2026.10, UNSLOTH_FUSED_LORA_DROPOUT unset
    assert unsloth_fuses_lora_dropout() is True
    fast_lora.FUSED_LORA_DROPOUT = False                  # UNSLOTH_FUSED_LORA_DROPOUT=0
    assert unsloth_fuses_lora_dropout() is False
