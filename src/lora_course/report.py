"""Metrics that notebooks record and ``make course`` collects into ``build/course-report.md``.

A notebook's closing cell calls ``record_metric(name, value)`` for each measured outcome it asserts. When the
course runner executes the notebook it sets ``LORA_COURSE_METRICS`` to a per-notebook JSON file; run by hand,
the metrics are printed and kept in memory (``recorded()``).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

METRICS_ENV = "LORA_COURSE_METRICS"
_recorded: dict[str, Any] = {}


def record_metric(name: str, value: Any) -> Any:
    """Record one measured outcome of a notebook (a number, string or bool); returns ``value`` unchanged."""
    if not isinstance(name, str) or not name:
        raise ValueError("record_metric needs a non-empty metric name")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"metric {name!r} is {value}: record finite numbers only (did training diverge?)")
    if hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    if not isinstance(value, (int, float, str, bool)):
        raise TypeError(f"metric {name!r} must be a number, string or bool, got {type(value).__name__}")
    _recorded[name] = value
    print(f"[metric] {name} = {value}")
    target = os.environ.get(METRICS_ENV)
    if target:
        from .paths import write_text_atomic

        path = Path(target)
        data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        data[name] = value
        write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))
    return value


def recorded() -> dict[str, Any]:
    """The metrics recorded so far in this process."""
    return dict(_recorded)
