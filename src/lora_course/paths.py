"""Where the course keeps things: the repository URL (one place), the data folder and the cache folder.

Every badge, setup cell and doc link is derived from ``REPO_URL``; ``tests/test_notebooks.py`` checks that.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_URL = "https://github.com/lora-course/lora-course"
"""The course's repository: the one place badges and Colab/Kaggle setup cells take it from."""

REPO_BRANCH = "main"

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
            f"(`git clone {REPO_URL} && pip install -e lora-course`), or point LORA_COURSE_DATA at a copy "
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
