"""LoRA targets by architecture and by discovery, the checked LoraConfig, the rank advice and the parameter report.

Architectures are checked on tiny random models built from their real transformers classes, so a renamed layer
in a transformers upgrade fails here, not in a notebook.
"""
import copy

import pytest
import torch
from torch import nn

from lora_course.lora_sizing import (
    NothingTrainableError,
    check_trainable,
    lora_parameter_count,
    module_type,
    recommend_lora_rank,
    trainable_parameter_report,
)
from lora_course.targets import (
    ALL_LINEAR,
    TARGETS_BY_ARCHITECTURE,
    TargetModuleError,
    UnknownArchitectureError,
    build_lora_config,
    check_target_modules,
    discover_targets,
    linear_layers,
    linear_name_counts,
    target_modules_for,
    targets_for_architecture,
)


def _tiny(model_type: str) -> nn.Module:
    """A one/two-layer random model of a transformers architecture (vocabulary 128, width 32)."""
    import transformers as T

    small = {"vocab_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 32}
    configs = {
        "llama": lambda: T.LlamaConfig(intermediate_size=64, num_key_value_heads=1, **small),
        "mistral": lambda: T.MistralConfig(intermediate_size=64, num_key_value_heads=1, **small),
        "qwen2": lambda: T.Qwen2Config(intermediate_size=64, num_key_value_heads=1, **small),
        "qwen3": lambda: T.Qwen3Config(intermediate_size=64, num_key_value_heads=1, head_dim=16, **small),
        "gemma": lambda: T.GemmaConfig(intermediate_size=64, num_key_value_heads=1, head_dim=16, **small),
        "phi": lambda: T.PhiConfig(intermediate_size=64, **small),
        "falcon": lambda: T.FalconConfig(**small),
        "gpt2": lambda: T.GPT2Config(vocab_size=128, n_layer=2, n_head=2, n_embd=32, bos_token_id=0, eos_token_id=0),
    }
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(configs[model_type]())


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi", "falcon", "gpt2"]


@pytest.mark.parametrize("model_type", ARCHS)
def test_registry_names_match_the_real_architecture_and_discovery_agrees(model_type):
    model = _tiny(model_type)
    assert model.config.model_type == model_type
    spec = targets_for_architecture(model_type)
    counts = check_target_modules(model, spec.all)
    n_layers = 2
    assert all(c == n_layers for c in counts.values()), counts  # each name: once per block, never lm_head
    found = discover_targets(model)
    assert set(found.attention) == set(spec.attention)
    assert set(found.mlp) == set(spec.mlp)
    assert found.conv1d == spec.conv1d == (model_type == "gpt2")
    # The registry's targets together are exactly what "all-linear" adapts.
    assert sorted(n for n in linear_layers(model)) == sorted(
        n for n in linear_layers(model) if any(n == t or n.endswith("." + t) for t in spec.all))


def test_gpt2_needs_fan_in_fan_out_and_qualified_c_proj():
    from peft import get_peft_model

    model = _tiny("gpt2")
    cfg = build_lora_config(model, r=4, target_modules=target_modules_for(model, "attention"))
    assert cfg.fan_in_fan_out is True
    peft_model = get_peft_model(model, cfg)
    adapted = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and n.endswith(("c_attn", "c_proj"))}
    assert adapted and all(".attn." in n for n in adapted)  # the MLP's c_proj is not adapted
    x = torch.randint(0, 128, (1, 5))
    assert peft_model(x).logits.shape == (1, 5, 128)


def test_lm_head_is_never_a_target(tiny):
    model, _ = tiny
    assert "lm_head" not in linear_layers(model)
    assert "lm_head" not in linear_name_counts(model)
    assert set(target_modules_for(model)) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"}
    assert target_modules_for(model, "attention") == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_unknown_architecture_lists_its_linear_layers():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = nn.Linear(8, 16)
            self.readout = nn.Linear(16, 4)

    with pytest.raises(UnknownArchitectureError) as e:
        discover_targets(Odd())
    assert "mixer" in str(e.value) and "readout" in str(e.value) and "8->16" in str(e.value)
    with pytest.raises(UnknownArchitectureError, match="mamba"):
        targets_for_architecture("mamba")


def test_a_target_that_matches_nothing_is_an_error_listing_the_linear_names(tiny):
    model, _ = tiny
    with pytest.raises(TargetModuleError) as e:
        build_lora_config(model, r=8, target_modules=["q_proj", "v_prj"])  # peft alone would adapt q_proj only
    msg = str(e.value)
    assert "v_prj" in msg and "v_proj" in msg and "gate_proj" in msg
    with pytest.raises(TargetModuleError, match="empty"):
        check_target_modules(model, [])
    with pytest.raises(TargetModuleError, match="nothing_here"):
        check_target_modules(model, r".*nothing_here")


