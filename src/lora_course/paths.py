"""Where the course keeps things: the repository URL (one place), the data folder and the cache folder.

Every badge, setup cell and doc link is derived from ``REPO_URL``; ``tests/test_notebooks.py`` checks that. The setup
cells clone ``$LORA_COURSE_REPO_URL`` (branch ``$LORA_COURSE_REPO_REF``) instead when set (``clone_url``).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_URL = "https://github.com/lora-course/lora-course"
"""The course's repository: the one place badges and Colab/Kaggle setup cells take it from."""

REPO_BRANCH = "main"

REPO_URL_ENV = "LORA_COURSE_REPO_URL"
"""Overrides the address the setup cells clone (a fork, a mirror, or a ``file://`` URL in tests); badges keep
``REPO_URL`` (a fork changes ``REPO_URL`` and regenerates them with ``python -m lora_course.notebook --sync``)."""
REPO_REF_ENV = "LORA_COURSE_REPO_REF"
"""Overrides the branch or tag the setup cells clone (``REPO_BRANCH`` by default)."""


def clone_url() -> str:
    """The address a setup cell clones: ``$LORA_COURSE_REPO_URL`` or ``REPO_URL``."""
    return os.environ.get(REPO_URL_ENV) or REPO_URL


def clone_ref() -> str:
    """The branch or tag a setup cell clones: ``$LORA_COURSE_REPO_REF`` or ``REPO_BRANCH``."""
    return os.environ.get(REPO_REF_ENV) or REPO_BRANCH

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent.parent


def data_dir() -> Path:
    """The folder holding the committed task data (``$LORA_COURSE_DATA`` overrides it).

    The course is installed editable (locally and on Colab/Kaggle, from a clone), so ``data/`` sits at the
    repository root next to ``src/``.
    """
    env = os.environ.get("LORA_COURSE_DATA")
    path = Path(env) if env else REPO_ROOT / "data"
    if not path.is_dir():
        raise FileNotFoundError(
            f"task data folder {path} does not exist. Clone the repository and install it editable "
            f"(`git clone {clone_url()} && pip install -e lora-course`), or point LORA_COURSE_DATA at a copy "
            "of its data/ folder."
        )
    return path


def cache_dir() -> Path:
    """The course's cache (converted models, built artefacts): ``$LORA_COURSE_CACHE`` or ~/.cache/lora-course.

    Why a cache outside the repo: the converted CPU model is 517 MB and is shared by every notebook and clone.
    """
    env = os.environ.get("LORA_COURSE_CACHE")
    path = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lora-course"
    path.mkdir(parents=True, exist_ok=True)
    return path


def colab_url(notebook: str) -> str:
    """The 'Open in Colab' address of ``notebooks/<notebook>`` on the repository's main branch."""
    slug = REPO_URL.removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{slug}/blob/{REPO_BRANCH}/notebooks/{notebook}"


def kaggle_url(notebook: str) -> str:
    """The 'Open in Kaggle' address of ``notebooks/<notebook>`` (Kaggle imports from the GitHub blob URL)."""
    return f"https://kaggle.com/kernels/welcome?src={REPO_URL}/blob/{REPO_BRANCH}/notebooks/{notebook}"


# ------------------------------------------------------------------------------------- cache directories
CACHE_MARKER = "COMPLETE.json"


def file_sizes(path: Path) -> dict[str, int]:
    """``{name: bytes}`` of the plain files directly in ``path`` (the completeness marker left out)."""
    return {p.name: p.stat().st_size for p in sorted(Path(path).iterdir()) if p.is_file() and p.name != CACHE_MARKER}


def read_complete(path: Path, required: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The marker record of a published cache directory, or None if it is missing, half-built or altered since.

    Complete means: the marker exists, its recorded file sizes equal the directory's, and every ``required``
    entry (file or folder) exists. Anything else is never used; ``publish_directory`` rebuilds it.
    """
    marker = Path(path) / CACHE_MARKER
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("files") != file_sizes(path):
        return None
    return record if all((Path(path) / r).exists() for r in required) else None


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all: a sibling temporary file (same file system, named by this
    process) renamed over ``path``. A reader, or a process that was killed mid-write, never sees half a file; the
    temporary file is removed if writing fails. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def publish_directory(final: Path, build: Callable[[Path], dict[str, Any] | None], info: dict[str, Any],
                      required: tuple[str, ...] = ()) -> tuple[dict[str, Any], bool]:
    """Build a cache directory once, safely among parallel processes: ``(marker record, built by this call)``.

    Behind a file lock, ``build(tmp)`` fills a temporary sibling; the marker (``info``, what ``build`` returns and the
    file sizes) is written last and the folder renamed into place atomically, so a reader sees a complete directory
    or none. A half-built or altered directory found at ``final`` is removed and rebuilt, never used.
    """
    from filelock import FileLock

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{final.name}.lock")):
        record = read_complete(final, required)
        if record is not None:  # complete already, or another process finished it while this one waited
            return record, False
        if final.exists():
            print(f"[lora_course] {final} is incomplete or corrupt: rebuilding it", file=sys.stderr)
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            record = {**info, **(build(tmp) or {})}
            record["files"] = file_sizes(tmp)
            (tmp / CACHE_MARKER).write_text(json.dumps(record, indent=1))
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return record, True
