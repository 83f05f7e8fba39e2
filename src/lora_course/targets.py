"""Which layers LoRA adapts, and a checked ``LoraConfig``.

Implements, for notebook 02 (peft):

- ``TARGETS_BY_ARCHITECTURE``: the attention and MLP projection names of common decoder families (Llama, Mistral,
  Qwen2/3, Gemma, Phi, GPT-2, Falcon, ...), and ``discover_targets``, which finds them in any model by grouping its
  ``nn.Linear``/``Conv1D`` layers under their attention or MLP parent (the output head is never a target);
- ``check_target_modules``: every requested target must match at least one layer. peft raises only when *no*
  target matches, so a typo next to a correct name (``["q_proj", "v_prj"]``) silently adapts fewer layers;
- ``build_lora_config``: a ``LoraConfig`` whose rank, alpha, dropout and targets are validated with errors that
  say how to fix them (and ``fan_in_fan_out`` set for GPT-2-style ``Conv1D`` layers, which store ``W`` transposed);

How large an adapter is and which rank to start from are in ``lora_course.lora_sizing``.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ALL_LINEAR = "all-linear"  # peft's keyword for every Linear layer but the output head (lora.py uses it too)


class UnknownArchitectureError(ValueError):
    """A model's attention/MLP layers cannot be named automatically; the message lists the layers it has."""


class TargetModuleError(ValueError):
    """A requested LoRA target matches no layer of the model; the message lists the layers that exist."""


# ------------------------------------------------------------------------------------------ architectures
@dataclass(frozen=True)
class ArchitectureTargets:
    """The LoRA target names of one architecture, split into attention and MLP projections.

    Names follow peft's matching rule: a module is targeted when its full name equals the target or ends with
    ``"." + target``, so ``"attn.c_proj"`` picks GPT-2's attention output and not its MLP's ``c_proj``.
    ``conv1d`` marks GPT-2-style ``transformers.pytorch_utils.Conv1D`` layers, whose weight is stored
    (in, out) instead of (out, in): peft must be told with ``fan_in_fan_out=True``.
    """

    model_type: str
    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    conv1d: bool = False
    source: str = "registry"

    @property
    def all(self) -> list[str]:
        """Attention and MLP targets together: what ``"all-linear"`` adapts, named explicitly."""
        return [*self.attention, *self.mlp]

    def select(self, which: str = "all") -> list[str]:
        """The targets of one group: ``"attention"``, ``"mlp"`` or ``"all"``."""
        groups = {"attention": list(self.attention), "mlp": list(self.mlp), "all": self.all}
        if which not in groups:
            raise ValueError(f"which={which!r}: choose 'attention', 'mlp' or 'all'")
        return groups[which]


_LLAMA_LIKE = (("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj"))
TARGETS_BY_ARCHITECTURE: dict[str, ArchitectureTargets] = {
    **{t: ArchitectureTargets(t, *_LLAMA_LIKE) for t in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite",
        "smollm3", "cohere")},
    # Phi-1/1.5/2: separate q/k/v, the attention output is `dense`, the MLP is fc1 -> fc2.
    "phi": ArchitectureTargets("phi", ("q_proj", "k_proj", "v_proj", "dense"), ("fc1", "fc2")),
    # Phi-3: fused qkv and fused gate/up projections.
    "phi3": ArchitectureTargets("phi3", ("qkv_proj", "o_proj"), ("gate_up_proj", "down_proj")),
    # GPT-2: Conv1D layers (weights stored transposed); `c_proj` exists in attention and MLP alike.
    "gpt2": ArchitectureTargets("gpt2", ("c_attn", "attn.c_proj"), ("c_fc", "mlp.c_proj"), conv1d=True),
    # Falcon and GPT-NeoX: fused query_key_value, attention output `dense`, MLP h -> 4h -> h.
    "falcon": ArchitectureTargets("falcon", ("query_key_value", "dense"), ("dense_h_to_4h", "dense_4h_to_h")),
    "gpt_neox": ArchitectureTargets("gpt_neox", ("query_key_value", "dense"), ("dense_h_to_4h", "dense_4h_to_h")),
    "opt": ArchitectureTargets("opt", ("q_proj", "k_proj", "v_proj", "out_proj"), ("fc1", "fc2")),
    "starcoder2": ArchitectureTargets("starcoder2", ("q_proj", "k_proj", "v_proj", "o_proj"), ("c_fc", "c_proj")),
}
_ATTENTION_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "ffn", "feed_forward", "feedforward", "experts", "moe")


