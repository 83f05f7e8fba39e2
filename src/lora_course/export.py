"""Merge a LoRA adapter, export to GGUF, quantize, check parity against transformers, and serve it.

The path from a fine-tuned adapter to a file that llama.cpp, llama-cpp-python's server and Ollama run:

- ``merge_adapter``: peft's ``merge_and_unload`` into a plain transformers folder (safetensors, tokenizer, chat
  template), written to a temporary sibling and renamed, then checked to convert correctly;
- ``to_gguf``: llama.cpp's own converter, ``convert_hf_to_gguf.py``, run as a subprocess. It is taken from the
  source distribution of the pinned llama-cpp-python (``vendor/llama.cpp``), so the converter and the runtime
  that loads its output are the same llama.cpp revision. ``fetch_converter`` extracts it once into the course
  cache behind a file lock (``python -m lora_course.export --fetch-converter``; never committed);
- ``quantize``: ``llama_cpp.llama_model_quantize`` (the C API behind ``llama-quantize``), reporting which tensors
  were stored in another type than asked (read back with ``gguf.GGUFReader``);
- ``lora_to_gguf``: llama.cpp's ``convert_lora_to_gguf.py``, so an adapter is applied at load time without merging
  (``llama_cpp.Llama(model_path=base, lora_path=adapter)``);
- ``check_parity``: tokenizer parity, teacher-forced top-1 agreement and KL divergence, greedy-prefix agreement;
- ``serve``: ``python -m llama_cpp.server`` (OpenAI-compatible) on 127.0.0.1 with a bounded start-up wait;
- the Ollama Modelfile for the result is ``lora_course.modelfile``'s.

Why refuse some tokenizers: ``convert_hf_to_gguf.py`` stores a ``tokenizer.json`` that is BPE with byte fallback
and a ``Sequence`` decoder as a SentencePiece-style vocabulary (``tokenizer.ggml.model = "llama"``). llama.cpp
then looks up byte tokens such as ``<0x0A>`` while loading; a byte-level BPE vocabulary dressed up that way (what
transformers' GGUF loader produces for SmolLM2) has none, and llama.cpp aborts with ``std::out_of_range``.

Sources: llama.cpp ``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, ``conversion/`` and ``gguf-py``
(https://github.com/ggml-org/llama.cpp, vendored in llama-cpp-python 0.3.36); ``llama.h`` (``llama_ftype``,
``llama_model_quantize``).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .paths import cache_dir, publish_directory, read_complete
from .procs import free_port

LLAMA_CPP_DIST = "llama-cpp-python"
LLAMA_CPP_PIN = "0.3.36"
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "LICENSE")
CONVERTER_DIRS = ("conversion", "gguf-py")
CONVERTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0", "auto")


class ExportError(RuntimeError):
    """An export step cannot be done; the message says why and what to do."""


class UnsupportedArchitectureError(ExportError):
    """llama.cpp's converter has no converter class for the model's architecture."""


class TokenizerError(ExportError):
    """The tokenizer is missing, or would be stored in a form llama.cpp cannot load."""


class OutputExistsError(ExportError, FileExistsError):
    """The destination exists and ``overwrite=True`` was not given."""


class UnknownQuantizationError(ExportError, ValueError):
    """The quantization name is not one of llama.cpp's ``llama_ftype`` names."""


