"""Notebook 05's SFT recipe: one builder that picks the backend and the ``SFTConfig`` defaults for the hardware.

Implements:

- ``Hardware`` / ``detect_hardware``: what the recipe needs to know about the machine (a plain dataclass, so tests
  and notebooks can describe an H100, a T4 or a laptop without having one);
- ``choose_backend``: Unsloth's ``FastLanguageModel`` when a CUDA GPU (compute capability >= 7.0) and unsloth are
  present, transformers + peft otherwise, always with the reason, printed by the notebooks;
- ``build_recipe`` -> ``SFTRecipe``: precision, optimizer, batch and accumulation, gradient checkpointing, 4-bit
  loading and the batching (padded, padding-free or packed), each with the reason it was chosen; the same LoRA
  hyperparameters for both backends; ``SFTRecipe.sft_config`` turns it into a ``trl.SFTConfig``;
- ``load_for_sft``: the model and tokenizer with LoRA adapters through the chosen backend;
- ``make_trainer``: a ``trl.SFTTrainer`` (TRL's fused LM-head loss where Triton runs, the model's own cross-entropy
  otherwise; with fp16, the trainable parameters back in fp32); ``unsloth_token_budget`` and ``import_unsloth`` for
  the Unsloth backend.

The data it trains on (Alpaca records as messages, prompt-completion, the chat template with ``{% generation %}``
markers, length checks, the labelled-token view) is in ``lora_course.chat_format``.

Sources: TRL 1.15 ``SFTConfig``/``SFTTrainer`` (``padding_free``, ``packing_strategy="bfd"``, ``assistant_only_loss``,
``completion_only_loss``); Unsloth 2026.10 ``FastLanguageModel.from_pretrained``/``get_peft_model`` (it auto-enables
padding-free batching in ``SFTTrainer``); transformers 5.x builds a block-diagonal causal mask from ``position_ids``
when no attention mask is passed, which keeps flattened sequences from attending to each other with sdpa too.
"""
from __future__ import annotations

import contextlib
import importlib.metadata as md
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from .shapes import ALL_LINEAR  # a Llama block's seven projections, by name

