"""How large a LoRA adapter is, where its trainable parameters sit, and which rank to start from.

For notebook 02 (peft), next to ``lora_course.targets`` (which layers are adapted):

- ``lora_parameter_count``: the parameters adapting given targets at rank r adds, r x (in + out) per matched layer,
  from the model's shapes alone (what ``get_peft_model`` will report);
- ``trainable_parameter_report`` / ``check_trainable``: trainable and total parameters per module type (``q_proj``,
  ``lm_head``, ...), and a clear error when nothing is trainable;
- ``recommend_lora_rank``: a documented starting rank and alpha from task complexity, data size and model size.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .targets import _in_out, linear_layers, matched_modules


class NothingTrainableError(RuntimeError):
    """A model about to be trained has no parameter with ``requires_grad``; the message says the usual causes."""


def lora_parameter_count(model: Any, target_modules: str | Sequence[str], r: int,
                         layers_to_transform: Iterable[int] | None = None) -> int:
    """LoRA parameters that adapting ``target_modules`` at rank ``r`` adds: r x (in + out) per matched layer.

    Computed from the model's shapes alone, so a notebook can assert what ``get_peft_model`` reports.
    ``layers_to_transform`` keeps only layers whose name contains ``.<i>.`` for one of the given indices.
    """
    layers = linear_layers(model)
    names = [n for n in matched_modules(model, target_modules) if n in layers]
    if layers_to_transform is not None:
        keep = set(layers_to_transform)
        names = [n for n in names if any(f".{i}." in f".{n}." for i in keep)]
    return sum(r * sum(_in_out(layers[n])) for n in names)


# ------------------------------------------------------------------------------------------------ rank
_COMPLEXITY = {"low": "low", "simple": "low", "format": "low", "style": "low",
               "medium": "medium", "moderate": "medium",
               "high": "high", "complex": "high", "hard": "high"}
_BASE_RANK = {"low": 8, "medium": 16, "high": 32}


@dataclass(frozen=True)
class RankRecommendation:
    """A starting LoRA rank and alpha, with the reasons that produced them (to print next to the config)."""

    r: int
    lora_alpha: int
    reasons: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}\n" + "\n".join(f"- {x}" for x in self.reasons)


def recommend_lora_rank(task_complexity: str, dataset_size: int, model_size_b: float) -> RankRecommendation:
    """A starting rank and alpha for a LoRA run, from three things known before training.

    The reasoning, in order (each step is recorded in ``reasons``):

    1. Task complexity sets the base rank: ``low`` (format, style, a fixed answer shape) 8; ``medium`` (a new
       skill within the model's knowledge) 16; ``high`` (new domain knowledge, multi-step reasoning, a new
       language) 32. Hu et al. 2021 (LoRA, Table 6) find r = 1-8 already matches full fine-tuning on GPT-3 for
       tasks of the first kind: the needed update has low intrinsic rank.
    2. Data caps it: under 1,000 examples r is capped at 8, because a few hundred examples do not pin down more
       directions and a larger rank only fits noise; with 50,000+ examples a ``high`` task may double it (max 64).
    3. Model size lowers it: from 13B parameters the rank is halved (min 4), since larger models have a lower
       intrinsic dimension (Aghajanyan et al. 2020) and each rank unit costs more parameters on a wider layer.
    4. ``lora_alpha = 2 * r``: the common convention (scaling alpha/r = 2). It does not make a tuned learning rate
       carry over to another r: with alpha/r fixed, each step's change to B A grows with r. Hu et al. keep alpha
       fixed (scaling 1/r) so the rate need not be retuned; rsLoRA (Kalajdzievski 2023) shows alpha/sqrt(r) is the
       scaling under which it transfers (``use_rslora=True``). Changing r with alpha = 2r: retune the rate.
    """
    if task_complexity not in _COMPLEXITY:
        raise ValueError(f"task_complexity={task_complexity!r}: choose low, medium or high "
                         f"(aliases: {', '.join(sorted(_COMPLEXITY))})")
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
        raise ValueError(f"dataset_size={dataset_size!r}: give the number of training examples (an integer >= 1)")
    if not isinstance(model_size_b, (int, float)) or not model_size_b > 0:
        raise ValueError(f"model_size_b={model_size_b!r}: give the base model's size in billions of parameters, "
                         "e.g. 0.135 for SmolLM2-135M")
    level = _COMPLEXITY[task_complexity]
    r = _BASE_RANK[level]
    reasons = [f"{level} complexity task: base rank {r}"]
    if dataset_size < 1000 and r > 8:
        r = 8
        reasons.append(f"only {dataset_size} examples: rank capped at 8 (more directions would fit noise)")
    elif dataset_size < 1000:
        reasons.append(f"{dataset_size} examples: a small rank suits a small data set")
    elif dataset_size >= 50_000 and level == "high":
        r = min(2 * r, 64)
        reasons.append(f"{dataset_size} examples of a high-complexity task: rank doubled to {r}")
    else:
        reasons.append(f"{dataset_size} examples: rank unchanged")
    if model_size_b >= 13:
        r = max(r // 2, 4)
        reasons.append(f"{model_size_b:g}B-parameter model: rank halved to {r} (lower intrinsic dimension)")
    else:
        reasons.append(f"{model_size_b:g}B-parameter model: no size adjustment (below 13B)")
    alpha = 2 * r
    reasons.append(f"lora_alpha = 2 x r = {alpha}: scaling alpha/r = 2, the common convention; if you change r, "
                   "retune the learning rate (or use use_rslora=True, whose alpha/sqrt(r) lets it carry over)")
    return RankRecommendation(r, alpha, reasons)


# -------------------------------------------------------------------------------------- parameter report
_PEFT_PARTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "base_layer",
               "modules_to_save", "original_module", "token_adapter", "trainable_tokens_delta",
               "trainable_tokens_original", "weight", "bias", "default", "base_model", "model"}


def module_type(param_name: str) -> str:
    """The module type a parameter belongs to: ``q_proj`` for ``...layers.0.self_attn.q_proj.lora_A.default.weight``.

    peft's wrapper parts (``lora_A``, ``base_layer``, ``modules_to_save``, ``token_adapter``, adapter names) and
    layer indices are skipped, so a LoRA factor and the frozen weight it adapts share one type.
    """
    parts = [p for p in param_name.split(".") if p not in _PEFT_PARTS and not p.isdigit()]
    return parts[-1] if parts else param_name


@dataclass
class ParameterReport:
    """Trainable and total parameter counts, overall and per module type."""

    trainable: int
    total: int
    by_type: dict[str, tuple[int, int]]  # module type -> (trainable, total)

    @property
    def percent(self) -> float:
        """Trainable share of all parameters, in percent."""
        return 100.0 * self.trainable / max(self.total, 1)

    def trainable_of(self, *types: str) -> int:
        """Trainable parameters of the given module types (0 for a type the model lacks)."""
        return sum(self.by_type.get(t, (0, 0))[0] for t in types)

    def table(self, only_trainable: bool = False) -> str:
        """A fixed-width table, one row per module type."""
        rows = [f"{'module type':<22}{'trainable':>13}{'total':>14}{'%':>9}"]
        for name, (tr, tot) in sorted(self.by_type.items(), key=lambda kv: (-kv[1][0], kv[0])):
            if only_trainable and not tr:
                continue
            rows.append(f"{name:<22}{tr:>13,}{tot:>14,}{100 * tr / max(tot, 1):>8.2f}%")
        rows.append(f"{'all':<22}{self.trainable:>13,}{self.total:>14,}{self.percent:>8.3f}%")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def trainable_parameter_report(model: Any) -> ParameterReport:
    """Count trainable and total parameters, overall and per module type (shared/tied tensors counted once).

    The totals equal peft's ``get_nb_trainable_parameters()``; the per-type rows show *where* the trainable
    parameters are: LoRA factors under the layer they adapt, a ``modules_to_save`` copy under its module
    (``lm_head``, ``embed_tokens``), trainable token rows under the embedding.
    """
    by_type: dict[str, list[int]] = {}
    trainable = total = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if hasattr(p, "ds_numel"):  # pragma: no cover - DeepSpeed ZeRO-3 shards
            n = p.ds_numel
        row = by_type.setdefault(module_type(name), [0, 0])
        row[1] += n
        total += n
        if p.requires_grad:
            row[0] += n
            trainable += n
    return ParameterReport(trainable, total, {k: (v[0], v[1]) for k, v in by_type.items()})


def check_trainable(model: Any) -> ParameterReport:
    """Raise ``NothingTrainableError`` when no parameter requires a gradient; else return the parameter report.

    The usual causes are named: the adapter was never added (``get_peft_model``), or it was loaded for
    inference (``PeftModel.from_pretrained`` defaults to ``is_trainable=False``).
    """
    report = trainable_parameter_report(model)
    if report.trainable == 0:
        raise NothingTrainableError(
            f"none of the model's {report.total:,} parameters is trainable. Wrap it with get_peft_model(model, "
            "config) before training, or load a saved adapter with PeftModel.from_pretrained(..., "
            "is_trainable=True) to continue training it.")
    return report


__all__ = [
    "NothingTrainableError",
    "ParameterReport",
    "RankRecommendation",
    "check_trainable",
    "lora_parameter_count",
    "module_type",
    "recommend_lora_rank",
    "trainable_parameter_report",
]