# ------------------------------------------------------------------------------------------------ helpers
def _threads() -> int:
    """Threads for llama.cpp: ``OMP_NUM_THREADS`` when set (the course runs one per process), else all cores."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else (os.cpu_count() or 1)


def _check_destination(out_path: Path, overwrite: bool) -> Path:
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise OutputExistsError(f"{out_path} already exists: pass overwrite=True to replace it")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return out_path


@contextlib.contextmanager
def _atomic_path(out_path: Path) -> Iterator[Path]:
    """A temporary sibling to write to; renamed onto ``out_path`` only if the block succeeds, else removed.

    A sibling (same folder, same file system) makes the final ``os.replace`` atomic, so a failed or interrupted
    export never leaves a partial file at the destination.
    """
    out_path = Path(out_path)
    tmp = out_path.parent / f".{out_path.name}.tmp-{os.getpid()}"
    _remove(tmp)
    try:
        yield tmp
        if out_path.is_dir() and not tmp.is_dir():
            shutil.rmtree(out_path)
        elif out_path.is_dir():
            old = out_path.parent / f".{out_path.name}.old-{os.getpid()}"
            os.replace(out_path, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out_path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def file_size_mib(path: Path) -> float:
    """Size of a file in MiB (tables of export sizes)."""
    return Path(path).stat().st_size / 2**20


# ------------------------------------------------------------------------------------------- the converter
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


# --------------------------------------------------------------------------------------- tokenizer checks
def _byte_tokens_missing(vocab: dict[str, int] | Sequence[str]) -> list[str]:
    names = set(vocab)
    return [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in names]


def check_tokenizer_files(model_dir: Path) -> str:
    """Check the tokenizer of ``model_dir`` before conversion; returns the GGUF form it will take.

    Returns ``"sentencepiece"`` (tokenizer.model), ``"llama-bpe-fallback"`` (tokenizer.json stored as a
    SentencePiece-style vocabulary) or ``"gpt2"`` (byte-level BPE, llama.cpp's ``gpt2`` model with a named
    pre-tokenizer). Raises ``TokenizerError`` when the files are missing or when the converter would write a
    vocabulary llama.cpp aborts on while loading.
    """
    model_dir = Path(model_dir)
    tj, spm = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
    if not tj.exists() and not spm.exists():
        raise TokenizerError(
            f"{model_dir} has no tokenizer (neither tokenizer.json nor tokenizer.model): the GGUF must embed the "
            "tokenizer. Save it next to the weights: tokenizer.save_pretrained(model_dir).")
    if not (model_dir / "tokenizer_config.json").exists():
        raise TokenizerError(f"{model_dir} has no tokenizer_config.json (special tokens, chat template): "
                             "save the tokenizer with tokenizer.save_pretrained(model_dir)")
    if spm.exists():
        return "sentencepiece"
    data = json.loads(tj.read_text(encoding="utf-8"))
    model = data.get("model", {})
    decoder = data.get("decoder") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback") and decoder.get("type") == "Sequence":
        missing = _byte_tokens_missing(model.get("vocab", {}))
        if missing:
            raise TokenizerError(
                f"{tj} is BPE with byte_fallback and a Sequence decoder, which convert_hf_to_gguf.py stores as a "
                f"SentencePiece-style vocabulary (tokenizer.ggml.model='llama'), but it has no byte tokens "
                f"({len(missing)} of 256 missing, e.g. {missing[0]}): llama.cpp would abort while loading it "
                "(std::out_of_range looking up the newline byte token). This is what transformers' GGUF loader "
                "makes of a byte-level BPE tokenizer; restore the model's own tokenizer (for SmolLM2, "
                "lora_course.models.build_tokenizer_from_gguf) and save it with save_pretrained.")
        return "llama-bpe-fallback"
    return "gpt2"


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf_header(gguf_path: str | Path, decode: Sequence[str] = ()) -> tuple[dict[str, Any], list[Any]]:
    """``(metadata, [(tensor name, shape in ggml order, ggml type id)])`` read straight from a GGUF header.

    Why not ``gguf.GGUFReader``: it builds a numpy view for every string of every array (SmolLM2's 49k tokens
    and 48k merges), about 2.5 s per file on the course CPU; this walks the header with ``struct`` in ~0.1 s.
    Arrays are returned as their length unless their key is in ``decode``.
    """
    import mmap
    import struct

    gguf_path = Path(gguf_path)
    with open(gguf_path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise ExportError(f"{gguf_path} is not a GGUF file (no GGUF magic)")
        _, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
        pos = 24

        def string(at: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", m, at)
            return m[at + 8:at + 8 + n].decode("utf-8", "replace"), at + 8 + n

        def value(kind: int, at: int, keep: bool) -> tuple[Any, int]:
            if kind == 8:
                return string(at)
            if kind != 9:
                fmt = "<" + _GGUF_SCALARS[kind]
                return struct.unpack_from(fmt, m, at)[0], at + struct.calcsize(fmt)
            elem, count = struct.unpack_from("<IQ", m, at)
            at += 12
            if elem == 8:
                items = []
                for _ in range(count):
                    (n,) = struct.unpack_from("<Q", m, at)
                    if keep:
                        items.append(m[at + 8:at + 8 + n].decode("utf-8", "replace"))
                    at += 8 + n
                return (items if keep else count), at
            if elem not in _GGUF_SCALARS:
                raise ExportError(f"{gguf_path}: unsupported GGUF array element type {elem}")
            size = struct.calcsize("<" + _GGUF_SCALARS[elem])
            vals = list(struct.unpack_from(f"<{count}{_GGUF_SCALARS[elem]}", m, at)) if keep else count
            return vals, at + size * count

        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = string(pos)
            (kind,) = struct.unpack_from("<I", m, pos)
            meta[key], pos = value(kind, pos + 4, key in decode)
        tensors = []
        for _ in range(n_tensors):
            name, pos = string(pos)
            (nd,) = struct.unpack_from("<I", m, pos)
            dims = struct.unpack_from(f"<{nd}Q", m, pos + 4)
            ttype, _offset = struct.unpack_from("<IQ", m, pos + 4 + 8 * nd)
            pos += 4 + 8 * nd + 12
            tensors.append((name, tuple(int(d) for d in dims), int(ttype)))
    return meta, tensors


def gguf_tokenizer_summary(gguf_path: Path) -> dict[str, Any]:
    """The tokenizer as stored in a GGUF file: model, pre-tokenizer, vocab size, special token ids, template.

    ``byte_tokens_missing`` counts absent ``<0xNN>`` tokens, which only a ``llama`` (SentencePiece-style)
    vocabulary needs; a ``gpt2`` byte-level vocabulary has none by design.
    """
    meta, _ = read_gguf_header(gguf_path, decode=("tokenizer.ggml.tokens",))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    return {"model": meta.get("tokenizer.ggml.model"), "pre": meta.get("tokenizer.ggml.pre"), "n_vocab": len(tokens),
            "bos": meta.get("tokenizer.ggml.bos_token_id"), "eos": meta.get("tokenizer.ggml.eos_token_id"),
            "chat_template": "tokenizer.chat_template" in meta,
            "byte_tokens_missing": len(_byte_tokens_missing(tokens)) if tokens else 256}


def _check_gguf_tokenizer(gguf_path: Path) -> None:
    summary = gguf_tokenizer_summary(gguf_path)
    if summary["model"] == "llama" and summary["byte_tokens_missing"]:
        raise TokenizerError(
            f"the converter stored the tokenizer as tokenizer.ggml.model='llama' (pre={summary['pre']!r}) "
            f"without byte tokens such as <0x0A>: llama.cpp would abort while loading it (std::out_of_range).")


# ------------------------------------------------------------------------------------------------- merge
def merge_adapter(base: str | Path, adapter_dir: str | Path, out_dir: str | Path, overwrite: bool = False,
                  dtype: Any = None) -> Path:
    """Merge a peft LoRA adapter into its base model and save a plain transformers folder (safetensors).

    ``base`` is a local folder or hub id of the base model (the adapter's ``base_model_name_or_path`` is not
    trusted: adapters trained on a cached copy record a path that may not exist elsewhere). The merged weights
    are ``W + (alpha/r) B A`` in fp32 unless ``dtype`` says otherwise. The tokenizer is saved from the base (the
    adapter's copy if it has one), with its chat template and special tokens, and checked to convert into a form
    llama.cpp loads. Written to a temporary sibling and renamed: a failed merge leaves nothing at ``out_dir``.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise ExportError(f"{adapter_dir} has no adapter_config.json: give the folder written by "
                          "peft_model.save_pretrained(...)")
    _check_destination(out_dir, overwrite)
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else base
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype or torch.float32)
    tok = AutoTokenizer.from_pretrained(str(tok_src))
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    with _atomic_path(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        check_tokenizer_files(tmp)
    return out_dir


# ------------------------------------------------------------------------------------------- conversion
def local_model_folder(model: str | Path) -> Path:
    """The local transformers folder of ``model``: a folder as given, or a hub id's snapshot in the hub cache.

    llama.cpp's converters read files, so a hub id (what the colab/kaggle profiles load, e.g.
    ``HuggingFaceTB/SmolLM2-360M-Instruct``) is resolved to the snapshot ``from_pretrained`` already downloaded (or
    downloads its config, tokenizer and weights when the hub is reachable).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1:
        raise ExportError(f"{name!r} is neither a local model folder nor a hub id (owner/name): give the folder "
                          "that save_pretrained wrote")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                            "*.tiktoken"]))
    except Exception as e:  # offline with nothing cached, a gated repo without a token, a typo in the id
        raise ExportError(f"could not get the files of hub model {name!r} for the converter ({type(e).__name__}: "
                          f"{e}): load it once with from_pretrained (it downloads to the hub cache), log in for a "
                          "gated model, or give a local folder") from e


def convert_command(model_dir: str | Path, out_path: str | Path, outtype: str = "f16",
                    conv: Path | None = None) -> list[str]:
    """The argv ``to_gguf`` runs: llama.cpp's ``convert_hf_to_gguf.py MODEL_DIR --outfile OUT --outtype TYPE``.

    ``conv`` is the converter folder (default: ``fetch_converter()``); the script runs with that folder's
    ``gguf-py`` on ``PYTHONPATH`` (``_converter_env``). In a llama.cpp checkout the same command is
    ``python convert_hf_to_gguf.py MODEL_DIR --outfile OUT --outtype TYPE``.
    """
    if outtype not in CONVERTER_OUTTYPES:
        raise UnknownQuantizationError(f"outtype {outtype!r} is not one of the converter's "
                                       f"{', '.join(CONVERTER_OUTTYPES)}; for k-quants use quantize()")
    conv = conv or fetch_converter()
    return [sys.executable, str(conv / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(out_path),
            "--outtype", outtype]


def lora_convert_command(adapter_dir: str | Path, base_dir: str | Path, out_path: str | Path, outtype: str = "f32",
                         conv: Path | None = None) -> list[str]:
    """The argv ``lora_to_gguf`` runs: ``convert_lora_to_gguf.py ADAPTER --base BASE_DIR --outfile OUT --outtype T``."""
    if outtype not in CONVERTER_OUTTYPES:
        raise UnknownQuantizationError(f"outtype {outtype!r} is not one of {', '.join(CONVERTER_OUTTYPES)}")
    conv = conv or fetch_converter()
    return [sys.executable, str(conv / "convert_lora_to_gguf.py"), str(adapter_dir), "--base", str(base_dir),
            "--outfile", str(out_path), "--outtype", outtype]


def to_gguf(model_dir: str | Path, out_path: str | Path, outtype: str = "f16", overwrite: bool = False,
            timeout: float = 1800) -> Path:
    """Convert a transformers folder to GGUF with llama.cpp's own ``convert_hf_to_gguf.py``.

    ``outtype`` is one of the converter's: f32 (the parity baseline), f16, bf16, q8_0, auto. The architecture and
    tokenizer are checked first (clear errors instead of a converter traceback), the file is written to a
    temporary sibling, its stored tokenizer is checked again, then it is renamed into place.
    """
    model_dir, out_path = local_model_folder(model_dir), Path(out_path)
    if outtype not in CONVERTER_OUTTYPES:
        raise UnknownQuantizationError(f"outtype {outtype!r} is not one of the converter's "
                                       f"{', '.join(CONVERTER_OUTTYPES)}; for k-quants use quantize()")
    cfg_path = model_dir / "config.json"
    if not cfg_path.exists():
        raise ExportError(f"{model_dir} has no config.json: give a folder written by save_pretrained")
    conv = fetch_converter()
    archs = json.loads(cfg_path.read_text(encoding="utf-8")).get("architectures") or []
    supported = supported_architectures(conv)
    if not archs or archs[0] not in supported:
        raise UnsupportedArchitectureError(
            f"architecture {archs[0] if archs else None!r} of {model_dir} is not supported by llama.cpp's "
            f"convert_hf_to_gguf.py (llama-cpp-python {LLAMA_CPP_PIN}); it converts {len(supported)} "
            f"architectures, e.g. LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM.")
    check_tokenizer_files(model_dir)
    _check_destination(out_path, overwrite)
    with _atomic_path(out_path) as tmp:
        _run_converter(convert_command(model_dir, tmp, outtype, conv), conv, f"convert_hf_to_gguf.py on {model_dir}",
                       timeout)
        if not tmp.exists():
            raise ExportError(f"convert_hf_to_gguf.py wrote no file at {tmp}")
        _check_gguf_tokenizer(tmp)
    return out_path


def lora_to_gguf(adapter_dir: str | Path, base_dir: str | Path, out_path: str | Path, outtype: str = "f32",
                 overwrite: bool = False, timeout: float = 900) -> Path:
    """Convert a peft LoRA adapter to a GGUF adapter with llama.cpp's ``convert_lora_to_gguf.py``.

    Why: llama.cpp applies it at load time (``Llama(model_path=base_gguf, lora_path=...)``), so one base file
    serves many adapters of a few MB each, without a merged copy of the whole model per adapter.
    """
    adapter_dir, base_dir, out_path = Path(adapter_dir), local_model_folder(base_dir), Path(out_path)
    if not (adapter_dir / "adapter_config.json").exists():
        raise ExportError(f"{adapter_dir} has no adapter_config.json: give a peft save_pretrained folder")
    if not (base_dir / "config.json").exists():
        raise ExportError(f"{base_dir} has no config.json: give the base model's transformers folder")
    if outtype not in CONVERTER_OUTTYPES:
        raise UnknownQuantizationError(f"outtype {outtype!r} is not one of {', '.join(CONVERTER_OUTTYPES)}")
    conv = fetch_converter()
    _check_destination(out_path, overwrite)
    with _atomic_path(out_path) as tmp:
        _run_converter(lora_convert_command(adapter_dir, base_dir, tmp, outtype, conv), conv,
                       f"convert_lora_to_gguf.py on {adapter_dir}", timeout)
        if not tmp.exists():
            raise ExportError(f"convert_lora_to_gguf.py wrote no file at {tmp}")
    return out_path


# ------------------------------------------------------------------------------------------- quantization
def quantization_types() -> dict[str, int]:
    """llama.cpp's quantization names (``llama_ftype``) and their ids, e.g. ``{"Q8_0": 7, "Q4_K_M": 15}``."""
    import llama_cpp

    names = {"F32": llama_cpp.LLAMA_FTYPE_ALL_F32}
    for attr in dir(llama_cpp):
        if attr.startswith("LLAMA_FTYPE_MOSTLY_"):
            names[attr.removeprefix("LLAMA_FTYPE_MOSTLY_")] = getattr(llama_cpp, attr)
    return names


def _target_tensor_type(qtype: str) -> Any:
    """The ggml tensor type a quantization name aims for (Q4_K_M -> Q4_K), or None when it is a mixture."""
    from gguf import GGMLQuantizationType as T

    base = re.sub(r"_K_[SML]$", "_K", qtype)
    return T.__members__.get(base)


def nominal_bits_per_weight(qtype: str) -> float:
    """Bits per weight of the tensor type a quantization name aims for, from its block format (gguf's
    ``GGML_QUANT_SIZES``): F32 32, F16 16, Q8_0 8.5 (34 bytes per 32), Q4_K_M 4.5 (Q4_K: 144 bytes per 256).

    A file holds more (1-D norms stay F32, recipes keep some tensors higher, narrow rows fall back): that is
    ``QuantizeReport.bits_per_weight``. A name that aims at no single type (e.g. ``MOSTLY_Q4_1_SOME_F16``) raises.
    """
    from gguf.constants import GGML_QUANT_SIZES

    key = qtype.upper()
    target = _target_tensor_type(key)
    if key not in quantization_types() or target is None or target not in GGML_QUANT_SIZES:
        raise UnknownQuantizationError(f"{qtype!r} is not a llama.cpp quantization with one target tensor type: "
                                       "use a name such as F16, Q8_0, Q5_K_M or Q4_K_M")
    block, size = GGML_QUANT_SIZES[target]
    return 8 * size / block


@dataclass
class TensorType:
    """One tensor stored in another type than the quantization asked for, and why."""

    name: str
    shape: tuple[int, ...]
    stored: str
    reason: str


@dataclass
class QuantizeReport:
    """A quantized GGUF: its size, bits per weight and the tensors kept in another type than asked."""

    path: Path
    qtype: str
    size_mib: float
    bits_per_weight: float
    n_tensors: int
    other_types: list[TensorType] = field(default_factory=list)
    seconds: float = 0.0

    def type_counts(self) -> dict[str, int]:
        """How many tensors were stored in each other type."""
        counts: dict[str, int] = {}
        for t in self.other_types:
            counts[t.stored] = counts.get(t.stored, 0) + 1
        return counts

    def __str__(self) -> str:
        lines = [(f"{self.path.name}: {self.qtype}, {self.size_mib:.1f} MiB, {self.bits_per_weight:.2f} bits/weight, "
                 f"{len(self.other_types)} of {self.n_tensors} tensors in another type ({self.seconds:.1f} s)")]
        if self.other_types:
            lines.append(f"  {'tensor':<28} {'shape':<14} {'stored':<7} reason")
            for t in self.other_types:
                lines.append(f"  {t.name:<28} {t.shape!s:<14} {t.stored:<7} {t.reason}")
        return "\n".join(lines)


def gguf_tensor_stats(gguf_path: str | Path) -> tuple[int, int, list[tuple[str, tuple[int, ...], str]]]:
    """``(total elements, total bytes, [(name, shape, type)])`` of a GGUF file's tensors (shape: ggml order)."""
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES

    _, tensors = read_gguf_header(gguf_path)
    rows, n_el, n_bytes = [], 0, 0
    for name, shape, ttype in tensors:
        kind = GGMLQuantizationType(ttype)
        block, size = GGML_QUANT_SIZES[kind]
        n = math.prod(shape)
        n_el += n
        n_bytes += n // block * size
        rows.append((name, shape, kind.name))
    return n_el, n_bytes, rows


def _why(shape: tuple[int, ...], stored: str, target: Any, qtype: str) -> str:
    from gguf.constants import GGML_QUANT_SIZES

    if len(shape) == 1 or (len(shape) > 1 and all(s == 1 for s in shape[1:])):
        return "1-D (norm): llama.cpp keeps these in F32"
    if target is not None:
        block = GGML_QUANT_SIZES[target][0]
        if shape[0] % block:
            return f"row of {shape[0]} is not a multiple of {target.name}'s block of {block}: fallback type"
    return f"{qtype}'s recipe keeps this tensor in higher precision by design"


QUANTIZE_BINARY = "llama-quantize"


def quantize_command(gguf_path: str | Path, out_path: str | Path, qtype: str = "Q8_0",
                     nthread: int | None = None) -> list[str]:
    """The ``llama-quantize`` command line equivalent to ``quantize(gguf_path, out_path, qtype, nthread)``.

    ``quantize`` does not run this binary (the llama-cpp-python wheel ships none): it calls the library function
    the binary calls, ``llama_model_quantize``, with the default parameters (the binary's defaults) and ``ftype`` /
    ``nthread`` set, as ``llama-quantize IN.gguf OUT.gguf TYPE NTHREADS`` does. Unknown types raise as in ``quantize``.
    """
    key = qtype.upper()
    types = quantization_types()
    if key not in types:
        raise UnknownQuantizationError(f"unknown quantization {qtype!r}: llama.cpp knows {', '.join(sorted(types))}")
    return [QUANTIZE_BINARY, str(gguf_path), str(out_path), key, str(nthread or _threads())]


def quantize(gguf_path: str | Path, out_path: str | Path, qtype: str = "Q8_0", nthread: int | None = None,
             overwrite: bool = False) -> QuantizeReport:
    """Quantize an f32/f16 GGUF with ``llama_cpp.llama_model_quantize`` (what ``llama-quantize`` runs).

    ``qtype`` is a ``llama_ftype`` name: F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, ... Tensors that end up in
    another type than asked are reported: 1-D norms stay F32, k-quant recipes mix types on purpose (Q4_K_M puts
    some in Q6_K), and a k-quant needs rows that are a multiple of 256, so narrower tensors fall back to another
    type (SmolLM2's hidden size 576 is not). Written to a temporary sibling and renamed.
    """
    import llama_cpp

    gguf_path, out_path = Path(gguf_path), Path(out_path)
    # the llama-quantize command line this call is equivalent to (one source of truth; unknown types raise here)
    _, _, _, key, threads = quantize_command(gguf_path, out_path, qtype, nthread)
    types = quantization_types()
    if not gguf_path.exists():
        raise ExportError(f"{gguf_path} does not exist: convert the model with to_gguf first")
    _check_destination(out_path, overwrite)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = types[key]
    params.nthread = int(threads)
    t0 = time.perf_counter()
    log = logging.getLogger("llama-cpp-python")  # llama.cpp logs every tensor while quantizing: keep errors only
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with _atomic_path(out_path) as tmp:
            rc = llama_cpp.llama_model_quantize(str(gguf_path).encode(), str(tmp).encode(), params)
            if rc != 0 or not tmp.exists():
                raise ExportError(f"llama_model_quantize({gguf_path.name} -> {key}) failed with code {rc}")
    finally:
        log.setLevel(level)
    seconds = time.perf_counter() - t0
    n_el, n_bytes, rows = gguf_tensor_stats(out_path)
    target = _target_tensor_type(key)
    other = [TensorType(name, shape, stored, _why(shape, stored, target, key))
             for name, shape, stored in rows if target is None or stored != target.name]
    return QuantizeReport(out_path, key, file_size_mib(out_path), 8 * n_bytes / max(n_el, 1), len(rows), other,
                          seconds)


# ------------------------------------------------------------------------------------------------ llama.cpp
def load_gguf(gguf_path: str | Path, n_ctx: int = 512, n_threads: int | None = None, logits_all: bool = False,
              lora_path: str | Path | None = None, **kwargs: Any) -> Any:
    """A quiet ``llama_cpp.Llama`` on the CPU with the course's thread count (``OMP_NUM_THREADS``)."""
    from llama_cpp import Llama

    n = n_threads or _threads()
    return Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=n, n_threads_batch=n, logits_all=logits_all,
                 lora_path=str(lora_path) if lora_path else None, verbose=False, seed=0, **kwargs)


