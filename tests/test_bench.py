"""bench.run_side_by_side, notebook 06's benchmark runner: where each recipe runs and how the rows get there."""
import json
from pathlib import Path

from lora_course import bench


def test_run_side_by_side_runs_in_process_on_cpu_and_hands_a_gpu_run_its_rows_in_a_temporary_file(monkeypatch):
    configs = bench.side_by_side(False, r=16, batch_size=2, warmup_steps=1, measure_steps=1)
    rows = [{"input_ids": [1, 2, 3], "completion_mask": [0, 1, 1]}, {"input_ids": [4, 5], "completion_mask": [0, 1]}]
    in_process, grouped = [], {}
    monkeypatch.setattr(bench, "run_config",
                        lambda c, source, r, seed=0: in_process.append((c.name, r, seed)) or c.name)

    def fake_grouped(cfgs, source, rows_file, seed=0):
        grouped.update(path=Path(rows_file), rows=json.loads(Path(rows_file).read_text()), seed=seed,
                       names=[c.name for c in cfgs])
        return [c.name for c in cfgs]

    monkeypatch.setattr(bench, "run_grouped", fake_grouped)
    assert bench.run_side_by_side(configs, "model", rows, cuda=False, seed=3) == [c.name for c in configs]
    assert ([(n, s) for n, _, s in in_process] == [(c.name, 3) for c in configs]
            and all(r is rows for _, r, _ in in_process))
    assert not grouped
    assert bench.run_side_by_side(configs, "model", rows, cuda=True, seed=5) == [c.name for c in configs]
    assert grouped["rows"] == rows and grouped["seed"] == 5 and grouped["names"] == [c.name for c in configs]
    assert not grouped["path"].exists(), "the temporary rows file is removed after the run"
