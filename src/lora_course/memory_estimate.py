"""Training memory of full fine-tuning, LoRA and QLoRA, estimated: every component counted from the architecture.

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

The real runs it is checked against are measured in ``memory`` (``measure_peak``, ``gpu_memory_benchmark``).

Sources: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (2023): NF4, blocksize 64, double
quantization (0.127 bits/param of constants), paged optimizers; Dettmers et al., "8-bit Optimizers via Block-wise
Quantization" (2022); the references in /work/shared/references (their memory tables, quoted as claims in
``REFERENCE_CLAIMS``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .models import METHODS
from .shapes import ALL_LINEAR, ATTENTION, LLAMA_3_1_8B, LLAMA_3_1_70B, MISTRAL_7B, ModelShape

GB = 1e9
MIB = 2**20
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
# Optimizer state bytes per trainable parameter (8-bit Adam: 2 x 1 byte + a block-wise fp32 absmax per 2048).
OPTIMIZER_BYTES: dict[str, float] = {"adamw": 8.0, "paged_adamw": 8.0, "adamw_8bit": 2.0 + 8 / 2048,
                                     "paged_adamw_8bit": 2.0 + 8 / 2048, "sgd": 0.0}
CUDA_CONTEXT_BYTES = 500 * MIB  # CUDA context + kernel images: outside torch's allocator (nvidia-smi shows it)
CUBLAS_WORKSPACE_BYTES = 64 * MIB  # cuBLAS/cuBLASLt workspaces on Hopper: allocated through the caching allocator
# LLaMA-65B (Touvron et al. 2023): the model of the QLoRA paper's "65B on one 48 GB GPU".
LLAMA_65B = ModelShape("LLaMA-65B", 8192, 22016, 80, 64, 64, 32000)


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