def gguf_greedy(llm: Any, prompt_ids: Sequence[int], max_new_tokens: int,
                stop_ids: Sequence[int] = (), suppress_ids: Sequence[int] = ()) -> list[int]:
    """Greedy continuation of ``prompt_ids`` in llama.cpp (temperature 0), stopping at ``stop_ids``.

    ``suppress_ids`` are never chosen (their logits set to -inf), as transformers' ``min_new_tokens`` does to
    the end-of-sequence ids.
    """
    processors = None
    if suppress_ids:
        import numpy as np
        from llama_cpp import LogitsProcessorList

        banned = list(suppress_ids)

        def _suppress(_input_ids: Any, scores: Any) -> Any:
            scores[banned] = -np.inf
            return scores

        processors = LogitsProcessorList([_suppress])
    llm.reset()
    out: list[int] = []
    for tok in llm.generate(list(prompt_ids), temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                            logits_processor=processors):
        if tok in stop_ids:
            break
        out.append(int(tok))
        if len(out) >= max_new_tokens:
            break
    return out


def gguf_chat(llm: Any, tokenizer: Any, conversations: list[list[dict[str, str]]],
              max_new_tokens: int = 32) -> list[str]:
    """Greedy chat replies from a GGUF model, prompts rendered by the transformers chat template.

    The same prompt text as ``lora_course.evaluate.generate`` and the same decoding (greedy, stop at eos), so a
    task metric computed on these replies compares with the transformers model's.
    """
    from .evaluate import chat_prompts

    stops = {tokenizer.eos_token_id, llm.token_eos()}
    replies = []
    for text in chat_prompts(tokenizer, conversations):
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        new = gguf_greedy(llm, ids, max_new_tokens, tuple(s for s in stops if s is not None))
        replies.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return replies


