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


def test_course_schedule_runs_solo_notebooks_after_the_others(tmp_path):
    from lora_course.course import schedule

    nbs = [tmp_path / n for n in ("08_merge.ipynb", "00_setup.ipynb", "04_qlora.ipynb")]
    together, alone = schedule(nbs, [tmp_path / "08_merge.ipynb", tmp_path / "99_absent.ipynb"])
    assert [p.name for p in together] == ["00_setup.ipynb", "04_qlora.ipynb"]
    assert [p.name for p in alone] == ["08_merge.ipynb"]
    assert schedule(nbs, []) == (sorted(nbs), [])
