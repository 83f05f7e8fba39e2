"""Quantize a GGUF file with llama.cpp and report what each tensor was stored as (notebook 08).

- ``quantize``: ``llama_cpp.llama_model_quantize`` (the C API behind ``llama-quantize``), written to a temporary
  sibling and renamed; ``quantize_command`` is the equivalent ``llama-quantize`` command line;
- ``QuantizeReport``: size, bits per weight, and which tensors were stored in another type than asked and why
  (1-D norms stay F32, k-quant recipes mix types, rows narrower than a block fall back), read back from the file
  (``gguf_tensor_stats``);
- ``quantization_types`` (llama.cpp's ``llama_ftype`` names) and ``nominal_bits_per_weight`` (from the block
  formats), for the chapter's quant-choice table.

The input comes from ``export.to_gguf``; ``parity.check_parity`` measures what quantization cost.

Sources: llama.cpp ``llama.h`` (``llama_ftype``, ``llama_model_quantize``) and ``gguf-py`` (``GGML_QUANT_SIZES``),
vendored in llama-cpp-python 0.3.36.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .export import (
    ExportError,
    UnknownQuantizationError,
    _atomic_path,
    _check_destination,
    file_size_mib,
    llama_threads,
)
from .gguf_inspect import read_gguf_header


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
    llama_log: str = ""  # what llama.cpp wrote to stderr while quantizing (one fallback warning per narrow tensor)

    def type_counts(self) -> dict[str, int]:
        """How many tensors were stored in each other type."""
        counts: dict[str, int] = {}
        for t in self.other_types:
            counts[t.stored] = counts.get(t.stored, 0) + 1
        return counts

    def groups(self) -> list[tuple[str, str, list[TensorType]]]:
        """The tensors in another type grouped by (stored type, reason), largest group first."""
        by: dict[tuple[str, str], list[TensorType]] = {}
        for t in self.other_types:
            by.setdefault((t.stored, t.reason), []).append(t)
        return [(stored, reason, ts) for (stored, reason), ts in sorted(by.items(), key=lambda kv: -len(kv[1]))]

    def __str__(self) -> str:
        """One line per (stored type, reason) with a count and an example tensor; ``details()`` lists every one."""
        lines = [(f"{self.path.name}: {self.qtype}, {self.size_mib:.1f} MiB, {self.bits_per_weight:.2f} bits/weight, "
                 f"{len(self.other_types)} of {self.n_tensors} tensors in another type ({self.seconds:.1f} s)")]
        if self.other_types:
            lines.append(f"  {'tensors':>7} {'stored':<7} {'example':<28} reason")
            for stored, reason, ts in self.groups():
                lines.append(f"  {len(ts):>7} {stored:<7} {ts[0].name:<28} {reason}")
        return "\n".join(lines)

    def details(self) -> str:
        """Every tensor in another type: name, shape (ggml order), stored type, reason."""
        lines = [f"  {'tensor':<28} {'shape':<14} {'stored':<7} reason"]
        lines += [f"  {t.name:<28} {t.shape!s:<14} {t.stored:<7} {t.reason}" for t in self.other_types]
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
    return [QUANTIZE_BINARY, str(gguf_path), str(out_path), key, str(nthread or llama_threads())]


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
    stderr: list[str] = []
    try:
        with _atomic_path(out_path) as tmp, _stderr_captured(stderr):
            rc = llama_cpp.llama_model_quantize(str(gguf_path).encode(), str(tmp).encode(), params)
            if rc != 0 or not tmp.exists():
                raise ExportError(f"llama_model_quantize({gguf_path.name} -> {key}) failed with code {rc}")
    except ExportError as err:
        raise ExportError(f"{err}; llama.cpp said:\n{''.join(stderr)[-2000:]}") from None
    finally:
        log.setLevel(level)
    seconds = time.perf_counter() - t0
    n_el, n_bytes, rows = gguf_tensor_stats(out_path)
    target = _target_tensor_type(key)
    other = [TensorType(name, shape, stored, _why(shape, stored, target, key))
             for name, shape, stored in rows if target is None or stored != target.name]
    return QuantizeReport(out_path, key, file_size_mib(out_path), 8 * n_bytes / max(n_el, 1), len(rows), other,
                          seconds, "".join(stderr))


@contextlib.contextmanager
def _stderr_captured(into: list[str]):
    """Collect what llama.cpp writes to stderr (a two-line fallback warning per tensor that a k-quant cannot store:
    180 of SmolLM2's 272 in Q4_K_M) into ``into``, instead of the notebook's output. Both ways it writes are
    caught: file descriptor 2 (C code) and ``sys.stderr`` (llama-cpp-python's log callback prints there, which in a
    Jupyter kernel is the cell's output, not descriptor 2). The report says the same per tensor, read back from the
    file (``QuantizeReport.groups``)."""
    import io
    import sys

    with contextlib.suppress(Exception):
        sys.stderr.flush()
    saved, saved_py, text = os.dup(2), sys.stderr, io.StringIO()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        sys.stderr = text
        try:
            yield into
        finally:
            sys.stderr = saved_py
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            into.append(sink.read().decode("utf-8", "replace") + text.getvalue())
