"""lora_course.profiling: operator names into families, and a profiled training step of the tiny model."""
import json

import pytest
import torch

from lora_course.profiling import OTHER, family_of, profile_steps


@pytest.mark.parametrize("name, family", [
    ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("ampere_bf16_s16816gemm_bf16_128x64", "matmul"),
    ("sm90_xmma_gemm_bf16bf16", "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"), ("flash_fwd_kernel", "attention"),
    ("kDequantizeBlockwise<bfloat16, 512, 64, 8, 2>", "nf4 dequant"), ("gemv_4bit_inference", "nf4 dequant"),
    ("aten::_log_softmax", "loss"), ("aten::nll_loss_forward", "loss"),
    ("aten::_foreach_lerp_", "optimizer"), ("Optimizer.step#AdamW.step", "optimizer"),
    ("aten::copy_", "memory/copy"), ("Memcpy HtoD (Pageable -> Device)", "memory/copy"),
    ("aten::mul", "elementwise/norm"), ("aten::rsqrt", "elementwise/norm"),
    ("cudaLaunchKernel", OTHER),
])
def test_family_of(name, family):
    assert family_of(name) == family


def test_a_profiled_training_step(tiny, tmp_path):
    from lora_course.data import collate, load_task, tokenize_example

    model, tok = tiny
    batch = collate([tokenize_example(tok, ex, 64) for ex in load_task("creative", "train")[:2]], tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # rate 0: the step's full cost, the weights unchanged
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def step():
        calls.append(1)
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    prof = profile_steps(step, steps=2, warmup=1, trace_path=tmp_path / "t" / "trace.json")
    assert len(calls) == 3 and prof.steps == 2 and prof.device == "cpu" and prof.busy_share is None
    assert prof.family_s["matmul"] > 0 and prof.family_s["optimizer"] > 0 and prof.family_s["loss"] > 0
    assert sum(prof.shares().values()) == pytest.approx(1.0)
    assert 0 < prof.total_s <= prof.wall_s * 1.05  # self times of one thread cannot exceed the wall time (+ clock)
    assert prof.outside_ops_s == pytest.approx(max(prof.wall_s - prof.total_s, 0.0))
    assert prof.top_ops and prof.top_ops[0][1] == max(s for _, s in prof.top_ops)
    events = json.loads(prof.trace.read_text())["traceEvents"]
    assert any(e.get("name") == "aten::mm" for e in events)
    assert "family" in prof.table() and "(wall)" in prof.table()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="at least one step"):
        profile_steps(step, steps=0)