BACKENDS: tuple[str, ...] = ("auto", "unsloth", "transformers")
BATCHING: tuple[str, ...] = ("padded", "padding_free", "packed")
UNSLOTH_INSTALL = 'pip install "lora-course[gpu]"  (unsloth==2026.10.9)'


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine; the message says why and what to use instead."""


# -------------------------------------------------------------------------------------------- hardware
@dataclass(frozen=True)
class Hardware:
    """The machine as the recipe sees it. Build one by hand to ask "what would the recipe do on an H100?"."""

    device: str  # "cuda" or "cpu"
    name: str  # e.g. "NVIDIA H100 80GB HBM3", or "cpu"
    memory_gib: float  # GPU memory on cuda, system RAM on cpu
    bf16: bool = False  # native bf16 matmuls (Ampere and newer)
    compute_capability: tuple[int, int] | None = None
    unsloth_version: str | None = None  # installed unsloth (not imported: importing it needs a GPU), or None

    def __post_init__(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")
        if not (isinstance(self.memory_gib, (int, float)) and self.memory_gib > 0):
            raise ValueError(f"memory_gib must be a positive number of GiB, got {self.memory_gib!r}")
        if self.device == "cpu" and self.bf16:
            raise ValueError("bf16=True describes a GPU with bf16 tensor cores; on cpu the course trains in fp32")


def installed_version(package: str) -> str | None:
    """The installed version of ``package`` (found without importing it), or None."""
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def detect_hardware() -> Hardware:
    """Describe this machine as the course decides from it (``hardware.gpu_info``): the current CUDA GPU if there
    is one, else the CPU and its RAM.

    bf16 means native bf16 (compute capability >= 8.0), not ``torch.cuda.is_bf16_supported()`` (True on a T4,
    whose bf16 is emulated); under ``LORA_COURSE_EMULATE=t4`` this is a T4's capability and 15 GiB.
    """
    from .env import memory_gib
    from .hardware import gpu_info

    unsloth = installed_version("unsloth")
    gpu = gpu_info()
    if gpu.available:
        return Hardware("cuda", gpu.name, round(gpu.memory_gib, 1), gpu.native_bf16, gpu.capability, unsloth)
    return Hardware("cpu", "cpu", round(memory_gib().get("total", 8.0), 1), False, None, unsloth)


def hardware_for_profile(profile: str) -> Hardware:
    """The hardware a notebook profile trains on: this machine for gpu/colab/kaggle, the CPU for cpu/tiny."""
    from .env import memory_gib
    from .models import resolve_profile

    profile = resolve_profile(profile)
    if profile in ("cpu", "tiny"):
        return Hardware("cpu", "cpu", round(memory_gib().get("total", 8.0), 1), False, None,
                        installed_version("unsloth"))
    return detect_hardware()


# --------------------------------------------------------------------------------------------- backend
@dataclass(frozen=True)
class BackendChoice:
    """Which training stack runs, and why."""

    name: str  # "unsloth" or "transformers"
    reason: str

    def __str__(self) -> str:
        stack = "Unsloth FastLanguageModel" if self.name == "unsloth" else "transformers + peft"
        return f"backend: {stack} ({self.reason})"


def choose_backend(hw: Hardware, requested: str = "auto") -> BackendChoice:
    """Unsloth when asked or when ``auto`` finds a CUDA GPU of compute capability >= 7.0 and unsloth installed.

    Unsloth's kernels are Triton/CUDA code: on a CPU (or a pre-Volta GPU) it cannot run, so ``auto`` falls back to
    transformers + peft with the same LoRA hyperparameters, and an explicit ``"unsloth"`` raises with the fix.
    """
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}: choose one of {', '.join(BACKENDS)}")
    if requested == "transformers":
        return BackendChoice("transformers", "asked for explicitly")
    problem = None
    if hw.device != "cuda":
        problem = "no CUDA GPU here, and Unsloth's Triton kernels need one"
    elif hw.compute_capability is not None and hw.compute_capability < (7, 0):
        problem = f"{hw.name} has compute capability {hw.compute_capability[0]}.{hw.compute_capability[1]} < 7.0"
    elif hw.unsloth_version is None:
        problem = f"unsloth is not installed ({UNSLOTH_INSTALL})"
    if problem is None:
        return BackendChoice("unsloth", f"{hw.name} with CUDA and unsloth {hw.unsloth_version} found")
    if requested == "unsloth":
        raise BackendUnavailableError(f"backend='unsloth' cannot run: {problem}. Use backend='auto' (which falls "
                                      "back to transformers + peft) or backend='transformers'.")
    return BackendChoice("transformers", f"{problem}: the same recipe runs through transformers + peft")


# ---------------------------------------------------------------------------------------------- recipe
@dataclass(frozen=True)
class SFTRecipe:
    """Every choice of an SFT run in one place, with the reason for each hardware-dependent one."""

    backend: str
    precision: str  # bf16 | fp16 | fp32
    optim: str  # a TrainingArguments optimizer name
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    load_in_4bit: bool
    batching: str  # padded | padding_free | packed
    max_length: int
    learning_rate: float
    r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: tuple[str, ...]
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    def describe(self) -> str:
        """A table of the settings and why each was chosen."""
        rows = [(k, v) for k, v in asdict(self).items() if k != "reasons"]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v!s:<24} {self.reasons.get(k, '')}".rstrip() for k, v in rows)

    def sft_kwargs(self, output_dir: str, max_steps: int, seed: int = 0, **overrides: Any) -> dict[str, Any]:
        """The ``trl.SFTConfig`` arguments of this recipe; ``overrides`` win (e.g. ``logging_steps``).

        TRL's own defaults assume a GPU (``bf16=True``, ``gradient_checkpointing=True``): both are set explicitly here,
        ``fp16``/``bf16`` from the recipe's precision (``hardware.train_precision``), which Unsloth's trainer checks
        against the model's dtype. Padding-free batches without packing cannot be truncated by TRL, so ``max_length``
        is then left to the data (cut it first; ``chat_format.check_lengths`` says whether it is).
        """
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps <= 0:
            raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
        kw: dict[str, Any] = {
            "output_dir": output_dir, "max_steps": max_steps, "seed": seed, "learning_rate": self.learning_rate,
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "bf16": self.precision == "bf16", "fp16": self.precision == "fp16", "optim": self.optim,
            "gradient_checkpointing": self.gradient_checkpointing,
            "gradient_checkpointing_kwargs": {"use_reentrant": False} if self.gradient_checkpointing else None,
            "max_length": self.max_length, "packing": self.batching == "packed", "packing_strategy": "bfd",
            "padding_free": self.batching == "padding_free", "lr_scheduler_type": "constant", "warmup_steps": 0,
            "weight_decay": 0.0, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
            "dataloader_num_workers": 0,
        }
        if self.batching == "padding_free":
            # TRL refuses padding_free + max_length without packing (its collator cannot truncate), and Unsloth turns
            # padding-free off for pre-tokenized data that carries a max_length: the data is cut first
            # (chat_format.check_lengths).
            kw["max_length"] = None
        kw.update(overrides)
        return kw

    def sft_config(self, output_dir: str, max_steps: int, seed: int = 0, **overrides: Any) -> Any:
        """``trl.SFTConfig(**self.sft_kwargs(...))`` on one GPU (``hardware.single_device``: no DataParallel on
        Kaggle's 2x T4); transformers checks there that the hardware has the precision."""
        from trl import SFTConfig

        from .hardware import single_device

        return single_device(SFTConfig(**self.sft_kwargs(output_dir, max_steps, seed, **overrides)))

    def lora_kwargs(self) -> dict[str, Any]:
        """The LoRA hyperparameters, shared by both backends."""
        return {"r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
                "target_modules": list(self.target_modules), "bias": "none"}


def _per_device_batch(hw: Hardware, effective: int) -> int:
    """Largest per-device batch (a divisor of ``effective``) within a memory-based cap, so accumulation is exact."""
    cap = effective if hw.device == "cpu" else 2 if hw.memory_gib < 20 else 4 if hw.memory_gib < 48 else 8
    return max(d for d in range(1, min(cap, effective) + 1) if effective % d == 0)


def build_recipe(hw: Hardware, backend: str = "auto", effective_batch_size: int = 8, max_length: int = 1024,
                 learning_rate: float = 2e-4, r: int = 16, lora_alpha: float | None = None, lora_dropout: float = 0.0,
                 target_modules: tuple[str, ...] = ALL_LINEAR, load_in_4bit: bool | None = None,
                 batching: str | None = None, quiet: bool = False) -> SFTRecipe:
    """The SFT recipe for ``hw``: backend, precision, optimizer, batch/accumulation, checkpointing, batching.

    Prints which backend runs and why (``quiet=False``). Every hardware-dependent value can be overridden; invalid
    values raise ``ValueError`` naming the fix.
    """
    if isinstance(effective_batch_size, bool) or not isinstance(effective_batch_size, int) or effective_batch_size <= 0:
        raise ValueError(f"effective_batch_size must be a positive integer, got {effective_batch_size!r}")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer (the LoRA rank), got {r!r}")
    if not isinstance(max_length, int) or max_length < 16:
        raise ValueError(f"max_length must be an integer >= 16 tokens, got {max_length!r}")
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r} (LoRA: 1e-4 to 2e-3)")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    if batching is not None and batching not in BATCHING:
        raise ValueError(f"unknown batching {batching!r}: choose one of {', '.join(BATCHING)}")
    choice = choose_backend(hw, backend)
    cuda = hw.device == "cuda"
    why: dict[str, str] = {"backend": choice.reason}

    precision = "bf16" if cuda and hw.bf16 else "fp16" if cuda else "fp32"
    why["precision"] = {"bf16": "bf16 tensor cores; same range as fp32, no loss scaling",
                        "fp16": "no native bf16 on this GPU (compute capability < 8.0, e.g. T4): fp16 base, fp32 "
                                "adapters, loss scaling",
                        "fp32": "CPU: bf16 matmuls are emulated there (about 5x slower); TRL's bf16 default is off"}[
        precision]
    optim = "adamw_8bit" if cuda else "adamw_torch"
    why["optim"] = ("bitsandbytes 8-bit AdamW states; not paged: LoRA's states are a few MiB, paging buys nothing"
                    if cuda else "bitsandbytes' 8-bit optimizers need CUDA; LoRA's fp32 states are small anyway")
    per_device = _per_device_batch(hw, effective_batch_size)
    why["per_device_train_batch_size"] = (f"{hw.memory_gib:.0f} GiB GPU: cap {per_device}" if cuda else
                                          "CPU RAM is plentiful: the whole batch at once")
    why["gradient_accumulation_steps"] = f"{per_device} x {effective_batch_size // per_device} = effective batch " \
                                         f"{effective_batch_size}"
    why["gradient_checkpointing"] = ("activations dominate at long sequences; recompute costs ~20-30% time"
                                     + (" (Unsloth's offloaded variant)" if choice.name == "unsloth" else "")
                                     if cuda else "CPU: memory is not the limit, recomputing would cost ~30% time")
    if load_in_4bit is None:
        load_in_4bit = cuda
        why["load_in_4bit"] = ("QLoRA: NF4 weights take a quarter of bf16's memory" if cuda else
                               "CPU: 4-bit dequantization costs time and saves no memory that matters here")
    else:
        why["load_in_4bit"] = "asked for"
    if load_in_4bit and not cuda:
        raise ValueError("load_in_4bit=True needs a CUDA GPU in this recipe (bitsandbytes' 4-bit training path); "
                         "use load_in_4bit=False on CPU")
    if batching is None:
        batching = "padding_free" if choice.name == "unsloth" else "packed"
        why["batching"] = ("Unsloth's kernels take the flattened batch with its sequence lengths (no padding)"
                           if batching == "padding_free" else
                           "BFD packing: rows of up to max_length tokens, no padding inside, position_ids restart "
                           "per example so examples never attend to each other")
    else:
        why["batching"] = "asked for"
    recipe = SFTRecipe(choice.name, precision, optim, per_device, effective_batch_size // per_device,
                       cuda, bool(load_in_4bit), batching, max_length, learning_rate, r,
                       float(2 * r if lora_alpha is None else lora_alpha), lora_dropout, tuple(target_modules), why)
    if not quiet:
        print(choice)
    return recipe


