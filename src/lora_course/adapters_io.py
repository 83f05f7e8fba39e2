"""Checked saving and loading of peft adapters (and of merged models).

Implements:

- ``save_adapter``: ``save_pretrained`` in safetensors only, written into a temporary sibling folder and renamed
  into place, so a crash or error mid-save never leaves a half-written adapter behind (nor replaces a good one);
  next to peft's files it writes ``base_model.json``, a fingerprint of the base model (type, sizes, vocabulary);
- ``check_adapter_files`` / ``check_adapter_compatible``: before peft loads anything, the folder must hold
  ``adapter_config.json`` and ``adapter_model.safetensors``, and every saved tensor must fit the loaded model
  (LoRA ``A`` is r x in, ``B`` is out x r; saved whole modules must have the same shape). A mismatch raises an
  error naming both base models, instead of peft's ``size mismatch`` wall of text or, worse, nothing at all;
- ``load_adapter``: the checks, then ``PeftModel.from_pretrained``;
- ``save_merged_model``: the atomic save of a plain transformers model (after ``merge_and_unload``);
- ``dir_bytes`` / ``model_bytes``: measured sizes, for "adapter bytes vs base bytes".
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
FINGERPRINT = "base_model.json"


class AdapterError(ValueError):
    """An adapter cannot be saved or loaded as asked; the message says why and what to do."""


class AdapterFilesError(AdapterError, FileNotFoundError):
    """An adapter folder is missing, or lacks its config or its safetensors weights file."""


class AdapterMismatchError(AdapterError):
    """An adapter was saved for a different base model than the one it is being loaded onto."""


# ------------------------------------------------------------------------------------------------- sizes
def dir_bytes(path: str | Path) -> int:
    """Total size in bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def model_bytes(model: Any) -> int:
    """Bytes of a model's parameters and buffers in memory (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------------------------------ atomic save
@contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``path``; on success rename it to ``path``, on error delete it.

    The rename is atomic on one file system, so readers see either the old complete folder or the new complete
    one. An existing ``path`` is refused unless ``overwrite``; it is moved aside only once the new folder is
    complete, then deleted.
    """
    final = Path(path).expanduser().absolute()
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists: pass overwrite=True or choose a new folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- identity
def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def base_fingerprint(model: Any) -> dict[str, Any]:
    """What identifies a base model for adapter loading: its name/path, type and the sizes adapters depend on."""
    base = _base(model)
    cfg = getattr(base, "config", None)
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    return {
        "name_or_path": str(getattr(base, "name_or_path", "") or getattr(cfg, "_name_or_path", "")),
        "model_type": getattr(cfg, "model_type", None),
        "architectures": getattr(cfg, "architectures", None) or [type(base).__name__],
        "hidden_size": getattr(cfg, "hidden_size", None),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
        "vocab_size": int(emb.weight.shape[0]) if emb is not None else getattr(cfg, "vocab_size", None),
    }


def _describe(fp: dict[str, Any]) -> str:
    bits = [f"{fp.get('model_type')}"]
    if fp.get("hidden_size") is not None:
        bits.append(f"hidden {fp['hidden_size']}")
    if fp.get("num_hidden_layers") is not None:
        bits.append(f"{fp['num_hidden_layers']} layers")
    if fp.get("vocab_size") is not None:
        bits.append(f"vocab {fp['vocab_size']}")
    return f"{fp.get('name_or_path') or '<unnamed>'!r} ({', '.join(bits)})"


# -------------------------------------------------------------------------------------------------- save
@dataclass(frozen=True)
class SavedAdapter:
    """Where an adapter was saved and how big it is on disk."""

    path: Path
    weights_bytes: int
    total_bytes: int


