"""Wall-clock timing, in one place: every timed comparison of the course (notebook 01's wrapped vs merged LoRA
forward, notebook 07's adapter switch, ``cpu_bench``) reads its clock here.

- ``time_calls``: seconds of each call of several functions, interleaved after warm-up calls, with an optional device
  sync around each clock read (GPU work is asynchronous);
- ``timed_ms`` / ``median_ms``: one function's calls in milliseconds (and their median).

Decoding speed (``parity._decode_rate``) is a rate from pairs of runs, not a call time, and stays with the decoders.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def time_calls(fns: dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1,
                  sync: Callable[[], Any] | None = None) -> dict[str, list[float]]:
    """Seconds of each call of every ``fns[name]()``, timed ``repeats`` times interleaved after ``warmup`` calls each.

    Interleaving (a, b, a, b, ...) puts a burst of load from other processes on every function alike; ``sync``
    (e.g. ``torch.cuda.synchronize``) runs before each clock read so GPU work is counted.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: time each function at least once")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            if sync:
                sync()
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            out[k].append(time.perf_counter() - t0)
    return out


def timed_ms(fn: Callable[[], Any], repeat: int = 50, warmup: int = 2) -> list[float]:
    """Wall time of each of ``repeat`` calls of ``fn()`` in milliseconds, after ``warmup`` untimed calls."""
    return [s * 1e3 for s in time_calls({"fn": fn}, repeats=repeat, warmup=warmup)["fn"]]


def median_ms(fn: Callable[[], Any], repeat: int = 50, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeat`` calls, after ``warmup`` untimed calls."""
    return statistics.median(timed_ms(fn, repeat, warmup))


__all__ = ["median_ms", "time_calls", "timed_ms"]
