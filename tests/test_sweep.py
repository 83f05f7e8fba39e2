"""Notebook 09's sweep: the on-disk cache, resuming, results files, staleness, provenance and the live re-check."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from lora_course import experiments as ex
from lora_course import sweep as sw


# ------------------------------------------------------------------------------------------------ cache
def test_cache_round_trip_and_corruption(tmp_path, capsys):
    rec = {"metric": 0.5, "label": "x"}
    path = sw.write_cached("abc", rec, tmp_path)
    assert sw.read_cached("abc", tmp_path) == rec
    assert sw.read_cached("missing", tmp_path) is None
    # A record edited after caching fails its checksum: ignored, moved aside, never used.
    entry = json.loads(path.read_text())
    entry["record"]["metric"] = 0.9
    path.write_text(json.dumps(entry))
    assert sw.read_cached("abc", tmp_path) is None
    assert "corrupt" in capsys.readouterr().err
    assert not path.exists() and path.with_suffix(".corrupt").exists()
    # A truncated file, and an entry stored under another key.
    path.write_text('{"key": "abc", "sha')
    assert sw.read_cached("abc", tmp_path) is None
    sw.write_cached("def", rec, tmp_path)
    (tmp_path / "def.json").replace(tmp_path / "abc.json")
    assert sw.read_cached("abc", tmp_path) is None


# ----------------------------------------------------------------------------------------------- sweeps
def test_sweep_caches_resumes_and_reruns_corrupt_entries(tmp_path):
    cfgs = [ex.make_config(method="lora", steps=2, batch_size=2, eval_n=2, r=2)]
    first = sw.run_sweep(cfgs, profile="tiny", workers=1, cache_root=tmp_path, progress=False)
    assert (first.ran, first.cached, first.failed) == (1, 0, [])
    rec = first.records[0]
    assert rec["model"] == ex.model_identity("tiny") and rec["code_version"] == ex.code_version()
    assert {"versions", "machine", "wall_seconds", "peak_mib"} <= set(rec)
    again = sw.run_sweep(cfgs, profile="tiny", workers=1, cache_root=tmp_path, progress=False)
    assert (again.ran, again.cached) == (0, 1) and again.records == first.records
    # Corrupt the cached entry: detected, re-run, and the fresh record (same seed) matches the first.
    (entry,) = tmp_path.glob("*.json")
    entry.write_text(entry.read_text()[:50])
    third = sw.run_sweep(cfgs, profile="tiny", workers=1, cache_root=tmp_path, progress=False)
    assert (third.ran, third.cached) == (1, 0)
    assert third.records[0]["losses"] == rec["losses"]

    out = sw.write_results(third, tmp_path / "results.json", "test")
    res = sw.load_results(out, profile="tiny")
    assert not res.stale, res.reasons
    assert res.find(r=2) == res.records


# ------------------------------------------------------------------------------------------ stale results
def _doc(tmp_path: Path, **overrides) -> Path:
    doc = {"model": ex.model_identity("tiny"), "code_version": ex.code_version(), "records": [], **overrides}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    return path


def test_results_from_another_model_or_code_are_stale(tmp_path):
    assert not sw.load_results(_doc(tmp_path), profile="tiny").stale
    other_model = sw.load_results(_doc(tmp_path, model={"name": "SmolLM2-360M"}), profile="tiny")
    assert other_model.stale and "model" in other_model.reasons[0]
    other_code = sw.load_results(_doc(tmp_path, code_version="000000000000"), profile="tiny")
    assert other_code.stale and "code version" in other_code.reasons[0]


def test_check_provenance_reads_a_file_and_says_whether_it_describes_this_checkout(tmp_path, capsys):
    """check_provenance (notebook 09's first cell) prints where the results came from and, for a file made by other
    code or another model, STALE with every reason; a fresh file is not stale."""
    fresh = sw.check_provenance("tiny", results_path=_doc(tmp_path, produced_by="make sweep", date="2026-12-01"))
    out = capsys.readouterr().out
    assert not fresh.stale and fresh.reasons == []
    assert "produced by: make sweep  on 2026-12-01" in out and f"this checkout: {ex.code_version()}" in out
    assert "STALE" not in out and "reproduce: make sweep" in out
    stale = sw.check_provenance("tiny", results_path=_doc(tmp_path, code_version="000000000000",
                                                          model={"name": "SmolLM2-360M"}))
    out = capsys.readouterr().out
    assert stale.stale and len(stale.reasons) == 2
    assert "STALE" in out and "made by code version 000000000000" in out and "SmolLM2-360M" in out
    sw.check_provenance("tiny", results_path=_doc(tmp_path), quiet=True)
    assert capsys.readouterr().out == ""
    with pytest.raises(FileNotFoundError, match="make sweep"):
        sw.check_provenance("tiny", results_path=tmp_path / "nope.json")


def test_check_provenance_runs_the_grid_live_without_committed_results(tmp_path, monkeypatch, capsys):
    """Off the cpu profile without a file, the grid runs live (a stand-in run_sweep here), is written under out_dir
    and read back as describing this checkout; a failed live run raises rather than drawing a partial grid."""
    seen = {}

    def fake_sweep(configs, profile, model_id, workers=2):
        seen.update(n=len(configs), profile=profile, workers=workers, steps={c.steps for c in configs})
        recs = [{"config": asdict(c), "label": c.label, "model": ex.model_identity("tiny"),
                 "code_version": ex.code_version()} for c in configs]
        return sw.SweepResult(recs, len(recs), 0, seen.get("failed", []), 1.0)

    monkeypatch.setattr(sw, "run_sweep", fake_sweep)
    res = sw.check_provenance("tiny", live_seeds=[0], live_steps=2, workers=3, out_dir=tmp_path)
    assert res.path == tmp_path / "experiments-tiny.json" and res.path.is_file()
    assert not res.stale and len(res.records) == seen["n"] == len(ex.full_grid(seeds=[0]))
    assert seen["profile"] == "tiny" and seen["workers"] == 3 and 2 in seen["steps"]
    assert "running" in capsys.readouterr().out
    seen["failed"] = ["lora r=8 s0: exit 1"]
    with pytest.raises(ex.RunFailedError, match="lora r=8 s0: exit 1"):
        sw.check_provenance("tiny", out_dir=tmp_path)


def test_missing_or_malformed_results_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="make sweep"):
        sw.load_results(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="make sweep"):
        sw.load_results(bad)
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="records"):
        sw.load_results(bad)


def test_live_check_compares_the_files_own_records_and_flags_drift(tmp_path, monkeypatch):
    """live_check re-runs the records of the file (here through a stand-in run_sweep that returns chosen records)
    and is OK only within LIVE_TOLERANCE; a file without those records is refused; a failed re-run raises."""
    configs = ex.grid("check")

    def record(cfg, metric=0.5, ppl=10.0, losses=(3.0, 2.0)):
        return {"config": asdict(cfg), "label": cfg.label, "metric": metric, "perplexity": ppl, "losses": list(losses)}

    committed = [record(c) for c in configs]
    results = sw.Results(tmp_path / "r.json", {"records": committed}, False, [])
    live = {"records": [record(c) for c in configs], "failed": []}
    monkeypatch.setattr(sw, "run_sweep", lambda cfgs, *a, **k: sw.SweepResult(live["records"], len(cfgs), 0,
                                                                               live["failed"], 0.0))
    assert all(c.ok for c in sw.live_check(results)) and len(configs) >= 1
    live["records"] = [record(c, ppl=10.0 * (1 + 2 * sw.LIVE_TOLERANCE["perplexity_rel"])) for c in configs]
    assert not any(c.ok for c in sw.live_check(results)), "a perplexity off by twice the tolerance is drift"
    live["records"] = [record(c, losses=(3.0, 2.1)) for c in configs]
    assert not any(c.ok for c in sw.live_check(results)), "a loss curve off by 0.1 is drift"
    live["failed"] = ["lora r=8: exit 1"]
    with pytest.raises(ex.RunFailedError, match="live re-run failed: lora r=8"):
        sw.live_check(results)
    with pytest.raises(LookupError, match="has no record for"):
        sw.live_check(sw.Results(tmp_path / "r.json", {"records": committed[1:] if len(committed) > 1 else []},
                                 False, []))


# ------------------------------------------------------------------------------------- committed grids
def test_a_file_from_another_stack_is_checked_with_the_versions_it_records(tmp_path):
    """A grid made on a GPU machine (another torch) is current when this checkout's code, hashed with the library
    versions the file records, gives its code version; without recorded_stack it reads as stale here."""
    gpu_stack = {name: "9.9.9" for name in ex.STACK}
    path = _doc(tmp_path, code_version=ex.code_version(gpu_stack), versions=gpu_stack)
    assert sw.load_results(path, profile="tiny").stale
    assert not sw.load_results(path, profile="tiny", recorded_stack=True).stale
    # recorded versions that this code does not give: stale, with the reason
    edited = sw.load_results(_doc(tmp_path, code_version=ex.code_version(gpu_stack),
                                  versions={**gpu_stack, "torch": "9.9.8"}), profile="tiny", recorded_stack=True)
    assert edited.stale and "code version" in edited.reasons[0]
    # a file that records no versions cannot be checked this way: stale, naming what is missing
    bare = sw.load_results(_doc(tmp_path), profile="tiny", recorded_stack=True)
    assert bare.stale and "no version of torch" in bare.reasons[0]


def test_code_version_with_a_stack_hashes_those_versions():
    from importlib.metadata import version

    installed = {name: version(name) for name in ex.STACK}
    assert ex.code_version(installed) == ex.code_version()
    assert ex.code_version({**installed, "peft": "0.0.1"}) != ex.code_version()
    with pytest.raises(ValueError, match="no version of bitsandbytes"):
        ex.code_version({k: v for k, v in installed.items() if k != "bitsandbytes"})


def test_committed_grids_describe_this_checkout():
    """The committed grids (CPU, GPU bf16, GPU as a T4) are all there, 40 runs each, each made from the course's
    cpu model by this code (with its own libraries), and no claim is supported on one and contradicted on another."""
    from lora_course.claims import verdicts_across
    from lora_course.memory_estimate import qlora_upcast_bytes
    from lora_course.shapes import SMOLLM2_135M

    grids = sw.load_committed_grids("cpu")
    assert [g.file for g, _ in grids] == [g.file for g in sw.COMMITTED_GRIDS]
    for g, res in grids:
        assert not res.stale, (g.file, res.reasons)
        assert len(res.records) == len(ex.full_grid(seeds=[0])), g.file
    rows = verdicts_across([(g.name, res.records, qlora_upcast_bytes(SMOLLM2_135M, g.compute) / 2**20)
                            for g, res in grids])
    assert not [r["claim"] for r in rows if r["conflict"]]


def test_committed_grids_skip_missing_files(tmp_path):
    from importlib.metadata import version

    installed = {name: version(name) for name in ex.STACK}
    (tmp_path / "experiments.json").write_text(_doc(tmp_path, versions=installed).read_text())
    grids = sw.load_committed_grids("tiny", root=tmp_path)
    assert [g.file for g, _ in grids] == ["experiments.json"] and not grids[0][1].stale
