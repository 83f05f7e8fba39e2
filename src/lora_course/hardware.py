"""The one place the course reads the hardware it decides from: GPU, compute capability, bf16, memory, GPU count.

Every precision and batch-size choice of the course (``models.select_dtype``, ``sft.detect_hardware`` and the SFT
recipe, the training loop, Unsloth serving) comes from here, so one switch changes them all:

- ``gpu_info()``: the first CUDA GPU (or the current one) as the course sees it: name, compute capability, whether
  it has **native** bf16 (compute capability >= 8.0, Ampere and newer), memory, number of GPUs.
  ``torch.cuda.is_bf16_supported()`` is not the test: it is True on a T4 (sm75) too, where bf16 is emulated and
  slow, and where Unsloth then refuses bf16.
- ``LORA_COURSE_EMULATE=t4``: decide as on a Colab/Kaggle T4 (compute capability 7.5, no native bf16, 15 GiB)
  on a bigger GPU. Only the course's own decisions change; ``torch.cuda.get_device_capability`` is left alone, so
  Triton, bitsandbytes and Unsloth still compile for the real GPU (patching it makes Triton fail with "no kernel
  image is available"). The memory is capped for real: the first time the course touches a GPU in a process,
  ``torch.cuda.set_per_process_memory_fraction(15 GiB / total)`` is applied to it, so an allocation beyond 15 GiB
  raises ``OutOfMemoryError`` as it would on a T4. What the emulation cannot show: a T4's kernels (no bf16 tensor
  cores, no FlashAttention-2, other Triton/bitsandbytes code paths), its speed (65 fp16 TFLOP/s against an H200's
  ~990 bf16) and the CUDA context's own ~0.3-0.5 GiB, which on a T4 comes out of the 15 GiB but is outside the
  allocator's cap here.
- ``train_precision(mode)``: the precision rules of each way of training (``full``, ``lora``, ``qlora``, and
  ``inference``) as one table: the dtype to load with, the compute dtype, the adapters' dtype, the
  ``fp16``/``bf16`` flags of ``TrainingArguments``/``SFTConfig`` and whether a gradient scaler runs.
- ``loop_amp(model)`` / ``amp_context``: what the course's plain training loop (``train.train_steps``) does for a
  model: fp16 autocast + ``GradScaler`` when the model computes in fp16 on a GPU, the model as loaded otherwise.
- ``single_device(args)``: a ``TrainingArguments`` that trains on one GPU even when several are visible (Kaggle's
  2x T4), unless the process was launched distributed (accelerate/torchrun).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

EMULATE_ENV = "LORA_COURSE_EMULATE"
NATIVE_BF16_CAPABILITY = (8, 0)
"""bf16 tensor cores arrived with Ampere (sm80); a T4 (sm75) or V100 (sm70) only emulates bf16."""
MODES: tuple[str, ...] = ("full", "lora", "qlora", "inference")
LOOP_AMPS: tuple[str, ...] = ("auto", "fp16", "bf16", "off")


@dataclass(frozen=True)
class Emulation:
    """A GPU the course can be told to decide as (``LORA_COURSE_EMULATE``)."""

    key: str
    name: str
    capability: tuple[int, int]
    memory_gib: float


EMULATIONS: dict[str, Emulation] = {
    # Colab's and Kaggle's T4: 16 GB card, 15,360 MiB visible to CUDA (nvidia-smi and torch report 15.0 GiB).
    "t4": Emulation("t4", "Tesla T4", (7, 5), 15.0),
}


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS has one (a container's or ``taskset``'s limit,
    a Kaggle or Colab VM's share), else ``os.cpu_count()``. Thread pools sized by ``os.cpu_count()`` on a machine
    shared by several processes oversubscribe it: seen on the GPU lane, where two notebook 08s each ran llama.cpp on
    all 16 cores of a 16-core host and neither finished its speed cell within 230 s (alone: 95 s for the notebook)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def emulation() -> Emulation | None:
    """The emulation ``LORA_COURSE_EMULATE`` asks for (None when unset or empty); an unknown value raises."""
    raw = os.environ.get(EMULATE_ENV, "").strip().lower()
    if raw in ("", "0", "none", "off"):
        return None
    if raw not in EMULATIONS:
        raise ValueError(f"{EMULATE_ENV}={raw!r} is not an emulation the course knows: use one of "
                         f"{', '.join(sorted(EMULATIONS))}, or unset it to decide from the real GPU")
    return EMULATIONS[raw]


@dataclass(frozen=True)
class GPUInfo:
    """The GPU as the course decides from it (emulated values when ``LORA_COURSE_EMULATE`` is set)."""

    available: bool
    name: str
    capability: tuple[int, int] | None
    memory_bytes: int  # what the course may use: the card's total, or the emulated budget
    n_gpus: int
    emulated: str | None = None  # the emulation's key ("t4"), None on real hardware
    real_name: str = ""
    real_capability: tuple[int, int] | None = None  # what compilers (Triton, bitsandbytes, Unsloth) see
    real_memory_bytes: int = 0

    @property
    def native_bf16(self) -> bool:
        """bf16 tensor cores: compute capability >= 8.0 (not ``torch.cuda.is_bf16_supported``, True on a T4)."""
        return self.capability is not None and self.capability >= NATIVE_BF16_CAPABILITY

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 2**30


_memory_limited: dict[int, float] = {}  # device index -> fraction applied in this process


def _limit_memory(index: int, budget: int, total: int) -> None:
    """Cap this process's allocations on GPU ``index`` at ``budget`` bytes, once per device and process."""
    import torch

    if index in _memory_limited or budget >= total:
        return
    fraction = budget / total
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    _memory_limited[index] = fraction


