"""Merge a LoRA adapter and convert it to GGUF with llama.cpp's own converter (notebook 08); export errors.

The path from a fine-tuned adapter to a GGUF file that llama.cpp, llama-cpp-python's server and Ollama run:

- ``merge_adapter``: peft's ``merge_and_unload`` into a plain transformers folder (safetensors, tokenizer, chat
  template), written to a temporary sibling and renamed, then checked to convert correctly;
- ``to_gguf``: llama.cpp's own converter, ``convert_hf_to_gguf.py``, run as a subprocess. It is taken from the
  source distribution of the pinned llama-cpp-python (``vendor/llama.cpp``), so the converter and the runtime
  that loads its output are the same llama.cpp revision. ``fetch_converter`` extracts it once into the course
  cache behind a file lock (``python -m lora_course.export --fetch-converter``; never committed);
- ``lora_to_gguf``: llama.cpp's ``convert_lora_to_gguf.py``, so an adapter is applied at load time without merging
  (``llama_cpp.Llama(model_path=base, lora_path=adapter)``);
- ``read_gguf_header`` / ``gguf_tokenizer_summary``: what a GGUF file holds, read straight from its header;
- shared by the export modules: ``ExportError`` and its subclasses, atomic writes (``_check_destination``,
  ``_atomic_path``), ``file_size_mib``, ``format_table`` and llama.cpp's thread count (``llama_threads``);
- the CLI: ``python -m lora_course.export --fetch-converter`` and ``--check`` (``llama_runtime.llama_cpp_check``).

The rest of the chapter's export is one module per concept: ``gguf_quant`` (quantize a GGUF, what each type
stores), ``parity`` (the GGUF against transformers: agreement, KL, greedy output, decode speed), ``llama_runtime``
(load, decode and serve a GGUF; this machine's llama.cpp checked) and ``modelfile`` (Ollama).

Why refuse some tokenizers: ``convert_hf_to_gguf.py`` stores a ``tokenizer.json`` that is BPE with byte fallback
and a ``Sequence`` decoder as a SentencePiece-style vocabulary (``tokenizer.ggml.model = "llama"``). llama.cpp
then looks up byte tokens such as ``<0x0A>`` while loading; a byte-level BPE vocabulary dressed up that way (what
transformers' GGUF loader produces for SmolLM2) has none, and llama.cpp aborts with ``std::out_of_range``.

Sources: llama.cpp ``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, ``conversion/`` and ``gguf-py``
(https://github.com/ggml-org/llama.cpp, vendored in llama-cpp-python 0.3.36).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .paths import cache_dir, publish_directory, read_complete

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
def llama_threads() -> int:
    """Threads for llama.cpp: ``OMP_NUM_THREADS`` when set (the course runs one per process), else every usable CPU."""
    from .hardware import usable_cpus

    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else usable_cpus()


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
        from .llama_runtime import llama_cpp_check  # not at the top: llama_runtime imports this module

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
