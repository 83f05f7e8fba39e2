"""Training monitoring and troubleshooting checks for peft runs, written to be called from notebooks.

Implements:

- ``LossRecorder``: a ``transformers.TrainerCallback`` that keeps every logged training and evaluation loss by
  step (the Trainer's own ``log_history`` mixes them with other records and is lost with the Trainer);
- ``check_loss_falling``: is the end of a loss curve clearly below its start (the first sign that an adapter
  learns at all, and the check that catches a frozen model, a zero learning rate or fully masked labels);
- the three questions to ask when a LoRA run does nothing, as functions that raise with the fix:
  ``check_trainable`` (is anything trainable?), ``check_loss_falling`` (is the loss falling?) and
  ``check_adapter_compatible`` (does the adapter's base model match the loaded one?), re-exported here.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback

from .adapters_io import check_adapter_compatible
from .lora_sizing import NothingTrainableError, check_trainable


class LossNotFallingError(RuntimeError):
    """A training loss curve did not fall; the message lists the usual causes."""


class LossRecorder(TrainerCallback):
    """Record ``(step, loss)`` of every training log and ``(step, eval_loss)`` of every evaluation.

    Pass it in ``Trainer(callbacks=[...])`` and set ``logging_steps`` to how often a loss should be kept
    (``logging_steps=1`` keeps every step's loss).
    """

    def __init__(self) -> None:
        self.train: list[tuple[int, float]] = []
        self.eval: list[tuple[int, float]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        logs = logs or {}
        if "loss" in logs:
            self.train.append((state.global_step, float(logs["loss"])))
        if "eval_loss" in logs:
            self.eval.append((state.global_step, float(logs["eval_loss"])))

    @property
    def losses(self) -> list[float]:
        """The training losses in order."""
        return [v for _, v in self.train]

    @property
    def eval_losses(self) -> list[float]:
        """The evaluation losses in order."""
        return [v for _, v in self.eval]


@dataclass(frozen=True)
class LossTrend:
    """Start and end of a loss curve (means over a window) and the relative drop."""

    start: float
    end: float

    @property
    def drop(self) -> float:
        """Relative decrease from start to end (0.3 = the loss fell by 30 %)."""
        return (self.start - self.end) / self.start if self.start else 0.0


def check_loss_falling(losses: Sequence[float], min_drop: float = 0.05, window: int = 3) -> LossTrend:
    """Check that the mean of the last ``window`` losses is at least ``min_drop`` (relative) below the first.

    Means over a window, not single steps, because single-batch losses are noisy. Raises
    ``LossNotFallingError`` with the usual causes when the curve is flat, rising or not finite.
    """
    values = [float(x) for x in losses]
    if len(values) < 2:
        raise ValueError(f"need at least 2 losses to see a trend, got {len(values)}: log more often "
                         "(TrainingArguments(logging_steps=1))")
    if not all(math.isfinite(v) for v in values):
        raise LossNotFallingError(f"the loss is not finite ({values}): lower the learning rate, or use bf16 "
                                  "instead of fp16 if the run overflowed")
    w = max(1, min(window, len(values) // 2))
    trend = LossTrend(sum(values[:w]) / w, sum(values[-w:]) / w)
    if trend.drop < min_drop:
        raise LossNotFallingError(
            f"the loss went from {trend.start:.4f} to {trend.end:.4f} ({100 * trend.drop:+.1f} %, need at least "
            f"{100 * min_drop:.0f} % lower): check that something is trainable (check_trainable), that the "
            "learning rate is not zero or tiny, that the labels are not all -100, and that the adapter is active")
    return trend


__all__ = ["LossNotFallingError", "LossRecorder", "LossTrend", "NothingTrainableError", "check_adapter_compatible",
           "check_loss_falling", "check_trainable"]
