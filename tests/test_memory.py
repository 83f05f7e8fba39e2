"""The memory harness: real CPU measurements of the tiny model in a subprocess (byte counts that no allocator or CPU
changes, exact or within 2%, and the peak-RSS-based total within a window 15 times its measured spread), and
PeakMeasurements' one-at-a-time background runs."""
import pytest

from lora_course.memory import measure_peak


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_real_cpu_measurement_of_the_tiny_model_is_near_the_estimate(method):
    m = measure_peak(method, "tiny", batch_size=4, seq_len=64, steps=2, timeout=300)
    assert m.device == "cpu" and len(m.losses) == 2
    # Counted tensor by tensor in the first step, the same on every CPU, allocator and load: gradients and AdamW's
    # states are exactly the estimator's; the tensors saved for backward exceed its activations (+ the loss's
    # fp32 log-softmax) by what it leaves out (rotary tables, norms' statistics, masks): measured +0.15% here and
    # on an AVX-512/AMX Xeon (+0.7% on the 135M model), bound 2%.
    counts = m.count_ratios()
    assert counts["gradients"] == 1 and counts["optimizer states"] == 1, (m.counted, m.estimated)
    assert abs(counts["saved activations"] - 1) <= 0.02, (m.counted, m.estimated)
    # Tensor bytes + the rise of peak RSS (glibc mmaps blocks >= 64 KiB): not a timing, but allocator- and
    # library-dependent. Measured 1.07-1.08 (LoRA, 5 repeats) and 1.06-1.07 (QLoRA, 2) on the course's AMD EPYC
    # (AVX2, loaded by other jobs), 1.08 on 3 repeats on a Xeon with AVX-512/AMX: a small model's fixed costs
    # (allocator pages, autograd bookkeeping) weigh more than on the real one (1.01-1.03 on both CPUs). The window
    # is over 15 times that spread either side of it.
    assert 0.85 < m.ratio < 1.25, str(m)


def test_peak_measurements_run_one_at_a_time_in_the_background(monkeypatch):
    """PeakMeasurements (notebook 04's first cell) hands each method its own rate and the shared keywords, never runs
    two measurements at once (their peaks would overlap), returns them in order, and re-raises a failure."""
    import threading
    import time

    from lora_course import memory

    calls, active, most = [], [0], [0]
    lock = threading.Lock()

    def fake(method, profile, model_id, **kw):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        calls.append((method, profile, model_id, kw))
        if method == "qlora" and kw.get("fail"):
            raise RuntimeError("measurement of qlora failed (exit 1)")
        return method

    monkeypatch.setattr(memory, "measure_peak", fake)
    pending = memory.PeakMeasurements(("full", "lora", "qlora"), "tiny", None,
                                      lr={"full": 5e-5, "lora": 2e-3, "qlora": 2e-3}, steps=2, seed=0)
    assert pending.results() == {"full": "full", "lora": "lora", "qlora": "qlora"}
    assert most[0] == 1 and [c[0] for c in calls] == ["full", "lora", "qlora"]
    assert [c[3]["lr"] for c in calls] == [5e-5, 2e-3, 2e-3] and all(c[3]["steps"] == 2 for c in calls)
    assert all(c[1:3] == ("tiny", None) for c in calls)
    with pytest.raises(RuntimeError, match="qlora failed"):
        memory.PeakMeasurements(["lora", "qlora"], "tiny", lr=1e-3, fail=True).results()
    with pytest.raises(ValueError, match="one rate per method"):
        memory.PeakMeasurements(["lora", "qlora"], lr={"lora": 1e-3})
    with pytest.raises(ValueError, match="at most once"):
        memory.PeakMeasurements(["lora", "dora"])


def test_a_memory_limit_makes_a_step_that_needs_more_fail_as_out_of_memory_and_one_that_fits_run():
    """Under memory_limit_mib a training step that needs more memory than allowed fails in the allocator (reported,
    not raised: the process then holds a limit), and a smaller setup under the same limit trains."""
    big = measure_peak("full", "tiny", batch_size=8, seq_len=64, steps=1, timeout=300, memory_limit_mib=2)
    assert big.out_of_memory and "allocate" in big.out_of_memory and not big.losses, big
    assert "OUT OF MEMORY" in str(big)
    small = measure_peak("lora", "tiny", batch_size=1, seq_len=32, steps=1, timeout=300, memory_limit_mib=200)
    assert not small.out_of_memory and len(small.losses) == 1, small
    # the step's rise over the loaded model stayed under the limit
    assert small.measured_bytes - small.load_bytes <= 200 * 2**20, small
