"""lora_course.timing: the course's one clock for timed comparisons."""
import pytest

from lora_course import timing


def test_time_calls_interleaves_after_warm_up():
    calls = []
    out = timing.time_calls({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert {k: len(v) for k, v in out.items()} == {"a": 3, "b": 3} and all(t >= 0 for v in out.values() for t in v)
    with pytest.raises(ValueError, match="at least once"):
        timing.time_calls({"a": lambda: None}, repeats=0)


def test_time_calls_syncs_around_every_clock_read():
    events = []
    timing.time_calls({"a": lambda: events.append("a")}, repeats=2, warmup=1, sync=lambda: events.append("sync"))
    assert events == ["a"] + ["sync", "a", "sync"] * 2  # the warm-up call is not timed, so not synced


def test_timed_ms_is_milliseconds_of_each_call_after_warm_up(monkeypatch):
    clock = iter(range(0, 100, 1))  # every clock read advances one second
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    calls = []
    ms = timing.timed_ms(lambda: calls.append(1), repeat=4, warmup=3)
    assert len(calls) == 7 and ms == [1000.0] * 4
    clock = iter(range(0, 100, 1))
    assert timing.median_ms(lambda: None, repeat=5, warmup=0) == 1000.0
