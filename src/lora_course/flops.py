"""Useful model FLOPs of a LoRA training step, and the GPU peaks they are divided by: the MFU column of the SFT
benchmark (``bench``: notebook 06's table, ``make bench-gpu``, docs/benchmarks.md).

- ``training_flops``: the useful FLOPs of one step over sequences of given lengths, from the model's shapes alone
  (``shapes.ModelShape``): 4 x frozen matmul parameters per token (forward and input gradients; the output head
  counts even when tied to the embeddings), 6 x LoRA parameters (their weight gradients too), and causal attention,
  6 x layers x heads*head_dim x n^2 per sequence of n tokens. Padding and recomputation under gradient checkpointing
  are not useful work and are not counted;
- ``PEAK_BF16_TFLOPS`` / ``gpu_peak_tflops``: a GPU's dense (no sparsity) bf16 tensor-core peak by its name, fp16 for
  the T4 (no bf16), or None when unknown.

MFU is ``training_flops`` per second over ``gpu_peak_tflops``. Sources: NVIDIA's data sheets (H100, H200, A100, L40S,
A10G, L4, T4) for the peaks; model FLOPs utilisation as defined in the PaLM paper (Chowdhery et al. 2022, appendix B:
6N per token plus 12 x layers x heads*head_dim x sequence length for attention), with attention halved for the causal
mask and LoRA's frozen weights counted without weight gradients.
"""
from __future__ import annotations

from .shapes import ALL_LINEAR, ModelShape

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s; fp16 for the T4 (no bf16).
PEAK_BF16_TFLOPS: dict[str, float] = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0,
                                      "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "T4": 65.0}


def gpu_peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name (longest matching key), or None when unknown."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if all(part in name for part in key.split()):
            return PEAK_BF16_TFLOPS[key]
    return None


def training_flops(shape: ModelShape, seq_lengths: list[int], r: int = 16,
                   targets: tuple[str, ...] = ALL_LINEAR) -> float:
    """Useful FLOPs of one LoRA training step over sequences of the given lengths (see the module docstring)."""
    if any(n <= 0 for n in seq_lengths):
        raise ValueError(f"sequence lengths must be positive, got {seq_lengths}")
    frozen = shape.num_layers * sum(a * b for a, b in shape.linear_shapes().values()) + \
        shape.vocab_size * shape.hidden_size  # the output head is a matmul even when tied to the embeddings
    lora = shape.lora_params(targets, r)
    attn_width = shape.num_heads * shape.head_size
    tokens = sum(seq_lengths)
    return (4 * frozen + 6 * lora) * tokens + 6 * shape.num_layers * attn_width * sum(n * n for n in seq_lengths)


__all__ = ["PEAK_BF16_TFLOPS", "gpu_peak_tflops", "training_flops"]
