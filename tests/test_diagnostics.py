"""Troubleshooting checks and the loss-recording Trainer callback."""
import math

import pytest

from lora_course.diagnostics import LossNotFallingError, LossRecorder, check_loss_falling


def test_loss_falling_passes_a_falling_curve_and_reports_the_drop():
    trend = check_loss_falling([5.0, 4.8, 4.0, 3.1, 2.5, 2.0])
    assert trend.start == pytest.approx((5.0 + 4.8 + 4.0) / 3)
    assert trend.end == pytest.approx((3.1 + 2.5 + 2.0) / 3)
    assert 0.3 < trend.drop < 0.5


@pytest.mark.parametrize("losses", [[3.0, 3.0, 3.0, 3.0], [2.0, 2.1, 2.5, 3.0], [3.0, 2.99]])
def test_flat_or_rising_loss_is_an_error_naming_the_causes(losses):
    with pytest.raises(LossNotFallingError, match="check_trainable"):
        check_loss_falling(losses)


def test_non_finite_or_too_short_curves_are_errors():
    with pytest.raises(LossNotFallingError, match="not finite"):
        check_loss_falling([3.0, math.nan, 2.0])
    with pytest.raises(ValueError, match="at least 2"):
        check_loss_falling([3.0])


def test_loss_recorder_keeps_train_and_eval_losses_by_step():
    class State:
        global_step = 0

    rec, state = LossRecorder(), State()
    for step, logs in [(1, {"loss": 4.0, "learning_rate": 1e-3}), (2, {"loss": 3.0}), (2, {"eval_loss": 3.5}),
                       (3, {"train_runtime": 1.0})]:
        state.global_step = step
        rec.on_log(None, state, None, logs=logs)
    assert rec.train == [(1, 4.0), (2, 3.0)] and rec.losses == [4.0, 3.0]
    assert rec.eval == [(2, 3.5)] and rec.eval_losses == [3.5]
