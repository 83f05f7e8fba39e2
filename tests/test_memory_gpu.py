"""memory.gpu_memory_benchmark on a GPU: LoRA and QLoRA measured with torch.cuda.max_memory_allocated against the
estimator (needs CUDA; run by `make test-gpu`, which passes its model as LORA_COURSE_GPU_MODEL)."""
import os

import pytest

pytestmark = pytest.mark.gpu


def test_gpu_memory_benchmark_measures_within_the_estimators_tolerance():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from lora_course.memory import gpu_memory_benchmark
    from lora_course.models import gpu_model_dir

    model = os.environ.get("LORA_COURSE_GPU_MODEL") or str(gpu_model_dir(os.environ.get("LORA_COURSE_TOKENIZER")))
    ok, runs = gpu_memory_benchmark(os.environ.get("LORA_COURSE_TOKENIZER", ""), batch_size=2, seq_len=128, steps=2,
                                    model_dir=model)
    assert [m.method for m in runs] == ["lora", "qlora"] and all(m.device == "cuda" for m in runs)
    assert runs[1].measured_bytes < runs[0].measured_bytes, "the 4-bit base holds less than the 16-bit one"
    assert ok, [(m.method, m.ratio) for m in runs]