# --------------------------------------------------------------------------------------------- loading
def import_unsloth() -> Any:
    """Import unsloth (before transformers is used, so its patches apply), or raise ``BackendUnavailableError``.

    ``import unsloth`` raises without a GPU (and may fail on a broken install): never at module level.
    """
    try:
        import unsloth  # noqa: F401
        from unsloth import FastLanguageModel
    except Exception as e:
        raise BackendUnavailableError(f"import unsloth failed ({type(e).__name__}: {e}). Use backend='transformers' "
                                      f"or install it on a CUDA machine: {UNSLOTH_INSTALL}") from e
    return FastLanguageModel


def load_for_sft(recipe: SFTRecipe, source: str, seed: int = 0) -> tuple[Any, Any]:
    """``(model, tokenizer)`` with LoRA adapters on every target module, through the recipe's backend.

    Unsloth: ``FastLanguageModel.from_pretrained`` then ``FastLanguageModel.get_peft_model``. transformers: the model
    (NF4 via bitsandbytes when ``load_in_4bit``, then ``prepare_model_for_kbit_training``) and ``peft.get_peft_model``
    with the same ``r``, ``lora_alpha``, dropout and targets.
    """
    import torch

    from .models import prepare_tokenizer

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[recipe.precision]
    if recipe.backend == "unsloth":
        flm = import_unsloth()
        model, tok = flm.from_pretrained(model_name=source, max_seq_length=recipe.max_length, dtype=dtype,
                                         load_in_4bit=recipe.load_in_4bit)
        model = flm.get_peft_model(model, **recipe.lora_kwargs(), random_state=seed,
                                   use_gradient_checkpointing="unsloth" if recipe.gradient_checkpointing else False)
        tok = getattr(tok, "tokenizer", tok)
    else:
        from peft import get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .bnb_interop import qlora_quantization_config
        from .targets import build_lora_config

        tok = AutoTokenizer.from_pretrained(source)
        cuda = torch.cuda.is_available() and recipe.precision != "fp32"
        kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": 0} if cuda else {"": "cpu"}}
        if recipe.load_in_4bit:
            kwargs["quantization_config"] = qlora_quantization_config(dtype)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        if recipe.load_in_4bit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.gradient_checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        # fp32 adapters over a bf16/fp16 base (peft's default, spelled out): fp16's GradScaler unscales fp32 only
        model = get_peft_model(model, build_lora_config(model, **recipe.lora_kwargs()),
                               autocast_adapter_dtype=True)
    prepare_tokenizer(tok)
    tok.padding_side = "right"  # training pads on the right; evaluate.generate switches to left itself
    model.config.use_cache = False
    return model, tok


