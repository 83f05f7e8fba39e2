import json
import math

import pytest

from lora_course.report import METRICS_ENV, record_metric, recorded


def test_record_metric_writes_the_runner_file(tmp_path, monkeypatch):
    target = tmp_path / "m" / "nb.json"
    monkeypatch.setenv(METRICS_ENV, str(target))
    assert record_metric("exact_after", 0.7) == 0.7
    record_metric("backend", "peft")
    assert json.loads(target.read_text()) == {"exact_after": 0.7, "backend": "peft"}
    assert recorded()["backend"] == "peft"


def test_record_metric_rejects_non_finite_and_objects():
    with pytest.raises(ValueError, match="finite"):
        record_metric("loss", math.nan)
    with pytest.raises(TypeError):
        record_metric("table", {"a": 1})