def gpu_info(device: Any = None) -> GPUInfo:
    """Describe the GPU the course will use (``device``: an index, ``"cuda:1"``, a ``torch.device``; default current).

    Without CUDA: ``available=False``, ``name="cpu"``. With ``LORA_COURSE_EMULATE`` set, the emulated capability and
    memory are returned and, the first time for a device in this process, the memory cap is applied to it.
    """
    import torch

    emu = emulation()  # an unknown value raises even on a CPU machine: the switch is wrong everywhere
    if not torch.cuda.is_available():
        return GPUInfo(False, "cpu", None, 0, 0)
    index = _device_index(device)
    props = torch.cuda.get_device_properties(index)
    real = (props.major, props.minor)
    count = torch.cuda.device_count()
    if emu is None:
        return GPUInfo(True, props.name, real, props.total_memory, count, None, props.name, real, props.total_memory)
    budget = min(int(emu.memory_gib * 2**30), props.total_memory)
    _limit_memory(index, budget, props.total_memory)
    name = f"{props.name} deciding as a {emu.name} ({EMULATE_ENV}={emu.key})"
    return GPUInfo(True, name, emu.capability, budget, count, emu.key, props.name, real, props.total_memory)


def _device_index(device: Any) -> int:
    import torch

    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"gpu_info needs a CUDA device, got {device!r}")
    return torch.cuda.current_device() if dev.index is None else dev.index


def native_bf16() -> bool:
    """Whether the GPU has bf16 tensor cores (False without CUDA and under ``LORA_COURSE_EMULATE=t4``)."""
    return gpu_info().native_bf16


def select_dtype(device: str | None = None) -> Any:
    """Inference/weights precision: bf16 with native bf16, fp16 on older GPUs (T4, V100), fp32 on CPU.

    fp32 on CPU because bf16 matmuls there are emulated and about 5x slower on this course's machines.
    """
    import torch

    device = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        return torch.bfloat16 if gpu_info(device).native_bf16 else torch.float16
    return torch.float32


# ------------------------------------------------------------------------------------------------ precision
@dataclass(frozen=True)
class TrainPrecision:
    """How one way of training runs on this hardware; ``trainer_flags()`` go to ``TrainingArguments``/``SFTConfig``."""

    mode: str  # full | lora | qlora | inference
    device: str  # cuda | cpu
    precision: str  # the compute precision: bf16 | fp16 | fp32
    model_dtype: Any  # from_pretrained(dtype=...): the weights as loaded (fp32 master weights for full FT in fp16)
    compute_dtype: Any  # matmul dtype (bnb_4bit_compute_dtype for qlora, the autocast dtype under fp16)
    adapter_dtype: Any  # trainable adapter parameters (lora/qlora); None for full/inference
    fp16: bool  # TrainingArguments(fp16=...): autocast to fp16 and a GradScaler
    bf16: bool  # TrainingArguments(bf16=...): autocast to bf16, no scaler
    grad_scaler: bool  # whether the loss is scaled (fp16): trainable parameters must then be fp32
    loop_amp: str  # what train.train_steps should use: "fp16" (autocast + GradScaler) or "off" (as loaded)
    reason: str

    def trainer_flags(self) -> dict[str, bool]:
        """``{"fp16": ..., "bf16": ...}`` for ``TrainingArguments``/``SFTConfig`` (never both; TRL defaults bf16 on)."""
        return {"fp16": self.fp16, "bf16": self.bf16}

    def as_dict(self) -> dict[str, Any]:
        name = (lambda d: None if d is None else str(d).replace("torch.", ""))
        return {"mode": self.mode, "device": self.device, "precision": self.precision,
                "model_dtype": name(self.model_dtype), "compute_dtype": name(self.compute_dtype),
                "adapter_dtype": name(self.adapter_dtype), "fp16": self.fp16, "bf16": self.bf16,
                "grad_scaler": self.grad_scaler, "loop_amp": self.loop_amp, "reason": self.reason}