@pytest.mark.parametrize("r", [0, -4, 2.5, True])
def test_rank_must_be_a_positive_integer(tiny, r):
    with pytest.raises(ValueError, match="positive integer"):
        build_lora_config(tiny[0], r=r)


@pytest.mark.parametrize("alpha", [0, -16, float("nan")])
def test_alpha_must_be_positive_and_the_error_gives_the_fix(tiny, alpha):
    with pytest.raises(ValueError, match=r"lora_alpha=16"):
        build_lora_config(tiny[0], r=8, lora_alpha=alpha)


def test_build_lora_config_defaults_and_passthrough(tiny):
    cfg = build_lora_config(tiny[0], r=4, target_modules=["q_proj"], layers_to_transform=[1], bias="none")
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules, cfg.layers_to_transform) == (4, 8, {"q_proj"}, [1])
    assert cfg.fan_in_fan_out is False
    with pytest.raises(ValueError, match="dropout"):
        build_lora_config(tiny[0], lora_dropout=1.0)


def test_report_counts_match_peft_and_the_shape_formula(tiny):
    from peft import get_peft_model

    model = copy.deepcopy(tiny[0])
    before = trainable_parameter_report(model)
    assert before.trainable == before.total > 0
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(NothingTrainableError, match="get_peft_model"):
        check_trainable(model)

    targets = ["q_proj", "v_proj"]
    cfg = build_lora_config(model, r=4, target_modules=targets, layers_to_transform=[1])
    peft_model = get_peft_model(model, cfg)
    report = check_trainable(peft_model)
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert (report.trainable, report.total) == (trainable, total)
    # tiny: hidden 64, 4 heads of 16, 2 kv heads -> q 64->64, v 64->32; layer 1 only
    assert report.trainable == 4 * (64 + 64) + 4 * (64 + 32)
    assert report.trainable == lora_parameter_count(tiny[0], targets, 4, layers_to_transform=[1])
    # The wrapped model lists the same projections under the same names and predicts the same count.
    assert list(linear_layers(peft_model)) == list(linear_layers(tiny[0]))
    assert lora_parameter_count(peft_model, targets, 4, layers_to_transform=[1]) == report.trainable
    assert report.trainable_of("q_proj") == 512 and report.trainable_of("v_proj") == 384
    assert report.trainable_of("k_proj", "embed_tokens") == 0
    assert 0 < report.percent < 1
    assert "q_proj" in report.table() and "all" in report.table()


def test_report_attributes_modules_to_save_and_token_rows_to_their_module(tiny):
    from peft import get_peft_model

    model = copy.deepcopy(tiny[0])
    vocab, width = model.get_input_embeddings().weight.shape
    saved = get_peft_model(model, build_lora_config(model, r=2, target_modules=["q_proj"],
                                                    modules_to_save=["embed_tokens"]))
    assert trainable_parameter_report(saved).trainable_of("embed_tokens") == vocab * width

    model = copy.deepcopy(tiny[0])
    tokens = get_peft_model(model, build_lora_config(model, r=2, target_modules=["q_proj"],
                                                     trainable_token_indices=[5, 7]))
    assert trainable_parameter_report(tokens).trainable_of("embed_tokens") == 2 * width


def test_module_type_strips_peft_wrappers():
    assert module_type("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == "q_proj"
    assert module_type("base_model.model.model.layers.3.mlp.down_proj.base_layer.weight") == "down_proj"
    assert module_type("base_model.model.lm_head.modules_to_save.default.weight") == "lm_head"
    assert module_type("base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default") \
        == "embed_tokens"
    assert module_type("model.norm.weight") == "norm"


def test_recommend_lora_rank_follows_its_documented_rules():
    small = recommend_lora_rank("low", 160, 0.135)
    assert (small.r, small.lora_alpha) == (8, 16)
    assert recommend_lora_rank("high", 300, 1.7).r == 8  # capped by data
    assert recommend_lora_rank("medium", 5000, 7).r == 16
    assert recommend_lora_rank("high", 100_000, 7).r == 64  # doubled by plenty of data
    big = recommend_lora_rank("high", 5000, 70)
    assert big.r == 16 and big.lora_alpha == 32 and any("halved" in x for x in big.reasons)
    assert recommend_lora_rank("low", 160, 70).r == 4
    assert any("capped" in x for x in recommend_lora_rank("complex", 10, 1).reasons)
    assert "r=8" in str(small)
    for bad in [("impossible", 10, 1.0), ("low", 0, 1.0), ("low", 10, 0), ("low", 10.5, 1.0)]:
        with pytest.raises(ValueError):
            recommend_lora_rank(*bad)


def test_all_linear_string_is_accepted_and_counts_every_linear(tiny):
    counts = check_target_modules(tiny[0], ALL_LINEAR)
    assert counts == {ALL_LINEAR: 14}  # 7 projections x 2 layers
    assert set(TARGETS_BY_ARCHITECTURE) >= {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi", "gpt2", "falcon"}