def _is_linear(module: Any) -> bool:
    import torch

    if isinstance(module, torch.nn.Linear):
        return True
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return False
    return isinstance(module, Conv1D)


def _unwrap(model: Any) -> Any:
    """The transformers model inside a peft model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _output_head_names(model: Any) -> set[str]:
    """Names of the output projection (``lm_head``): LoRA never targets it by default, like peft's all-linear."""
    names = {"lm_head"}
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is not None:
        names |= {n for n, m in model.named_modules() if m is head}
    return names


def linear_layers(model: Any) -> dict[str, Any]:
    """Every ``nn.Linear``/``Conv1D`` of the model by full name, output head (``lm_head``) excluded.

    On a peft model the same projections are listed under the same names: a LoRA-wrapped projection counts as
    the layer it wraps (its ``base_layer``), and the LoRA factors themselves are skipped.
    """
    model = _unwrap(model)
    heads = _output_head_names(model)
    out: dict[str, Any] = {}
    for name, module in model.named_modules():
        if not name or name in heads or name.split(".")[-1] in heads:
            continue
        if re.search(r"\.(lora_[AB]|base_layer|modules_to_save|original_module|lora_embedding_[AB])(\.|$)", name):
            continue
        if _is_linear(module) or _is_linear(getattr(module, "base_layer", None)):
            out[name] = module
    return out


def linear_name_counts(model: Any) -> dict[str, int]:
    """The distinct short names of the model's Linear layers (what ``target_modules`` takes) and how many each.

    A short name is the module's last name component, e.g. ``q_proj`` for ``model.layers.3.self_attn.q_proj``;
    when the same last component sits under different parents (GPT-2's ``attn.c_proj`` and ``mlp.c_proj``),
    both parent-qualified names are listed too.
    """
    names = list(linear_layers(model))
    counts = Counter(n.split(".")[-1] for n in names)
    parents: dict[str, set[str]] = {}
    for n in names:
        parts = n.split(".")
        parents.setdefault(parts[-1], set()).add(parts[-2] if len(parts) > 1 else "")
    for n in names:
        parts = n.split(".")
        if len(parents[parts[-1]]) > 1 and len(parts) > 1:
            counts[f"{parts[-2]}.{parts[-1]}"] += 1
    return dict(sorted(counts.items()))


def _describe_linear_layers(model: Any, limit: int = 40) -> str:
    layers = linear_layers(model)
    if not layers:
        return "the model has no nn.Linear or Conv1D layers at all"
    short: dict[str, tuple[int, str]] = {}
    for name, module in layers.items():
        key = name.split(".")[-1]
        n, _ = short.get(key, (0, ""))
        short[key] = (n + 1, _in_out_text(module))
    rows = [f"{k} (x{n}, {shape})" for k, (n, shape) in sorted(short.items())][:limit]
    return "its Linear layers are: " + ", ".join(rows)


