"""Shared fixtures: the tiny random Llama (mechanics) and the real cpu model (behaviour), loaded once per worker;
the tiny model's folder, tokenizer and f32 GGUF, shared by the export tests (export, gguf_quant, parity,
llama_runtime, modelfile)."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny():
    from lora_course.models import load_base

    return load_base("tiny")


@pytest.fixture(scope="session")
def cpu_model():
    from lora_course.models import load_base

    return load_base("cpu")


@pytest.fixture(scope="session")
def cpu_tokenizer():
    from transformers import AutoTokenizer

    from lora_course.models import cpu_model_dir, prepare_tokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(cpu_model_dir()))


@pytest.fixture(scope="session")
def tiny_dir():
    from lora_course.models import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def tiny_tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def tiny_gguf(tiny_dir, tmp_path_factory):
    """The tiny model converted once by llama.cpp's own converter (f32: the exact baseline)."""
    from lora_course.export import to_gguf

    return to_gguf(tiny_dir, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", outtype="f32")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped (with the reason) where there is none, run by `make test-gpu`."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run `make test-gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
