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


def test_sync_regenerates_the_setup_cell_and_the_gpu_metadata(tmp_path):
    """A notebook with a stale setup cell and no Colab/Kaggle metadata: check_notebook names both, and
    `python -m lora_course.notebook --sync` rewrites exactly those (every other cell kept), idempotently."""
    import json

    from lora_course.notebook import PLATFORM_METADATA, main, read_json, setup_cell_source, sync_notebook

    src = next(p for p in NOTEBOOKS if p.name.startswith("02_"))
    path = tmp_path / src.name
    nb = read_json(src)
    for key in PLATFORM_METADATA:
        nb["metadata"].pop(key, None)
    setup = next(c for c in nb["cells"] if "setup" in c["metadata"].get("tags", []))
    setup["source"] = "# an old setup cell\n!pip install lora-course"
    path.write_text(json.dumps(nb))
    problems = " | ".join(check_notebook(path))
    assert f"setup_cell_source('{src.name}')" in problems and "--sync" in problems
    for key in PLATFORM_METADATA:
        assert f"notebook metadata {key!r}" in problems
    assert main(["--sync", str(path)]) == 0
    assert check_notebook(path) == []
    synced = read_json(path)
    assert synced["metadata"]["colab"]["gpuType"] == "T4" and synced["metadata"]["accelerator"] == "GPU"
    assert synced["metadata"]["kaggle"]["accelerator"] == "nvidiaTeslaT4"
    new_setup = next(c for c in synced["cells"] if "setup" in c["metadata"].get("tags", []))
    assert "".join(new_setup["source"]) == setup_cell_source(src.name)
    others = [("".join(c["source"]), c["cell_type"]) for c in synced["cells"] if c is not new_setup]
    assert others == [("".join(c["source"]), c["cell_type"]) for c in read_json(src)["cells"]
                      if "setup" not in c["metadata"].get("tags", [])]
    assert sync_notebook(path) is False  # idempotent: same bytes


def test_sync_refuses_a_notebook_without_exactly_one_setup_cell(tmp_path):
    from lora_course.notebook import code_cell, markdown_cell, new_notebook, sync_notebook, write_notebook

    path = tmp_path / "03_x.ipynb"
    write_notebook(path, new_notebook([markdown_cell("# t"), code_cell("x = 1")]))
    with pytest.raises(ValueError, match="tagged 'setup'"):
        sync_notebook(path)


def _learner_texts():
    """What a learner reads: every notebook cell, the README, the Makefile and docs/."""
    import json

    root = Path(__file__).resolve().parent.parent
    for nb in NOTEBOOKS:
        yield nb.name, "\n".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"])
    for p in [root / "README.md", root / "Makefile", *sorted((root / "docs").glob("*.md"))]:
        yield p.name, p.read_text()


def test_cross_references_name_existing_notebooks_with_one_numbering():
    """One numbering: 'notebook NN' (or 'chapter NN') must name a notebook that exists; the old one-digit chapter
    numbers, which were not the notebooks' numbers, must not come back."""
    import re

    existing = {p.name[:2] for p in NOTEBOOKS}
    problems = []
    for name, text in _learner_texts():
        for m in re.finditer(r"\b([Nn]otebook|[Cc]hapter) (\d+)\b", text):
            number = m.group(2)
            if len(number) != 2 or number not in existing:
                problems.append(f"{name}: '{m.group(0)}' ({text[max(0, m.start() - 40):m.end() + 20]!r})")
    assert not problems, "\n".join(problems)


def test_each_notebook_ends_with_a_link_to_the_next():
    import json
    import re

    for i, path in enumerate(NOTEBOOKS):
        last = "".join(json.loads(path.read_text())["cells"][-1]["source"])
        assert last.startswith("**Next:**"), f"{path.name} does not end with a **Next:** cell"
        links = re.findall(r"\]\(([^)]+\.ipynb)\)", last)
        if i + 1 < len(NOTEBOOKS):
            assert links == [NOTEBOOKS[i + 1].name], (path.name, links)
        else:
            assert "README" in last and not links, last


def test_learner_path_rules_name_what_is_missing_or_misplaced():
    """Exercises with self-checking collapsed solutions, a recap, then the collapsed closing check: each rule fires on
    a notebook end that breaks it, and a well-formed end passes them."""
    from lora_course.notebook import _learner_path_problems, code_cell, markdown_cell, new_notebook

    hidden = {"jupyter": {"source_hidden": True}}

    def cell(kind, src, tag=None):
        c = markdown_cell(src) if kind == "md" else code_cell(src)
        if tag:
            c["metadata"] = {"tags": [tag], **hidden}
        return c

    def problems(cells):
        import nbformat

        return " | ".join(_learner_path_problems(nbformat.from_dict(new_notebook(cells)).cells))

    good = [cell("md", "### Exercise 1 · warm-up: a"), cell("code", "assert 2 + 2 == 4", "solution"),
            cell("md", "### Exercise 2 · core: b"), cell("code", "assert len('ab') == 2", "solution"),
            cell("md", "## Recap"), cell("code", "# Recap\nprint('- x')"),
            cell("md", "## Closing check"), cell("code", "assert True\nrecord_metric('x', 1)", "checks")]
    assert problems(good) == ""
    assert "2-3 '### Exercise'" in problems(good[2:])
    unchecked = good[:1] + [cell("code", "print(4)", "solution")] + good[2:]
    assert "exercise cell 0" in problems(unchecked)
    visible = good[:-1] + [code_cell("assert True")]
    assert "tagged 'checks'" in problems(visible)
    assert "'## Recap'" in problems(good[:4] + good[6:])
    reordered = good[4:6] + good[:4] + good[6:]
    assert "order at the end" in problems(reordered)
