"""README figures come from files that commands write: the generated blocks equal their rendering from results/, and
a figure changed in its source file is caught."""
import json
import shutil

import pytest

from lora_course import readme


def test_readme_blocks_match_their_source_files():
    assert readme.check() == [], "run `python -m lora_course.readme --write` after a command rewrote results/"


def test_a_changed_source_figure_is_caught(tmp_path):
    (tmp_path / "results").mkdir()
    for f in [readme.ROOT / "README.md", *(readme.ROOT / "results").glob("*.json")]:
        shutil.copy(f, tmp_path / ("README.md" if f.name == "README.md" else f"results/{f.name}"))
    shutil.copytree(readme.ROOT / "notebooks", tmp_path / "notebooks")  # the lanes' blocks name notebooks not run
    assert readme.check(tmp_path) == []
    bench = tmp_path / "results" / "bench-cpu.json"
    doc = json.loads(bench.read_text())
    doc["figures"][0]["value"] *= 1.5  # what a new `make bench` would write
    bench.write_text(json.dumps(doc))
    assert readme.check(tmp_path) == ["bench-cpu"]
    lane = min((tmp_path / "results").glob("gpu-lane-real-*.json"))
    doc = json.loads(lane.read_text())
    doc["notebooks"][0]["seconds"] += 100
    lane.write_text(json.dumps(doc))
    assert readme.check(tmp_path) == ["bench-cpu", "gpu-lanes"]


def test_a_readme_without_a_block_says_how_to_add_it(tmp_path):
    (tmp_path / "results").mkdir()
    for f in (readme.ROOT / "results").glob("*.json"):
        shutil.copy(f, tmp_path / "results" / f.name)
    (tmp_path / "README.md").write_text("# no blocks here\n")
    with pytest.raises(ValueError, match=r"no block 'bench-cpu'.*--write"):
        readme.check(tmp_path)


def test_every_notebook_has_a_course_map_figure():
    """A new notebook needs a LANE_METRICS line (README's course map and the site show it); a stale entry names a
    notebook that no longer exists."""
    stems = {p.stem for p in (readme.ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    assert stems == set(readme.LANE_METRICS), (sorted(stems - set(readme.LANE_METRICS)),
                                               sorted(set(readme.LANE_METRICS) - stems))


def test_a_notebook_missing_from_a_lane_file_is_named(tmp_path):
    """A notebook that did not finish in a GPU lane (no row in its file) is named under the lane's table."""
    (tmp_path / "results").mkdir()
    (tmp_path / "notebooks").mkdir()
    for name in ("00_a.ipynb", "01_b.ipynb"):
        (tmp_path / "notebooks" / name).write_text("{}")
    row = {"notebook": "00_a.ipynb", "ok": True, "seconds": 1.0, "metrics": {}, "error": "", "skipped": "",
           "status": "ok"}
    doc = {"device": "GPU", "profile": "gpu", "emulate": None, "dtype": "bfloat16", "pretrained": True,
           "model_id": "/m", "date": "d", "passed": 1, "failed": 0, "skipped": 0, "notebooks": [row]}
    (tmp_path / "results" / "gpu-lane-real-x.json").write_text(json.dumps(doc))
    text = readme.render_gpu_lanes(tmp_path)
    assert "Not in this run (no finished result in the file): `01_b.ipynb`" in text and "`00_a.ipynb`" not in text


def test_06_lane_figure_shows_the_fused_path_where_the_lane_measured_it():
    from lora_course import readme

    fmt = readme.LANE_METRICS["06_unsloth_fast_sft"]
    base = {"ppl_before": 210.0, "ppl_after": 13.96}
    assert fmt(base) == "answer perplexity 210 -> 14.0"
    gpu = fmt({**base, "unsloth_step_ms_dropout_0": 41.2, "unsloth_step_ms_dropout_005": 55.9})
    assert gpu.endswith("; Unsloth step at lora_dropout 0 / 0.05: 41 / 56 ms"), gpu


def test_13_lane_figure_shows_unsloths_gguf_export_where_the_lane_ran_it():
    fmt = readme.LANE_METRICS["13_capstone"]
    cpu = {"cleaned_kept": 400, "cleaned_duplicates": 80, "eval_loss_start": 2.04, "eval_loss_end": 1.25,
           "task_metric_mean_before": 0.17, "task_metric_mean_after": 0.67, "served_in_format": 2.0}
    assert "save_pretrained_gguf" not in fmt(cpu) and "served 2/3 in format" in fmt(cpu), fmt(cpu)
    gpu = fmt({**cpu, "unsloth_gguf_seconds": 36.3, "unsloth_gguf_own_kl": 0.00685,
               "unsloth_gguf_unsloth_kl_vs_trained": 0.64309, "unsloth_gguf_course_kl_vs_trained": 0.01765})
    assert gpu.endswith("; save_pretrained_gguf Q8_0 in 36 s, KL 0.0069 from its own 16-bit merge, 0.64 from the "
                        "trained function (the course's Q8_0: 0.0176)"), gpu


def test_the_hardware_block_follows_its_grids_and_refuses_another_model(tmp_path):
    """experiments-hardware is rendered from the three committed grids: a verdict that moves in one file changes the
    block, and a grid of another model is refused with what to do."""
    (tmp_path / "results").mkdir()
    for f in (readme.ROOT / "results").glob("experiments*.json"):
        shutil.copy(f, tmp_path / "results" / f.name)
    before = readme.render_experiments_hardware(tmp_path)
    assert before == readme.render_experiments_hardware(readme.ROOT)
    gpu = tmp_path / "results" / "experiments-gpu-t4.json"
    doc = json.loads(gpu.read_text())
    for rec in doc["records"]:
        if rec["config"]["method"] == "qlora":
            rec["sec_per_step"] = 0.001        # QLoRA suddenly far faster than LoRA on that machine
    gpu.write_text(json.dumps(doc))
    assert readme.render_experiments_hardware(tmp_path) != before
    doc["model"]["name"] = "SmolLM2-360M-Instruct"
    gpu.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="not the course's SmolLM2-135M: re-create it"):
        readme.render_experiments_hardware(tmp_path)
