"""LoRA from scratch: a low-rank adapter around ``nn.Linear``, written to match peft's numbers exactly.

Implements the method of Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"
(arXiv:2106.09685), and its rank-stabilised scaling rsLoRA (Kalajdzievski 2023, arXiv:2312.03732), following
peft's ``src/peft/tuners/lora/layer.py`` (``LoraLayer.update_layer``, ``reset_lora_parameters``,
``Linear.forward``/``merge``/``unmerge``/``get_delta_weight``) so that notebook 01's tests can compare the two
layer by layer.

A frozen weight ``W`` (out x in) gets a trainable update ``ΔW = scaling · B @ A`` with ``A`` (r x in) and ``B``
(out x r), ``scaling = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA)::

    y = x W^T + b + scaling · (dropout(x) A^T) B^T

``A`` starts Kaiming-uniform (as ``nn.Linear`` does) and ``B`` at zero, so ``ΔW = 0`` and the wrapped model is
exactly the base model until the first optimiser step; because ``A`` is not zero, ``B`` receives a gradient at
once. Merging folds ``ΔW`` into ``W``, which removes every extra operation at inference.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .targets import ALL_LINEAR  # peft's keyword for "every Linear layer but the output head"


class LoRAPair(nn.Module):
    """The trainable half of a LoRA layer: ``A`` (r x in), ``B`` (out x r), ``scaling``, dropout, and the update.

    The one implementation of the pair, shared by ``LoRALinear`` (a frozen ``nn.Linear``) and
    ``nf4.QLoRALinear`` (a frozen NF4 weight): a subclass holds its frozen base, calls ``init_lora_pair`` in its
    constructor and ``add_lora_update(x, result)`` at the end of its forward. The names (``lora_A``, ``lora_B``,
    ``lora_dropout``, ``scaling``, ``r``, ``alpha``) are peft's, so state-dict keys read alike::

        y = result + scaling · (dropout(x) A^T) B^T,   ΔW = scaling · B @ A,   result = the base layer's output

    ``scaling = alpha / r`` (Hu et al.), or ``alpha / sqrt(r)`` with rsLoRA: Hu et al. keep alpha fixed (scale
    alpha / r); rsLoRA (Kalajdzievski 2023) shows each step's change to delta W then shrinks like 1/sqrt(r), and
    alpha / sqrt(r) keeps it the same for every r (notebook 01 measures both, and alpha = 2r, whose step grows like
    sqrt(r)).

    ``A`` starts Kaiming-uniform and ``B`` at zero (``reset_lora_parameters`` says why), so the layer starts exactly
    equal to its base. Adapters of a half-precision base are kept in float32 (``adapter_dtype``).
    """

    r: int
    alpha: float
    use_rslora: bool
    scaling: float
    lora_dropout: nn.Module
    lora_A: nn.Parameter
    lora_B: nn.Parameter

    @staticmethod
    def adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
        """float32 for a float16/bfloat16 base, else the base's dtype (peft's ``autocast_adapter_dtype``).

        Why: small updates to bf16 factors would round away. The forward casts the input to this dtype and the
        result back.
        """
        return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype

    def init_lora_pair(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                       use_rslora: bool, weight_dtype: torch.dtype, device: torch.device | str | None) -> None:
        """Create ``lora_dropout``, ``lora_A`` and ``lora_B`` (in ``adapter_dtype(weight_dtype)`` on ``device``) and
        initialise them; call after ``nn.Module.__init__``."""
        if r <= 0:
            raise ValueError(f"the rank r must be a positive integer, got {r}")
        self.r = int(r)
        self.alpha = float(alpha)
        self.use_rslora = use_rslora
        self.scaling = self.alpha / math.sqrt(self.r) if use_rslora else self.alpha / self.r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": device, "dtype": self.adapter_dtype(weight_dtype)}
        self.lora_A = nn.Parameter(torch.empty(self.r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, self.r, **factory))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """peft's default: ``A`` Kaiming-uniform with a=sqrt(5) (``nn.Linear``'s own init), ``B`` zeros.

        One zero factor makes ``ΔW = B @ A = 0`` at the start; only one, because with both at zero neither gets a
        gradient (dL/dA = B^T · ... and dL/dB = ... · A^T would both be zero).
        """
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """``ΔW = scaling · B @ A``, shaped like the base weight (out x in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def add_lora_update(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result + scaling · (dropout(x) A^T) B^T``, in ``result``'s dtype.

        Two thin matmuls (x A^T, then · B^T) instead of materialising ΔW: O(r·(in+out)) per token. ``x`` is cast to
        the adapters' dtype; the sum is formed in the adapters' precision and rounded once (as peft).
        """
        x = x.to(self.lora_A.dtype)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling
        return (result + update).to(result.dtype)


class LoRALinear(LoRAPair):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``scaling · B @ A`` (peft's ``lora.Linear``).

    The pair itself (init, scaling, dtype, update) is ``LoRAPair``'s. The wrapped layer is kept as ``base_layer``
    (peft's name, so state-dict keys read alike). ``merge()`` adds ``ΔW`` into the base weight and sets ``merged``;
    while merged, ``forward`` is the base layer alone, so the update is never applied twice. ``unmerge()``
    subtracts it again.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear layers, got {type(base).__name__}")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.init_lora_pair(base.in_features, base.out_features, r, alpha, dropout, use_rslora,
                            base.weight.dtype, base.weight.device)
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (merged or not), so code that reads ``layer.weight`` keeps working."""
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        return self.add_lora_update(x, result)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``ΔW`` into the base weight (``W += ΔW``) so inference costs exactly one matmul."""
        if self.merged:
            return
        w = self.base_layer.weight
        w += self.delta_weight().to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge()`` (``W -= ΔW``), e.g. to keep training or to switch adapters."""
        if not self.merged:
            return
        w = self.base_layer.weight
        w -= self.delta_weight().to(w.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:g}, rslora={self.use_rslora}, merged={self.merged}")


# ---------------------------------------------------------------------------------------------- models
def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct name suffixes of the model's plain ``nn.Linear`` layers (``q_proj``, ``lm_head``...).

    These are the valid targets; layers already wrapped in ``LoRALinear`` are left out.
    """
    wrapped = {f"{n}.base_layer" for n, _ in lora_layers(model)}
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and n not in wrapped})


def _matches(name: str, target: str) -> bool:
    # peft's rule: the full module name equals the target or ends with "." + target.
    return name == target or name.endswith("." + target)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """``(name, layer)`` for every ``LoRALinear`` in the model."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def add_lora_to_model(model: nn.Module, target_modules: Sequence[str] | str, r: int, alpha: float,
                      dropout: float = 0.0, use_rslora: bool = False) -> nn.Module:
    """Wrap the targeted ``nn.Linear`` layers in ``LoRALinear`` in place and freeze every other base parameter.

    Targets match by module-name suffix, as in peft: ``["q_proj", "v_proj"]`` wraps every layer's query and
    value projections; ``"all-linear"`` wraps every linear layer except the output head (peft's shortcut).
    Every target must match at least one layer: a typo would otherwise silently train nothing, so the
    ``ValueError`` lists the names that do exist. Returns the model (the same object).
    """
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if target_modules == ALL_LINEAR:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        chosen = [n for n, m in candidates if m is not head]
        missing: list[str] = [] if chosen else [ALL_LINEAR]
    else:
        targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        if not targets:
            raise ValueError("target_modules is empty: name at least one linear layer, e.g. ['q_proj', 'v_proj']")
        chosen = [n for n, _ in candidates if any(_matches(n, t) for t in targets)]
        missing = [t for t in targets if not any(_matches(n, t) for n, _ in candidates)]
    if missing:
        wrapped = sorted({n.rsplit(".", 1)[-1] for n, _ in lora_layers(model)})
        raise ValueError(
            f"target module(s) {missing} match no nn.Linear layer of {type(model).__name__}. Its Linear layers "
            f"are: {linear_layer_names(model)}" + (f"; already wrapped by LoRA: {wrapped}" if wrapped else ""))
    for name, p in model.named_parameters():  # freeze the base; adapters added earlier stay trainable
        if not name.endswith((".lora_A", ".lora_B")):
            p.requires_grad_(False)
    for name in chosen:
        _set_module(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout, use_rslora))
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (``...lora_A``, ``...lora_B``): what you save and share, a few MB, not the model."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}