def save_adapter(model: Any, path: str | Path, overwrite: bool = False, **save_kwargs: Any) -> SavedAdapter:
    """Save a peft model's adapter(s) to ``path`` in safetensors only, atomically, with a base-model fingerprint.

    Why atomic: ``save_pretrained`` writes file by file, so an error (disk full, interrupted kernel) would
    otherwise leave a folder that looks like an adapter but lacks weights. Extra keyword arguments go to
    ``save_pretrained`` (e.g. ``save_embedding_layers``); ``safe_serialization`` is always True.
    """
    if not hasattr(model, "peft_config"):
        raise AdapterError(f"{type(model).__name__} has no adapter to save: wrap it with get_peft_model(model, "
                           "config) (or save a merged model with save_merged_model)")
    save_kwargs.pop("safe_serialization", None)
    final = Path(path).expanduser().absolute()
    with atomic_directory(final, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, **save_kwargs)
        names = {p.name for p in tmp.rglob("*") if p.is_file()}
        if ADAPTER_WEIGHTS not in names or ADAPTER_CONFIG not in names:
            raise AdapterError(f"save_pretrained wrote {sorted(names)} without {ADAPTER_WEIGHTS} and "
                               f"{ADAPTER_CONFIG}: nothing was saved to {final}")
        (tmp / FINGERPRINT).write_text(json.dumps(base_fingerprint(model), indent=1))
    weights = sum(p.stat().st_size for p in final.rglob(ADAPTER_WEIGHTS))
    return SavedAdapter(final, weights, dir_bytes(final))