def train_precision(mode: str, device: str | None = None, gpu: GPUInfo | None = None) -> TrainPrecision:
    """The precision rules for ``mode`` (full | lora | qlora | inference) on ``device`` (default: CUDA if present).

    - CPU: fp32 everywhere (bf16 matmuls are emulated there, ~5x slower), no mixed precision.
    - native bf16 (sm80+): weights bf16 (full fine-tuning in pure bf16, as the course measured on H100/H200),
      adapters fp32 (peft's ``autocast_adapter_dtype=True``), ``bf16=True``; bf16 has fp32's exponent range, so no
      loss scaling.
    - no native bf16 (T4, V100, ``LORA_COURSE_EMULATE=t4``): fp16 with a ``GradScaler`` (``fp16=True``), whose
      unscale step accepts only fp32 gradients. So full fine-tuning loads **fp32 master weights** and computes in
      fp16 under autocast (pure fp16 weights break AdamW: its second moment underflows in fp16), and LoRA/QLoRA
      keep their adapters in fp32 over an fp16 (or NF4 with fp16 compute) base.
    """
    import torch

    if mode not in MODES:
        raise ValueError(f"unknown training mode {mode!r}: choose one of {', '.join(MODES)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = "cuda" if str(device).startswith("cuda") else "cpu" if str(device) == "cpu" else str(device)
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    f32, f16, b16 = torch.float32, torch.float16, torch.bfloat16
    adapters = f32 if mode in ("lora", "qlora") else None
    if device == "cpu":
        return TrainPrecision(mode, "cpu", "fp32", f32, f32, adapters, False, False, False, "off",
                              "CPU: bf16 matmuls are emulated there (about 5x slower); everything in fp32")
    gpu = gpu or gpu_info()
    if not gpu.available:
        raise ValueError("train_precision(device='cuda') on a machine without a CUDA GPU: ask for device='cpu' "
                         "(or leave device unset), or pass gpu=GPUInfo(...) to ask about another machine")
    if gpu.native_bf16:
        return TrainPrecision(mode, "cuda", "bf16", b16, b16, adapters, False, mode != "inference", False, "off",
                              f"{gpu.name}: native bf16 (compute capability >= 8.0), fp32's range, no loss scaling")
    why = f"{gpu.name}: no native bf16 (compute capability {_cap(gpu.capability)} < 8.0): fp16"
    if mode == "inference":
        return TrainPrecision(mode, "cuda", "fp16", f16, f16, None, False, False, False, "off", why)
    if mode == "full":
        return TrainPrecision(mode, "cuda", "fp16", f32, f16, None, True, False, True, "fp16",
                              why + " autocast over fp32 master weights, loss scaled (pure fp16 weights break AdamW)")
    return TrainPrecision(mode, "cuda", "fp16", f16, f16, f32, True, False, True, "fp16",
                          why + f" {'NF4 ' if mode == 'qlora' else ''}base, fp32 adapters, loss scaled (GradScaler "
                          "unscales fp32 gradients only)")


def _cap(cap: tuple[int, int] | None) -> str:
    return "unknown" if cap is None else f"{cap[0]}.{cap[1]}"


def compute_dtypes(model: Any) -> set[Any]:
    """The dtypes ``model`` computes in: its floating parameters' and its quantized layers' ``compute_dtype``."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes | {m.compute_dtype for m in model.modules() if getattr(m, "compute_dtype", None) is not None}


def loop_amp(model: Any) -> str:
    """``"fp16"`` when ``model`` is on a GPU and computes in fp16 (fp16 weights, or 4-bit layers with fp16 compute),
    else ``"off"``.

    The plain loop then scales the loss as ``Trainer(fp16=True)`` does; bf16 and fp32 models train as loaded (bf16
    needs no loss scaling), exactly as before this switch existed.
    """
    import torch

    if not any(p.device.type == "cuda" for p in model.parameters()):
        return "off"
    return "fp16" if torch.float16 in compute_dtypes(model) else "off"


def resolve_loop_amp(model: Any, amp: str) -> str:
    """``amp`` checked (one of ``LOOP_AMPS``) and ``"auto"`` resolved through ``loop_amp``."""
    if amp not in LOOP_AMPS:
        raise ValueError(f"unknown amp {amp!r}: choose one of {', '.join(LOOP_AMPS)} "
                         "('auto': fp16 with a GradScaler when the model computes in fp16, else as loaded)")
    return loop_amp(model) if amp == "auto" else amp


def check_scalable(params: list[Any]) -> None:
    """Raise when a trainable parameter is not fp32: ``GradScaler.unscale_`` cannot unscale fp16/bf16 gradients."""
    import torch

    bad = sorted({str(p.dtype).replace("torch.", "") for p in params if p.dtype != torch.float32})
    if bad:
        raise ValueError(
            f"fp16 training with a GradScaler needs fp32 trainable parameters, found {', '.join(bad)} ones. "
            "LoRA/QLoRA: keep peft's default autocast_adapter_dtype=True (adapters in fp32); full fine-tuning: load "
            "fp32 master weights (dtype=hardware.train_precision('full').model_dtype) and let autocast compute in fp16")


@contextlib.contextmanager
def amp_context(amp: str, device_type: str) -> Iterator[None]:
    """``torch.autocast`` to fp16/bf16 for ``amp`` in ("fp16", "bf16"); nothing for "off"."""
    import torch

    if amp == "off":
        yield
        return
    with torch.autocast(device_type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16):
        yield


def make_grad_scaler(amp: str, device_type: str) -> Any:
    """A ``torch.amp.GradScaler`` for fp16 (torch's defaults, as ``Trainer(fp16=True)`` uses), else None."""
    import torch

    return torch.amp.GradScaler(device_type) if amp == "fp16" else None


def upcast_trainable(model: Any) -> int:
    """Cast every trainable floating parameter that is not fp32 to fp32 in place; returns how many were cast.

    TRL 1.15's ``SFTTrainer`` casts the trainable parameters of a quantized model to bf16 whatever the precision
    asked (``if _is_quantized_model: param.data = param.data.to(torch.bfloat16)``), and fp16's GradScaler then
    fails (``"_amp_foreach_non_finite_check_and_unscale_cuda" not implemented for 'BFloat16'``).
    """
    import torch

    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.to(torch.float32)
            cast += 1
    return cast


# ---------------------------------------------------------------------------------------- several GPUs
def launched_distributed() -> bool:
    """Whether this process was started by accelerate/torchrun (one process per GPU)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 or "LOCAL_RANK" in os.environ


def single_device(args: Any) -> Any:
    """``args`` (``TrainingArguments``/``SFTConfig``) made to train on one GPU when several are visible.

    transformers 5.17 sets ``args.n_gpu = torch.cuda.device_count()`` in a process that was not launched
    distributed, and ``Trainer`` then wraps the model in ``nn.DataParallel`` (Kaggle's 2x T4: every step scatters
    the batch, replicates the model and gathers the outputs, and the per-device batch doubles). The course's
    single-GPU notebooks train on ``cuda:0``: ``args._n_gpu`` is set to 1 (what ``Trainer`` itself does for a model
    split across GPUs). Distributed runs (accelerate/torchrun, notebook 10) already have ``n_gpu == 1``; untouched.
    Setting ``CUDA_VISIBLE_DEVICES=0`` before torch starts does the same for the whole process.
    """
    import torch

    if torch.cuda.device_count() <= 1 or launched_distributed():
        return args
    if args.n_gpu > 1:  # first access runs TrainingArguments' device set-up (cached)
        args._n_gpu = 1
    return args


# ------------------------------------------------------------------------------------------------- report
def describe() -> dict[str, Any]:
    """The fields the environment doctor shows: capability, native bf16, memory, GPU count, emulation."""
    import torch

    gpu = gpu_info()
    out: dict[str, Any] = {"gpu": gpu.name if gpu.available else "none", "gpu_count": gpu.n_gpus}
    if gpu.available:
        out.update({"compute_capability": _cap(gpu.capability), "native_bf16": gpu.native_bf16,
                    "torch_bf16_supported": bool(torch.cuda.is_bf16_supported()),
                    "gpu_memory_gib": round(gpu.memory_gib, 1)})
        if gpu.emulated:
            out.update({"emulating": f"{EMULATIONS[gpu.emulated].name} ({EMULATE_ENV}={gpu.emulated}); compilers see "
                                     f"{gpu.real_name} {_cap(gpu.real_capability)}",
                        "gpu_memory_real_gib": round(gpu.real_memory_bytes / 2**30, 1)})
    elif os.environ.get(EMULATE_ENV):
        out["emulating"] = f"nothing: {EMULATE_ENV} is set but there is no CUDA GPU (the CPU path is unchanged)"
    out["dtype"] = str(select_dtype()).replace("torch.", "")
    return out


__all__ = ["EMULATE_ENV", "EMULATIONS", "LOOP_AMPS", "MODES", "GPUInfo", "TrainPrecision", "amp_context",
           "check_scalable", "compute_dtypes", "describe", "emulation", "gpu_info", "launched_distributed", "loop_amp",
           "make_grad_scaler", "native_bf16", "resolve_loop_amp", "select_dtype", "single_device",
           "train_precision", "upcast_trainable"]