def evaluate_gguf(gguf_path: str | Path, tokenizer: Any, task: str, examples: list[dict[str, Any]],
                  n_threads: int | None = None, llm: Any = None) -> Any:
    """The task metric of a GGUF model on ``examples``: an ``EvalResult`` like ``evaluate_task`` (no perplexity)."""
    from .data import prompt_messages
    from .evaluate import MAX_NEW_TOKENS, EvalResult, score

    llm = llm or load_gguf(gguf_path, n_threads=n_threads)
    outputs = gguf_chat(llm, tokenizer, [prompt_messages(ex) for ex in examples], MAX_NEW_TOKENS[task])
    return EvalResult(task, score(task, outputs, examples), None, outputs)


# ------------------------------------------------------------------------------------------------- parity
@dataclass
class HFReference:
    """transformers' side of a parity check, computed once and compared with several GGUF files."""

    texts: list[str]
    token_ids: list[list[int]]
    log_probs: list[Any]  # one (n_tokens, vocab) float64 array per text
    prompts: list[str]
    prompt_ids: list[list[int]]
    greedy_ids: list[list[int]]
    max_new_tokens: int
    suppressed_ids: list[int] = field(default_factory=list)  # end-of-sequence ids masked during greedy decoding


def hf_reference(hf: Any, tokenizer: Any, texts: Sequence[str], prompts: Sequence[str],
                 max_new_tokens: int = 32) -> HFReference:
    """Teacher-forced log-probabilities over ``texts`` and greedy continuations of ``prompts`` in transformers.

    ``hf`` is a loaded model or a folder; prompts are raw text (render chat templates first) tokenized without
    special tokens added. Greedy continuations run exactly ``max_new_tokens`` (end of sequence suppressed, as
    ``min_new_tokens`` does), so the comparison covers the same number of tokens whatever the model says;
    ``check_parity`` masks the same ids in llama.cpp, else a model that ends its turn early would be compared
    with transformers' second choice.
    """
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32) if isinstance(hf, (str, Path)) \
        else hf
    model.eval()
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    pids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    lps, greedy = [], []
    with torch.inference_mode():
        for row in ids:
            logits = model(torch.tensor([row])).logits[0].double()
            lps.append(torch.log_softmax(logits, -1).numpy().astype(np.float64))
        for row in pids:
            out = model.generate(torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                                 do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
            greedy.append(out[0, len(row):].tolist())
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    suppressed = sorted({int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None})
    return HFReference(list(texts), ids, lps, list(prompts), pids, greedy, max_new_tokens, suppressed)


@dataclass
class ParityReport:
    """How closely a GGUF model reproduces transformers on the same inputs."""

    name: str
    tokenizer_match: int
    tokenizer_total: int
    top1_agreement: float
    mean_kl: float
    max_kl: float
    n_positions: int
    greedy_prefix: list[int]
    greedy_len: int
    size_mib: float = 0.0
    # Near-tie accounting (see ``split_disagreements``): the quantization's logit noise, and how many positions are
    # decisive (the reference's top-1 leads its top-2 by at least NEAR_TIE_SIGMAS times that noise).
    gap_noise: float = 0.0
    decisive: int = 0
    decisive_disagree: int = 0
    near_tie_disagree: int = 0

    @property
    def tokenizer_parity(self) -> float:
        """Share of texts tokenized identically by llama.cpp and transformers."""
        return self.tokenizer_match / max(self.tokenizer_total, 1)

    @property
    def decisive_share(self) -> float:
        """Share of positions where the reference's choice is clear of the noise (a broken model drives it to 0)."""
        return self.decisive / max(self.n_positions, 1)

    @property
    def decisive_agreement(self) -> float:
        """Top-1 agreement on the decisive positions alone: near-ties, which any CPU's kernels may flip, left out."""
        return 1.0 - self.decisive_disagree / max(self.decisive, 1)

    @property
    def greedy_agreement(self) -> float:
        """Mean share of greedy tokens equal to transformers' before the first difference."""
        return sum(self.greedy_prefix) / max(len(self.greedy_prefix) * self.greedy_len, 1)

    def row(self) -> dict[str, Any]:
        return {"model": self.name, "MiB": round(self.size_mib, 1),
                "tokenizer": f"{self.tokenizer_match}/{self.tokenizer_total}",
                "top-1 agree": f"{100 * self.top1_agreement:.1f}%", "mean KL": f"{self.mean_kl:.4f}",
                "max KL": f"{self.max_kl:.3f}", "noise": f"{self.gap_noise:.3f}",
                "decisive": f"{100 * self.decisive_share:.0f}% of {self.n_positions}",
                "disagree (decisive/near-tie)": f"{self.decisive_disagree}/{self.near_tie_disagree}",
                "greedy prefix": "/".join(str(p) for p in self.greedy_prefix) + f" of {self.greedy_len}"}

    def __str__(self) -> str:
        return format_table([self.row()])


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of dict rows (same keys), for printing in notebooks."""
    if not rows:
        return ""
    keys = list(rows[0])
    width = {k: max(len(str(k)), *(len(str(r[k])) for r in rows)) for k in keys}
    line = "  ".join(f"{k:<{width[k]}}" for k in keys)
    sep = "  ".join("-" * width[k] for k in keys)
    body = ["  ".join(f"{r[k]!s:<{width[k]}}" for k in keys) for r in rows]
    return "\n".join([line, sep, *body])


NEAR_TIE_SIGMAS = 4.0
"""A position is decisive when the reference's top-1 log-probability leads its top-2 by >= 4 sigma of the measured
noise of that gap. For Gaussian noise a flip there has probability 3e-5; the noise of llama.cpp's kernels has heavier
tails than that, so a check allows a few decisive flips per thousand (notebook 08), never a rate a broken file has."""


def _top2_gap(ref: Any, q: Any) -> tuple[Any, Any, Any]:
    """Per position: the reference's top-1 margin over its top-2, the quantized model's error on that gap, and
    whether the quantized model's top-1 differs from the reference's."""
    import numpy as np

    ref = np.asarray(ref, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    top2 = np.argpartition(-ref, 1, axis=-1)[:, :2]
    rows = np.arange(len(ref))
    first = np.where(ref[rows, top2[:, 0]] >= ref[rows, top2[:, 1]], top2[:, 0], top2[:, 1])
    second = np.where(first == top2[:, 0], top2[:, 1], top2[:, 0])
    margin = ref[rows, first] - ref[rows, second]
    return margin, (q[rows, first] - q[rows, second]) - margin, q.argmax(-1) != first


def split_disagreements(ref_logp: Any, logq: Any, sigmas: float = NEAR_TIE_SIGMAS) -> dict[str, float]:
    """Top-1 disagreements between a reference and a quantized model, split into near-ties and real ones.

    ``ref_logp`` and ``logq`` are (positions, vocab) log-probabilities, or lists of such arrays (one per text).
    Per position, ``a``/``b`` are the reference's top-1/top-2 tokens, ``margin = ref[a] - ref[b]`` and the quantized
    model's error on that gap is ``e = (logq[a] - logq[b]) - margin``. The noise is the RMS of ``e`` over positions:
    what quantization (and the CPU's kernels) do to the one gap that decides the top-1. A disagreement where
    ``margin < sigmas * noise`` is a near-tie (a coin toss that another CPU's summation order may call the other
    way); elsewhere it is real.

    Why it separates a correct file from a broken one on any CPU: top-1 agreement alone moves by a token or two of a
    ~100-token sample with the kernels (0.94 vs 0.92 for the same Q8_0 on two CPUs); real disagreements are rare on a
    correct file, and a broken file's noise is so large that few positions stay decisive (``decisive``).
    """

    pairs = list(zip(ref_logp, logq)) if isinstance(ref_logp, (list, tuple)) else [(ref_logp, logq)]
    return _summarise_gaps([_top2_gap(r, q) for r, q in pairs if len(r)], sigmas)


def _summarise_gaps(parts: list[tuple[Any, Any, Any]], sigmas: float = NEAR_TIE_SIGMAS) -> dict[str, float]:
    import numpy as np

    if not parts:
        return {"noise": 0.0, "positions": 0, "decisive": 0, "decisive_disagree": 0, "near_tie_disagree": 0,
                "agree": 0}
    margin, err, disagree = (np.concatenate(x) for x in zip(*parts))
    noise = float(np.sqrt(np.mean(err ** 2)))
    decisive = margin >= sigmas * noise
    return {"noise": noise, "positions": len(margin), "decisive": int(decisive.sum()),
            "decisive_disagree": int((disagree & decisive).sum()),
            "near_tie_disagree": int((disagree & ~decisive).sum()), "agree": int((~disagree).sum())}


def check_parity(hf_dir: Any, gguf_path: str | Path, texts: Sequence[str] = (), prompts: Sequence[str] = (),
                 tokenizer: Any = None, max_new_tokens: int = 32, n_threads: int | None = None,
                 reference: HFReference | None = None, name: str | None = None,
                 lora_path: str | Path | None = None) -> ParityReport:
    """Compare a GGUF model with its transformers source on the same texts and prompts.

    - tokenizer parity: llama.cpp's token ids equal transformers' for each text and prompt;
    - teacher-forced next-token agreement (top-1) and KL(transformers || llama.cpp), mean and max over positions;
    - greedy prefix: how many of ``max_new_tokens`` greedy tokens match before the first difference (both
      engines with the end-of-sequence ids masked, so both produce exactly ``max_new_tokens``).

    Pass ``reference`` (from ``hf_reference``) to reuse transformers' side for several files.
    """
    import numpy as np

    if reference is None:
        if tokenizer is None:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
        reference = hf_reference(hf_dir, tokenizer, texts, prompts, max_new_tokens)
    llm = load_gguf(gguf_path, n_ctx=512, n_threads=n_threads, logits_all=True, lora_path=lora_path)
    tok_ok = 0
    for text, want in zip(reference.texts + reference.prompts, reference.token_ids + reference.prompt_ids):
        tok_ok += llm.tokenize(text.encode(), add_bos=False, special=True) == want
    kls: list[float] = []
    gaps = []  # per text: (margin, error on the gap, disagreement), not the (tokens x vocab) arrays
    for row, ref in zip(reference.token_ids, reference.log_probs):
        llm.reset()
        llm.eval(row)
        logits = np.asarray(llm.scores[:len(row)], dtype=np.float64)
        logq = logits - logits.max(-1, keepdims=True)
        logq -= np.log(np.exp(logq).sum(-1, keepdims=True))
        kl = (np.exp(ref) * (ref - logq)).sum(-1)
        kls.extend(kl.tolist())
        gaps.append(_top2_gap(ref, logq))
    split = _summarise_gaps(gaps)
    agree, n = split["agree"], split["positions"]
    prefix = []
    for pid, want in zip(reference.prompt_ids, reference.greedy_ids):
        got = gguf_greedy(llm, pid, reference.max_new_tokens, suppress_ids=reference.suppressed_ids)
        k = 0
        while k < min(len(got), len(want)) and got[k] == want[k]:
            k += 1
        prefix.append(k)
    del llm
    return ParityReport(name or Path(gguf_path).name, tok_ok, len(reference.texts) + len(reference.prompts),
                        agree / max(n, 1), float(np.mean(kls)) if kls else math.nan,
                        float(np.max(kls)) if kls else math.nan, n, prefix, reference.max_new_tokens,
                        file_size_mib(gguf_path), split["noise"], split["decisive"], split["decisive_disagree"],
                        split["near_tie_disagree"])


# ------------------------------------------------------------------------------------------------- speed
def _decode_rate(run: Callable[[int], int], n_tokens: int, repeats: int) -> float:
    """New tokens per second of ``run(n)`` (which decodes n tokens and returns how many it made) after prefill.

    The time of a 1-token run (prefill + first token) is subtracted from an ``n_tokens`` run; each is the best of
    ``repeats`` runs, so a burst of load from other processes on a shared CPU does not decide the number.
    """
    run(2)  # warm-up
    best = 0.0
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        run(1)
        t1 = time.perf_counter()
        made = run(n_tokens)
        t2 = time.perf_counter()
        t_one, t_n = t1 - t0, t2 - t1
        # Subtract the prefill only when the pair is consistent: on a loaded CPU the 1-token run can take longer
        # than the n-token run, and the difference would be ~0 (an absurd rate). Then count the whole run.
        decode = t_n - t_one if t_n - t_one > 0.25 * t_n else t_n
        best = max(best, (made - 1) / decode)
    return best


def hf_tokens_per_second(model: Any, tokenizer: Any, prompt: str, n_tokens: int = 64, repeats: int = 3) -> float:
    """transformers' greedy decoding speed (batch 1): new tokens per second after the prompt's prefill."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    kw = {"do_sample": False, "pad_token_id": tokenizer.pad_token_id}

    def run(n: int) -> int:
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=n, min_new_tokens=n, **kw)
        return out.shape[1] - ids["input_ids"].shape[1]

    return _decode_rate(run, n_tokens, repeats)


def gguf_tokens_per_second(gguf_path: str | Path, prompt_ids: Sequence[int], n_tokens: int = 64,
                           n_threads: int | None = None, repeats: int = 3) -> float:
    """llama.cpp's greedy decoding speed (batch 1): new tokens per second after the prompt's prefill."""
    llm = load_gguf(gguf_path, n_threads=n_threads)
    return _decode_rate(lambda n: len(gguf_greedy(llm, prompt_ids, n)), n_tokens, repeats)


# ------------------------------------------------------------------------------------------- self-check
PROBE_QUANTS = ("Q8_0", "Q4_K_M")
_PROBE_CHILD = r"""
import json, sys
import llama_cpp
info = llama_cpp.llama_print_system_info()
info = info.decode() if isinstance(info, bytes) else str(info)
print(json.dumps({"system_info": info}), flush=True)
for path in sys.argv[1:]:
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_threads=1, n_threads_batch=1, verbose=False, seed=0)
    llm.eval([1, 2, 3, 4, 5])
    tokens = [int(llm.sample(temp=0.0))]
    print(json.dumps({"path": path, "decoded": tokens}), flush=True)
"""


def probe_ggufs(quants: Sequence[str] = PROBE_QUANTS) -> dict[str, Path]:
    """Small quantized GGUFs of the tiny random Llama (64 wide: every matmul fits llama.cpp's AMX kernels'
    alignment for Q8_0), built once into the course cache for ``llama_cpp_check``."""
    folder = cache_dir() / "llama-probe"
    folder.mkdir(parents=True, exist_ok=True)
    f32 = folder / "tiny-f32.gguf"
    out = {q: folder / f"tiny-{q}.gguf" for q in quants}
    if all(p.exists() for p in out.values()):
        return out
    if not f32.exists():
        from .models import tiny_model_dir

        to_gguf(tiny_model_dir(), f32, "f32")
    for q, path in out.items():
        if not path.exists():
            quantize(f32, path, q)
    return out


def llama_cpp_check(timeout: float = 120.0, quants: Sequence[str] = PROBE_QUANTS) -> dict[str, Any]:
    """Does this machine's llama.cpp decode quantized GGUFs? Checked in a child process, since a bad build dies
    of a signal (a native build with AMX crashed in ``decode`` on Q8_0 and Q4_K_M, issue 28), which would take the
    notebook's kernel with it.

    Returns ``ok``, ``detail``, ``fix`` (what to do when not ok), ``system_info`` (llama.cpp's CPU features, e.g.
    ``AVX2 = 1 | AMX_INT8 = 0``) and ``amx`` (whether the build uses AMX).
    """
    import importlib.util

    from .llama_build import plan

    rebuild = (f"rebuild it portably: `python src/lora_course/llama_build.py --install` in the course's clone "
               f"(tier {plan()['tier']} on this CPU, AMX off), then restart the kernel")
    if importlib.util.find_spec("llama_cpp") is None:
        return {"ok": False, "detail": "llama-cpp-python is not installed (notebook 08 needs it)",
                "fix": "install the export extra: `make setup` locally, or the setup cell of notebook 08 on "
                       "Colab/Kaggle", "system_info": "", "amx": False}
    paths = probe_ggufs(quants)
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE_CHILD, *map(str, paths.values())], check=False,
                              capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "detail": f"decoding the probe GGUFs took over {timeout:.0f} s", "fix": rebuild,
                "system_info": "", "amx": False}
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    info = lines[0]["system_info"] if lines else ""
    amx = bool(re.search(r"AMX_INT8 = 1|AMX_BF16 = 1|AMX_TILE = 1", info))
    decoded = [Path(x["path"]).stem.removeprefix("tiny-") for x in lines[1:]]
    if proc.returncode != 0:
        import signal

        died = (f"died of {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
                else f"exited with {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
        failed = [q for q in paths if q not in decoded]
        return {"ok": False, "detail": f"llama.cpp {died} decoding a {failed[0] if failed else '?'} GGUF "
                f"(decoded: {decoded or 'none'}; build: {info.strip() or 'unknown'})", "fix": rebuild,
                "system_info": info, "amx": amx}
    return {"ok": True, "detail": f"decoded {', '.join(decoded)} GGUFs in a child process", "fix": "",
            "system_info": info, "amx": amx}


# ------------------------------------------------------------------------------------------------ serving
SERVER_PACKAGES = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")


def server_command(gguf_path: str | Path, port: int, n_threads: int | None = None, n_ctx: int = 1024) -> list[str]:
    """The argv ``serve`` starts: ``python -m llama_cpp.server --model FILE`` on 127.0.0.1 only."""
    n = n_threads or _threads()
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path), "--host", "127.0.0.1",
            "--port", str(port), "--n_threads", str(n), "--n_threads_batch", str(n), "--n_ctx", str(n_ctx)]


