"""What a GGUF file holds, read straight from its header, and the tokenizer checks around conversion (notebook 08).

- ``check_tokenizer_files``: before conversion, the tokenizer files of a transformers folder and the form the
  converter will store them in (``sentencepiece``, ``llama-bpe-fallback`` or ``gpt2``); a ``TokenizerError`` for
  missing files or for a vocabulary llama.cpp cannot load;
- ``read_gguf_header``: ``(metadata, tensors)`` of a GGUF file, walked with ``struct`` (~0.1 s, where
  ``gguf.GGUFReader`` takes ~2.5 s on SmolLM2's vocabulary);
- ``gguf_tokenizer_summary``: the tokenizer as stored (model, pre-tokenizer, vocab size, special token ids, chat
  template); ``_check_gguf_tokenizer`` refuses a stored tokenizer llama.cpp would abort on.

Used by ``export`` (``merge_adapter`` and ``to_gguf`` check the tokenizer before and after converting),
``gguf_quant`` (``gguf_tensor_stats`` reads the tensor table) and notebook 08.

Why refuse some tokenizers: ``convert_hf_to_gguf.py`` stores a ``tokenizer.json`` that is BPE with byte fallback
and a ``Sequence`` decoder as a SentencePiece-style vocabulary (``tokenizer.ggml.model = "llama"``). llama.cpp
then looks up byte tokens such as ``<0x0A>`` while loading; a byte-level BPE vocabulary dressed up that way (what
transformers' GGUF loader produces for SmolLM2) has none, and llama.cpp aborts with ``std::out_of_range``.

Sources: the GGUF format (``docs/gguf.md`` of https://github.com/ggml-org/ggml; ``gguf-py``'s ``GGUFReader``) and
llama.cpp's ``convert_hf_to_gguf.py`` (how it stores a tokenizer), vendored in llama-cpp-python 0.3.36.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .export_errors import ExportError, TokenizerError


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
