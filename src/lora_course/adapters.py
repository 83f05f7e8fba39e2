"""Serving several LoRA adapters from one base model: a registry, per-row routing, combination and hot swap.

Implements:

- ``AdapterRegistry(model, tokenizer)``: the base is loaded once and every adapter is a few MB beside it.
  ``load`` checks the adapter against the base (files, architecture, layer shapes, rank, target modules) and
  raises ``AdapterCompatibilityError`` naming the mismatch; ``activate`` switches the active adapter; ``generate``
  routes each row of one batch to its own adapter (or ``"__base__"``); ``unload`` frees an adapter's memory;
  ``combine`` builds a weighted adapter through peft's ``add_weighted_adapter`` (linear, svd, cat);
  ``prepare_compiled_hotswap`` / ``hotswap`` replace an adapter's weights in place through peft's hotswap
  utilities, so a ``torch.compile``-d model does not recompile.
- ``python -m lora_course.adapters --build-course-adapters`` / ``--bench``: the course's task adapters
  (``lora_course.course_adapters``) and the chapter's speed targets (``lora_course.serving``, which also holds
  the noise floor, greedy comparison and task matrix that notebook 07 measures the registry with).

Two departures from plain peft, both measured in notebook 07 and the benchmark:

- ``activate`` writes the active adapter into a cached list of the model's LoRA layers instead of calling
  ``PeftModel.set_adapter``, which walks every module and flips ``requires_grad`` on every adapter's weights
  (milliseconds per call). The resulting state (``active_adapters`` of every layer, ``model.active_adapter``) is
  the same; serving keeps every adapter frozen, so the ``requires_grad`` flips have nothing to do.
- Mixed batches use a routed forward instead of peft's ``adapter_names`` hook: per LoRA layer, the A matrices of
  all routed adapters are stacked into one (sum of ranks x in) matrix and the scaled B matrices into one
  (out x sum of ranks) matrix, so every row costs two small matmuls and a 0/1 mask selects its own adapter's
  rank slice: ``base(x) + ((x @ A_all.T) * mask) @ B_all.T``. peft instead slices the batch per adapter in every
  layer. The idea of batching many LoRAs over one base is S-LoRA's and Punica's (arXiv 2311.03285, 2310.18547).

On a model loaded through Unsloth's ``FastLanguageModel`` (``is_unsloth_model``), Unsloth's fused kernels read the
single active adapter's A, B and scaling straight from each LoRA layer and never call the layer's forward, so a
routed forward would be bypassed. Every one of those kernels (``fast_linear_forward``, ``apply_lora_qkv``, ...) falls
back to calling the layer when it has several active adapters; while routing, the registry therefore marks the
routed adapters active together in every LoRA layer (restored afterwards), and the routed forward runs inside
Unsloth's prefill and decode steps too. ``lora_course.unsloth_serving`` measures all of this on a GPU.

Sources: peft ``tuners/lora/layer.py`` (``_mixed_batch_forward``), ``tuners/tuners_utils.py`` (``set_adapter``),
``utils/hotswap.py``; Unsloth 2026.10 ``kernels/utils.py`` (``get_lora_parameters``, ``fast_linear_forward``,
``_has_multiple_active_adapters``), ``models/llama.py`` (``LlamaModel_fast_forward_inference``).
"""
from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapters_io import (
    AdapterError,
    AdapterFilesError,
    AdapterMismatchError,
    check_adapter_compatible,
    check_adapter_files,
)

BASE = "__base__"
"""The routing name of the bare base model (no adapter), as in peft's ``adapter_names``."""
COMBINATION_TYPES = ("linear", "svd", "cat")


class AdapterRegistryError(ValueError):
    """A registry call cannot be done as asked (unknown or duplicate name, bad weights, ...); the message says why."""


class AdapterCompatibilityError(AdapterMismatchError):
    """An adapter does not fit the registry's base model (or another adapter); the message names the mismatch."""


# ============================================================================================== registry
@dataclass(frozen=True)
class AdapterInfo:
    """One loaded adapter: where it came from, its rank, targets and measured size."""

    name: str
    source: str                      # the folder it was loaded from, or how it was made (combine, hotswap)
    r: int                           # largest rank over its layers
    lora_alpha: float
    target_modules: tuple[str, ...]  # the short names of the layers it adapts (q_proj, ...)
    n_params: int
    bytes: int                       # its tensors in memory