UNSLOTH_TOKEN_BUDGET_ENV = "UNSLOTH_TOKEN_BUDGET"


@contextlib.contextmanager
def unsloth_token_budget(tokens: int) -> Iterator[None]:
    """Trainers built inside split each micro-batch into passes of at most ``tokens`` padded tokens (Unsloth only).

    Unsloth 2026.10 reads ``UNSLOTH_TOKEN_BUDGET`` once, when its ``SFTTrainer`` is constructed: a padded batch of
    ``B`` rows of width ``L`` then runs as passes of ``tokens // L`` rows, each loss divided by the step's shared
    token count, so the gradients sum to the unsplit batch's. A batch of long chats runs in several small passes
    (the activation peak follows the pass, not the batch), a batch of short ones in one. The variable is set only
    inside the ``with`` block and restored after, so later trainers are untouched; ``tokens=0`` changes nothing.
    transformers' own trainer ignores the variable.
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens must be an integer >= 0 (0: no budget), got {tokens!r}")
    if not tokens:
        yield
        return
    before = os.environ.get(UNSLOTH_TOKEN_BUDGET_ENV)
    os.environ[UNSLOTH_TOKEN_BUDGET_ENV] = str(tokens)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(UNSLOTH_TOKEN_BUDGET_ENV, None)
        else:
            os.environ[UNSLOTH_TOKEN_BUDGET_ENV] = before


UNSLOTH_FUSED_KERNELS = {"qkv": "apply_lora_qkv", "o": "apply_lora_o", "mlp": "apply_lora_mlp"}
"""The functions Unsloth's ``get_peft_model`` installs on a decoder layer when it can fuse its LoRA
(unsloth.kernels.fast_lora: the base matmul and the LoRA branch of q/k/v, o, and the gate/up/down MLP in one autograd
function each, with a hand-written backward); a layer it cannot fuse keeps the generic path (``original_apply_qkv``,
peft's forward)."""


def unsloth_fused_layers(model: Any) -> dict[str, int]:
    """How many decoder layers of ``model`` run each of Unsloth's fused LoRA kernels: ``{"layers", "qkv", "o", "mlp"}``.

    Unsloth's ``FastLanguageModel.get_peft_model`` fuses a layer's LoRA only on a 16-bit (or 4-bit) base without a
    bias or DoRA magnitude and only with ``bias == "none"``; up to 2026.8 also only when ``lora_dropout == 0`` (with
    ``bias="none"`` its docs' "fast path"); 2026.10 applies dropout, and peft's ``lora_bias`` on B, inside the fused
    kernels (``unsloth_fuses_lora_dropout``). It names
    what it patched by replacing ``self_attn.apply_qkv`` / ``apply_o`` and ``mlp.forward`` (or, with a tiled MLP,
    ``mlp._unsloth_forward``); this reads those names back. On a model that Unsloth never touched, every count is 0.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", base), "layers", None)
    if layers is None:
        raise ValueError(f"{type(base).__name__} has no .model.layers: unsloth_fused_layers reads decoder layers of a "
                         "causal LM (LlamaForCausalLM and alike)")

    def name(fn: Any) -> str:
        return getattr(fn, "__name__", "") or getattr(getattr(fn, "func", None), "__name__", "")  # partial: its func

    counts = {"layers": len(layers), "qkv": 0, "o": 0, "mlp": 0}
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        counts["qkv"] += name(getattr(attn, "apply_qkv", None)) == UNSLOTH_FUSED_KERNELS["qkv"]
        counts["o"] += name(getattr(attn, "apply_o", None)) == UNSLOTH_FUSED_KERNELS["o"]
        mlp_fn = getattr(mlp, "_unsloth_forward", None) or getattr(mlp, "forward", None)
        counts["mlp"] += name(mlp_fn).startswith(UNSLOTH_FUSED_KERNELS["mlp"])
    return counts


def unsloth_fuses_lora_dropout() -> bool:
    """Whether the imported Unsloth runs ``lora_dropout > 0`` inside its fused kernels.

    Unsloth 2026.10 does, unless ``UNSLOTH_FUSED_LORA_DROPOUT=0`` (``unsloth.kernels.fast_lora.FUSED_LORA_DROPOUT``,
    read once at import); versions without that flag (2026.8 and before) leave every layer of a ``lora_dropout > 0``
    model on peft's generic forward, with the warning "Dropout = 0 is supported for fast patching". Raises where
    Unsloth was not imported (``import_unsloth`` first, on a CUDA machine).
    """
    import sys

    if "unsloth" not in sys.modules:
        raise BackendUnavailableError("unsloth is not imported: call lora_course.sft.import_unsloth() first "
                                      "(it needs a CUDA GPU)")
    import importlib

    fast_lora = importlib.import_module("unsloth.kernels.fast_lora")
    return bool(getattr(fast_lora, "FUSED_LORA_DROPOUT", False))


def fused_loss_available() -> bool:
    """Whether TRL's fused LM-head loss can run: it is a Triton kernel, and Triton ships with CUDA builds of torch."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def make_trainer(model: Any, args: Any, train_dataset: Any, tokenizer: Any, quiet: bool = False,
                 **kwargs: Any) -> Any:
    """A ``trl.SFTTrainer``; where Triton is missing (CPU torch), one whose loss is the model's own cross-entropy.

    TRL 1.15 computes the SFT loss with a fused, chunked LM head that never builds the full ``tokens x vocab`` logits
    (a Triton kernel). CPU builds of torch have no Triton, so there the loss comes from the model's forward (full
    logits, the same mean over labelled tokens); TRL's ``mean_token_accuracy``/``entropy`` logs are then absent.

    With ``args.fp16`` the trainable parameters are put back to fp32 after TRL built the trainer: TRL 1.15 casts a
    quantized model's trainable parameters to bf16 whatever the precision (``_is_quantized_model``), and fp16's
    GradScaler cannot unscale bf16 gradients. ``args`` is kept to one GPU (``hardware.single_device``).
    """
    from trl import SFTTrainer

    from .hardware import single_device

    args = single_device(args)
    if fused_loss_available():
        if not quiet:
            print("loss: TRL's fused LM-head cross-entropy (Triton)")
        return _fp16_ready(SFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer,
                                      **kwargs), quiet)

    class FullLogitsSFTTrainer(SFTTrainer):
        """``SFTTrainer`` with the model's own loss (TRL's documented way: subclass and override ``compute_loss``)."""

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            inputs = {**inputs, "use_cache": False}
            if num_items_in_batch is not None:
                inputs["num_items_in_batch"] = num_items_in_batch
            outputs = model(**inputs)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    if not quiet:
        print("loss: the model's own cross-entropy (no Triton here, so TRL's fused LM-head kernel cannot run)")
    return _fp16_ready(FullLogitsSFTTrainer(model=model, args=args, train_dataset=train_dataset,
                                            processing_class=tokenizer, **kwargs), quiet)


def _fp16_ready(trainer: Any, quiet: bool) -> Any:
    """With ``fp16=True``: every trainable parameter fp32 before the optimizer exists (it is built in ``train()``)."""
    from .hardware import upcast_trainable

    if trainer.args.fp16:
        cast = upcast_trainable(trainer.model)
        if cast and not quiet:
            print(f"fp16: {cast} trainable tensors put back to fp32 (TRL had cast them to bf16; the GradScaler "
                  "unscales fp32 gradients only)")
    return trainer


__all__ = ["BACKENDS", "BATCHING", "BackendChoice", "BackendUnavailableError", "Hardware", "SFTRecipe",
           "build_recipe", "choose_backend", "detect_hardware", "fused_loss_available", "hardware_for_profile",
           "import_unsloth", "load_for_sft", "make_trainer", "unsloth_fused_layers", "unsloth_fuses_lora_dropout",
           "unsloth_token_budget"]
