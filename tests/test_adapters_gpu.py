"""AdapterRegistry serving a model loaded through Unsloth's FastLanguageModel in inference mode (needs CUDA + unsloth).

Run by `make test-gpu` (the GPU lane sets LORA_COURSE_GPU_MODEL to its ~1B random-init Llama); elsewhere the model is
built here (LORA_COURSE_TOKENIZER: a tokenizer folder, where the course's model wheel is not installed).
"""
import os

import pytest

from lora_course.sft import installed_version

pytestmark = pytest.mark.gpu


def _model_dir() -> str:
    from lora_course.models import gpu_model_dir

    return os.environ.get("LORA_COURSE_GPU_MODEL") or str(gpu_model_dir(os.environ.get("LORA_COURSE_TOKENIZER")))


def test_registry_serves_an_unsloth_model_in_inference_mode(tmp_path):
    if installed_version("unsloth") is None:
        pytest.skip("unsloth is not installed here")
    from lora_course.unsloth_serving import check, verdict

    rep = check(_model_dir(), work=tmp_path)  # random adapters a, b, c; plain reference in its own process
    print(rep)
    assert rep["unsloth_detected"] and rep["model_class"]
    assert rep["route"] == ["a", "b", "c", "__base__"]
    # the adapters really differ (else every comparison below would pass trivially)
    assert min(rep["alone_vs_plain_other_adapter"].values()) > 0.5, rep["alone_vs_plain_other_adapter"]
    assert rep["unloaded_bytes"] > 0 and rep["adapters_mib"] > 0
    works = verdict(rep)
    # every claim notebook 07 makes about Unsloth, except peft's own mixed batch (reported there, not claimed)
    failed = [k for k, ok in works.items() if not ok and not k.startswith("peft's own")]
    assert not failed, (failed, rep)
