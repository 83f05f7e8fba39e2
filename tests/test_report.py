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


def test_course_gives_all_cores_notebooks_every_usable_cpu_and_others_nothing(tmp_path, monkeypatch):
    from lora_course import hardware
    from lora_course.course import solo_environ

    monkeypatch.setattr(hardware, "usable_cpus", lambda: 6)
    nb08, nb04 = tmp_path / "08_merge.ipynb", tmp_path / "04_qlora.ipynb"
    assert solo_environ(nb08, [tmp_path / "." / "08_merge.ipynb"]) == {"OMP_NUM_THREADS": "6", "MKL_NUM_THREADS": "6"}
    assert solo_environ(nb04, [nb08]) == {}  # 04 starts a process of its own beside its training: one thread each


def test_an_all_cores_notebook_gets_torch_threads_under_the_makefiles_environment(tmp_path):
    # The Makefile exports OMP_NUM_THREADS=1 and MKL_NUM_THREADS=1 for the side-by-side stage; a notebook run alone
    # with every core must see torch use them: torch's CPU wheel starts with the smaller of the two variables
    import os
    import subprocess
    import sys

    from lora_course import hardware
    from lora_course.course import solo_environ

    n = str(hardware.usable_cpus())
    nb = tmp_path / "12_forgetting.ipynb"
    probe = [sys.executable, "-c", "import torch; print(torch.get_num_threads())"]

    def torch_threads(env):
        return int(subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout.strip())

    plain = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    learner = torch_threads({**plain, "OMP_NUM_THREADS": n})  # a learner's kernel: no MKL variable set
    if learner < 2:
        pytest.skip("torch gets one thread here whatever the environment")
    make_env = {**plain, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert torch_threads({**make_env, **solo_environ(nb, [nb])}) == learner
    assert torch_threads({**make_env, "OMP_NUM_THREADS": n}) == 1  # OMP's alone: what the runner gave before


def test_course_report_shows_skipped_notebooks_as_skipped(tmp_path):
    from lora_course.course import NotebookRun, write_report

    runs = [NotebookRun("00_a.ipynb", True, 3.0, {"x": 1}),
            NotebookRun("10_b.ipynb", True, 0.0, skipped="needs 2 or more GPUs"),
            NotebookRun("11_c.ipynb", False, 1.0, error="AssertionError")]
    text = write_report(runs, tmp_path).read_text()
    assert "| 00_a.ipynb | ok |" in text
    assert "| 10_b.ipynb | SKIPPED: needs 2 or more GPUs |" in text
    assert "| 11_c.ipynb | FAILED: AssertionError |" in text
    import json

    doc = json.loads((tmp_path / "course-report.json").read_text())  # what README's course-cpu block reads
    assert [(r["notebook"], r["status"]) for r in doc["notebooks"]] == [
        ("00_a.ipynb", "ok"), ("10_b.ipynb", "SKIPPED"), ("11_c.ipynb", "FAILED")]
    assert (doc["passed"], doc["failed"], doc["skipped"]) == (1, 1, 1) and doc["notebooks"][0]["metrics"] == {"x": 1}
    assert doc["machine"]["cores"] and "flags" in doc["machine"]


def test_gpu_lane_gives_multi_process_notebooks_one_process_per_gpu():
    from pathlib import Path

    from lora_course.gpu_lane import lane_parameters
    from lora_course.notebook import parameter_names

    nb10 = Path(__file__).parents[1] / "notebooks" / "10_scaling_out.ipynb"
    nb00 = Path(__file__).parents[1] / "notebooks" / "00_setup_and_first_model.ipynb"
    assert {"PROFILE", "MODEL_ID", "NUM_PROCESSES"} <= parameter_names(nb10)
    assert lane_parameters(nb10, "gpu", "m", 4) == {"PROFILE": "gpu", "MODEL_ID": "m", "NUM_PROCESSES": 4}
    assert "needs 2 or more GPUs" in lane_parameters(nb10, "gpu", "m", 1)
    assert lane_parameters(nb00, "gpu", "m", 1) == {"PROFILE": "gpu", "MODEL_ID": "m"}


def test_gpu_lane_param_reaches_only_the_notebooks_that_declare_it():
    """``--param WORKERS=4`` sets notebook 09's runs side by side; notebook 00 has no WORKERS parameter and gets none;
    values read as JSON, a malformed one is refused with the form to use."""
    from pathlib import Path

    import pytest

    from lora_course.gpu_lane import lane_parameters, parse_param

    nbs = Path(__file__).parents[1] / "notebooks"
    extra = dict([parse_param("WORKERS=4"), parse_param("LIVE_SEEDS=[0]")])
    assert extra == {"WORKERS": 4, "LIVE_SEEDS": [0]}
    assert parse_param("BACKEND=unsloth") == ("BACKEND", "unsloth")
    assert lane_parameters(nbs / "09_experiments.ipynb", "gpu", "m", 1, extra) == {
        "PROFILE": "gpu", "MODEL_ID": "m", "WORKERS": 4, "LIVE_SEEDS": [0]}
    assert lane_parameters(nbs / "00_setup_and_first_model.ipynb", "gpu", "m", 1, extra) == {
        "PROFILE": "gpu", "MODEL_ID": "m"}
    for bad in ("WORKERS", "4=WORKERS", "=4"):
        with pytest.raises(ValueError, match="NAME=VALUE"):
            parse_param(bad)


def test_write_text_atomic_leaves_the_old_file_whole_when_writing_fails(tmp_path, monkeypatch):
    """The one atomic write every results/cache/report file goes through: a failure mid-write keeps the previous
    content and leaves no temporary file behind."""
    from lora_course.paths import write_text_atomic

    target = tmp_path / "sub" / "r.json"
    assert write_text_atomic(target, "old") == target and target.read_text() == "old"

    from pathlib import Path

    original = Path.write_text

    def broken(self, text, encoding=None):
        original(self, text[:2], encoding=encoding)  # half written, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", broken)
    with pytest.raises(OSError, match="No space"):
        write_text_atomic(target, "new content")
    monkeypatch.undo()
    assert target.read_text() == "old" and [p.name for p in target.parent.iterdir()] == ["r.json"]
