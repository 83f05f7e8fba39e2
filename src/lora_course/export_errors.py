"""The export errors: ``ExportError`` and one subclass per way an export step can fail (notebook 08).

Their own module because every export module raises them: ``export`` imports ``llama_converter`` (the converter)
and ``gguf_inspect`` (GGUF headers, tokenizer checks), which raise them too, so they cannot live in ``export``
without an import cycle. ``export`` re-exports them: callers import them from there
(``from lora_course.export import ExportError``), as ``gguf_quant``, ``llama_runtime``, ``modelfile`` and the tests do.
"""
from __future__ import annotations


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