@dataclass
class _Pack:
    """The stacked weights of one LoRA layer for one set of routed adapters."""

    A: Any             # (sum of ranks, in)
    B: Any             # (out, sum of ranks), each adapter's slice multiplied by its scaling
    layout: tuple[int, ...]  # rank of each routed adapter in this layer (0: the adapter skips this layer)


def _lora_layer_cls() -> type:
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def is_unsloth_model(model: Any) -> bool:
    """True when Unsloth patched this model's forward code (its fused kernels bypass module forwards)."""
    for m in model.modules():
        fwd = getattr(type(m), "forward", None)
        if getattr(fwd, "__module__", "").startswith("unsloth"):
            return True
    return False


class AdapterRegistry:
    """Several LoRA adapters served from one base model, switched per call or routed per batch row.

    The base model is held once; adapters are added with ``load`` (checked first, nothing half-loaded on error).
    The first adapter loaded becomes active, as in peft; ``activate(BASE)`` serves the bare base.
    """

    def __init__(self, model: Any, tokenizer: Any) -> None:
        from peft import PeftModel

        from .models import prepare_tokenizer

        if model is None or not hasattr(model, "forward"):
            raise AdapterRegistryError(f"AdapterRegistry needs a loaded model, got {type(model).__name__}: "
                                       "load one with lora_course.models.load_base(profile)")
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.peft_model: Any = model if isinstance(model, PeftModel) else None
        self.base: Any = model.get_base_model() if isinstance(model, PeftModel) else model
        self.unsloth = is_unsloth_model(self.base)
        self._info: dict[str, AdapterInfo] = {}
        self._layers: list[tuple[str, Any]] = []
        self._layer_dicts: list[dict[str, Any]] = []
        self._version = 0
        self._packs: dict[tuple[Any, ...], list[_Pack]] = {}
        self._active = BASE
        self._hotswap_rank: int | None = None
        if self.peft_model is not None:
            self._refresh_layers()
            for name in list(self.peft_model.peft_config):
                self._info[name] = self._describe(name, "adopted from the PeftModel passed in")
            self._active = self.peft_model.active_adapter

    # ------------------------------------------------------------------------------------------ state
    @property
    def model(self) -> Any:
        """The model to run: the PeftModel once an adapter is loaded, else the bare base."""
        return self.peft_model if self.peft_model is not None else self.base

    @property
    def names(self) -> list[str]:
        """Loaded adapter names, in load order."""
        return list(self._info)

    @property
    def active(self) -> str:
        """The adapter a plain forward or ``generate`` without ``adapter_names`` uses (``BASE``: none)."""
        return self._active

    def info(self, name: str) -> AdapterInfo:
        """What is known about loaded adapter ``name``."""
        self._require(name)
        return self._info[name]

    def _require(self, name: str, allow_base: bool = False) -> None:
        if allow_base and name == BASE:
            return
        if name not in self._info:
            raise AdapterRegistryError(f"unknown adapter name {name!r}: loaded are {self.names or 'none'}"
                                       + (f" (or {BASE!r} for the base model)" if allow_base else "")
                                       + "; load it first with registry.load(name, path)")

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or name == BASE or "." in name:
            raise AdapterRegistryError(f"adapter name {name!r} is not allowed: use a non-empty name without dots, "
                                       f"other than {BASE!r}, which means the bare base model")
        if name in self._info:
            raise AdapterRegistryError(f"an adapter named {name!r} is already loaded (from {self._info[name].source}): "
                                       f"choose another name, or registry.unload({name!r}) first, or replace its "
                                       f"weights in place with registry.hotswap({name!r}, path)")

    def _refresh_layers(self) -> None:
        cls = _lora_layer_cls()
        self._layers = [(n, m) for n, m in self.model.named_modules() if isinstance(m, cls)]
        self._layer_dicts = [m.__dict__ for _, m in self._layers]
        self._version += 1
        self._packs.clear()

    def _describe(self, name: str, source: str) -> AdapterInfo:
        n_params = nbytes = 0
        ranks, targets = [], set()
        for lname, layer in self._layers:
            if name not in layer.lora_A:
                continue
            ranks.append(int(layer.r[name]))
            targets.add(lname.rsplit(".", 1)[-1])
            for p in (*layer.lora_A[name].parameters(), *layer.lora_B[name].parameters()):
                n_params += p.numel()
                nbytes += p.numel() * p.element_size()
        cfg = self.peft_model.peft_config[name]
        return AdapterInfo(name, source, max(ranks, default=int(cfg.r)), float(cfg.lora_alpha),
                           tuple(sorted(targets)), n_params, nbytes)

    def adapter_layers(self, name: str) -> set[str]:
        """Full names of the layers adapter ``name`` adapts."""
        self._require(name)
        return {lname for lname, layer in self._layers if name in layer.lora_A}

    # -------------------------------------------------------------------------------------------- load
    def check(self, path: str | Path) -> dict[str, Any]:
        """The adapter's config after checking it fits this registry's base; ``AdapterCompatibilityError`` if not.

        Checks, in order: the folder holds ``adapter_config.json`` and safetensors weights (``AdapterFilesError``);
        it is a LoRA adapter; the architecture and every saved tensor's shape fit the base (the adapter for another
        base model is caught here); the rank in its config matches its weights; its target modules exist in the
        base; after ``prepare_compiled_hotswap(target_rank)``, its rank is at most ``target_rank``.
        """
        from .targets import check_target_modules

        folder = Path(path).expanduser()
        cfg = check_adapter_files(folder)
        if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
            raise AdapterCompatibilityError(f"{folder} holds a {cfg.get('peft_type')} adapter: the registry serves "
                                            "LoRA adapters only (peft_type LORA)")
        try:
            check_adapter_compatible(self.base, folder)
        except AdapterMismatchError as e:
            raise AdapterCompatibilityError(str(e)) from None
        from .adapters_io import _saved_shapes

        want = {int(cfg.get("r", 0)), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())}
        have = {s[0] for k, s in _saved_shapes(folder).items() if k.endswith(".lora_A.weight")}
        if have - want:
            raise AdapterCompatibilityError(
                f"{folder}: adapter_config.json says rank r={cfg.get('r')} but its weights have rank(s) "
                f"{sorted(have - want)}: the config and the weights come from different adapters; save it again")
        targets = cfg.get("target_modules")
        if targets:
            try:
                check_target_modules(self.base, targets if isinstance(targets, str) else sorted(targets))
            except ValueError as e:
                raise AdapterCompatibilityError(
                    f"{folder}: its target modules do not fit the base model: {e}") from None
        if self._hotswap_rank is not None and max(have, default=0) > self._hotswap_rank:
            raise AdapterCompatibilityError(
                f"{folder} has rank {max(have)}, above the target_rank={self._hotswap_rank} this registry was prepared "
                "for (prepare_compiled_hotswap): prepare a new registry with a larger target_rank")
        return cfg

    def load(self, name: str, path: str | Path) -> AdapterInfo:
        """Check the adapter at ``path`` against the base, then load it under ``name`` (frozen, for inference)."""
        from peft import PeftModel

        self._check_new_name(name)
        folder = Path(path).expanduser()
        self.check(folder)
        before = self.names
        try:
            if self.peft_model is None:
                self.peft_model = PeftModel.from_pretrained(self.base, str(folder), adapter_name=name,
                                                            is_trainable=False)
                self._active = name
            else:
                self.peft_model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        except Exception:
            self._discard_partial(name, before)
            raise
        self.peft_model.eval()
        self._refresh_layers()
        self._info[name] = self._describe(name, str(folder))
        if self._active != BASE:  # keep peft's state and the registry's in step
            self.activate(self._active)
        return self._info[name]

    def _discard_partial(self, name: str, before: list[str]) -> None:
        if self.peft_model is None:
            return
        if name in self.peft_model.peft_config:
            if not before:
                self.base = self.peft_model.unload()
                self.peft_model = None
            else:
                self.peft_model.delete_adapter(name)
        self._refresh_layers()

    def unload(self, name: str) -> int:
        """Delete adapter ``name`` and free its memory; returns the bytes its tensors held.

        Unloading the active adapter leaves the base active. Unloading the last adapter removes every LoRA layer
        (``PeftModel.unload``), so the registry holds the plain base model again.
        """
        self._require(name)
        freed = self._info[name].bytes
        if len(self._info) == 1:
            self.base = self.peft_model.unload()
            self.peft_model = None
        else:
            self.peft_model.delete_adapter(name)
        del self._info[name]
        self._refresh_layers()
        self._active = BASE if self._active == name else self._active
        if self.peft_model is not None:
            self.activate(self._active)
        gc.collect()
        return freed

    # ---------------------------------------------------------------------------------------- activate
    def activate(self, name: str) -> None:
        """Make ``name`` the adapter every forward uses (``BASE``: the bare base model).

        Same resulting state as peft's ``set_adapter(name, inference_mode=True)`` (every LoRA layer's
        ``active_adapters`` and ``model.active_adapter``), written into the cached list of LoRA layers instead of
        a walk over every module: see the module docstring.
        """
        self._require(name, allow_base=True)
        if self.peft_model is None:
            return  # nothing loaded: the base is all there is
        # Plain attributes, written straight into each layer's __dict__ (nn.Module.__setattr__ would first search
        # its parameter, buffer and module dicts: 3x slower here, for the same result).
        if name == BASE:  # peft's disable_adapter_layers: every LoRA layer returns its base output
            for d in self._layer_dicts:
                d["_disable_adapters"] = True
        else:
            active = [name]  # one list shared by every layer: peft copies before it edits it
            for d in self._layer_dicts:
                d["_disable_adapters"] = False
                d["_active_adapter"] = active
            self.peft_model.active_adapter = name  # peft keeps it in two places: the PeftModel and its tuner
            self.peft_model.base_model.active_adapter = name
        self._active = name

    def activate_with_peft(self, name: str) -> None:
        """``activate`` through peft's own ``set_adapter`` (for comparison: same state, slower)."""
        self._require(name)
        if self._active == BASE:
            self.peft_model.base_model.enable_adapter_layers()
        self.peft_model.set_adapter(name, inference_mode=True)
        self._active = name

    # ------------------------------------------------------------------------------------------ routing
    def _pack(self, names: tuple[str, ...]) -> list[_Pack]:
        key = (self._version, names)
        if key in self._packs:
            return self._packs[key]
        import torch

        packs = []
        for lname, layer in self._layers:
            if layer.merged:
                raise AdapterRegistryError(f"{lname} has merged adapters: unmerge them before routing rows")
            As, Bs, layout = [], [], []
            for n in names:
                if n not in layer.lora_A:
                    layout.append(0)
                    continue
                if layer.use_dora.get(n) or n in getattr(layer, "lora_variant", {}) or layer.lora_bias.get(n):
                    raise AdapterRegistryError(f"adapter {n!r} uses DoRA, a LoRA variant or a LoRA bias in {lname}: "
                                               "the routed forward handles plain LoRA only; call "
                                               "generate(..., engine='peft') or activate() per batch")
                a, b = layer.lora_A[n].weight, layer.lora_B[n].weight  # (r, in), (out, r)
                scale = layer.scaling[n]
                As.append(a.detach())
                Bs.append(b.detach() * (scale.detach() if torch.is_tensor(scale) else scale))
                layout.append(a.shape[0])
            if As:
                packs.append(_Pack(torch.cat(As, 0), torch.cat(Bs, 1), tuple(layout)))
            else:
                packs.append(_Pack(None, None, tuple(layout)))
        self._packs[key] = packs
        return packs

    @contextmanager
    def routed(self, adapter_names: Sequence[str]) -> Iterator[None]:
        """Within the block, row ``i`` of every batch goes through adapter ``adapter_names[i]`` (or ``BASE``).

        Works for any forward or ``generate`` without beam search (rows must stay in order). Every LoRA layer
        gets a forward computing ``base(x) + ((x @ A_all.T) * mask) @ B_all.T`` with the stacked weights of the
        adapters named (built once per set of names and cached until an adapter is loaded, unloaded or changed).
        """
        import torch
        import torch.nn.functional as F

        names = list(adapter_names)
        if not names:
            raise AdapterRegistryError("adapter_names is empty: give one name per prompt")
        for n in names:
            self._require(n, allow_base=True)
        if self.model.training:
            raise AdapterRegistryError("the model is in training mode: call registry.model.eval() before routing rows")
        unique = tuple(sorted(set(names) - {BASE}))
        if self.peft_model is None or not unique:
            with self._base_only():
                yield
            return
        packs = self._pack(unique)
        rows = torch.tensor([unique.index(n) if n != BASE else -1 for n in names])
        device = next(self.model.parameters()).device
        masks: dict[tuple[int, ...], Any] = {}
        for p in packs:
            if p.A is None or p.layout in masks:
                continue
            seg = torch.repeat_interleave(torch.arange(len(p.layout)), torch.tensor(p.layout))
            masks[p.layout] = (rows[:, None] == seg[None, :]).to(device=device, dtype=p.A.dtype)[:, None, :]
        n_rows = len(names)

        def make(layer: Any, pack: _Pack) -> Callable[..., Any]:
            base = layer.base_layer
            if pack.A is None:
                return base.forward
            A, B, mask = pack.A, pack.B, masks[pack.layout]

            def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
                result = base(x, *args, **kwargs)                       # (rows, T, out)
                if x.shape[0] != n_rows:
                    raise AdapterRegistryError(
                        f"a batch of {x.shape[0]} rows reached a routed layer set up for {n_rows} adapter_names: "
                        "give one name per prompt and no beam search / num_return_sequences")
                h = F.linear(x.to(A.dtype), A) * mask                   # (rows, T, sum of ranks)
                return result + F.linear(h, B).to(result.dtype)         # (rows, T, out)
            return forward

        layers = [layer for _, layer in self._layers]
        try:
            for layer, pack in zip(layers, packs):
                layer.forward = make(layer, pack)
            with self._unsloth_calls_layers(unique):
                yield
        finally:
            for layer in layers:
                layer.__dict__.pop("forward", None)

    @contextmanager
    def _unsloth_calls_layers(self, names: Sequence[str]) -> Iterator[None]:
        """On an Unsloth model: make its fused kernels call each LoRA layer's forward instead of reading one adapter.

        Unsloth's fast paths (``fast_linear_forward``, ``apply_lora_qkv``, ``apply_lora_o``, the MLP kernels) hand the
        work back to ``layer(x)`` when a layer has more than one active adapter; the routed forward (or peft's
        mixed-batch forward) then serves each row. The layers' previous state is restored on exit. A no-op elsewhere.
        """
        if not self.unsloth or self.peft_model is None:
            yield
            return
        routed = list(names) if len(names) > 1 else [names[0], names[0]]  # any list of two or more names
        saved = [(d.get("_active_adapter"), d.get("_disable_adapters")) for d in self._layer_dicts]
        for d in self._layer_dicts:
            d["_disable_adapters"] = False
            d["_active_adapter"] = routed
        try:
            yield
        finally:
            for d, (active, disabled) in zip(self._layer_dicts, saved):
                d["_active_adapter"], d["_disable_adapters"] = active, disabled

    @contextmanager
    def _base_only(self) -> Iterator[None]:
        previous = self._active
        self.activate(BASE)
        try:
            yield
        finally:
            self.activate(previous)

    # ----------------------------------------------------------------------------------------- generate
    def encode(self, prompts: Sequence[str | list[dict[str, str]]]) -> Any:
        """Left-padded token batch of prompts: strings as given, conversations through the chat template."""
        if isinstance(prompts, (str, dict)) or not len(prompts):
            raise AdapterRegistryError("prompts must be a non-empty list of strings or of chat conversations")
        texts = [p if isinstance(p, str) else
                 self.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        self.tokenizer.padding_side = "left"
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return batch.to(next(self.model.parameters()).device)

    def generate(self, prompts: Sequence[str | list[dict[str, str]]], adapter_names: Sequence[str] | None = None,
                 engine: str = "routed", **gen_kwargs: Any) -> list[str]:
        """Greedy replies to ``prompts`` (strings as given, or chat conversations), one batch.

        ``adapter_names=None``: every row uses the active adapter. Otherwise one name per prompt (``BASE`` for
        the bare base): ``engine="routed"`` runs the stacked-weights forward of ``routed``; ``engine="peft"``
        passes the names to peft's own mixed-batch ``generate`` (for comparison).
        """
        batch, ids = self._generate(prompts, adapter_names, engine, **gen_kwargs)
        new = ids[:, batch["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def _generate(self, prompts: Sequence[str | list[dict[str, str]]], adapter_names: Sequence[str] | None = None,
                  engine: str = "routed", **gen_kwargs: Any) -> tuple[Any, Any]:
        """``(encoded batch, model.generate's output)`` for ``generate`` and ``greedy_tokens``."""
        import torch

        if adapter_names is not None and len(adapter_names) != len(prompts):
            raise AdapterRegistryError(f"{len(adapter_names)} adapter_names for {len(prompts)} prompts: give exactly "
                                       "one name per prompt")
        if engine not in ("routed", "peft"):
            raise AdapterRegistryError(f"engine={engine!r}: choose 'routed' or 'peft'")
        batch = self.encode(prompts)
        kwargs = {"do_sample": False, "max_new_tokens": 32, "pad_token_id": self.tokenizer.pad_token_id, **gen_kwargs}
        self.model.eval()
        with torch.inference_mode():
            if adapter_names is None:
                out = self.model.generate(**batch, **kwargs)
            elif engine == "peft":
                for n in adapter_names:
                    self._require(n, allow_base=True)
                if self.peft_model is None:
                    raise AdapterRegistryError("engine='peft' needs at least one loaded adapter")
                with self._unsloth_calls_layers(sorted(set(adapter_names) - {BASE}) or self.names[:1]):
                    out = self.peft_model.generate(**batch, adapter_names=list(adapter_names), **kwargs)
            else:
                with self.routed(adapter_names):
                    out = self.model.generate(**batch, **kwargs)
        return batch, out

    def next_token_logits(self, prompts: Sequence[str | list[dict[str, str]]],
                          adapter_names: Sequence[str] | None = None) -> Any:
        """Logits of the next token after each prompt, shape (rows, vocab): for exact comparisons of routes.

        Positions are counted from each row's first real token (as ``generate`` does), so a row's logits do not
        depend on how much left padding its batch needed.
        """
        import torch

        batch = self.encode(prompts)
        pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        self.model.eval()
        with torch.inference_mode():
            if adapter_names is None:
                return self.model(**batch, position_ids=pos).logits[:, -1].float()
            if len(adapter_names) != len(prompts):
                raise AdapterRegistryError(f"{len(adapter_names)} adapter_names for {len(prompts)} prompts")
            with self.routed(adapter_names):
                return self.model(**batch, position_ids=pos).logits[:, -1].float()

    # ------------------------------------------------------------------------------------------ combine
    def combine(self, new_name: str, names: Sequence[str], weights: Sequence[float],
                combination_type: str = "linear", svd_rank: int | None = None) -> AdapterInfo:
        """A new adapter ``new_name`` = the weighted combination of loaded adapters (peft ``add_weighted_adapter``).

        ``cat`` stacks the adapters (rank = sum of ranks): its update is exactly sum(w_i * B_i A_i). ``svd`` forms
        that sum and keeps its top ``svd_rank`` singular directions (default: the largest rank). ``linear`` adds
        the A's and the B's separately (each scaled by sqrt(w)), which also creates cross terms B_i A_j: cheap,
        approximate, and only defined for equal ranks. Every input must adapt the same layers.
        """
        self._check_new_name(new_name)
        names = list(names)
        if not names:
            raise AdapterRegistryError("combine needs at least one adapter name")
        for n in names:
            self._require(n)
        if len(weights) != len(names):
            raise AdapterRegistryError(f"{len(weights)} weights for {len(names)} adapters: give one weight each")
        if combination_type not in COMBINATION_TYPES:
            raise AdapterRegistryError(f"combination_type={combination_type!r}: choose one of {COMBINATION_TYPES}")
        layers = {n: self.adapter_layers(n) for n in names}
        first = names[0]
        for n in names[1:]:
            if layers[n] != layers[first]:
                only_a, only_b = sorted(layers[first] - layers[n]), sorted(layers[n] - layers[first])
                raise AdapterCompatibilityError(
                    f"cannot combine {first!r} and {n!r}: they adapt different layers (targets "
                    f"{self._info[first].target_modules} vs {self._info[n].target_modules}; only in {first!r}: "
                    f"{only_a[:3]}{'...' if len(only_a) > 3 else ''}; only in {n!r}: {only_b[:3]}"
                    f"{'...' if len(only_b) > 3 else ''}). Combine adapters trained with the same target_modules.")
        ranks = {n: self._info[n].r for n in names}
        if combination_type == "linear" and len(set(ranks.values())) > 1:
            raise AdapterCompatibilityError(
                f"combination_type='linear' needs equal ranks, got {ranks}: use combination_type='cat' (rank = sum) "
                "or 'svd' (rank = svd_rank), which accept different ranks")
        self.peft_model.add_weighted_adapter(adapters=names, weights=[float(w) for w in weights],
                                             adapter_name=new_name, combination_type=combination_type,
                                             svd_rank=svd_rank)
        self._refresh_layers()
        for _, layer in self._layers:  # serving: the new adapter stays frozen like the loaded ones
            if new_name in layer.lora_A:
                layer.lora_A[new_name].requires_grad_(False)
                layer.lora_B[new_name].requires_grad_(False)
        desc = f"combine({combination_type}: " + ", ".join(f"{w:g} x {n}" for n, w in zip(names, weights)) + ")"
        self._info[new_name] = self._describe(new_name, desc)
        self.activate(self._active)
        return self._info[new_name]

    def combination_error(self, new_name: str, names: Sequence[str], weights: Sequence[float]) -> float:
        """How far ``new_name``'s weight update is from sum(w_i * dW_i): relative Frobenius error over all layers."""
        import torch

        num = den = 0.0
        with torch.no_grad():
            for _, layer in self._layers:
                if new_name not in layer.lora_A:
                    continue
                target = sum(w * layer.get_delta_weight(n) for n, w in zip(names, weights))
                num += float((layer.get_delta_weight(new_name) - target).pow(2).sum())
                den += float(target.pow(2).sum())
        return (num / den) ** 0.5 if den else 0.0

    # ------------------------------------------------------------------------------------------- hot swap
    def prepare_compiled_hotswap(self, target_rank: int) -> None:
        """Pad every loaded adapter to ``target_rank`` and turn scalings into tensors, before ``torch.compile``.

        Then ``hotswap`` can replace an adapter's weights (any rank up to ``target_rank``, any alpha) without the
        compiled graph seeing a new shape or constant, so nothing recompiles (peft
        ``prepare_model_for_compiled_hotswap``).
        """
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        if self.peft_model is None:
            raise AdapterRegistryError("load the adapter to swap into first: "
                                       "prepare_compiled_hotswap pads loaded adapters")
        ranks = {n: i.r for n, i in self._info.items()}
        if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank < max(ranks.values()):
            raise AdapterRegistryError(f"target_rank={target_rank!r} must be an integer >= the largest loaded rank "
                                       f"({ranks}) and >= every adapter you will swap in")
        prepare_model_for_compiled_hotswap(self.peft_model, target_rank=target_rank, config=self.peft_model.peft_config)
        self._hotswap_rank = target_rank
        self._version += 1
        self._packs.clear()
        for name in self.names:
            self._info[name] = self._describe(name, self._info[name].source)

    def hotswap(self, name: str, path: str | Path) -> AdapterInfo:
        """Replace loaded adapter ``name``'s weights in place with those at ``path`` (peft ``hotswap_adapter``).

        The adapter must adapt the same layers. Parameters keep their identity and shape, so a compiled model
        prepared with ``prepare_compiled_hotswap`` runs the new adapter without recompiling.
        """
        from peft.utils.hotswap import hotswap_adapter

        self._require(name)
        folder = Path(path).expanduser()
        cfg = self.check(folder)
        clash = [n for n in self.names if n != name and name in n]
        if clash:
            raise AdapterRegistryError(f"cannot hot-swap {name!r} while {clash} are loaded: peft's hotswap finds an "
                                       "adapter's tensors by substring, so no other name may contain it; unload them")
        wanted = {t.rsplit(".", 1)[-1] for t in (cfg.get("target_modules") or [])}
        if wanted and set(self._info[name].target_modules) != wanted:
            raise AdapterCompatibilityError(f"cannot hot-swap {folder} into {name!r}: it targets {sorted(wanted)}, "
                                            f"{name!r} targets {list(self._info[name].target_modules)}; load it as a "
                                            "new adapter instead")
        previous = self._active
        self.activate(name)  # peft checks the swapped-in config against the active adapter's
        try:
            hotswap_adapter(self.peft_model, str(folder), adapter_name=name,
                            torch_device=str(next(self.model.parameters()).device))
        except (ValueError, RuntimeError) as e:
            raise AdapterCompatibilityError(f"cannot hot-swap {folder} into {name!r}: {e}") from None
        finally:
            self.activate(previous)
        self._version += 1
        self._packs.clear()
        self._info[name] = self._describe(name, f"{folder} (hot-swapped)")
        return self._info[name]


# =============================================================================================== CLI
def main(argv: list[str] | None = None) -> int:
    from .course_adapters import course_adapter
    from .data import TASKS, load_task, prompt_messages
    from .models import PROFILES, load_base
    from .serving import bench

    parser = argparse.ArgumentParser(description="Course adapters (build once) and the multi-adapter benchmark.")
    parser.add_argument("--build-course-adapters", action="store_true", help="train and cache the task adapters")
    parser.add_argument("--bench", action="store_true", help="measure activate latency and mixed-batch throughput")
    parser.add_argument("--profile", default="cpu", choices=PROFILES)
    parser.add_argument("--model-id", default=None)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--rows", type=int, default=2, help="bench: prompts per adapter in the batch")
    parser.add_argument("--new-tokens", type=int, default=64, help="bench: tokens generated per row")
    parser.add_argument("--repeats", type=int, default=2, help="bench: timed repeats (the median is kept)")
    args = parser.parse_args(argv)
    if not (args.build_course_adapters or args.bench):
        parser.error("choose --build-course-adapters and/or --bench")
    model, tok = load_base(args.profile, args.model_id)
    built = {}
    for task in args.tasks:
        ca = course_adapter(task, model, tok, log_every=5)
        built[task] = ca
        how = f"trained now in {ca.seconds:.0f} s" if ca.trained_now else f"cached (trained in {ca.seconds:.0f} s)"
        print(f"{task:10s} {ca.path}  {how}, loss {ca.losses[0]:.3f} -> {ca.losses[-1]:.3f}")
    if not args.bench:
        return 0
    registry = AdapterRegistry(model, tok)
    for task, ca in built.items():
        registry.load(task, ca.path)
    prompts = {t: [prompt_messages(ex) for ex in load_task(t, "eval")[:args.rows]] for t in built}
    r = bench(registry, prompts, new_tokens=args.new_tokens, repeats=args.repeats)
    ok_act, ok_tp = r["activate_ms"] <= 5.0, r["ratio"] >= 2.0
    print(f"device {registry.model.device}, torch threads {__import__('torch').get_num_threads()}")
    print(f"activate (registry)              {r['activate_ms']:8.3f} ms   target <= 5 ms   "
          f"{'PASS' if ok_act else 'FAIL'}")
    print(f"peft set_adapter (for reference) {r['peft_set_adapter_ms']:8.3f} ms")
    print(f"{len(built)} adapters x {args.rows} rows, {args.new_tokens} new tokens each:")
    for label, key in (("mixed batch (routed)", "mixed_s"), ("sequential, peft forward", "sequential_s"),
                       ("sequential, routed forward", "sequential_routed_s"),
                       ("mixed batch (peft adapter_names)", "peft_mixed_s")):
        print(f"  {label:34s} {r[key]:7.2f} s  {r['rows'] * args.new_tokens / r[key]:7.1f} tokens/s")
    print(f"mixed / sequential throughput    {r['ratio']:8.2f}x   target >= 2x     {'PASS' if ok_tp else 'FAIL'}"
          f"   (peft's mixed batch: {r['peft_ratio']:.2f}x)")
    return 0 if ok_act and ok_tp else 1


__all__ = ["BASE", "COMBINATION_TYPES", "AdapterCompatibilityError", "AdapterError", "AdapterFilesError",
           "AdapterInfo", "AdapterRegistry", "AdapterRegistryError", "is_unsloth_model"]

if __name__ == "__main__":
    sys.exit(main())
