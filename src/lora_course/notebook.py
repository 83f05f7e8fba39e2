"""The notebook harness: the standard cells every chapter starts with, and the anatomy check tests run.

Anatomy (DEVELOPERS.md): a title with learning objectives and Colab/Kaggle badges; a setup cell that installs
the course on Colab/Kaggle and does nothing locally; one cell tagged ``parameters`` for papermill; narrative and
code; a closing code cell that asserts the measured outcome and records it with ``record_metric``.

``header_cells`` generates the first two cells from ``paths.REPO_URL`` so that badges and setup cells follow
the repository in one place; ``check_notebook`` lists everything a notebook gets wrong (empty list: fine).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .paths import REPO_URL, colab_url, kaggle_url

NAME_RE = re.compile(r"^(\d\d)_[a-z0-9_]+\.ipynb$")
PARAMETER_NAMES = ("PROFILE", "MODEL_ID", "SEED")


def badges_markdown(notebook: str) -> str:
    """The Colab and Kaggle badges of ``notebooks/<notebook>``."""
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url(notebook)}) "
            f"[![Open in Kaggle](https://kaggle.com/static/images/open-in-kaggle.svg)]({kaggle_url(notebook)})")


def setup_cell_source() -> str:
    """The setup cell: on Colab/Kaggle clone the course and install it editable, keeping the platform's torch.

    Self-contained (the package is not importable yet on Colab). Locally it does nothing: ``make lab`` already
    installed everything into .venv.
    """
    return f'''# Setup: on Colab or Kaggle, clone the course and install it (the platform's own torch is kept,
# since the package asks only for torch>=2.4). Locally this cell does nothing: `make lab` set up .venv.
import os, subprocess, sys
if "google.colab" in sys.modules or "KAGGLE_KERNEL_RUN_TYPE" in os.environ:
    REPO_URL = "{REPO_URL}"
    if not os.path.isdir("lora-course"):
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, "lora-course"], check=True)
    extra = "[gpu]" if subprocess.run(["nvidia-smi"], capture_output=True).returncode == 0 else ""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"lora-course{{extra}}"], check=True)
    sys.path.insert(0, os.path.abspath("lora-course/src"))
    os.environ.setdefault("LORA_COURSE_DATA", os.path.abspath("lora-course/data"))'''


def header_cells(notebook: str, title: str, objectives: list[str], intro: str = "") -> list[dict[str, Any]]:
    """The title/objectives/badges markdown cell and the setup code cell for ``notebooks/<notebook>``."""
    goals = "\n".join(f"- {o}" for o in objectives)
    md = f"# {title}\n\n{badges_markdown(notebook)}\n\n**Learning objectives**\n\n{goals}\n"
    if intro:
        md += f"\n{intro}\n"
    return [markdown_cell(md), code_cell(setup_cell_source(), tags=["setup"])]


def markdown_cell(source: str) -> dict[str, Any]:
    return {"cell_type": "markdown", "metadata": {}, "source": source}


def code_cell(source: str, tags: list[str] | None = None) -> dict[str, Any]:
    meta = {"tags": tags} if tags else {}
    return {"cell_type": "code", "execution_count": None, "metadata": meta, "outputs": [], "source": source}


def new_notebook(cells: list[dict[str, Any]], timeout: int = 600) -> dict[str, Any]:
    """A notebook dict (nbformat 4) with the python3 kernelspec and an nbmake per-cell timeout."""
    return {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
            "execution": {"timeout": timeout},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def write_notebook(path: Path, nb: dict[str, Any]) -> None:
    """Write a notebook with stable JSON (ids added, no outputs) so regenerating it gives the same bytes."""
    import nbformat

    node = nbformat.from_dict(nb)
    for i, cell in enumerate(node.cells):
        cell["id"] = f"c{i:02d}"
    nbformat.validate(node)
    Path(path).write_text(nbformat.writes(node) + "\n")


def _src(cell: dict[str, Any]) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def check_notebook(path: Path) -> list[str]:
    """Everything ``path`` gets wrong against the course's notebook anatomy; an empty list means it is fine."""
    import nbformat

    path = Path(path)
    problems: list[str] = []
    if not NAME_RE.match(path.name):
        problems.append(f"name {path.name!r} is not NN_topic.ipynb (two digits, lowercase topic)")
    try:
        nb = nbformat.read(str(path), as_version=4)
        nbformat.validate(nb)
    except Exception as e:  # noqa: BLE001 - any parse/validation failure is the finding
        return problems + [f"not a valid nbformat-4 notebook: {e}"]
    if nb.metadata.get("kernelspec", {}).get("name") != "python3":
        problems.append("kernelspec is not python3")
    cells = nb.cells
    for i, c in enumerate(cells):
        if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None):
            problems.append(f"cell {i} has committed outputs or an execution count (strip them)")
    if not cells or cells[0].cell_type != "markdown":
        return problems + ["the first cell must be the markdown title with learning objectives"]
    first = _src(cells[0])
    if not first.startswith("# "):
        problems.append("the first cell does not start with a '# ' title")
    if "learning objectives" not in first.lower():
        problems.append("the first cell does not list learning objectives")
    if colab_url(path.name) not in first:
        problems.append(f"missing or stale Colab badge (want {colab_url(path.name)})")
    if kaggle_url(path.name) not in first:
        problems.append(f"missing or stale Kaggle badge (want {kaggle_url(path.name)})")
    setup = [c for c in cells if "setup" in c.metadata.get("tags", [])]
    if len(setup) != 1 or _src(setup[0]) != setup_cell_source():
        problems.append("needs exactly one cell tagged 'setup' equal to notebook.setup_cell_source()")
    params = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    if len(params) != 1:
        problems.append(f"needs exactly one cell tagged 'parameters', found {len(params)}")
    else:
        try:
            names = assigned_names(_src(params[0]))
        except SyntaxError as err:
            problems.append(f"the parameters cell is not valid Python: {err}")
        else:
            missing = [n for n in PARAMETER_NAMES if n not in names]
            if missing:
                problems.append(f"the parameters cell does not set {missing}")
    code = [c for c in cells if c.cell_type == "code"]
    last = _src(code[-1]) if code else ""
    if "assert " not in last or "record_metric(" not in last:
        problems.append("the closing code cell must assert the measured outcome and record_metric it")
    return problems


def assigned_names(source: str) -> set[str]:
    """The names a cell's top-level statements assign (``X = ...``): what papermill may override in a parameters cell."""
    import ast

    return {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign) for t in node.targets
            if isinstance(t, ast.Name)}


def parameter_names(path: Path) -> set[str]:
    """The names set by ``path``'s cell tagged ``parameters`` (empty when it has none)."""
    for cell in read_json(path)["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            src = cell["source"]
            return assigned_names(src if isinstance(src, str) else "".join(src))
    return set()


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
