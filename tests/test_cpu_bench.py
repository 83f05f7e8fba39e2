"""lora_course.cpu_bench: figures from synthetic timings (values, targets, JSON, table) and one real run on tiny."""
import json
import math
import statistics

import pytest
import torch

from lora_course import cpu_bench
from lora_course.cpu_bench import Figure, Quantity, Target, latency_figure, order_figure, ratio_figure

SEQ = Quantity("sequential", "s", [6.0, 5.0, 9.0, 5.5, 6.5])   # median 6.0
MIXED = Quantity("mixed", "s", [3.5, 2.0, 3.0, 2.5, 8.0])      # median 3.0: one burst of load in the last repeat


def test_ratio_is_the_ratio_of_the_medians_and_met_follows_the_target():
    fig = ratio_figure("07_mixed_batch", "07", "mixed vs sequential", Target(">=", 2.0), SEQ, MIXED)
    assert fig.value == statistics.median(SEQ.samples) / statistics.median(MIXED.samples) == 2.0
    assert fig.met  # exactly on the bound: >= holds
    assert not ratio_figure("k", "07", "w", Target(">", 2.0), SEQ, MIXED).met
    slower = Quantity("mixed", "s", [3.1, 3.2, 3.3])
    assert not ratio_figure("k", "07", "w", Target(">=", 2.0), SEQ, slower).met
    assert fig.quantity("mixed") is MIXED and fig.how == "median sequential / median mixed"
    with pytest.raises(KeyError, match="no quantity 'other'"):
        fig.quantity("other")


@pytest.mark.parametrize(("op", "bound", "value", "met"), [
    ("<=", 1.05, 1.05, True), ("<=", 1.05, 1.0501, False), ("<", 1.0, 1.0, False), ("<", 1.0, 0.99, True),
    (">", 1.0, 1.0, False), (">", 1.0, 1.01, True), (">=", 5.0, 4.99, False), (">=", 5.0, math.nan, False)])
def test_target_comparisons(op, bound, value, met):
    assert Target(op, bound).met(value) is met


def test_bad_targets_and_empty_quantities_are_refused():
    with pytest.raises(ValueError, match="operator"):
        Target("=>", 2.0)
    with pytest.raises(ValueError, match="finite"):
        Target(">=", math.inf)
    with pytest.raises(ValueError, match="no samples"):
        Quantity("x", "s", [])
    with pytest.raises(ValueError, match="needs ms"):
        latency_figure("k", "07", "w", Target("<=", 5.0), SEQ)
    with pytest.raises(ValueError, match="at least two"):
        order_figure("k", "07", "w", [SEQ])


def test_latency_and_order_figures():
    act = Quantity("activate", "ms", [0.02, 0.01, 0.03, 0.015, 9.0])   # median 0.02
    fig = latency_figure("07_activate_ms", "07", "activate", Target("<=", 5.0), act)
    assert fig.value == 0.02 and fig.met and fig.unit == "ms"
    assert not latency_figure("k", "07", "w", Target("<=", 0.01), act).met
    swap = Quantity("hotswap", "ms", [40.0, 50.0, 60.0])
    load = Quantity("load_again", "ms", [300.0, 100.0, 200.0])
    fig = order_figure("07_switch_order", "07", "order", [act, swap, load])
    assert fig.value == pytest.approx(min(50.0 / 0.02, 200.0 / 50.0)) and fig.met
    wrong = order_figure("k", "07", "w", [act, load, swap])  # load is slower than hotswap: the chain breaks
    assert fig.target.op == ">" and not wrong.met and wrong.value == pytest.approx(50.0 / 200.0)


