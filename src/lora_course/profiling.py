"""Where a training step's time goes (notebook 06, ``make bench-gpu``'s traces): ``torch.profiler`` over a few steps,
each operator's own time summed into families a reader can act on, and the trace written for Perfetto.

- ``family_of(name)``: an operator or kernel name -> ``matmul``, ``attention``, ``nf4 dequant``, ``optimizer``,
  ``loss``, ``elementwise/norm``, ``memory/copy`` or ``other`` (first match in ``FAMILIES``' order);
- ``profile_steps(step, steps, warmup)`` -> ``StepProfile``: wall seconds per step, each family's self time (device time
  on a GPU: kernels; CPU time on a CPU), on a GPU the share of the wall time the device was busy, and the trace file
  (open it at https://ui.perfetto.dev or in TensorBoard).

Self time (an operator's time minus its children's) adds up without double counting: the families partition it.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAMILIES: tuple[tuple[str, str], ...] = (
    ("nf4 dequant", r"dequant|kdequant|gemv_4bit|bnb|4bit|nf4"),
    ("loss", r"cross_entropy|nll_loss|log_softmax"),
    ("attention", r"attention|flash|sdpa|softmax|fmha"),
    ("matmul", r"\bmm\b|aten::mm|addmm|bmm|matmul|linear|gemm|gemv|cublas|cutlass|xmma|sm\d+_"),
    ("optimizer", r"adam|foreach|optimizer|_fused_adam|lerp|addcdiv|addcmul"),
    ("memory/copy", r"copy|contiguous|\bto\b|_to_copy|cat\b|empty|fill|zero_|clone|index|gather|scatter|memcpy|memset"),
    ("elementwise/norm",
     r"mul|add|sub|div|pow|rsqrt|mean|sum|silu|gelu|neg|exp|norm|where|clamp|sqrt|rotary|embedding"),
)
"""Families in matching order: the first pattern (case-insensitive, searched in the name) that matches wins, so the
4-bit and attention kernels are not counted as the matmuls inside them."""
OTHER = "other"


def family_of(name: str) -> str:
    """The family of an operator or kernel name (``FAMILIES``), else ``other``."""
    low = name.lower()
    for family, pattern in FAMILIES:
        if re.search(pattern, low):
            return family
    return OTHER


@dataclass
class StepProfile:
    """What ``profile_steps`` measured: per-step wall time, each family's self time per step, and the trace."""

    device: str
    steps: int
    wall_s: float                      # wall seconds per profiled step
    family_s: dict[str, float]         # self seconds per step, by family (device time on a GPU)
    busy_share: float | None = None    # GPU: device kernel time / wall time (None on a CPU)
    trace: Path | None = None
    top_ops: list[tuple[str, float]] = field(default_factory=list)  # the largest operators, self seconds per step

    @property
    def total_s(self) -> float:
        return sum(self.family_s.values())

    @property
    def outside_ops_s(self) -> float:
        """Wall time per step in no operator's self time: on a CPU the Python and framework work between operators
        (on a GPU: the time the device idled)."""
        return max(self.wall_s - self.total_s, 0.0)

    def shares(self) -> dict[str, float]:
        """Each family's share of the profiled self time, largest first."""
        total = self.total_s or 1.0
        return dict(sorted(((k, v / total) for k, v in self.family_s.items()), key=lambda kv: -kv[1]))

    def table(self) -> str:
        rows = [f"{'family':18s} {'ms/step':>9s} {'share':>7s}"]
        rows += [f"{k:18s} {self.family_s[k] * 1e3:9.1f} {v:7.1%}" for k, v in self.shares().items()]
        rows.append(f"{'(outside ops)':18s} {self.outside_ops_s * 1e3:9.1f} "
                    f"{self.outside_ops_s / self.wall_s:7.1%} of wall")
        rows.append(f"{'(wall)':18s} {self.wall_s * 1e3:9.1f}")
        return "\n".join(rows)


def profile_steps(step: Callable[[], Any], steps: int = 2, warmup: int = 1, trace_path: str | Path | None = None,
                  top: int = 8) -> StepProfile:
    """Run ``step()`` ``warmup`` times unprofiled (allocations, compilation, caches), then ``steps`` times under
    ``torch.profiler``; sum each operator's self time into ``FAMILIES``. On a GPU the device's kernel times are
    summed (and the device synchronised around the profiled steps); on a CPU, each operator's self CPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if steps < 1:
        raise ValueError(f"steps={steps}: profile at least one step")
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    families: dict[str, float] = {}
    per_op: dict[str, float] = {}
    for ev in prof.key_averages():
        us = ev.self_device_time_total if cuda else ev.self_cpu_time_total
        if us <= 0:
            continue
        s = us / 1e6 / steps
        families[family_of(ev.key)] = families.get(family_of(ev.key), 0.0) + s
        per_op[ev.key] = per_op.get(ev.key, 0.0) + s
    path = None
    if trace_path is not None:
        path = Path(trace_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(path))
    busy = sum(families.values()) / wall if cuda and wall > 0 else None
    tops = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
    return StepProfile("cuda" if cuda else "cpu", steps, wall, families, busy, path, tops)


__all__ = ["FAMILIES", "OTHER", "StepProfile", "family_of", "profile_steps"]
