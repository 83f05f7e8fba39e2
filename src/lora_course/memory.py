"""Training memory of full fine-tuning, LoRA and QLoRA, measured: the peak of a real run beside the estimate.

``measure_peak`` runs a configuration (``run_measurement``: a few AdamW steps on fixed-shape batches) in a fresh
subprocess (``python -m lora_course.memory --measure ...``) so peaks never mix. On a GPU the peak is
``torch.cuda.max_memory_allocated``, reset after loading. On a CPU, which has no such counter, it is the model's
tensor bytes plus the rise of the process's peak resident memory (Linux's ``VmHWM``, reset to the current RSS after
loading through ``/proc/self/clear_refs``) during training: ``cpu_peak_start`` / ``cpu_peak_bytes``, with glibc made
to return freed blocks to the OS (``MALLOC_MMAP_THRESHOLD_=65536``) so that RSS follows the live tensors. Beside that
peak, the first step's gradients, optimizer states and saved activations are counted tensor by tensor
(``Measurement.counted``): byte counts that do not depend on the allocator, the CPU or the load, compared with the
estimator's components (``estimated``; the estimator is ``memory_estimate``). ``PeakMeasurements`` runs several
methods one after the other in the background (notebook 04).
``python -m lora_course.memory --gpu-check --tokenizer-source DIR`` checks the estimator within 15% on a GPU
(``gpu_memory_benchmark``, on ``models.gpu_model_dir``'s random-init Llama of Llama-3.2-1B's shape); without
arguments it prints the references' memory tables beside the estimates.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .memory_estimate import MIB, TrainingSetup, compare_with_references, estimate_memory, format_rows
from .models import METHODS, gpu_model_dir, load_for_method
from .procs import run_module
from .shapes import ALL_LINEAR


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
    # under a memory limit (run_measurement's memory_limit_mib): the allocator's refusal, "" when the step fitted
    out_of_memory: str = ""

    @property
    def ratio(self) -> float:
        return self.measured_bytes / self.estimate_bytes

    def count_ratios(self) -> dict[str, float]:
        """Counted / estimated bytes of each component counted tensor by tensor (1.0: the estimator is exact)."""
        return {k: self.counted[k] / v for k, v in self.estimated.items() if k in self.counted and v}

    def __str__(self) -> str:
        if self.out_of_memory:
            return (f"{self.method:<6} {self.device:<5} OUT OF MEMORY (estimate {self.estimate_bytes / MIB:.0f} MiB): "
                    f"{self.out_of_memory[:160]}")
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


def limit_training_memory(limit_mib: float, device: str = "cpu") -> int:
    """Allow this process ``limit_mib`` MiB more than it holds now; beyond it an allocation fails (out of memory).

    CPU (Linux): ``RLIMIT_DATA`` (since Linux 4.7 it covers the heap and private anonymous mappings, where torch's
    tensors live) set to the current ``VmData`` plus the limit; torch then raises ``RuntimeError: ...
    DefaultCPUAllocator: can't allocate memory``. CUDA: ``torch.cuda.set_per_process_memory_fraction`` at the bytes
    allocated now plus the limit; torch raises ``torch.OutOfMemoryError``. Returns the limit in bytes (absolute).
    """
    import resource

    import torch

    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(0).total_memory
        cap = torch.cuda.memory_allocated() + int(limit_mib * MIB)
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
        return cap
    if not sys.platform.startswith("linux"):
        raise RuntimeError(f"a CPU memory limit needs Linux's RLIMIT_DATA (this is {sys.platform}): run it on Linux, "
                           "Colab or Kaggle")
    cap = _rss("VmData") + int(limit_mib * MIB)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    return cap


def _is_out_of_memory(err: BaseException) -> bool:
    text = str(err)
    return type(err).__name__ == "OutOfMemoryError" or isinstance(err, MemoryError) or "can't allocate memory" in text


def run_measurement(method: str, profile: str = "cpu", model_id: str | None = None, task: str | None = "creative",
                    batch_size: int = 4, seq_len: int = 96, steps: int = 3, r: int = 16, lr: float = 1e-3,
                    gradient_checkpointing: bool = False, eval_n: int = 0, seed: int = 0,
                    memory_limit_mib: float | None = None) -> Measurement:
    """Train ``steps`` AdamW steps in *this* process and measure its peak memory (call it in a fresh process).

    With ``memory_limit_mib`` training may use that much memory beyond the loaded model (``limit_training_memory``):
    a step that needs more fails as on a full GPU, and the Measurement carries the allocator's message in
    ``out_of_memory`` (the process then holds a limit: run it in a fresh one, as ``measure_peak`` does)."""
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
    from .hardware import check_scalable, make_grad_scaler, train_precision

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
    if memory_limit_mib is not None:
        limit_training_memory(memory_limit_mib, "cuda" if cuda else "cpu")
    model.train()
    counted: dict[str, int] = {}
    losses, t0 = [], time.perf_counter()
    try:
        _train_measured(model, batches, opt, params, scaler, amp, device, gradient_checkpointing, counted, losses)
    except (RuntimeError, MemoryError) as err:
        if memory_limit_mib is None or not _is_out_of_memory(err):
            raise
        oom = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    else:
        oom = ""
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
    if eval_n and not oom:
        from .data import load_task
        from .evaluate import perplexity

        ppl = perplexity(model, tok, load_task(task or "creative", "eval")[:eval_n], batch_size=eval_n)
    return Measurement(method, "cuda" if cuda else "cpu", int(measured), est.total, int(load_bytes), losses, sec,
                       ppl, str(est), counted, estimated, oom)


def _train_measured(model: Any, batches: list, opt: Any, params: list, scaler: Any, amp: str, device: Any,
                    gradient_checkpointing: bool, counted: dict[str, int], losses: list[float]) -> None:
    """``run_measurement``'s training loop: the first step's saved activations, gradients and optimizer states are
    counted tensor by tensor into ``counted``; each step's loss is appended to ``losses``."""
    import torch

    from .hardware import amp_context

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
    path = model_dir or str(gpu_model_dir(tokenizer_source))
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
