"""Training memory of full fine-tuning, LoRA and QLoRA: an estimator that counts every component, and real runs.

``estimate_memory(shape, setup)`` adds up what the allocator holds at the peak of a training step: base weights
(bf16/fp32, or NF4 with its quantization constants), gradients, optimizer states (AdamW: two fp32 states; 8-bit
Adam: two 1-byte states; paged: the same bytes in CUDA unified memory, evictable to the CPU), LoRA parameters and
their gradients/states, and activations. Activations are counted from the code paths of the pinned stack
(transformers' Llama, peft's LoRA layers, bitsandbytes' ``MatMul4Bit``), checked tensor by tensor with
``torch.autograd.graph.saved_tensors_hooks``: peft casts a LoRA layer's input to the fp32 adapter dtype (a copy per
targeted module when activations are bf16), ``prepare_model_for_kbit_training`` upcasts the embeddings to fp32 (so a
QLoRA residual stream is fp32), ``MatMul4Bit`` saves only the packed weight, and the loss keeps fp32 log-softmax
of ``tokens x vocab`` and needs two more such tensors in its backward (12 bytes per token per vocab entry, often the
largest activation). With gradient checkpointing only each layer's input is stored, plus one layer's recompute.
CUDA context and kernels are stated separately (``runtime_overhead``): ``torch.cuda.max_memory_allocated`` does not
see them.

``measure_peak`` runs a configuration in a fresh subprocess (``python -m lora_course.memory --measure ...``) so
peaks never mix: on CPU the model's tensor bytes plus the rise of peak RSS (``VmHWM``, reset after loading) during
training; ``torch.cuda.max_memory_allocated`` on a GPU. Beside that peak, the first step's gradients, optimizer
states and saved activations are counted tensor by tensor (``Measurement.counted``): byte counts that do not
depend on the allocator, the CPU or the load, compared with the estimator's components (``estimated``).
``python -m lora_course.memory --gpu-check --tokenizer-source DIR`` checks the estimator within 15% on a GPU.

Sources: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (2023): NF4, blocksize 64, double
quantization (0.127 bits/param of constants), paged optimizers; Dettmers et al., "8-bit Optimizers via Block-wise
Quantization" (2022); the references in /work/shared/references (their memory tables, quoted as claims in
``REFERENCE_CLAIMS``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .procs import run_module
from .shapes import ALL_LINEAR, ATTENTION, LLAMA_3_1_8B, LLAMA_3_1_70B, MISTRAL_7B, ModelShape

GB = 1e9
MIB = 2**20
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
METHODS: tuple[str, ...] = ("full", "lora", "qlora")
# Optimizer state bytes per trainable parameter (8-bit Adam: 2 x 1 byte + a block-wise fp32 absmax per 2048).
OPTIMIZER_BYTES: dict[str, float] = {"adamw": 8.0, "paged_adamw": 8.0, "adamw_8bit": 2.0 + 8 / 2048,
                                     "paged_adamw_8bit": 2.0 + 8 / 2048, "sgd": 0.0}
CUDA_CONTEXT_BYTES = 500 * MIB  # CUDA context + kernel images: outside torch's allocator (nvidia-smi shows it)
CUBLAS_WORKSPACE_BYTES = 64 * MIB  # cuBLAS/cuBLASLt workspaces on Hopper: allocated through the caching allocator
# LLaMA-65B (Touvron et al. 2023): the model of the QLoRA paper's "65B on one 48 GB GPU".
LLAMA_65B = ModelShape("LLaMA-65B", 8192, 22016, 80, 64, 64, 32000)
# Llama-3.2-1B's shape (hidden 2048, 16 layers, GQA 32/8, tied) with the course tokenizer's vocab of 49152, not 128256.
LLAMA_3_2_1B_SHAPE: dict[str, Any] = {
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True, "rope_theta": 500000.0,
    "max_position_embeddings": 4096}


@dataclass(frozen=True)
class TrainingSetup:
    """How a model is trained: the inputs of the estimator besides the architecture."""

    method: str = "lora"  # full | lora | qlora
    batch_size: int = 1
    seq_len: int = 512
    dtype: str = "bf16"  # base weights for full/lora; compute dtype (and unquantized weights) for qlora
    optimizer: str = "adamw"
    master_weights: bool = False  # mixed-precision full fine-tuning keeps an fp32 copy of every weight
    # AdamW's two states take the dtype of the parameters they update (torch.optim): fp32 for LoRA adapters and
    # master weights, bf16 for a pure-bf16 full fine-tune. "fp32" forces fp32 states (what trainers with an fp32
    # master copy or the references' tables assume).
    state_dtype: str | None = None
    gradient_checkpointing: bool = False
    r: int = 16
    targets: tuple[str, ...] = ALL_LINEAR
    double_quant: bool = True
    blocksize: int = 64
    upcast_non_quantized: bool = True  # peft's prepare_model_for_kbit_training casts non-4-bit params to fp32
    padded: bool = False  # an attention mask is passed: sdpa then repeats k/v to all heads (no GQA kernel)
    # autocast's dtype where it differs from the weights': full fine-tuning on a T4 keeps fp32 master weights
    # (dtype="fp32") and computes in fp16, so activations are fp16 and autocast holds an fp16 copy of every weight
    compute_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.batch_size <= 0 or self.seq_len <= 0:
            raise ValueError(f"batch_size and seq_len must be positive, got {self.batch_size} and {self.seq_len}")
        if self.method != "full" and self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(DTYPE_BYTES)}")
        if self.optimizer not in OPTIMIZER_BYTES:
            raise ValueError(f"unknown optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZER_BYTES)}")
        if self.state_dtype is not None and self.state_dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown state_dtype {self.state_dtype!r}: choose one of {', '.join(DTYPE_BYTES)}")
        if self.compute_dtype is not None and self.compute_dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown compute_dtype {self.compute_dtype!r}: choose one of {', '.join(DTYPE_BYTES)}")
        if self.method != "full" and not self.targets:
            raise ValueError("LoRA needs at least one target module")


@dataclass
class MemoryEstimate:
    """Bytes per component at the peak of a training step; prints as a table. ``total`` excludes the runtime."""

    model: str
    setup: TrainingSetup
    components: dict[str, int]
    runtime_overhead: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.components.values())

    def __str__(self) -> str:
        s = self.setup
        head = (f"{self.model} | {s.method} | {s.dtype} | batch {s.batch_size} x seq {s.seq_len} | {s.optimizer}"
                f"{' | grad ckpt' if s.gradient_checkpointing else ''}"
                f"{f' | r={s.r} on {len(s.targets)} modules' if s.method != 'full' else ''}")
        rows = [f"  {k:<38}{v / GB:>10.3f} GB" for k, v in self.components.items() if v]
        rows.append(f"  {'total (what the allocator holds)':<38}{self.total / GB:>10.3f} GB")
        if self.runtime_overhead:
            rows.append(f"  {'+ CUDA context/runtime (separate)':<38}{self.runtime_overhead / GB:>10.3f} GB")
        return "\n".join([head, *rows, *(f"  note: {n}" for n in self.notes)])


def quantized_bytes(n_params: int, blocksize: int = 64, double_quant: bool = True) -> tuple[int, int]:
    """``(packed, constants)`` bytes of NF4 weights: 4 bits a weight plus one absmax per block.

    Without double quantization each block of 64 keeps an fp32 absmax (0.5 bits/param); with it the absmax are
    themselves quantized to 8 bits in blocks of 256 with an fp32 scale each (8/64 + 32/(64*256) = 0.127 bits/param).
    """
    blocks = -(-n_params // blocksize)
    consts = blocks + 4 * -(-blocks // 256) if double_quant else 4 * blocks
    return n_params // 2, consts


def _linear_params(shape: ModelShape) -> int:
    return shape.num_layers * sum(a * b for a, b in shape.linear_shapes().values())


def qlora_upcast_bytes(shape: ModelShape, compute_dtype: str) -> int:
    """The bytes a QLoRA base holds beyond the compute dtype: peft's ``prepare_model_for_kbit_training`` keeps every
    weight that is not 4-bit (the embeddings and lm_head, the norms) in fp32, where a LoRA base keeps them in
    ``compute_dtype``. Zero in fp32 (the CPU).

    At 135M parameters this is as large as what 4 bits save: SmolLM2's tied 49152 x 576 embedding is 21 % of its
    weights, 54 MiB more in fp32 than in bf16/fp16, against ~150 MiB saved on its linear layers; measured on an H100
    (2026-12-05, the experiments grid's batch), QLoRA peaked 61 MiB below LoRA in bf16 and 16 MiB above it in fp16
    (the T4 lane, where autocast also copies the fp32 lm_head to fp16). At 1B+ the linear layers dominate.
    """
    if compute_dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {compute_dtype!r}: choose one of {', '.join(DTYPE_BYTES)}")
    return (shape.total_params() - _linear_params(shape)) * (4 - DTYPE_BYTES[compute_dtype])


def activation_bytes(shape: ModelShape, setup: TrainingSetup, device: str = "cuda") -> dict[str, int]:
    """Activation memory at the peak: tensors saved for backward, the loss's logits, one layer's recompute.

    Per token and layer (a = bytes of the residual stream, w = 4 for fp32 adapters): RMSNorm keeps an fp32 copy
    of its input; sdpa keeps q, k, v and its output (no seq^2 matrix); the gated MLP keeps gate, silu and up
    outputs; full fine-tuning also keeps every linear layer's input, LoRA only the (fp32-cast) inputs of its
    targets and the rank-r projections.
    """
    s = setup
    h, i_size, hd = shape.hidden_size, shape.intermediate_size, shape.head_size
    q, kv = shape.num_heads * hd, shape.num_kv_heads * hd
    tokens = s.batch_size * s.seq_len
    a = 4 if s.method == "qlora" and s.upcast_non_quantized else DTYPE_BYTES[s.compute_dtype or s.dtype]
    w = 4
    fp32_attention_on_cuda = device.startswith("cuda") and a == 4  # no flash kernel for fp32: GQA via math kernel
    kv_saved = q if (s.padded or fp32_attention_on_cuda) else kv
    attn = (2 * q + 2 * kv_saved) * a + shape.num_heads * 4
    if fp32_attention_on_cuda:
        attn += 2 * shape.num_heads * s.seq_len * 4  # math kernel: scores and probabilities, seq x seq per head
    if s.method == "full":
        per_layer = 2 * (8 * h + a * h) + attn + 4 * i_size * a
        final_norm = 8 * h + a * h
    else:
        t = set(s.targets)
        n_qkv, n_gu = len(t & {"q_proj", "k_proj", "v_proj"}), len(t & {"gate_proj", "up_proj"})
        if a == w:  # no cast: q/k/v share the norm output, o_proj its input with sdpa's output
            lora_in = (h * w if n_qkv else 0) + (h * w if n_gu else 0)
        else:  # one fp32 copy of the input per targeted module
            lora_in = n_qkv * h * w + ("o_proj" in t) * q * w + n_gu * h * w
        lora_in += ("down_proj" in t) * i_size * w + len(t) * s.r * w
        per_layer = 2 * 4 * h + attn + 3 * i_size * a + lora_in
        final_norm = 4 * h
    loss = 12 * shape.vocab_size  # fp32 log-softmax kept + its gradient + the gradient of the logits
    if s.gradient_checkpointing:
        stored = shape.num_layers * h * a + final_norm
        peak_extra = max(loss, per_layer + 2 * i_size * 4)
        return {"activations: layer inputs (checkpointed)": stored * tokens,
                "activations: loss peak or one-layer recompute": peak_extra * tokens}
    return {"activations: saved for backward": (shape.num_layers * per_layer + final_norm) * tokens,
            "activations: loss (fp32 logits, backward)": loss * tokens}


def estimate_memory(shape: ModelShape, setup: TrainingSetup, device: str = "cuda") -> MemoryEstimate:
    """Estimate the peak training memory of ``shape`` trained as ``setup`` says, component by component.

    Full fine-tuning counts weights, gradients, optimizer states (and an fp32 master copy if asked) and all
    activations at once (an upper bound: gradients fill up while activations are freed). LoRA/QLoRA count the frozen
    base (bf16, or NF4 + constants + the unquantized embeddings/norms) plus the adapters' params, grads and states.
    """
    s = setup
    total_params = shape.total_params()
    wb = DTYPE_BYTES[s.dtype]
    c: dict[str, int] = {}
    notes: list[str] = []
    if s.method == "qlora":
        lin = _linear_params(shape)
        packed, consts = quantized_bytes(lin, s.blocksize, s.double_quant)
        rest = total_params - lin
        c["weights: NF4 packed (4 bits)"] = packed
        c[f"quant constants (absmax{', double quant' if s.double_quant else ' fp32'})"] = consts
        c["weights: not quantized (embeddings, norms)"] = rest * (4 if s.upcast_non_quantized else wb)
        if s.upcast_non_quantized:
            notes.append("prepare_model_for_kbit_training upcasts embeddings/norms to fp32 (activations fp32 too)")
    else:
        c[f"weights ({s.dtype})"] = total_params * wb
    if s.method == "full":
        trainable = total_params
        c[f"gradients ({s.dtype})"] = trainable * wb
        if s.master_weights:
            c["fp32 master weights"] = trainable * 4
        if s.compute_dtype and s.compute_dtype != s.dtype:  # autocast's cached casts, kept for backward
            c[f"autocast copies of the weights ({s.compute_dtype})"] = _linear_params(shape) * DTYPE_BYTES[
                s.compute_dtype]
    else:
        trainable = shape.lora_params(s.targets, s.r)
        c["LoRA params (fp32)"] = trainable * 4
        c["LoRA gradients (fp32)"] = trainable * 4
    state_bytes = OPTIMIZER_BYTES[s.optimizer]
    param_dtype = s.dtype if s.method == "full" and not s.master_weights else "fp32"
    if s.optimizer in ("adamw", "paged_adamw"):
        state_bytes = 2 * DTYPE_BYTES[s.state_dtype or param_dtype]
    c[f"optimizer states ({s.optimizer}, {s.state_dtype or param_dtype})"
      if s.optimizer in ("adamw", "paged_adamw")
      else f"optimizer states ({s.optimizer})"] = int(trainable * state_bytes)
    if s.optimizer.startswith("paged") and device.startswith("cuda"):
        notes.append("paged optimizer states live in CUDA unified memory: evicted to CPU RAM under pressure, "
                     "and not seen by torch.cuda.max_memory_allocated")
    acts = activation_bytes(shape, s, device)
    c.update(acts)
    if device.startswith("cuda") and s.optimizer in ("adamw", "paged_adamw") and s.method == "full":
        # foreach AdamW allocates one state-sized temporary at the step, when the activations are already freed
        c["optimizer step temporaries (beyond activations)"] = max(0, int(trainable * state_bytes / 2)
                                                                   - sum(acts.values()))
    runtime = 0
    if device.startswith("cuda"):
        c["cuBLAS workspaces"] = CUBLAS_WORKSPACE_BYTES
        runtime = CUDA_CONTEXT_BYTES
    return MemoryEstimate(shape.name, s, c, runtime, notes)


# ---------------------------------------------------------------------------------- the references' tables
# (source file, model, method, claimed GB, what the setup must be for the claim to hold)
REFERENCE_CLAIMS: list[tuple[str, ModelShape, str, float, dict[str, Any]]] = [
    ("000", LLAMA_3_1_8B, "full", 64, {}), ("000", LLAMA_3_1_8B, "lora", 18, {}),
    ("000", LLAMA_3_1_8B, "qlora", 6, {}), ("000", LLAMA_3_1_70B, "full", 560, {}),
    ("000", LLAMA_3_1_70B, "lora", 160, {}), ("000", LLAMA_3_1_70B, "qlora", 48, {}),
    ("000", MISTRAL_7B, "full", 56, {}), ("000", MISTRAL_7B, "lora", 16, {}), ("000", MISTRAL_7B, "qlora", 5, {}),
    ("002", LLAMA_65B, "full", 260, {"dtype": "fp32"}), ("002", LLAMA_65B, "full", 130, {"dtype": "fp16"}),
    ("002", LLAMA_65B, "lora", 80, {"dtype": "fp16", "r": 8}), ("002", LLAMA_65B, "qlora", 48, {"r": 8}),
    ("003", MISTRAL_7B, "full", 28, {}), ("003", MISTRAL_7B, "lora", 16, {}), ("003", MISTRAL_7B, "qlora", 6, {}),
    ("004", MISTRAL_7B, "full", 42, {}), ("004", MISTRAL_7B, "lora", 12, {}), ("004", MISTRAL_7B, "qlora", 9, {}),
]


@dataclass
class ReferenceRow:
    """One claim of a reference beside the estimator's number for a stated setup."""

    source: str
    model: str
    method: str
    claimed_gb: float
    estimate_gb: float
    weights_gb: float

    @property
    def ratio(self) -> float:
        return self.claimed_gb / self.estimate_gb

    @property
    def verdict(self) -> str:
        if self.claimed_gb < 0.95 * self.weights_gb:
            return "impossible: below the weights alone"
        if 0.75 <= self.ratio <= 1.33:
            return "consistent (within 25%)"
        return f"off: claim is {self.ratio:.2f}x the estimate"


def reference_setup(method: str, **overrides: Any) -> TrainingSetup:
    """The setup the references' tables are compared under: batch 1 x 512 tokens, gradient checkpointing,
    r=16 on q,k,v,o (their configs), bf16 weights with fp32 AdamW states for full fine-tuning, and QLoRA's
    embeddings kept in bf16 (the lean choice; peft's ``prepare_model_for_kbit_training`` would upcast them)."""
    base = {"method": method, "batch_size": 1, "seq_len": 512, "gradient_checkpointing": True, "r": 16,
            "targets": ATTENTION, "upcast_non_quantized": False, "state_dtype": "fp32"}
    return TrainingSetup(**{**base, **overrides})


def compare_with_references() -> list[ReferenceRow]:
    """Each memory claim of the references beside ``estimate_memory`` under ``reference_setup``."""
    rows = []
    for src, shape, method, claim, over in REFERENCE_CLAIMS:
        est = estimate_memory(shape, reference_setup(method, **over))
        weights = sum(v for k, v in est.components.items() if k.startswith(("weights", "quant")))
        rows.append(ReferenceRow(src, shape.name, method, claim, est.total / GB, weights / GB))
    return rows


def format_rows(rows: list[ReferenceRow]) -> str:
    """The comparison as a plain-text table."""
    out = [f"{'ref':<4}{'model':<17}{'method':<7}{'claim GB':>9}{'estimate':>10}{'weights':>9}  verdict"]
    out += [f"{r.source:<4}{r.model:<17}{r.method:<7}{r.claimed_gb:>9.0f}{r.estimate_gb:>10.1f}{r.weights_gb:>9.1f}"
            f"  {r.verdict}" for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------- measurements
@dataclass
class Measurement:
    """A real run's peak memory beside the estimate for the same model and setup."""

    method: str
    device: str
    measured_bytes: int  # CPU: model tensor bytes + rise of peak RSS in training; CUDA: max_memory_allocated
    estimate_bytes: int
    load_bytes: int
    losses: list[float]
    sec_per_step: float
    perplexity: float | None = None
    estimate_table: str = ""
    # Allocator-independent byte counts of the first step (same on every CPU and allocator): the tensors of each
    # component, counted where they are created, beside the estimator's number for it (``tensor_check``).
    counted: dict[str, int] = field(default_factory=dict)
    estimated: dict[str, int] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.measured_bytes / self.estimate_bytes

    def count_ratios(self) -> dict[str, float]:
        """Counted / estimated bytes of each component counted tensor by tensor (1.0: the estimator is exact)."""
        return {k: self.counted[k] / v for k, v in self.estimated.items() if k in self.counted and v}

    def __str__(self) -> str:
        return (f"{self.method:<6} {self.device:<5} measured {self.measured_bytes / MIB:9.0f} MiB  estimate "
                f"{self.estimate_bytes / MIB:9.0f} MiB  ratio {self.ratio:5.2f}  loss {self.losses[0]:.3f} -> "
                f"{self.losses[-1]:.3f}  {self.sec_per_step:.2f} s/step")


def _rss(field_name: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status (Linux only)")


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size()


def _saved_bytes_hooks(model: Any, counted: dict[str, int]) -> tuple[Any, Any]:
    """``saved_tensors_hooks`` that add up the bytes autograd saves for backward (each storage once, the model's
    own parameters and buffers left out) into ``counted["saved activations"]``; the tensors pass unchanged."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: set[int] = set()
    counted["saved activations"] = 0

    def pack(t: Any) -> Any:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in own and ptr not in seen:  # saved tensors stay alive until backward: no pointer is reused
            seen.add(ptr)
            counted["saved activations"] += storage.nbytes()
        return t

    return pack, lambda t: t


def _state_bytes(model: Any) -> int:
    """Bytes of a model's parameters and buffers, each storage counted once (tied weights share one)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _malloc_trim() -> None:
    """Give freed heap back to the OS (glibc), so RSS before training is what is live, not what was."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_peak_start(model: Any) -> tuple[int, int]:
    """Start measuring a CPU training peak: returns (the model's tensor bytes, RSS now) and resets peak RSS.

    CPU has no max_memory_allocated. The model's own bytes are counted from its tensors: after loading, RSS also
    holds the mmapped safetensors pages and heap that the loader freed but glibc kept. Training's growth
    (gradients, optimizer states, activations) is the rise of peak RSS over RSS just before it; glibc must return
    freed blocks to the OS for that (run with ``MALLOC_MMAP_THRESHOLD_=65536``, as ``measure_peak`` does).
    """
    import torch

    load_bytes = _state_bytes(model)
    with torch.no_grad():  # safetensors weights are mmapped: page them all in now, or training's first read
        for t in [*model.parameters(), *model.buffers()]:  # of each weight would count as training memory
            t.sum()
    _malloc_trim()
    base = _rss()
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS: loading peaks excluded
        f.write("5")
    return load_bytes, base


def cpu_peak_bytes(mark: tuple[int, int]) -> int:
    """The CPU training peak since ``cpu_peak_start``: the model's tensor bytes plus the rise of peak RSS."""
    load_bytes, base = mark
    return load_bytes + _rss("VmHWM") - base


def load_for_method(method: str, profile: str, model_id: str | None, r: int = 16,
                    targets: tuple[str, ...] = ALL_LINEAR, gradient_checkpointing: bool = False) -> tuple[Any, Any]:
    """The model ready to train by ``method``: all weights trainable, a LoRA on the base, or a QLoRA (NF4 base)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .models import load_base, prepare_tokenizer, resolve_source, select_dtype

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if method == "qlora":
        from transformers import AutoTokenizer

        profile, source = resolve_source(profile, model_id)
        device = "cuda" if torch.cuda.is_available() and profile not in ("cpu", "tiny") else "cpu"
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=select_dtype(device))
        model = AutoModelForCausalLM.from_pretrained(source, quantization_config=bnb, dtype=select_dtype(device),
                                                     device_map={"": 0} if device == "cuda" else {"": "cpu"})
        tok = prepare_tokenizer(AutoTokenizer.from_pretrained(source))
        from .nf4 import disable_cpu_repacking

        disable_cpu_repacking(model)  # float32 path on every CPU: no bf16 repack after an eval (nf4's docstring)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:  # mode: fp32 master weights for full fine-tuning where the GPU has no native bf16 (hardware.train_precision)
        model, tok = load_base(profile, model_id, mode="full" if method == "full" else "lora")
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if method != "full":
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                 target_modules=list(targets), task_type="CAUSAL_LM"))
    return model, tok


def _batches(tok: Any, task: str | None, batch_size: int, seq_len: int, steps: int, vocab: int, seed: int) -> list:
    """Fixed-shape batches: task examples padded to ``seq_len`` (with a mask), or random tokens (no mask)."""
    import torch

    from .data import collate, load_task, tokenize_example

    g = torch.Generator().manual_seed(seed)
    if task is None:
        out = []
        for _ in range(steps):
            ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
            out.append({"input_ids": ids, "labels": ids.clone()})
        return out
    feats = [tokenize_example(tok, ex, seq_len) for ex in load_task(task, "train")]
    order = torch.randperm(len(feats), generator=g).tolist()
    out = []
    for step in range(steps):
        idx = [order[(step * batch_size + j) % len(order)] for j in range(batch_size)]
        b = collate([feats[i] for i in idx], tok.pad_token_id)
        pad = seq_len - b["input_ids"].shape[1]
        b["input_ids"] = torch.nn.functional.pad(b["input_ids"], (0, pad), value=tok.pad_token_id)
        b["attention_mask"] = torch.nn.functional.pad(b["attention_mask"], (0, pad), value=0)
        b["labels"] = torch.nn.functional.pad(b["labels"], (0, pad), value=-100)
        out.append(b)
    return out


def run_measurement(method: str, profile: str = "cpu", model_id: str | None = None, task: str | None = "creative",
                    batch_size: int = 4, seq_len: int = 96, steps: int = 3, r: int = 16, lr: float = 1e-3,
                    gradient_checkpointing: bool = False, eval_n: int = 0, seed: int = 0) -> Measurement:
    """Train ``steps`` AdamW steps in *this* process and measure its peak memory (call it in a fresh process)."""
    import bitsandbytes  # noqa: F401 - imported before the baseline so that library memory is not counted
    import peft  # noqa: F401
    import torch
    from transformers import LlamaForCausalLM  # noqa: F401

    from .shapes import ModelShape as _Shape

    cuda = torch.cuda.is_available() and profile not in ("cpu", "tiny")
    model, tok = load_for_method(method, profile, model_id, r, ALL_LINEAR, gradient_checkpointing)
    device = next(model.parameters()).device
    shape = _Shape.from_config(model.config, name=str(model.config._name_or_path).rsplit("/", 1)[-1])
    batches = _batches(tok, task, batch_size, seq_len, steps, shape.vocab_size, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    from .hardware import amp_context, check_scalable, make_grad_scaler, train_precision

    # fp16 GPUs (a T4): autocast + GradScaler as the trainers use there; bf16 GPUs and the CPU train as loaded
    precision = train_precision(method, "cuda" if cuda else "cpu")
    amp = precision.loop_amp
    scaler = make_grad_scaler(amp, device.type)
    if scaler is not None:
        check_scalable(params)
    import gc

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        load_bytes = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        mark = cpu_peak_start(model)
        load_bytes = mark[0]
    model.train()
    counted: dict[str, int] = {}
    losses, t0 = [], time.perf_counter()
    for i, b in enumerate(batches):
        with amp_context(amp, device.type):
            if i == 0 and not gradient_checkpointing:
                with torch.autograd.graph.saved_tensors_hooks(*_saved_bytes_hooks(model, counted)):
                    loss = model(**{k: v.to(device) for k, v in b.items()}).loss
            else:
                loss = model(**{k: v.to(device) for k, v in b.items()}).loss
        (loss if scaler is None else scaler.scale(loss)).backward()
        if i == 0:  # counted from the tensors themselves: no allocator, no timing
            counted["gradients"] = sum(_nbytes(p.grad) for p in params if p.grad is not None)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        if i == 0:
            counted["optimizer states"] = sum(_nbytes(t) for st in opt.state.values() for k, t in st.items()
                                              if k != "step" and torch.is_tensor(t))
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if cuda:
        torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / max(steps, 1)
    measured = torch.cuda.max_memory_allocated() if cuda else cpu_peak_bytes(mark)
    # the estimate takes the dtypes the model was loaded and trained in, from the same rules (train_precision): full
    # fine-tuning on a T4 keeps fp32 weights and computes in fp16 under autocast
    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    weights_dtype, compute_dtype = name[precision.model_dtype], name[precision.compute_dtype]
    setup = TrainingSetup(method, batch_size, seq_len, weights_dtype, "adamw",
                          gradient_checkpointing=gradient_checkpointing, r=r, targets=ALL_LINEAR,
                          padded=task is not None,
                          compute_dtype=compute_dtype if compute_dtype != weights_dtype else None)
    est = estimate_memory(shape, setup, "cuda" if cuda else "cpu")
    estimated = {"gradients": sum(v for k, v in est.components.items() if "gradients" in k),
                 "optimizer states": sum(v for k, v in est.components.items() if k.startswith("optimizer states"))}
    if "saved activations" in counted:  # what backward keeps: the layers' saved tensors + the fp32 log-softmax
        estimated["saved activations"] = (est.components["activations: saved for backward"]
                                          + 4 * batch_size * seq_len * shape.vocab_size)
    ppl = None
    if eval_n:
        from .data import load_task
        from .evaluate import perplexity

        ppl = perplexity(model, tok, load_task(task or "creative", "eval")[:eval_n], batch_size=eval_n)
    return Measurement(method, "cuda" if cuda else "cpu", int(measured), est.total, int(load_bytes), losses, sec,
                       ppl, str(est), counted, estimated)


def measure_peak(method: str, profile: str = "cpu", model_id: str | None = None, timeout: float = 600,
                 **kwargs: Any) -> Measurement:
    """Run ``run_measurement`` in a fresh Python process (so peaks of different runs never mix) and return it."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    cfg = {"method": method, "profile": profile, "model_id": model_id, **kwargs}
    # With a fixed mmap threshold glibc serves every block >= 64 KiB by mmap and unmaps it on free, so peak RSS
    # follows the live tensor bytes (its default adaptive threshold keeps freed activations in the heap).
    env = {"MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
    return Measurement(**run_module("lora_course.memory", ["--measure", json.dumps(cfg)],
                                    what=f"measurement of {method}", timeout=timeout, env=env)[-1])


class PeakMeasurements:
    """``measure_peak`` for several methods, one after the other in a background thread (each method in its own
    fresh process, so peaks never mix and never overlap): a notebook starts them early and goes on working.

    ``lr`` is one learning rate, or one per method (``{"full": 5e-5, "lora": 2e-3, ...}``); every other keyword goes
    to ``measure_peak`` unchanged. ``results()`` waits for all of them and returns ``{method: Measurement}`` in the
    order given; a measurement that failed raises its error there.
    """

    def __init__(self, methods: tuple[str, ...] | list[str], profile: str = "cpu", model_id: str | None = None,
                 lr: float | dict[str, float] | None = None, **kwargs: Any) -> None:
        from concurrent.futures import ThreadPoolExecutor

        methods = list(methods)
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods or len(set(methods)) != len(methods):
            raise ValueError(f"methods {methods!r}: give each of {', '.join(METHODS)} at most once, at least one")
        if isinstance(lr, dict) and set(lr) != set(methods):
            raise ValueError(f"lr names {sorted(lr)}, the methods are {sorted(methods)}: give one rate per method "
                             "(or a single float for all)")
        self._pool = ThreadPoolExecutor(max_workers=1)  # one process at a time: their peaks must not overlap
        self._pending = {}
        for m in methods:
            rate = lr[m] if isinstance(lr, dict) else lr
            kw = {**kwargs, **({"lr": rate} if rate is not None else {})}
            self._pending[m] = self._pool.submit(measure_peak, m, profile, model_id, **kw)

    def results(self) -> dict[str, Measurement]:
        try:
            return {m: f.result() for m, f in self._pending.items()}
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def gpu_memory_benchmark(tokenizer_source: str, batch_size: int = 4, seq_len: int = 256, steps: int = 4,
                         r: int = 16, tolerance: float = 0.15, gradient_checkpointing: bool = True,
                         model_dir: str | None = None) -> tuple[bool, list[Measurement]]:
    """On a GPU: LoRA and QLoRA (bf16, r=16 on all linear layers) of a random-init Llama-3.2-1B-shaped model
    (vocab 49152, the course tokenizer's) for a few steps; measured peak vs estimate, ok if all within tolerance."""
    from .models import random_model_dir

    path = model_dir or str(random_model_dir("llama-3.2-1b-shape", LLAMA_3_2_1B_SHAPE, 0, "bfloat16",
                                             tokenizer_source=tokenizer_source))
    results = []
    for method in ("lora", "qlora"):
        m = measure_peak(method, "gpu", path, task=None, batch_size=batch_size, seq_len=seq_len, steps=steps, r=r,
                         gradient_checkpointing=gradient_checkpointing)
        print(m.estimate_table)
        print(m, flush=True)
        results.append(m)
    ok = all(abs(m.ratio - 1) <= tolerance for m in results)
    print(f"{'OK' if ok else 'FAIL'}: measured/estimate within {tolerance:.0%}: "
          + ", ".join(f"{m.method} {m.ratio:.3f}" for m in results))
    return ok, results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Estimate or measure training memory (full / LoRA / QLoRA).")
    p.add_argument("--measure", help="JSON of run_measurement's arguments; prints a Measurement as JSON")
    p.add_argument("--gpu-check", action="store_true", help="LoRA and QLoRA of a ~1B Llama on a GPU vs estimate")
    p.add_argument("--tokenizer-source", help="folder with the course tokenizer (for --gpu-check)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--references", action="store_true", help="print the references' tables beside the estimates")
    a = p.parse_args(argv)
    if a.measure:
        print(json.dumps(asdict(run_measurement(**json.loads(a.measure)))), flush=True)
        return 0
    if a.gpu_check:
        if not a.tokenizer_source:
            p.error("--gpu-check needs --tokenizer-source DIR (a folder holding the course tokenizer files)")
        ok, _ = gpu_memory_benchmark(a.tokenizer_source, a.batch_size, a.seq_len, a.steps,
                                     gradient_checkpointing=not a.no_checkpointing)
        return 0 if ok else 1
    print(format_rows(compare_with_references()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
