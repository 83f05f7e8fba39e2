"""Every notebook follows the course anatomy: ordered names, badges from REPO_URL, setup and parameters cells,
no committed outputs, python3 kernel, and a closing cell that asserts and records its measured outcome."""
from pathlib import Path

import pytest

from lora_course.notebook import NAME_RE, check_notebook

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks_and_their_numbers_are_unique():
    assert NOTEBOOKS, "no notebooks found"
    numbers = [NAME_RE.match(p.name).group(1) for p in NOTEBOOKS if NAME_RE.match(p.name)]
    assert len(numbers) == len(set(numbers)) == len(NOTEBOOKS)
    assert numbers[0] == "00"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_anatomy(path):
    assert check_notebook(path) == []


def test_check_notebook_finds_problems(tmp_path):
    from lora_course.notebook import code_cell, markdown_cell, new_notebook, write_notebook

    bad = new_notebook([markdown_cell("no title"), code_cell("x = 1")])
    bad["cells"][1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "1"}]
    bad["cells"][1]["execution_count"] = 1
    path = tmp_path / "1_bad.ipynb"
    write_notebook(path, bad)
    problems = " | ".join(check_notebook(path))
    for expected in ("NN_topic", "committed outputs", "'# ' title", "learning objectives", "Colab badge",
                     "tagged 'setup'", "tagged 'parameters'", "closing code cell"):
        assert expected in problems
