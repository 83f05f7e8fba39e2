"""Real model shapes written out as data, to count parameters and LoRA's share of them without downloading.

Every number comes from the models' published ``config.json`` on the Hugging Face hub (meta-llama/Llama-3.1-8B,
meta-llama/Llama-3.1-70B, mistralai/Mistral-7B-v0.1, Qwen/Qwen2.5-7B, HuggingFaceTB/SmolLM2-135M-Instruct).
All are Llama-style decoders: per layer, attention projections q/k/v/o (grouped-query attention: k and v have
``num_kv_heads · head_dim`` outputs), a gated MLP gate/up/down, and two RMSNorm weight vectors; plus token
embeddings, a final norm and an output head that may share the embedding matrix (``tie_word_embeddings``).

``ModelShape.total_params()`` reproduces the published totals (Llama-3.1-8B: 8,030,261,248) and the loaded
SmolLM2-135M's 134,515,008; ``ModelShape.lora_params(targets, r)`` is ``layers · Σ r · (in + out)``.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

ATTENTION: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR: tuple[str, ...] = ATTENTION + MLP


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers of a Llama-style decoder, enough to count every parameter."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: int | None = None  # None: hidden_size // num_heads
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2 has them; o_proj has none)
    mlp_bias: bool = False

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``{module: (in_features, out_features)}`` of the seven linear layers of one decoder layer."""
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_size
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_params(self) -> int:
        """Parameters of one decoder layer: linear weights, their biases, and two RMSNorm vectors."""
        shapes = self.linear_shapes()
        n = sum(a * b for a, b in shapes.values()) + 2 * self.hidden_size
        if self.attention_bias:
            n += sum(shapes[m][1] for m in ("q_proj", "k_proj", "v_proj"))
        if self.mlp_bias:
            n += sum(shapes[m][1] for m in MLP)
        return n

    def total_params(self) -> int:
        """All parameters: embeddings, layers, final norm, and the output head unless tied to the embeddings."""
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + self.num_layers * self.layer_params() + self.hidden_size + head

    def lora_params(self, targets: Iterable[str] = ("q_proj", "v_proj"), r: int = 8) -> int:
        """Trainable LoRA parameters for ``targets`` in every layer at rank ``r``: ``layers · Σ r · (in + out)``."""
        shapes = self.linear_shapes()
        unknown = [t for t in targets if t not in shapes]
        if unknown:
            raise ValueError(f"unknown target(s) {unknown}: choose from {list(shapes)}")
        return self.num_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)

    def lora_percent(self, targets: Iterable[str] = ("q_proj", "v_proj"), r: int = 8) -> float:
        """LoRA's trainable parameters as a percentage of the base model's."""
        return 100.0 * self.lora_params(targets, r) / self.total_params()

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any, name: str | None = None) -> ModelShape:
        """Read the numbers from a transformers config object or a parsed ``config.json``."""
        get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
        heads = get("num_attention_heads")
        return cls(
            name=name or get("_name_or_path") or get("model_type") or "model",
            hidden_size=get("hidden_size"), intermediate_size=get("intermediate_size"),
            num_layers=get("num_hidden_layers"), num_heads=heads,
            num_kv_heads=get("num_key_value_heads") or heads, vocab_size=get("vocab_size"),
            head_dim=get("head_dim"), tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            # Qwen2 configs do not say it, but its q/k/v projections always carry biases.
            attention_bias=bool(get("attention_bias", get("model_type") == "qwen2")),
            mlp_bias=bool(get("mlp_bias", False)),
        )


LLAMA_3_1_8B = ModelShape("Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256, head_dim=128)
LLAMA_3_1_70B = ModelShape("Llama-3.1-70B", 8192, 28672, 80, 64, 8, 128256, head_dim=128)
MISTRAL_7B = ModelShape("Mistral-7B-v0.1", 4096, 14336, 32, 32, 8, 32000, head_dim=128)
QWEN2_5_7B = ModelShape("Qwen2.5-7B", 3584, 18944, 28, 28, 4, 152064, head_dim=128, attention_bias=True)
SMOLLM2_135M = ModelShape("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, head_dim=64, tie_word_embeddings=True)

MODELS: dict[str, ModelShape] = {m.name: m for m in (LLAMA_3_1_8B, LLAMA_3_1_70B, MISTRAL_7B, QWEN2_5_7B,
                                                     SMOLLM2_135M)}


__all__ = ["ALL_LINEAR", "ATTENTION", "LLAMA_3_1_8B", "LLAMA_3_1_70B", "MISTRAL_7B", "MLP", "MODELS",
           "QWEN2_5_7B", "SMOLLM2_135M", "ModelShape"]