@contextlib.contextmanager
def serve(gguf_path: str | Path, port: int | None = None, n_threads: int | None = None, n_ctx: int = 1024,
          startup_timeout: float = 60.0) -> Iterator[str]:
    """Run llama-cpp-python's OpenAI-compatible server on 127.0.0.1 for the ``with`` block; yields its base URL.

    Bound to localhost only, with a bounded wait for start-up (the process is killed and its log shown if it does
    not answer in time) and always stopped at the end of the block.
    """
    import importlib.util

    missing = [p for p in SERVER_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ExportError(f"llama_cpp.server needs {', '.join(missing)}: pip install 'llama-cpp-python[server]'")
    port = port or free_port()
    log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)  # noqa: SIM115
    cmd = server_command(gguf_path, port, n_threads, n_ctx)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise ExportError(f"llama_cpp.server exited with {proc.returncode}:\n"
                                  f"{Path(log.name).read_text(encoding='utf-8', errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ExportError(f"llama_cpp.server did not answer within {startup_timeout:.0f} s:\n"
                                  f"{Path(log.name).read_text(encoding='utf-8', errors='replace')[-2000:]}")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        Path(log.name).unlink(missing_ok=True)


def chat_completion(url: str, messages: list[dict[str, str]], max_tokens: int = 64, timeout: float = 60.0,
                    **extra: Any) -> dict[str, Any]:
    """POST one OpenAI-style chat completion (greedy unless told otherwise) and return the JSON response."""
    body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, **extra}).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


# ----------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="GGUF export tools of the course.")
    parser.add_argument("--fetch-converter", action="store_true",
                        help="extract llama.cpp's converter from the pinned llama-cpp-python sdist into the cache")
    parser.add_argument("--sdist", type=Path, default=None, help="a local llama-cpp-python sdist (.tar.gz)")
    parser.add_argument("--version", default=LLAMA_CPP_PIN)
    parser.add_argument("--check", action="store_true",
                        help="check in a child process that llama.cpp decodes quantized GGUFs on this CPU")
    args = parser.parse_args(argv)
    if args.check:
        rep = llama_cpp_check()
        print(("ok: " if rep["ok"] else "FAILED: ") + rep["detail"] + (f"\nfix: {rep['fix']}" if rep["fix"] else ""))
        print(f"llama.cpp system info: {rep['system_info'].strip()}")
        sys.exit(0 if rep["ok"] else 1)
    if args.fetch_converter:
        path = fetch_converter(args.version, args.sdist)
        print(f"llama.cpp converter (llama-cpp-python {args.version}): {path}")
    else:
        parser.print_help()


if __name__ == "__main__":
    main()
