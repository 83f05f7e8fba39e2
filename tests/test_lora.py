"""Chapter 1's from-scratch LoRA against peft, layer by layer, and the shape arithmetic against real models."""
import copy
import json
import math

import pytest
import torch
from torch import nn

from lora_course.lora import (
    LoRALinear,
    add_lora_to_model,
    count_lora_params,
    linear_layer_names,
    lora_layers,
    lora_state_dict,
    merge_lora_weights,
)
from lora_course.shapes import (
    ALL_LINEAR,
    LLAMA_3_1_8B,
    LLAMA_3_1_70B,
    MISTRAL_7B,
    QWEN2_5_7B,
    SMOLLM2_135M,
    ModelShape,
)

# (in_features, out_features, r, use_rslora, bias): non-square shapes, several ranks, both scalings.
CASES = [(48, 80, 1, False, True), (80, 48, 4, True, False), (33, 65, 8, False, False),
         (64, 17, 16, True, True), (96, 96, 2, False, True)]
TIGHT = {"rtol": 1.3e-6, "atol": 1e-6}  # float32 rounding


class OneLinear(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _peft_twin(base: nn.Linear, ours: LoRALinear, r: int, alpha: float, rslora: bool):
    """peft's lora.Linear around a copy of ``base``, holding our A and B."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as PeftLinear

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], lora_dropout=0.0, use_rslora=rslora)
    model = get_peft_model(OneLinear(copy.deepcopy(base)), cfg)
    layer = model.base_model.model.lin
    assert isinstance(layer, PeftLinear)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
    return layer


def _wrapped(in_f: int, out_f: int, r: int, alpha: float = 16.0, rslora: bool = False, bias: bool = True,
             seed: int = 0) -> tuple[nn.Linear, LoRALinear]:
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias)
    ours = LoRALinear(copy.deepcopy(base), r, alpha, use_rslora=rslora)
    with torch.no_grad():
        ours.lora_B.normal_()  # a trained-looking B: at init ΔW = 0 and every comparison would be trivial
    return base, ours


@pytest.fixture
def tiny_lora(tiny):
    model = copy.deepcopy(tiny[0])
    add_lora_to_model(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      r=4, alpha=8)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.02)
    return model


def _ids(seed: int = 0, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------- against peft
@pytest.mark.parametrize("in_f,out_f,r,rslora,bias", CASES)
def test_forward_delta_and_merge_match_peft(in_f, out_f, r, rslora, bias):
    base, ours = _wrapped(in_f, out_f, r, alpha=16.0, rslora=rslora, bias=bias)
    theirs = _peft_twin(base, ours, r, 16.0, rslora)
    assert ours.scaling == pytest.approx(theirs.scaling["default"], rel=1e-12)
    assert ours.scaling == pytest.approx(16.0 / math.sqrt(r) if rslora else 16.0 / r, rel=1e-12)
    x = torch.randn(3, 5, in_f)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), **TIGHT)
        assert not torch.allclose(ours(x), base(x), atol=1e-3)  # the adapter really changes the output
        torch.testing.assert_close(ours.delta_weight(), theirs.get_delta_weight("default"), **TIGHT)
        ours.merge()
        theirs.merge()
        torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight, **TIGHT)
        torch.testing.assert_close(ours(x), theirs(x), **TIGHT)


def test_bf16_base_keeps_float32_adapters_like_peft():
    torch.manual_seed(0)
    base = nn.Linear(32, 24).to(torch.bfloat16)
    ours = LoRALinear(copy.deepcopy(base), 4, 16.0)
    assert ours.lora_A.dtype == ours.lora_B.dtype == torch.float32
    with torch.no_grad():
        ours.lora_B.normal_()
    theirs = _peft_twin(base, ours, 4, 16.0, False)
    assert theirs.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert ours(x).dtype == torch.bfloat16
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)  # same operations, same roundings


def test_init_is_peft_default_kaiming_uniform_a_and_zero_b():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(400, 300), r=64, alpha=16)
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=sqrt(5)) on fan_in=400: U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.shape == (64, 400) and layer.lora_B.shape == (300, 64)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.99 * bound
    assert layer.lora_A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)


# ---------------------------------------------------------------------------------------- behaviour
def test_output_equals_base_exactly_at_init(tiny):
    model, _ = tiny
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        wrapped = add_lora_to_model(copy.deepcopy(model), ALL_LINEAR, r=8, alpha=16)
        after = wrapped(input_ids=ids).logits
    assert any(True for _ in lora_layers(wrapped))
    assert torch.equal(before, after)
    base = nn.Linear(20, 30)
    x = torch.randn(4, 20)
    assert torch.equal(LoRALinear(copy.deepcopy(base), r=4, alpha=8)(x), base(x))


def test_only_lora_factors_get_gradients(tiny_lora):
    tiny_lora(input_ids=_ids()).logits.square().mean().backward()
    with_grad = {n for n, p in tiny_lora.named_parameters() if p.grad is not None}
    assert with_grad and all(n.endswith(("lora_A", "lora_B")) for n in with_grad)
    assert len(with_grad) == 2 * len(list(lora_layers(tiny_lora)))
    assert all(p.grad is None for n, p in tiny_lora.named_parameters() if not n.endswith(("lora_A", "lora_B")))


def test_zero_b_gets_gradient_but_both_zero_gets_none():
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    layer = LoRALinear(nn.Linear(16, 12), r=4, alpha=8)  # peft's init: A random, B zero
    layer(x).square().sum().backward()
    assert layer.lora_B.grad.abs().sum() > 0  # B learns from the first step
    assert torch.count_nonzero(layer.lora_A.grad) == 0  # A's gradient is B^T·... = 0 until B moves
    both = LoRALinear(nn.Linear(16, 12), r=4, alpha=8)
    with torch.no_grad():
        both.lora_A.zero_()
    both(x).square().sum().backward()
    assert torch.count_nonzero(both.lora_A.grad) == 0 and torch.count_nonzero(both.lora_B.grad) == 0


def test_merge_then_unmerge_restores_w_and_merged_forward_is_base_only():
    base, ours = _wrapped(40, 24, 4)
    w0 = ours.base_layer.weight.detach().clone()
    x = torch.randn(6, 40)
    with torch.no_grad():
        y = ours(x)
        ours.merge()
        assert ours.merged
        assert not torch.allclose(ours.base_layer.weight, w0, atol=1e-3)
        torch.testing.assert_close(ours(x), y, **TIGHT)  # the update is applied once, not twice
        torch.testing.assert_close(ours.base_layer(x), y, **TIGHT)
        ours.merge()  # a second merge does nothing
        torch.testing.assert_close(ours(x), y, **TIGHT)
        ours.unmerge()
    assert not ours.merged
    torch.testing.assert_close(ours.base_layer.weight, w0, **TIGHT)
    torch.testing.assert_close(ours.base_layer.weight, base.weight, **TIGHT)


def test_non_matching_target_lists_the_linear_layers(tiny):
    model = copy.deepcopy(tiny[0])
    with pytest.raises(ValueError) as err:
        add_lora_to_model(model, ["q_proj", "query"], r=4, alpha=8)
    msg = str(err.value)
    assert "query" in msg
    for name in ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]:
        assert name in msg
    assert msg.count("'down_proj'") == 1  # deduplicated suffixes, not one entry per decoder layer
    assert linear_layer_names(model) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj", "lm_head"])


def test_a_second_call_keeps_earlier_adapters_trainable_and_names_wrapped_layers(tiny):
    model = add_lora_to_model(copy.deepcopy(tiny[0]), ["q_proj"], r=2, alpha=4)
    with pytest.raises(ValueError, match=r"Linear layers are: \['down_proj'.*already wrapped by LoRA: \['q_proj'\]"):
        add_lora_to_model(model, ["q_proj"], r=2, alpha=4)
    add_lora_to_model(model, ["v_proj"], r=2, alpha=4)
    trainable = {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj", "v_proj"}
    assert "base_layer" not in linear_layer_names(model) and "q_proj" not in linear_layer_names(model)


def test_targets_match_by_suffix_and_freeze_the_rest(tiny):
    model = add_lora_to_model(copy.deepcopy(tiny[0]), ["q_proj", "v_proj"], r=2, alpha=4)
    names = [n for n, _ in lora_layers(model)]
    n_layers = model.config.num_hidden_layers
    assert len(names) == 2 * n_layers and all(n.endswith((".q_proj", ".v_proj")) for n in names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(f"{n}.lora_{f}" for n in names for f in "AB")


def test_lora_state_dict_holds_only_adapter_tensors(tiny_lora):
    sd = lora_state_dict(tiny_lora)
    assert sd and all(k.endswith((".lora_A", ".lora_B")) for k in sd)
    assert len(sd) == 2 * len(list(lora_layers(tiny_lora)))
    assert sum(v.numel() for v in sd.values()) == count_lora_params(tiny_lora)
    full = tiny_lora.state_dict()
    assert all(torch.equal(v, full[k]) for k, v in sd.items())


def test_merge_lora_weights_gives_plain_linears_and_same_outputs(tiny, tiny_lora):
    ids = _ids(3)
    with torch.no_grad():
        before = tiny_lora(input_ids=ids).logits
        base_logits = tiny[0](input_ids=ids).logits
        assert not torch.allclose(before, base_logits, atol=1e-4)
        merged = merge_lora_weights(tiny_lora)
        after = merged(input_ids=ids).logits
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert set(merged.state_dict()) == set(tiny[0].state_dict())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_count_lora_params_equals_trainable_params(tiny):
    model = add_lora_to_model(copy.deepcopy(tiny[0]), ALL_LINEAR, r=8, alpha=16)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count_lora_params(model) == trainable
    assert ModelShape.from_config(model.config).lora_params(ALL_LINEAR, 8) == trainable
    assert count_lora_params(4096, 4096, 16) == 131_072  # the references' "4096x16 + 16x4096"
    with pytest.raises(TypeError):
        count_lora_params(4096)


def test_one_training_step_moves_only_the_adapter(tiny):
    from lora_course.data import load_task
    from lora_course.train import train_steps

    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora_to_model(model, ["q_proj", "v_proj"], r=4, alpha=8)
    train_steps(model, tok, load_task("creative", "train")[:4], steps=1, batch_size=4, lr=1e-2)
    for name, layer in lora_layers(model):
        assert torch.count_nonzero(layer.lora_B) > 0, name
        assert torch.equal(layer.base_layer.weight, frozen[f"{name}.weight"]), name
    assert torch.equal(model.model.embed_tokens.weight, frozen["model.embed_tokens.weight"])


# --------------------------------------------------------------------------------------------- shapes
def test_shapes_match_the_cpu_models_config_and_parameter_count():
    from lora_course.models import cpu_model_dir

    cfg = json.loads((cpu_model_dir() / "config.json").read_text())
    shape = ModelShape.from_config(cfg, name="SmolLM2-135M")
    assert shape == SMOLLM2_135M
    assert shape.total_params() == 134_515_008


def test_shapes_match_the_tiny_models_real_layers(tiny):
    model = tiny[0]
    shape = ModelShape.from_config(model.config)
    assert shape.total_params() == sum(p.numel() for p in model.parameters())
    layer = model.model.layers[0]
    real = {n.rsplit(".", 1)[-1]: (m.in_features, m.out_features)
            for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    assert real == shape.linear_shapes()


def test_qwen2_config_without_bias_key_gets_qkv_biases():
    cfg = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
           "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False}
    assert ModelShape.from_config(cfg).total_params() == QWEN2_5_7B.total_params()


def test_published_totals_of_real_models():
    assert LLAMA_3_1_8B.total_params() == 8_030_261_248
    assert LLAMA_3_1_70B.total_params() == 70_553_706_496
    assert MISTRAL_7B.total_params() == 7_241_732_096
    assert QWEN2_5_7B.total_params() == 7_615_616_512
    q = LLAMA_3_1_8B.linear_shapes()["q_proj"]
    assert q == (4096, 4096) and q[0] * q[1] == 16_777_216
    assert LLAMA_3_1_8B.lora_params(["q_proj"], 16) == 32 * 131_072
    # k/v are 4096 -> 1024 (8 KV heads of 128): q,v at r=16 is 32 layers x (131,072 + 81,920)
    assert LLAMA_3_1_8B.lora_params(["q_proj", "v_proj"], 16) == 32 * (131_072 + 81_920)
    with pytest.raises(ValueError, match="unknown target"):
        LLAMA_3_1_8B.lora_params(["query"], 16)
