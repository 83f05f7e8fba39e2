"""Shared fixtures: the tiny random Llama (mechanics) and the real cpu model (behaviour), loaded once per worker."""
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


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped (with the reason) where there is none, run by `make test-gpu`."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run `make test-gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
