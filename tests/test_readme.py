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
