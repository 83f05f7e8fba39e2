"""lora_course.practice (notebook 11): the training loop's schedule, clipping and records, the divergence guard, the
adapter snapshots, the dequantized weights of a 4-bit model and the logit comparison."""
import copy
import math
import tempfile
from types import SimpleNamespace

import pytest
import torch

from lora_course.data import load_task
from lora_course.practice import (
    DivergenceGuard,
    RunLog,
    TrainingDiverged,
    dequantized_weights,
    logit_gap,
    restore_trainable,
    snapshot_trainable,
    train_run,
)


@pytest.fixture()
def tiny_lora(tiny):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                  task_type="CAUSAL_LM"))
    return peft_model, tok


@pytest.fixture(scope="module")
def examples():
    return load_task("creative", "train")[:16]


def test_cosine_schedule_with_warmup_is_transformers_and_the_first_step_moves_nothing(tiny_lora, examples):
    from transformers import get_cosine_schedule_with_warmup

    model, tok = tiny_lora
    log = train_run(model, tok, examples, steps=6, batch_size=2, lr=1e-2, schedule="cosine", warmup_steps=2)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
    sched = get_cosine_schedule_with_warmup(opt, 2, 6)
    want = []
    for _ in range(6):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert log.lrs == want and log.lrs[0] == 0.0
    assert log.update_norms[0] == 0.0 and all(u > 0 for u in log.update_norms[1:]), log.update_norms
    assert log.grad_norms == log.clipped_norms  # no clipping asked
    assert log.steps == 6 and log.stopped is None and log.seconds > 0
    assert not model.training  # back in eval mode


def test_clipping_bounds_the_gradient_norm_and_is_recorded(tiny_lora, examples):
    model, tok = tiny_lora
    free = train_run(model, tok, examples, steps=3, batch_size=2, lr=1e-3)
    limit = min(free.grad_norms) / 4  # binds on every step
    restore = snapshot_trainable(model)
    log = train_run(model, tok, examples, steps=3, batch_size=2, lr=1e-3, max_grad_norm=limit)
    assert all(n > limit for n in log.grad_norms)
    assert all(c <= limit * (1 + 1e-5) for c in log.clipped_norms), (log.clipped_norms, limit)
    assert all(c == pytest.approx(limit, rel=1e-4) for c in log.clipped_norms)
    restore_trainable(model, restore)


def test_the_first_adamw_step_moves_every_b_weight_by_the_rate(tiny_lora, examples):
    model, tok = tiny_lora
    n_b = sum(p.numel() for n, p in model.named_parameters() if "lora_B" in n)
    log = train_run(model, tok, examples, steps=1, batch_size=2, lr=1e-3)
    assert log.update_norms[0] == pytest.approx(1e-3 * math.sqrt(n_b), rel=1e-2)


class Bowl(torch.nn.Module):
    """A model whose loss is 1 + sum(f(w)): AdamW's first step moves each w by about the learning rate."""

    def __init__(self, f):
        super().__init__()
        self.w, self.f = torch.nn.Parameter(torch.ones(3)), f

    def forward(self, input_ids, attention_mask, labels):
        return SimpleNamespace(loss=1 + self.f(self.w).sum())


@pytest.mark.parametrize("f, what", [(torch.square, "x the first step's"), (torch.sqrt, "loss is nan")])
def test_the_guard_stops_a_diverging_run_before_its_bad_step_and_names_the_fix(tiny, examples, f, what):
    _, tok = tiny
    model = Bowl(f)
    with pytest.raises(TrainingDiverged) as info:  # w: 1 -> -99, loss 4 -> 29,404 (square) or nan (sqrt)
        train_run(model, tok, examples, steps=5, batch_size=2, lr=100.0, guard=DivergenceGuard(1.5))
    err = info.value
    assert isinstance(err.log, RunLog) and err.log.stopped == str(err) and what in str(err)
    assert err.step == 1 and err.log.losses == [4.0] and err.log.steps == 1
    assert not math.isfinite(err.loss) or err.loss > 1.5 * err.log.losses[0]
    assert "lower the learning rate" in str(err) and "clip gradients" in str(err) and "warm up" in str(err)
    assert torch.allclose(model.w.detach(), torch.full((3,), -99.0))  # the first step applied, the bad one not
    healthy = train_run(Bowl(torch.square), tok, examples, steps=5, batch_size=2, lr=0.1, guard=DivergenceGuard(1.5))
    assert healthy.stopped is None and healthy.steps == 5 and healthy.losses[-1] < healthy.losses[0]