def save_merged_model(model: Any, path: str | Path, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Atomically save a plain transformers model (e.g. from ``merge_and_unload``) and its tokenizer.

    A peft model is refused: its ``save_pretrained`` writes the adapter only, which is not a standalone model.
    """
    if hasattr(model, "peft_config"):
        raise AdapterError("this is still a peft model: call model.merge_and_unload() first, which returns the "
                           "plain transformers model with the adapter folded into its weights")
    final = Path(path).expanduser().absolute()
    with atomic_directory(final, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return final


# -------------------------------------------------------------------------------------------------- load
def check_adapter_files(path: str | Path) -> dict[str, Any]:
    """The adapter's config, after checking the folder holds ``adapter_config.json`` and the safetensors weights.

    Raises ``AdapterFilesError`` naming the missing file (and a pickle ``adapter_model.bin``, which this course
    does not load: pickle files can run code when loaded).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise AdapterFilesError(f"no adapter folder at {folder}: save one with save_adapter(model, path)")
    cfg_path = folder / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise AdapterFilesError(f"{folder} has no {ADAPTER_CONFIG}: it is not a peft adapter folder "
                                f"(files: {sorted(p.name for p in folder.iterdir())})")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        extra = (f"; it has {PICKLE_WEIGHTS} (pickle), which is not loaded for safety: re-save the adapter with "
                 "safe_serialization=True") if (folder / PICKLE_WEIGHTS).is_file() else \
            "; the save was interrupted or the file was deleted: save the adapter again"
        raise AdapterFilesError(f"{folder} has no weights file {ADAPTER_WEIGHTS}{extra}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterFilesError(f"{cfg_path} is not valid JSON ({e}): save the adapter again") from e
    if not isinstance(cfg, dict):
        raise AdapterFilesError(f"{cfg_path} holds a {type(cfg).__name__}, not peft's config object: "
                                "save the adapter again")
    return cfg


def _saved_shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import SafetensorError, safe_open

    weights = path / ADAPTER_WEIGHTS
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except (SafetensorError, OSError) as e:  # a cut-off copy or download: the header promises more than the file has
        raise AdapterFilesError(f"{weights} is not a readable safetensors file ({e}; {weights.stat().st_size:,} "
                                "bytes): the save or copy was cut short, save or copy the adapter again") from e


def _saved_fingerprint(folder: Path) -> dict[str, Any]:
    """The adapter's ``base_model.json`` (``{}`` when absent: adapters saved by peft alone have none)."""
    fp_path = folder / FINGERPRINT
    if not fp_path.is_file():
        return {}
    try:
        saved = json.loads(fp_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterFilesError(f"{fp_path} is not valid JSON ({e}): delete it to load without the base-model check, "
                                "or save the adapter again") from e
    if not isinstance(saved, dict):
        raise AdapterFilesError(f"{fp_path} holds a {type(saved).__name__}, not the base model's fingerprint "
                                "(a JSON object): delete it or save the adapter again")
    return saved


_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B",
                  ".lora_magnitude_vector")


def _shape_problems(model: Any, shapes: dict[str, list[int]]) -> list[str]:
    """Saved tensors that do not fit the loaded model, one line each."""
    from .targets import _in_out

    base = _base(model)
    modules = dict(base.named_modules())
    params = dict(base.named_parameters())
    problems: list[str] = []
    for key, shape in shapes.items():
        name = key.removeprefix("base_model.model.")
        suffix = next((s for s in _LORA_SUFFIXES if name.endswith(s)), None)
        if suffix is not None:
            mod_name = name[: -len(suffix)]
            module = modules.get(mod_name)
            if module is None:
                problems.append(f"{mod_name}: the adapter has LoRA weights for it, the loaded model has no such layer")
                continue
            if suffix == ".lora_magnitude_vector":
                continue
            try:
                fan_in, fan_out = _in_out(module)
            except TypeError:
                problems.append(f"{mod_name}: a {type(module).__name__} in the loaded model, not a layer LoRA adapts")
                continue
            if suffix in (".lora_A.weight", ".lora_embedding_A"):
                want, have, what = shape[1], fan_in, "input size"
            else:
                want, have, what = shape[0], fan_out, "output size"
            if want != have:
                problems.append(f"{mod_name}: adapter expects {what} {want}, loaded layer has {have}")
            continue
        if name.endswith(".trainable_tokens_delta"):
            mod_name = name.removesuffix(".token_adapter.trainable_tokens_delta")
            module = modules.get(mod_name)
            dim = getattr(getattr(module, "weight", None), "shape", [None, None])[-1] if module is not None else None
            if module is None or dim != shape[-1]:
                problems.append(f"{mod_name}: adapter has trainable token rows of width {shape[-1]}, loaded model "
                                f"{'has no such module' if module is None else f'has width {dim}'}")
            continue
        pname = name.replace(".token_adapter.base_layer", "").replace(".modules_to_save", "")
        param = params.get(pname)
        if param is None:
            problems.append(f"{pname}: saved in the adapter, absent from the loaded model")
        elif list(param.shape) != list(shape):
            hint = " (resize the token embeddings to the adapter's vocabulary first)" \
                if "embed" in pname or "lm_head" in pname else ""
            problems.append(f"{pname}: adapter has shape {tuple(shape)}, loaded model {tuple(param.shape)}{hint}")
    return problems


def _vocabulary_problems(cfg: dict[str, Any], saved: dict[str, Any], loaded: dict[str, Any]) -> list[str]:
    """A vocabulary size that differs from the adapter's, or trained token rows the loaded model lacks.

    Needed because an adapter saved with ``trainable_token_indices`` (and ``save_embedding_layers=False``) holds
    only the trained rows: their width fits any model of the same hidden size, so the shape check alone would let
    an adapter trained after ``resize_token_embeddings`` load onto a model that was not resized.
    """
    problems: list[str] = []
    want, have = saved.get("vocab_size"), loaded.get("vocab_size")
    fix = f"resize the token embeddings to the adapter's vocabulary first: model.resize_token_embeddings({want})"
    if want and have and want != have:
        problems.append(f"vocabulary: the adapter was saved with {want} embedding rows, the loaded model has "
                        f"{have} ({fix})")
    indices = cfg.get("trainable_token_indices") or []
    flat = [i for v in indices.values() for i in v] if isinstance(indices, dict) else list(indices)
    if have and flat and max(flat) >= have:
        problems.append(f"trainable_token_indices: the adapter trained token id {max(flat)}, the loaded model's "
                        f"vocabulary ends at {have - 1} ({fix})")
    return problems


@dataclass(frozen=True)
class Compatibility:
    """The outcome of ``check_adapter_compatible``: the adapter's base model and non-fatal differences."""

    adapter_base: str
    loaded_base: str
    tensors_checked: int
    warnings: tuple[str, ...] = ()


def check_adapter_compatible(model: Any, path: str | Path) -> Compatibility:
    """Check that the adapter at ``path`` was made for ``model``; ``AdapterMismatchError`` names both models.

    Fatal: a different architecture (when the adapter's ``base_model.json`` fingerprint says so) or any saved
    tensor whose shape does not fit the loaded model's layer (``A`` is r x in, ``B`` out x r, saved modules
    whole). Only a warning: a different ``base_model_name_or_path`` with every shape fitting, since the same
    model is often loaded from another path or hub id (the warning says so in case it is a different
    fine-tune of the same architecture, which fits but gives other outputs).
    """
    folder = Path(path).expanduser()
    cfg = check_adapter_files(folder)
    loaded = base_fingerprint(model)
    saved = _saved_fingerprint(folder)
    saved.setdefault("name_or_path", cfg.get("base_model_name_or_path") or "")
    saved_name = cfg.get("base_model_name_or_path") or saved.get("name_or_path") or "<unknown base model>"
    shapes = _saved_shapes(folder)
    problems = _shape_problems(model, shapes) + _vocabulary_problems(cfg, saved, loaded)
    if saved.get("model_type") and loaded.get("model_type") and saved["model_type"] != loaded["model_type"]:
        problems.insert(0, f"architecture: adapter made for model_type {saved['model_type']!r}, loaded model is "
                           f"{loaded['model_type']!r}")
    if problems:
        shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise AdapterMismatchError(
            f"the adapter at {folder} was saved for base model {_describe(saved)}, but the loaded model is "
            f"{_describe(loaded)}; {len(problems)} problem(s) with its {len(shapes)} saved tensors:\n  {shown}\n"
            f"Load the adapter onto {saved_name!r} (load_base(..., model_id={saved_name!r})).")
    notes: list[str] = []
    if saved_name and loaded["name_or_path"] and Path(saved_name).name != Path(loaded["name_or_path"]).name:
        notes.append(f"the adapter was saved for {saved_name!r} and is being loaded onto {loaded['name_or_path']!r}: "
                     "the shapes fit, but if these are different fine-tunes the outputs will differ")
    return Compatibility(saved_name, loaded["name_or_path"], len(shapes), tuple(notes))


def load_adapter(model: Any, path: str | Path, is_trainable: bool = False, adapter_name: str = "default",
                 check: Callable[[Any, Path], Compatibility] = check_adapter_compatible) -> Any:
    """``PeftModel.from_pretrained(model, path)`` after checking the files and the base model's fit.

    ``is_trainable=False`` (peft's default) loads for inference: every adapter weight is frozen; pass True to
    continue training. A model that is already a ``PeftModel`` gets the adapter added under ``adapter_name``.
    """
    from peft import PeftModel

    folder = Path(path).expanduser()
    result = check(model, folder)
    for note in result.warnings:
        warnings.warn(note, stacklevel=2)
    if isinstance(model, PeftModel):
        model.load_adapter(str(folder), adapter_name=adapter_name, is_trainable=is_trainable)
        return model
    return PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name, is_trainable=is_trainable)


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterError", "AdapterFilesError", "AdapterMismatchError",
           "Compatibility", "SavedAdapter", "atomic_directory", "base_fingerprint", "check_adapter_compatible",
           "check_adapter_files", "dir_bytes", "load_adapter", "model_bytes", "save_adapter", "save_merged_model"]