def _in_out(module: Any) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a GPT-2 Conv1D (whose weight is stored (in, out))."""
    module = getattr(module, "base_layer", module)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if hasattr(module, "nf") and hasattr(module, "weight"):  # Conv1D(nf, nx): weight (nx, nf)
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    if hasattr(module, "num_embeddings"):
        return int(module.num_embeddings), int(module.embedding_dim)
    raise TypeError(f"cannot read the input/output sizes of a {type(module).__name__}")


def _in_out_text(module: Any) -> str:
    i, o = _in_out(module)
    return f"{i}->{o}"


def _group_of(name: str) -> str:
    for part in reversed(name.split(".")[:-1]):
        low = part.lower()
        if any(w in low for w in _ATTENTION_WORDS):
            return "attention"
        if any(w in low for w in _MLP_WORDS):
            return "mlp"
    return "other"


def discover_targets(model: Any) -> ArchitectureTargets:
    """Find a model's attention and MLP projections from its own modules, for architectures not in the registry.

    Each Linear/Conv1D layer (output head excluded) is grouped by the nearest parent whose name says attention
    (``attn``, ``attention``) or MLP (``mlp``, ``ffn``, ``feed_forward``, ``experts``). A short name shared by both
    groups is qualified with its parent (``attn.c_proj``). Raises ``UnknownArchitectureError`` listing the Linear
    layers when either group comes out empty: then name the targets yourself.
    """
    from transformers.pytorch_utils import Conv1D

    model = _unwrap(model)
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    layers = linear_layers(model)
    groups: dict[str, list[str]] = {"attention": [], "mlp": [], "other": []}
    by_short: dict[str, set[str]] = {}
    for name in layers:
        by_short.setdefault(name.split(".")[-1], set()).add(_group_of(name))
    for name in layers:
        parts = name.split(".")
        group = _group_of(name)
        short = parts[-1] if len(by_short[parts[-1]]) == 1 or len(parts) < 2 else f"{parts[-2]}.{parts[-1]}"
        if short not in groups[group]:
            groups[group].append(short)
    if not groups["attention"] or not groups["mlp"]:
        raise UnknownArchitectureError(
            f"architecture {model_type!r} ({type(model).__name__}) is not in TARGETS_BY_ARCHITECTURE and its "
            f"attention/MLP layers could not be told apart; {_describe_linear_layers(model)}. Pass target_modules "
            f"yourself (e.g. some of these names, or {ALL_LINEAR!r}).")
    conv1d = any(isinstance(getattr(m, "base_layer", m), Conv1D) for m in layers.values())
    return ArchitectureTargets(model_type, tuple(groups["attention"]), tuple(groups["mlp"]), conv1d, "discovered")


def targets_for_architecture(model_type: str) -> ArchitectureTargets:
    """The registered targets of a ``config.model_type``; ``UnknownArchitectureError`` lists the known types."""
    if model_type not in TARGETS_BY_ARCHITECTURE:
        raise UnknownArchitectureError(
            f"no registered LoRA targets for model_type {model_type!r}; known: "
            f"{', '.join(sorted(TARGETS_BY_ARCHITECTURE))}. Use discover_targets(model) to find them in the model.")
    return TARGETS_BY_ARCHITECTURE[model_type]


def target_modules_for(model: Any, which: str = "all") -> list[str]:
    """The LoRA targets of ``model`` (``"attention"``, ``"mlp"`` or ``"all"``), checked against the model.

    Registered architectures use the registry (verified: each name must match a layer, so a renamed layer is
    caught); others are discovered from the model's modules.
    """
    base = _unwrap(model)
    model_type = getattr(getattr(base, "config", None), "model_type", "")
    spec = TARGETS_BY_ARCHITECTURE.get(model_type) or discover_targets(base)
    targets = spec.select(which)
    check_target_modules(base, targets)
    return targets


# ---------------------------------------------------------------------------------------- target checks
def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def matched_modules(model: Any, target_modules: str | Sequence[str]) -> list[str]:
    """Full names of the layers a ``target_modules`` value adapts, by peft's rule.

    A list entry matches a module whose name equals it or ends with ``"." + entry``; a string other than
    ``"all-linear"`` is a regular expression that must match the whole name; ``"all-linear"`` is every
    Linear/Conv1D layer except the output head.
    """
    layers = linear_layers(model)
    if target_modules == ALL_LINEAR:
        return list(layers)
    base = _unwrap(model)
    names = [n for n, _ in base.named_modules() if n]
    if isinstance(target_modules, str):
        return [n for n in names if re.fullmatch(target_modules, n)]
    return [n for n in names if any(_matches(n, t) for t in target_modules)]


def check_target_modules(model: Any, target_modules: str | Sequence[str]) -> dict[str, int]:
    """How many layers each target matches; ``TargetModuleError`` (listing the Linear layers) if one matches none.

    Stricter than peft on purpose: peft fails only when nothing at all matches, so one misspelt name among
    correct ones silently trains fewer layers than asked.
    """
    if isinstance(target_modules, str) and target_modules != ALL_LINEAR:
        targets: list[str] = [target_modules]
        found = {target_modules: len(matched_modules(model, target_modules))}
    elif isinstance(target_modules, str):
        targets = [ALL_LINEAR]
        found = {ALL_LINEAR: len(linear_layers(model))}
    else:
        targets = list(target_modules)
        if not targets:
            raise TargetModuleError("target_modules is empty: name at least one layer, e.g. ['q_proj', 'v_proj'], "
                                    f"or {ALL_LINEAR!r}")
        base = _unwrap(model)
        names = [n for n, _ in base.named_modules() if n]
        found = {t: sum(_matches(n, t) for n in names) for t in targets}
    missing = [t for t in targets if found[t] == 0]
    if missing:
        model_type = getattr(getattr(_unwrap(model), "config", None), "model_type", "?")
        raise TargetModuleError(
            f"target module(s) {missing} match no layer of this {model_type!r} model; "
            f"{_describe_linear_layers(model)}. Available target names: {', '.join(linear_name_counts(model))}.")
    return found


# ------------------------------------------------------------------------------------------------ config
def build_lora_config(model: Any, r: int = 8, lora_alpha: float | None = None,
                      target_modules: str | Sequence[str] = ALL_LINEAR, lora_dropout: float = 0.0,
                      task_type: str = "CAUSAL_LM", **kwargs: Any) -> Any:
    """A peft ``LoraConfig`` for ``model`` with its values checked first, each error saying how to fix it.

    ``lora_alpha`` defaults to ``2 * r`` (scaling alpha/r = 2, see ``recommend_lora_rank``). Every target must
    match a layer (``check_target_modules``); when the targets are GPT-2-style ``Conv1D`` layers,
    ``fan_in_fan_out=True`` is set, since peft would otherwise build B @ A with the transposed shape.
    Other keyword arguments go to ``LoraConfig`` unchanged (``bias``, ``modules_to_save``, ``layers_to_transform``,
    ``trainable_token_indices``, ...).
    """
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r={r!r}: the LoRA rank must be a positive integer (the number of directions the update "
                         "may use). Start with r=8 or 16; recommend_lora_rank() explains the choice.")
    alpha = 2 * r if lora_alpha is None else lora_alpha
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"lora_alpha={lora_alpha!r}: alpha must be a positive number. The update is scaled by "
                         f"alpha/r, so alpha <= 0 disables or inverts it; use lora_alpha={2 * r} (2 x r).")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout={lora_dropout!r}: use a probability in [0, 1), e.g. 0.0 or 0.05")
    check_target_modules(model, target_modules)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    layers = linear_layers(model)
    hit = set(matched_modules(model, targets))
    conv_hit = any(isinstance(getattr(layers.get(n), "base_layer", layers.get(n)), Conv1D) for n in hit)
    if "fan_in_fan_out" not in kwargs and conv_hit:
        kwargs["fan_in_fan_out"] = True
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=lora_dropout, target_modules=targets,
                      task_type=task_type, **kwargs)


__all__ = [
    "ALL_LINEAR",
    "TARGETS_BY_ARCHITECTURE",
    "ArchitectureTargets",
    "TargetModuleError",
    "UnknownArchitectureError",
    "build_lora_config",
    "check_target_modules",
    "discover_targets",
    "linear_layers",
    "linear_name_counts",
    "matched_modules",
    "target_modules_for",
    "targets_for_architecture",
]
