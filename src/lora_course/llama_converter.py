"""llama.cpp's own converter scripts, from the pinned llama-cpp-python sdist, run as a subprocess (notebook 08).

- ``fetch_converter``: ``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, their ``conversion/`` package and the
  vendored ``gguf-py``, extracted once from the source distribution of llama-cpp-python ``LLAMA_CPP_PIN``
  (``vendor/llama.cpp``) into the course cache (``converter_dir``), behind a file lock and published by an atomic
  rename (``python -m lora_course.export --fetch-converter``, run by ``make model``; never committed). Why the
  sdist: the wheel does not ship the Python converter, and the copy vendored with the runtime is the same llama.cpp
  revision as the runtime that loads its output;
- ``supported_architectures``: the Hugging Face architectures it converts (its ``TEXT_MODEL_MAP``, read with
  ``ast``, without importing the converter);
- ``_run_converter``: one converter command line in a subprocess, with the converter's folders on ``PYTHONPATH``
  (``_converter_env``); a failure or timeout is an ``ExportError`` with the tail of its output.

Used by ``export``: ``to_gguf`` and ``lora_to_gguf`` (and their ``convert_command`` / ``lora_convert_command``)
run these scripts, and its CLI fetches them.

Sources: llama.cpp ``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, ``conversion/`` and ``gguf-py``
(https://github.com/ggml-org/llama.cpp, vendored in llama-cpp-python 0.3.36); ``pip download --no-binary``.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from .export_errors import ExportError
from .paths import cache_dir, publish_directory, read_complete

LLAMA_CPP_DIST = "llama-cpp-python"
LLAMA_CPP_PIN = "0.3.36"
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "LICENSE")
CONVERTER_DIRS = ("conversion", "gguf-py")


def converter_dir(version: str = LLAMA_CPP_PIN) -> Path:
    """Where the extracted llama.cpp converter of llama-cpp-python ``version`` lives in the course cache."""
    return cache_dir() / "llama.cpp-converter" / f"llama-cpp-python-{version}"


def _converter_complete(path: Path) -> bool:
    return read_complete(path, (*CONVERTER_FILES[:2], *CONVERTER_DIRS)) is not None


def _download_sdist(version: str, dest: Path) -> Path:
    """``pip download`` the source distribution of the pinned llama-cpp-python (no build, no dependencies).

    ``--no-binary llama-cpp-python`` forces the sdist of that one package; ``:all:`` would also force the build
    backend's own dependencies from source, which pip then builds just to read metadata (slow, same tarball).
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", LLAMA_CPP_DIST,
           f"{LLAMA_CPP_DIST}=={version}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not found:
        raise ExportError(f"could not download the llama-cpp-python {version} source distribution "
                          f"({' '.join(cmd)}):\n{proc.stderr[-2000:]}\nGive a local copy with "
                          "fetch_converter(sdist=...) or LORA_COURSE_LLAMA_SDIST=<path to the .tar.gz>.")
    return found[0]


def _extract_converter(sdist: Path, out: Path) -> None:
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if len(parts) < 4 or parts[1:3] != ("vendor", "llama.cpp"):
                continue
            rel = Path(*parts[3:])
            if (len(rel.parts) == 1 and rel.name in CONVERTER_FILES) or rel.parts[0] in CONVERTER_DIRS:
                if not (m.isfile() or m.isdir()):
                    continue
                m.name = str(rel)
                members.append(m)
        if not any(m.name == "convert_hf_to_gguf.py" for m in members):
            raise ExportError(f"{sdist} has no vendor/llama.cpp/convert_hf_to_gguf.py")
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(out, members=members, **kwargs)


def fetch_converter(version: str = LLAMA_CPP_PIN, sdist: Path | None = None) -> Path:
    """Extract llama.cpp's converter scripts from the pinned llama-cpp-python sdist into the cache (once).

    Why from the sdist: the wheel does not ship the Python converter, and the copy vendored with the runtime is
    the one whose GGUF output that runtime is known to load. Built in a temporary sibling behind a file lock and
    published by an atomic rename, so parallel notebooks never see a half-extracted converter.
    """
    final = converter_dir(version)
    if _converter_complete(final):
        return final

    def build(tmp: Path) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="llama-sdist-") as dl:
            local = sdist or os.environ.get("LORA_COURSE_LLAMA_SDIST")
            src = Path(local) if local else _download_sdist(version, Path(dl))
            _extract_converter(src, tmp)
        return {"sdist": src.name}

    publish_directory(final, build, {"llama-cpp-python": version}, (*CONVERTER_FILES[:2], *CONVERTER_DIRS))
    return final


def _converter_env(conv: Path) -> dict[str, str]:
    """``convert_hf_to_gguf.py`` imports its sibling package ``conversion/`` and the vendored ``gguf-py``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(conv / "gguf-py"), str(conv)] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def supported_architectures(conv: Path | None = None) -> set[str]:
    """The Hugging Face architectures the converter can convert (its ``TEXT_MODEL_MAP``, read without importing)."""
    conv = conv or fetch_converter()
    tree = ast.parse((conv / "conversion" / "__init__.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP" and node.value is not None:
            return set(ast.literal_eval(node.value).keys())
    raise ExportError(f"cannot read TEXT_MODEL_MAP from {conv / 'conversion' / '__init__.py'}")


def _run_converter(cmd: list[str], conv: Path, what: str, timeout: float) -> None:
    try:
        proc = subprocess.run(cmd, env=_converter_env(conv), capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as e:
        raise ExportError(f"{what} did not finish within {timeout:.0f} s") from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise ExportError(f"{what} failed (exit {proc.returncode}):\n{tail}")
