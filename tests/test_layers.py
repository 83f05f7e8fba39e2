"""The package's layers (README, "The package in layers"): plumbing modules import nothing of the course beyond the
plumbing itself, so any module can use them without an import cycle."""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lora_course"
PLUMBING = ("paths", "procs", "report", "timing")


def course_imports(path: Path) -> list[str]:
    """Every import of the course's own package in a module (relative, or ``lora_course``), at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("lora_course")):
            found.append(f"line {node.lineno}: from {'.' * node.level}{node.module or ''}")
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.startswith("lora_course")]
    return found


@pytest.mark.parametrize("module", PLUMBING)
def test_plumbing_imports_only_plumbing(module):
    allowed = {f"from .{m}" for m in PLUMBING} | {f"from lora_course.{m}" for m in PLUMBING}
    assert [i for i in course_imports(SRC / f"{module}.py") if i.split(": ", 1)[1] not in allowed] == []


def test_the_checker_sees_course_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef g():\n    from .paths import cache_dir\n    import lora_course.report\n")
    assert course_imports(f) == ["line 4: from .paths", "line 5: import lora_course.report"]
