"""What each process holds and sends when a LoRA is trained on N processes: memory per rank and bytes per step.

``estimate_memory_per_rank`` extends notebook 04's ``memory_estimate.estimate_memory`` with a world size. Under DDP
every rank holds everything (plus DDP's gradient buckets, a second copy of the gradients it all-reduces); under FSDP
each rank keeps 1/N of every parameter, gradient and optimizer state (each parameter's first dimension padded to a
multiple of N), and a unit's full weights only while it computes. Activations belong to the per-process batch.

``communication_per_step`` counts the bytes each rank sends in one optimizer step from the model's shape and
the cost of each collective per rank: all-reduce ``2(N-1)/N x bytes``, all-gather and reduce-scatter
``(N-1)/N x bytes`` (ring algorithms; nccl-tests' PERFORMANCE.md "bus bandwidth" factors). gloo, the CPU backend,
reduce-scatters at the price of an all-reduce: measured on this stack (torch 2.13) for N=2 and N=3.

- DDP: one all-reduce of the trainable (LoRA) gradients.
- FSDP2 (``fully_shard`` on each decoder layer, then the root): all-gather every unit for forward, every unit
  but the root again for backward (the root is not resharded after forward), reduce-scatter the gradients of
  the trainable parameters. Frozen base weights travel too: FSDP trades memory for traffic.

Sources: PyTorch docs of ``DistributedDataParallel`` (``gradient_as_bucket_view``) and ``fully_shard``
(``reshard_after_forward``: "the root FSDP state has its value specially set to False"); NVIDIA nccl-tests
doc/PERFORMANCE.md; Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models"
(2020) for the per-rank memory of sharded states.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .memory_estimate import DTYPE_BYTES, MemoryEstimate, TrainingSetup, estimate_memory
from .shapes import ModelShape

BACKENDS: tuple[str, ...] = ("nccl", "gloo")
STRATEGIES: tuple[str, ...] = ("ddp", "fsdp")
# Components of memory_estimate.estimate_memory: model state (sharded by FSDP) or per-process work (not sharded).
_STATE = ("weights", "quant constants", "gradients", "fp32 master weights", "LoRA params", "LoRA gradients",
          "optimizer states")
_WORK = ("activations", "optimizer step temporaries", "cuBLAS workspaces")


def _check(strategy: str, world_size: int, backend: str | None = None) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def component_kind(name: str) -> str:
    """``state`` (parameters, gradients, optimizer: FSDP shards it) or ``work`` (activations, workspaces)."""
    if name.startswith(_STATE):
        return "state"
    if name.startswith(_WORK):
        return "work"
    raise ValueError(f"memory component {name!r} is neither model state nor per-process work: add it to "
                     "lora_course.scaling._STATE or _WORK")


def estimate_memory_per_rank(shape: ModelShape, setup: TrainingSetup, world_size: int, strategy: str = "ddp",
                             device: str = "cuda") -> MemoryEstimate:
    """Bytes one rank holds at the peak of a step when ``world_size`` processes train ``shape`` together.

    ``setup.batch_size`` is the per-process batch. DDP: notebook 04's estimate plus a gradient-sized bucket buffer
    (``gradient_as_bucket_view=False``, the default). FSDP: model state divided by the world size, plus the
    largest unit held whole while it computes.
    """
    _check(strategy, world_size)
    est = estimate_memory(shape, setup, device)
    comps: dict[str, int] = {}
    notes = list(est.notes)
    for name, value in est.components.items():
        if strategy == "fsdp" and world_size > 1 and component_kind(name) == "state":
            comps[f"{name} / {world_size} ranks"] = math.ceil(value / world_size)
        else:
            comps[name] = value
    if world_size > 1 and strategy == "ddp":
        grads = sum(v for k, v in est.components.items() if k.startswith(("LoRA gradients", "gradients")))
        comps["DDP gradient buckets (a copy of the gradients)"] = grads
        notes.append("DDP(gradient_as_bucket_view=True) makes gradients views of the buckets: one copy less")
    if world_size > 1 and strategy == "fsdp":
        units = fsdp_units(shape, setup)
        wb = 4 if setup.method == "qlora" else DTYPE_BYTES[setup.dtype]
        comps["all-gathered root + one layer (while they compute)"] = (units["root"][0] + units["layer"][0]) * wb
        if setup.method == "qlora":
            notes.append("QLoRA: assumes the 4-bit weights are sharded like any other (bnb_4bit_quant_storage); "
                         "not measured here (needs GPUs)")
    return MemoryEstimate(f"{shape.name} | {strategy} x {world_size}", setup, comps, est.runtime_overhead, notes)


def fsdp_units(shape: ModelShape, setup: TrainingSetup) -> dict[str, tuple[int, int]]:
    """``{unit: (parameters, trainable parameters)}`` of one decoder layer and of the root (embeddings, head,
    final norm), LoRA included, as ``fully_shard`` on each layer and then on the model groups them."""
    lora_layer = shape.lora_params(setup.targets, setup.r) // shape.num_layers if setup.method != "full" else 0
    layer = shape.layer_params()
    root = shape.total_params() - shape.num_layers * layer
    if setup.method == "full":
        return {"layer": (layer, layer), "root": (root, root)}
    return {"layer": (layer + lora_layer, lora_layer), "root": (root, 0)}


def collective_bytes(op: str, nbytes: float, world_size: int, backend: str = "nccl") -> float:
    """Bytes one rank sends in a collective over ``nbytes`` (the full tensor: all-reduced, gathered or scattered)."""
    _check("ddp", world_size, backend)
    f = (world_size - 1) / world_size
    if op == "all_reduce":
        return 2 * f * nbytes
    if op == "all_gather":
        return f * nbytes
    if op == "reduce_scatter":
        return (2 * f if backend == "gloo" else f) * nbytes
    raise ValueError(f"unknown collective {op!r}: choose all_reduce, all_gather or reduce_scatter")


@dataclass
class CommVolume:
    """Bytes one rank sends per optimizer step, per collective, with the rule each line follows."""

    strategy: str
    world_size: int
    backend: str
    collectives: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.collectives.values())

    def __str__(self) -> str:
        rows = [f"  {k:<62}{v / 2**20:>12.3f} MiB" for k, v in self.collectives.items()]
        return "\n".join([f"{self.strategy} x {self.world_size} ({self.backend}): sent per rank per step", *rows,
                          f"  {'total':<62}{self.total / 2**20:>12.3f} MiB"])


def _padded(numel: int, world_size: int) -> int:
    return math.ceil(numel / world_size) * world_size


def communication_per_step(shape: ModelShape, setup: TrainingSetup, world_size: int, strategy: str = "ddp",
                           backend: str = "nccl", param_bytes: int | None = None, grad_bytes: int = 4,
                           grad_accum: int = 1) -> CommVolume:
    """Bytes each rank sends per optimizer step of ``grad_accum`` micro-steps.

    Gradients are synchronised once per step (DDP's ``no_sync``, FSDP's ``set_requires_gradient_sync(False)`` on
    the other micro-steps), but FSDP all-gathers the weights again for every micro-step's forward and backward.
    ``param_bytes``: bytes per parameter as all-gathered (the compute dtype under a mixed-precision policy; default
    the setup's dtype, fp32 on CPU). ``grad_bytes``: bytes per gradient element as reduced (fp32 LoRA gradients).
    """
    _check(strategy, world_size, backend)
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be a positive integer, got {grad_accum}")
    pb = param_bytes or DTYPE_BYTES[setup.dtype]
    vol = CommVolume(strategy, world_size, backend)
    if world_size == 1:
        return vol
    units = fsdp_units(shape, setup)
    trainable = units["layer"][1] * shape.num_layers + units["root"][1]
    if strategy == "ddp":
        vol.collectives["all-reduce trainable gradients"] = collective_bytes(
            "all_reduce", trainable * grad_bytes, world_size, backend)
        return vol
    layers = shape.num_layers * _padded(units["layer"][0], world_size) * pb
    root = _padded(units["root"][0], world_size) * pb
    times = f" (x {grad_accum} micro-steps)" if grad_accum > 1 else ""
    vol.collectives[f"forward: all-gather every unit (root + layers){times}"] = grad_accum * collective_bytes(
        "all_gather", root + layers, world_size, backend)
    vol.collectives[f"backward: all-gather the layers again (root kept){times}"] = grad_accum * collective_bytes(
        "all_gather", layers, world_size, backend)
    vol.collectives["backward: reduce-scatter trainable gradients"] = collective_bytes(
        "reduce_scatter", _padded(trainable, world_size) * grad_bytes, world_size, backend)
    return vol


def batch_plan(global_batch: int, num_processes: int, per_device_batch: int) -> int:
    """Gradient-accumulation steps that keep ``global_batch`` with this many processes and per-process batch."""
    per_step = num_processes * per_device_batch
    if global_batch % per_step:
        raise ValueError(f"a global batch of {global_batch} is not a multiple of {num_processes} processes x "
                         f"{per_device_batch} per process = {per_step}: change per_device_batch or global_batch")
    return global_batch // per_step


def scaled_lr(lr: float, old_global_batch: int, new_global_batch: int, rule: str = "sqrt") -> float:
    """A starting learning rate for a new global batch: ``linear`` (Goyal et al. 2017, SGD) or ``sqrt`` (Malladi et
    al. 2022, Adam-type optimizers). A rule of thumb to start from, not a guarantee: check the loss curve."""
    ratio = new_global_batch / old_global_batch
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    raise ValueError(f"unknown rule {rule!r}: choose 'linear' or 'sqrt'")


def shape_of(model: Any) -> ModelShape:
    """The ``ModelShape`` of a loaded transformers model (or a peft model around one)."""
    config = getattr(model, "config", None) or model.get_base_model().config
    return ModelShape.from_config(config, name=str(getattr(config, "_name_or_path", "model")).rsplit("/", 1)[-1])


__all__ = ["CommVolume", "batch_plan", "collective_bytes", "communication_per_step", "component_kind",
           "estimate_memory_per_rank", "fsdp_units", "scaled_lr", "shape_of"]
