"""The course's task adapters: trained once by a fixed recipe on the course's base model and cached.

``course_adapter(task)`` returns the adapter for ``task`` from ``cache_dir()/adapters/<task>-<recipe_key>``, or
trains it now by ``RECIPES[task]`` (peft LoRA on every linear layer, ``train.train_steps``) and publishes it there
behind a file lock (``paths.publish_directory``), so notebooks running side by side never race and a half-written
adapter is never used. ``recipe_key`` hashes the recipe, the base model's identity (``base_identity``), the task's
training data and the source of the functions that train, so a change to any of them trains anew and an unrelated
edit keeps the cache. ``make model`` builds them (``python -m lora_course.adapters --build-course-adapters``);
notebook 07 serves them.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .adapters import _lora_layer_cls
from .adapters_io import ADAPTER_WEIGHTS, base_fingerprint, save_adapter
from .paths import CACHE_MARKER, cache_dir, data_dir, publish_directory, read_complete

RECIPE_VERSION = "1"
"""Bump when the course adapters' training changes in a way the hashed sources below do not show."""
_MARKER = CACHE_MARKER


@dataclass(frozen=True)
class AdapterRecipe:
    """How a course adapter is trained: peft LoRA on every linear layer, AdamW, answer-only loss."""

    task: str
    steps: int                        # AdamW steps at batch_size (measured on the cpu model, see RECIPES)
    lr: float                         # 1e-3 .. 4e-3 for r=8 on SmolLM2-135M
    r: int = 8
    lora_alpha: int = 16              # scaling alpha/r = 2
    target_modules: str = "all-linear"
    batch_size: int = 8
    max_length: int = 128             # tokens per example (prompts and answers are shorter)
    seed: int = 0


RECIPES: dict[str, AdapterRecipe] = {
    "technical": AdapterRecipe("technical", steps=24, lr=3e-3),
    "creative": AdapterRecipe("creative", steps=20, lr=1e-3),
    "code": AdapterRecipe("code", steps=20, lr=1e-3),
}
"""The course adapters' recipes. Measured on the cpu model (1 thread, ~3-4 s a step): see notebook 07."""


@dataclass(frozen=True)
class CourseAdapter:
    """A course adapter in the cache: its folder, whether this call trained it, and its training record."""

    task: str
    path: Path
    trained_now: bool
    seconds: float              # training time of the run that built it (this call or an earlier one)
    losses: tuple[float, ...]
    recipe: AdapterRecipe


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def base_identity(model: Any) -> dict[str, Any]:
    """What identifies a base model for the adapter cache: its fingerprint, dtype, and its folder's files.

    The folder's name and the sizes of its weight/config files (plus the model cache's own completeness record,
    which holds a hash of the source) stand in for hashing hundreds of MB of weights.
    """
    fp = base_fingerprint(model)
    src = Path(fp.pop("name_or_path") or "")
    ident: dict[str, Any] = {**fp, "name": src.name, "dtype": str(next(model.parameters()).dtype)}
    if src.is_dir():
        ident["files"] = {p.name: p.stat().st_size for p in sorted(src.iterdir())
                          if p.is_file() and p.suffix in (".safetensors", ".json") and p.name != _MARKER}
        marker = src / _MARKER
        if marker.is_file():
            ident["source_record"] = _sha(marker.read_bytes())
    return ident


def recipe_key(recipe: AdapterRecipe, model: Any) -> str:
    """16 hex digits hashing the recipe, the base model's identity, the task's training data and the code.

    The code is the source of the functions that train (``train_steps``, ``tokenize_example``, ``collate``,
    ``build_lora_config``, ``_train_into``) plus ``RECIPE_VERSION`` and peft's version.
    """
    import inspect

    import peft

    from .data import collate, tokenize_example
    from .targets import build_lora_config
    from .train import train_steps

    # The functions that shape the training, not their whole modules: unrelated edits keep the cache valid.
    code = {f.__name__: _sha(inspect.getsource(f).encode())
            for f in (train_steps, tokenize_example, collate, build_lora_config, _train_into)}
    data = _sha((data_dir() / recipe.task / "train.jsonl").read_bytes())
    blob = json.dumps({"recipe": asdict(recipe), "base": base_identity(model), "data": data, "code": code,
                       "recipe_version": RECIPE_VERSION, "peft": peft.__version__}, sort_keys=True)
    return _sha(blob.encode())[:16]