def test_guard_check_and_its_message():
    guard = DivergenceGuard(3.0)
    assert guard.check(1, 5.0, 5.0, 1e-3, None, 0) is None
    assert guard.check(1, 14.9, 5.0, 1e-3, None, 0) is None
    msg = guard.check(3, 15.1, 5.0, 0.3, None, 0)
    assert "step 3" in msg and "3.0x" in msg and "0.3" in msg and "clip gradients" in msg and "warm up" in msg
    nan = guard.check(2, float("nan"), 5.0, 0.3, 1.0, 2)
    assert "nan" in nan and "clip gradients" not in nan and "warm up" not in nan  # already clipped and warmed up
    assert guard.check(0, float("inf"), float("inf"), 1e-3, None, 0) is not None
    for bad in (1.0, 0.5, "3"):
        with pytest.raises(ValueError, match="factor"):
            DivergenceGuard(bad)


def test_guard_stops_a_run_worse_than_a_uniform_guess_below_the_ratio():
    # the GPU lane deciding as a T4 (fp16 with loss scaling), notebook 11 at lr=0.3: the losses it measured
    t4 = [5.128, 14.507, 14.180, 14.282, 14.096, 14.306, 13.913, 14.318]
    ratio_only = DivergenceGuard(3.0)
    assert all(ratio_only.check(i, x, t4[0], 0.3, None, 0) is None for i, x in enumerate(t4))  # 2.8x: missed
    guard = DivergenceGuard(3.0, vocab_size=49152)
    assert guard.uniform_limit == pytest.approx(math.log(49152) + math.log(3.0))  # 11.90
    msg = guard.check(1, t4[1], t4[0], 0.3, None, 0)
    assert msg is not None and "step 1" in msg and "uniform guess over 49152 tokens" in msg and "10.80" in msg
    assert "lower the learning rate" in msg
    # healthy runs pass: a pretrained model well below the uniform guess, a random init within tenths of it
    assert guard.check(1, 3.36, 5.13, 2e-3, 1.0, 2) is None
    assert guard.check(3, 11.2, 10.9, 1e-3, None, 0) is None and guard.check(3, 12.0, 10.9, 1e-3, None, 0) is not None
    for bad in (1, 0, 2.5, "49152"):
        with pytest.raises(ValueError, match="vocab_size"):
            DivergenceGuard(3.0, vocab_size=bad)