@torch.no_grad()
def merge_lora_weights(model: nn.Module) -> nn.Module:
    """Replace every ``LoRALinear`` by its base ``nn.Linear`` holding ``W + scaling · B @ A``; returns the model.

    The result is a plain model of the original architecture (same class, same state-dict keys as the base),
    so it saves, loads and runs with no LoRA code and no extra inference cost.
    """
    for name, layer in list(lora_layers(model)):
        layer.merge()
        _set_module(model, name, layer.base_layer)
    return model


def count_lora_params(model_or_in_features: nn.Module | int, out_features: int | None = None,
                      r: int | None = None) -> int:
    """Trainable LoRA parameters: of a model's ``LoRALinear`` layers, or of one layer given its shape.

    ``count_lora_params(model)`` sums ``A`` and ``B`` over the model; ``count_lora_params(in, out, r)`` is the
    formula ``r · (in + out)`` (A is r x in, B is out x r) against ``in · out`` for the full weight.
    """
    if isinstance(model_or_in_features, nn.Module):
        return sum(m.lora_A.numel() + m.lora_B.numel() for _, m in lora_layers(model_or_in_features))
    if out_features is None or r is None:
        raise TypeError("count_lora_params(in_features, out_features, r) needs all three numbers")
    return int(r) * (int(model_or_in_features) + int(out_features))


__all__ = ["ALL_LINEAR", "LoRALinear", "LoRAPair", "add_lora_to_model", "count_lora_params", "linear_layer_names",
           "lora_layers", "lora_state_dict", "merge_lora_weights"]