def _complete(path: Path) -> dict[str, Any] | None:
    return read_complete(path, (ADAPTER_WEIGHTS,))


def _from_record(task: str, path: Path, record: dict[str, Any], trained_now: bool) -> CourseAdapter:
    return CourseAdapter(task, path, trained_now, float(record["seconds"]), tuple(record["losses"]),
                         AdapterRecipe(**record["recipe"]))


def _train_into(model: Any, tokenizer: Any, recipe: AdapterRecipe, out: Path,
                log_every: int) -> tuple[list[float], float]:
    """Train a fresh LoRA on ``model`` by ``recipe`` and save it to ``out``; the model is left as it was."""
    from peft import get_peft_model

    from .data import load_task
    from .targets import build_lora_config
    from .train import train_steps

    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    config = build_lora_config(model, r=recipe.r, lora_alpha=recipe.lora_alpha, target_modules=recipe.target_modules)
    peft_model = get_peft_model(model, config)
    try:
        log = train_steps(peft_model, tokenizer, load_task(recipe.task, "train"), steps=recipe.steps,
                          batch_size=recipe.batch_size, lr=recipe.lr, seed=recipe.seed, max_length=recipe.max_length,
                          log_every=log_every)
        save_adapter(peft_model, out)
    finally:
        peft_model.unload()  # removes the LoRA layers: `model` is the plain base again
        for n, p in model.named_parameters():
            p.requires_grad_(grads.get(n, p.requires_grad))
        model.train(was_training)
    return log.losses, log.seconds


def course_adapter(task: str, model: Any = None, tokenizer: Any = None, profile: str = "cpu",
                   model_id: str | None = None, recipe: AdapterRecipe | None = None,
                   log_every: int = 0) -> CourseAdapter:
    """The course adapter for ``task``: from the cache, or trained now by its recipe and cached.

    The cache folder is ``cache_dir()/adapters/<task>-<recipe_key>``; it is built behind a file lock into a
    temporary folder, marked complete (file sizes, training record) and renamed into place, so notebooks running in
    parallel never race and a half-written adapter is never used. Pass the plain base ``model`` (and its
    ``tokenizer``) to train on it; else the ``profile``'s base is loaded. Training leaves the model unchanged.
    """

    from .data import TASKS

    recipe = recipe or RECIPES.get(task)
    if recipe is None or task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if recipe.task != task:
        raise ValueError(f"the recipe is for task {recipe.task!r}, not {task!r}")
    if model is None:
        from .models import load_base

        model, tokenizer = load_base(profile, model_id)
    elif tokenizer is None:
        raise ValueError("pass the model's tokenizer together with the model")
    if any(isinstance(m, _lora_layer_cls()) for m in model.modules()):
        raise ValueError("the model already holds LoRA layers: pass the plain base model (before an AdapterRegistry "
                         "or get_peft_model wraps it), so the adapter is trained on the base alone")
    final = cache_dir() / "adapters" / f"{task}-{recipe_key(recipe, model)}"
    record = _complete(final)
    if record is not None:
        return _from_record(task, final, record, trained_now=False)
    def build(tmp: Path) -> dict[str, Any]:
        print(f"[lora_course] training the {task} course adapter ({recipe.steps} steps) into {final}",
              file=sys.stderr)
        losses, seconds = _train_into(model, tokenizer, recipe, tmp, log_every)
        return {"losses": losses, "seconds": seconds, "built": time.strftime("%Y-%m-%d %H:%M:%S")}

    record, trained_now = publish_directory(
        final, build, {"task": task, "recipe": asdict(recipe), "base": base_identity(model)}, (ADAPTER_WEIGHTS,))
    return _from_record(task, final, record, trained_now=trained_now)


__all__ = ["RECIPES", "RECIPE_VERSION", "AdapterRecipe", "CourseAdapter", "base_identity", "course_adapter",
           "recipe_key"]
