"""Merge a LoRA adapter and convert it to GGUF with llama.cpp's own converter (notebook 08); export helpers.

The path from a fine-tuned adapter to a GGUF file that llama.cpp, llama-cpp-python's server and Ollama run:

- ``merge_adapter``: peft's ``merge_and_unload`` into a plain transformers folder (safetensors, tokenizer, chat
  template), written to a temporary sibling and renamed, then checked to convert correctly;
- ``to_gguf``: llama.cpp's own converter, ``convert_hf_to_gguf.py``, run as a subprocess (``convert_command`` is
  its literal command line). The converter comes from ``llama_converter``: the source distribution of the pinned
  llama-cpp-python, so the converter and the runtime that loads its output are the same llama.cpp revision. The
  architecture and the tokenizer (``gguf_inspect``) are checked before converting, the stored tokenizer after;
- ``lora_to_gguf``: llama.cpp's ``convert_lora_to_gguf.py``, so an adapter is applied at load time without merging
  (``llama_cpp.Llama(model_path=base, lora_path=adapter)``);
- ``local_model_folder``: a hub id resolved to its snapshot, since the converters read files;
- shared by the export modules: ``ExportError`` and its subclasses (defined in ``export_errors``, imported from
  here), atomic writes (``_check_destination``, ``_atomic_path``), ``file_size_mib``, ``format_table`` and
  llama.cpp's thread count (``llama_threads``);
- the CLI: ``python -m lora_course.export --fetch-converter`` (``llama_converter.fetch_converter``) and ``--check``
  (``llama_runtime.llama_cpp_check``).

The rest of the chapter's export is one module per concept: ``llama_converter`` (fetch and run llama.cpp's
converter scripts), ``gguf_inspect`` (GGUF headers, tokenizer checks), ``gguf_quant`` (quantize a GGUF, what each
type stores), ``parity`` (the GGUF against transformers: agreement, KL, greedy output, decode speed),
``llama_runtime`` (load, decode and serve a GGUF; this machine's llama.cpp checked) and ``modelfile`` (Ollama).

Sources: llama.cpp ``convert_hf_to_gguf.py`` and ``convert_lora_to_gguf.py`` (https://github.com/ggml-org/llama.cpp,
vendored in llama-cpp-python 0.3.36); peft ``merge_and_unload``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .export_errors import (
    ExportError,
    OutputExistsError,
    TokenizerError,
    UnknownQuantizationError,
    UnsupportedArchitectureError,
)
from .gguf_inspect import _check_gguf_tokenizer, check_tokenizer_files
from .llama_converter import LLAMA_CPP_PIN, _run_converter, fetch_converter, supported_architectures

CONVERTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0", "auto")


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
    return save_model_folder(merged, tok, out_dir, overwrite=True)


def cached_base_gguf(model: str | Path, outtype: str = "f32") -> Path:
    """The base model as a GGUF in the course cache (``exports/base-<folder name>-<outtype>.gguf``), converted on the
    first call and reused after: the file an adapter GGUF is applied to (``lora_to_gguf``, a Modelfile's ``ADAPTER``).

    Notebooks 08 and 13 share it. ``model`` is a local folder or hub id (``local_model_folder``); a file at the path is
    complete, since ``to_gguf`` writes to a temporary name and renames.
    """
    from .paths import cache_dir

    folder = local_model_folder(model)
    name = folder.name if Path(model).expanduser().is_dir() else str(model).rsplit("/", 1)[-1]
    path = cache_dir() / "exports" / f"base-{name}-{outtype}.gguf"
    if not path.exists():
        to_gguf(folder, path, outtype=outtype)
    return path


def save_model_folder(model: Any, tokenizer: Any, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Save a plain transformers model and its tokenizer as the folder ``to_gguf`` converts (safetensors, the
    tokenizer with its chat template and special tokens, checked to convert into a form llama.cpp loads).

    For a model merged in memory, e.g. ``practice.merged_model`` (a QLoRA adapter merged into the dequantized NF4
    weights, which ``merge_adapter``'s 16-bit merge is not). Written to a temporary sibling and renamed.
    """
    if hasattr(model, "peft_config"):
        raise ExportError("this is a peft model: merge it first (merge_and_unload(), or practice.merged_model for a "
                          "QLoRA model), then save the plain model")
    out_dir = _check_destination(Path(out_dir), overwrite)
    with _atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
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


__all__ = [  # the error classes are defined in export_errors and imported from here
    "CONVERTER_OUTTYPES",
    "ExportError",
    "OutputExistsError",
    "TokenizerError",
    "UnknownQuantizationError",
    "UnsupportedArchitectureError",
    "cached_base_gguf",
    "convert_command",
    "file_size_mib",
    "format_table",
    "llama_threads",
    "local_model_folder",
    "lora_convert_command",
    "lora_to_gguf",
    "main",
    "merge_adapter",
    "save_model_folder",
    "to_gguf",
]

if __name__ == "__main__":
    main()