@pytest.mark.parametrize("kwargs, match", [
    ({"schedule": "cosine_restarts"}, "unknown schedule"),
    ({"schedule": "constant", "warmup_steps": 1}, "constant_with_warmup"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"warmup_steps": 3, "schedule": "cosine"}, r"warmup_steps must be in \[0, steps\)"),
    ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
])
def test_bad_arguments_are_refused_with_the_fix(tiny_lora, examples, kwargs, match):
    model, tok = tiny_lora
    args = {"steps": 3, "batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        train_run(model, tok, examples, **args)


def test_a_model_without_trainable_parameters_is_refused(tiny, examples):
    model, tok = tiny
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_run(frozen, tok, examples, steps=1)


def test_snapshot_and_restore(tiny_lora, examples):
    model, tok = tiny_lora
    snap = snapshot_trainable(model)
    assert snap and all("lora_" in n for n in snap)
    train_run(model, tok, examples, steps=2, batch_size=2, lr=1e-2)
    assert any(not torch.equal(p, snap[n]) for n, p in snapshot_trainable(model).items())
    restore_trainable(model, snap)
    assert all(torch.equal(p, snap[n]) for n, p in snapshot_trainable(model).items())
    with pytest.raises(KeyError, match="lacks"):
        restore_trainable(model, {"no.such.param": torch.zeros(1)})


def test_dequantized_weights_of_a_4bit_model(tiny):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lora_course.bnb_interop import bnb_weight, disable_cpu_repacking
    from lora_course.models import tiny_model_dir
    from lora_course.nf4 import quantize_nf4

    q = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32, device_map={"": "cpu"},
                                             quantization_config=BitsAndBytesConfig(
                                                 load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    disable_cpu_repacking(q)
    plain = {n: m for n, m in q.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    wrapped = get_peft_model(q, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    got = dequantized_weights(wrapped)
    assert set(got) == set(plain)  # plain module names, also for layers that peft wrapped
    for name, module in plain.items():
        assert torch.equal(got[name], bnb_weight(module))
    # the decoded weight is the NF4 round trip of the original weight
    model, _ = tiny
    name = "model.layers.0.self_attn.q_proj"
    original = model.get_submodule(name).weight.detach()
    assert torch.equal(got[name], quantize_nf4(original, 64, double_quant=True).dequantize())
    with pytest.raises(ValueError, match="no bitsandbytes 4-bit layers"):
        dequantized_weights(model)


def test_logit_gap():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 5, 11, generator=g)
    same = logit_gap(ref, ref.clone())
    assert same == {"max_abs": 0.0, "mean_kl": 0.0, "top1_agree": 1.0}
    other = ref.clone()
    other[0, 1] += 10 * torch.nn.functional.one_hot(ref[0, 1].argmin(), 11)  # changes one position's top token
    labels = torch.full((2, 5), -100)
    labels[1, 1:] = 1  # only the second row's positions count (positions 0-3 of row 1)
    masked = logit_gap(ref, other, labels)
    assert masked == {"max_abs": 0.0, "mean_kl": 0.0, "top1_agree": 1.0}
    full = logit_gap(ref, other)
    assert full["max_abs"] == pytest.approx(10.0) and full["mean_kl"] > 0 and full["top1_agree"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="same batch"):
        logit_gap(ref, ref[:, :4])


def test_answer_loss_is_the_models_own_loss_on_fewer_logits(tiny_lora, examples):
    from lora_course.data import collate, tokenize_example
    from lora_course.practice import answer_logits, answer_loss

    model, tok = tiny_lora
    batch = collate([tokenize_example(tok, ex, 128) for ex in examples[:4]], tok.pad_token_id)
    logits, targets = answer_logits(model, batch)
    kept = int((batch["labels"][:, 1:] != -100).any(0).sum())
    assert logits.shape[:2] == targets.shape == (4, kept) and kept < batch["input_ids"].shape[1] - 1
    assert int((targets != -100).sum()) == int((batch["labels"] != -100).sum())  # every answer token is scored
    with torch.no_grad():
        ours, theirs = answer_loss(model, batch).item(), model(**batch).loss.item()
    assert ours == pytest.approx(theirs, rel=1e-5)  # float32 rounding of another matmul shape

    class NoKeep(torch.nn.Module):  # a model whose forward takes no logits_to_keep: every position is scored
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids=None, attention_mask=None, labels=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    logits_all, targets_all = answer_logits(NoKeep(), batch)
    assert logits_all.shape[1] == targets_all.shape[1] == batch["input_ids"].shape[1] - 1
    with torch.no_grad():
        assert answer_loss(NoKeep(), batch).item() == pytest.approx(theirs, rel=1e-5)


def _trained_looking(peft_model):
    """The model in eval mode with B ~ N(0, 0.05): LoRA's B starts at zero, and a merge of a zero update is trivial."""
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return peft_model.eval()


def test_merged_model_of_a_qlora_adapter_is_the_trained_function_and_the_16bit_merge_is_not(tiny):
    """merged_model merges a QLoRA adapter into the dequantized NF4 weights: the same function as the 4-bit model
    with its adapter (fp32: rounding only), where merging into the original weights is off by W - W_hat."""
    from peft import PeftModel

    from lora_course.models import load_base, load_for_method
    from lora_course.practice import merged_model

    torch.manual_seed(0)
    qmodel, tok = load_for_method("qlora", "tiny", None, r=4)
    qmodel = _trained_looking(qmodel)
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog")["input_ids"]])
    with torch.no_grad():
        trained = qmodel(ids).logits
        merged = merged_model(qmodel, "tiny")
        got = merged(ids).logits
        assert not any("lora" in n for n, _ in merged.named_parameters())  # a plain model, nothing left to merge
        # the 16-bit merge, W + sBA, for comparison (the pitfall)
        base, _ = load_base("tiny", dtype=torch.float32)
        with tempfile.TemporaryDirectory() as d:
            qmodel.save_pretrained(d)
            wrong = PeftModel.from_pretrained(base, d).merge_and_unload()(ids).logits
    exact = (got - trained).abs().max().item()
    pitfall = (wrong - trained).abs().max().item()
    print(f"merged vs trained {exact:.2e}; 16-bit merge vs trained {pitfall:.2e}")
    # fp32 throughout: the merged weight is W_hat + sBA rounded once; the 4-bit layer adds x W_hat^T and s x A^T B^T
    # separately. Differences of a few float32 ulps of logits of ~1: 1e-4 is 100x that, and 100x below the pitfall
    assert exact < 1e-4 < pitfall / 100, (exact, pitfall)


def test_merged_model_of_a_plain_lora_model_leaves_the_trained_model_whole(tiny_lora, tmp_path):
    """The merge happens on a copy: the peft model keeps its adapter (a save after the merge once wrote an empty
    adapter_model.safetensors, 40 bytes, in notebook 13)."""
    from peft.utils import get_peft_model_state_dict

    from lora_course.practice import merged_model

    peft_model, tok = tiny_lora
    peft_model = _trained_looking(peft_model)
    ids = torch.tensor([tok("hello there")["input_ids"]])
    n_lora = len(get_peft_model_state_dict(peft_model))
    with torch.no_grad():
        before = peft_model(ids).logits
        merged = merged_model(peft_model)
        assert (merged(ids).logits - before).abs().max().item() < 1e-4
        assert torch.equal(peft_model(ids).logits, before)  # the trained model is unchanged
    assert n_lora > 0 and len(get_peft_model_state_dict(peft_model)) == n_lora
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with pytest.raises(TypeError, match="no adapter to merge"):
        merged_model(merged)


def test_merged_model_unmerged_reference_and_dtype(tiny_lora):
    """merge=False keeps the adapter (a peft model computing the trained function in ``dtype``); a dtype given casts
    the copy, and the reference and the merge then agree to that precision's rounding."""
    from lora_course.practice import merged_model

    peft_model, tok = tiny_lora
    peft_model = _trained_looking(peft_model)
    ids = torch.tensor([tok("hello there")["input_ids"]])
    with torch.no_grad():
        trained = peft_model(ids).logits
        ref = merged_model(peft_model, dtype=torch.float64, merge=False)
        assert any("lora_A" in n for n, _ in ref.named_parameters())  # not merged
        assert {p.dtype for p in ref.parameters()} == {torch.float64}
        merged = merged_model(peft_model, dtype=torch.float64)
        assert {p.dtype for p in merged.parameters()} == {torch.float64}
        ref_logits, merged_logits = ref(ids).logits, merged(ids).logits
    # float64 reference vs the fp32 trained model: fp32 rounding of logits ~1 (1e-6 ulps, 1e-4 bounds it); float64
    # merge vs float64 unmerged: 1e-12 rounding, 1e-9 bounds it; a missing or wrong merge moves logits by ~1e-2+
    assert (ref_logits - trained.double()).abs().max().item() < 1e-4
    assert (merged_logits - ref_logits).abs().max().item() < 1e-9
    with torch.no_grad(), ref.disable_adapter():
        effect = (ref(ids).logits - ref_logits).abs().max().item()
    assert effect > 1e-3, effect  # the adapter matters, so an unmerged-vs-merged mix-up would show


def test_merged_model_runs_its_own_weights_after_trl_patched_the_forward(tiny_lora):
    """TRL's SFTTrainer patches the trained model's forward with a closure over the original (add_fused_lm_head); a
    deepcopy kept calling the original model, so the merged copy matched the trained model whatever its weights."""
    import copy

    from trl.trainer.utils import add_fused_lm_head

    from lora_course.practice import merged_model

    peft_model, tok = tiny_lora
    peft_model = _trained_looking(peft_model)
    add_fused_lm_head(peft_model.base_model.model)  # what SFTTrainer does to the model it trains
    ids = torch.tensor([tok("hello there")["input_ids"]])
    with torch.no_grad():
        trained = peft_model(ids).logits
        naive = copy.deepcopy(peft_model).merge_and_unload()  # the pitfall, reproduced
        for p in naive.parameters():
            p.zero_()
        assert torch.equal(naive(ids).logits, trained)  # zeroed weights, same logits: the original ran
        merged = merged_model(peft_model)
        assert (merged(ids).logits - trained).abs().max().item() < 1e-4  # fp32 rounding of the merge only
        for p in merged.parameters():
            p.zero_()
        assert not torch.equal(merged(ids).logits, trained)  # its own (now zero) weights computed it
        assert torch.equal(peft_model(ids).logits, trained)  # and the trained model is untouched