def test_json_round_trip_and_report_structure():
    figs = [ratio_figure("07_mixed_batch", "07", "mixed vs sequential", Target(">=", 2.0), SEQ, MIXED, note="n"),
            ratio_figure("01_merged_vs_wrapped", "01", "merged vs wrapped", Target("<=", 1.05),
                         Quantity("merged", "s", [1.2, 1.1, 1.3]), Quantity("wrapped", "s", [1.0, 1.0, 1.0]))]
    machine = {"cpu": "Test CPU", "flags": {"avx2": True, "avx512f": False, "avx512_bf16": False, "amx": False},
               "cores": 2, "torch_threads": 1, "date": "2026-01-01 00:00"}
    doc = json.loads(json.dumps(cpu_bench.report(figs, machine, {"decode": "boom"}, 12.34)))
    assert doc["machine"] == machine and doc["failed"] == {"decode": "boom"} and doc["seconds"] == 12.3
    assert (doc["met"], doc["total"]) == (1, 2)
    first = doc["figures"][0]
    assert first["target"] == ">= 2x" and first["met"] is True and first["value"] == 2.0
    assert first["quantities"]["mixed"] == {"unit": "s", "median": 3.0, "min": 2.0, "max": 8.0, "n": 5,
                                            "samples": MIXED.samples}
    assert doc["figures"][1]["met"] is False and doc["figures"][1]["value"] == pytest.approx(1.2)
    back = [Figure.from_json(d) for d in doc["figures"]]
    assert [(f.key, f.value, f.met, f.target) for f in back] == [(f.key, f.value, f.met, f.target) for f in figs]


def test_table_shows_target_reached_and_met_for_every_figure():
    figs = [ratio_figure("07_mixed_batch", "07", "mixed vs sequential", Target(">=", 2.0), SEQ,
                         Quantity("mixed", "s", [4.0, 4.0, 4.0])),
            latency_figure("07_activate_ms", "07", "activate latency", Target("<=", 5.0),
                           Quantity("activate", "ms", [0.012, 0.02, 0.015]))]
    lines = cpu_bench.format_table(figs).splitlines()
    row = next(ln for ln in lines if "mixed vs sequential" in ln)
    assert ">= 2x" in row and "1.50x" in row and row.rstrip().endswith("NO")
    row = next(ln for ln in lines if "activate latency" in ln)
    assert "<= 5 ms" in row and "0.015 ms" in row and row.rstrip().endswith("yes")
    assert "sequential 6 [5-9] s (n=5)" in cpu_bench.format_table(figs)


def test_matmul_flops_counts_exactly_the_products():
    x, w = torch.randn(5, 7), torch.randn(3, 7)
    assert cpu_bench.matmul_flops(lambda: torch.nn.functional.linear(x, w)) == 2 * 5 * 7 * 3
    assert cpu_bench.matmul_flops(lambda: x + 1) == 0
    # a GPU's fused attention with grouped-query heads (9 query, 3 key/value heads: SmolLM2's): left out, as the CPU's
    # fused kernel is (the counter's own formulas asserted on such shapes on an H200)
    q, kv = torch.empty(1, 9, 5, 64, device="meta"), torch.empty(1, 3, 5, 64, device="meta")
    fused = lambda: torch.ops.aten._scaled_dot_product_efficient_attention(q, kv, kv, None, False)
    assert cpu_bench.matmul_flops(fused) == 0


def test_merge_figure_on_the_tiny_model():
    """A real run of one group, fast: its figure is well formed and its value is the ratio of its medians."""
    from lora_course.models import tiny_model_dir

    (fig,) = cpu_bench.merge_figures("tiny", str(tiny_model_dir()), repeats=3)
    merged, wrapped = fig.quantity("merged"), fig.quantity("wrapped")
    assert len(merged.samples) == len(wrapped.samples) == 3 and all(t > 0 for t in merged.samples + wrapped.samples)
    assert fig.value == merged.median / wrapped.median and fig.met == (fig.value <= 1.05)
    assert fig.key == "01_merged_vs_wrapped" and "more matmul FLOPs" in fig.note
    # the wrapped model's extra work is exactly its LoRA matmuls
    assert fig.facts["extra_matmul_flops"] == fig.facts["lora_matmul_flops"] > 0


def test_cli_runs_one_group_and_writes_the_report(tmp_path, capsys):
    from lora_course.models import tiny_model_dir

    out = tmp_path / "bench.json"
    rc = cpu_bench.main(["--groups", "merge", "--profile", "tiny", "--model-id", str(tiny_model_dir()),
                         "--repeats", "2", "--in-process", "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert [f["key"] for f in doc["figures"]] == ["01_merged_vs_wrapped"] and doc["failed"] == {}
    assert set(doc["machine"]) >= {"cpu", "flags", "cores", "torch_threads", "date"}
    assert set(doc["machine"]["flags"]) == {"avx2", "avx512f", "avx512_bf16", "amx"}
    printed = capsys.readouterr().out
    assert "merged vs LoRA-wrapped decoder forward time" in printed and "<= 1.05x" in printed
    with pytest.raises(SystemExit):
        cpu_bench.main(["--groups", "nope"])
