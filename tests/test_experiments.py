"""Notebook 09's sweep runner: configurations, cache keys, the on-disk cache, resuming, staleness, and the analysis."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from lora_course import experiments as ex


# ------------------------------------------------------------------------------------------- configurations
def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ex.ExperimentConfigError) as err:
        ex.make_config(method="lora", rank=8)
    assert "rank" in str(err.value)
    for key in ex.CONFIG_KEYS:
        assert key in str(err.value)


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ex.ExperimentConfigError) as err:
        ex.make_config(method="lorra")
    assert "lorra" in str(err.value)
    for m in ex.METHODS:
        assert m in str(err.value)


@pytest.mark.parametrize("kwargs, needle", [({"targets": "q,v"}, "q,k,v,o"), ({"task": "poetry"}, "technical"),
                                            ({"steps": 0}, "steps"), ({"lr": -1.0}, "lr")])
def test_bad_values_are_named(kwargs, needle):
    with pytest.raises(ex.ExperimentConfigError) as err:
        ex.make_config(**kwargs)
    assert needle in str(err.value)


def test_unknown_study_lists_the_studies():
    with pytest.raises(ex.ExperimentConfigError) as err:
        ex.grid("ranks")
    assert all(s in str(err.value) for s in ex.STUDIES)


def test_defaults_resolve_per_method():
    assert ex.make_config(method="full").lr == ex.DEFAULT_LR["full"]
    assert ex.make_config(method="lora", r=4).alpha == 8.0
    assert ex.make_config(method="lora", lr=1e-4).lr == 1e-4


def test_grid_covers_the_studies_once():
    grid = ex.full_grid()
    assert len(grid) == len(set(grid))
    methods = {c.method for c in grid}
    assert methods == set(ex.METHODS)
    assert {c.r for c in grid if c.method == "lora" and c.targets == "all" and c.steps == 20} == set(ex.RANKS)
    assert {c.targets for c in grid if c.method == "lora"} == set(ex.TARGET_SETS)
    # LoRA r=8 on all layers serves the rank, target, memory and variant studies: once per seed.
    shared = [c for c in grid if c == replace(ex.make_config(), seed=c.seed)]
    assert sorted(c.seed for c in shared) == [0, 1, 2]
    for s, seeds in ex.STUDY_SEEDS.items():
        assert {c.seed for c in ex.grid(s)} == set(seeds)


# ------------------------------------------------------------------------------------------------- keys
def test_run_key_changes_with_config_model_and_code():
    cfg = ex.make_config()
    model = {"name": "m"}
    key = ex.run_key(cfg, model, "c1")
    assert key == ex.run_key(ex.make_config(), {"name": "m"}, "c1")  # stable
    assert key != ex.run_key(replace(cfg, seed=1), model, "c1")
    assert key != ex.run_key(cfg, {"name": "other"}, "c1")
    assert key != ex.run_key(cfg, model, "c2")
    # Unset defaults and their explicit values are the same run.
    assert ex.run_key(ex.RunConfig(), model, "c1") == ex.run_key(ex.make_config(lr=3e-3, alpha=16), model, "c1")


def test_code_version_is_stable_and_hex():
    v = ex.code_version()
    assert v == ex.code_version() and len(v) == 12
    int(v, 16)


def test_code_version_changes_with_the_data_and_the_library_versions(tmp_path, monkeypatch):
    import importlib.metadata
    import shutil

    from lora_course import paths

    v = ex.code_version()
    shutil.copytree(paths.data_dir(), tmp_path / "data")
    monkeypatch.setattr(paths, "data_dir", lambda: tmp_path / "data")
    assert ex.code_version() == v, "the same bytes elsewhere: the same version"
    f = tmp_path / "data" / "creative" / "train.jsonl"
    f.write_bytes(f.read_bytes().replace(b"poem", b"poen", 1))
    edited = ex.code_version()
    assert edited != v, "an edited task file makes committed results stale"
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda n: "0.0.1" if n == "peft" else real(n))
    assert ex.code_version() not in (v, edited), "another peft makes committed results stale"


def test_model_identity_hashes_the_weights_not_their_size(tmp_path, monkeypatch):
    import shutil

    from lora_course.models import tiny_model_dir

    copy = tmp_path / tiny_model_dir().name
    shutil.copytree(tiny_model_dir(), copy)
    ident = ex.model_identity("tiny", str(copy))
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, one bit of one weight different
    weights.write_bytes(bytes(data))
    assert ex.model_identity("tiny", str(copy))["weights"] != ident["weights"]


def test_model_identity_is_stable_and_path_free(tmp_path):
    ident = ex.model_identity("tiny")
    assert ident == ex.model_identity("tiny")
    assert "/" not in json.dumps(ident["name"])
    assert ident["weights"]
    assert ex.model_identity("gpu", "some-org/some-model") == {"name": "some-org/some-model"}


# ------------------------------------------------------------------------------------------------ cache
def test_cache_round_trip_and_corruption(tmp_path, capsys):
    rec = {"metric": 0.5, "label": "x"}
    path = ex.write_cached("abc", rec, tmp_path)
    assert ex.read_cached("abc", tmp_path) == rec
    assert ex.read_cached("missing", tmp_path) is None
    # A record edited after caching fails its checksum: ignored, moved aside, never used.
    entry = json.loads(path.read_text())
    entry["record"]["metric"] = 0.9
    path.write_text(json.dumps(entry))
    assert ex.read_cached("abc", tmp_path) is None
    assert "corrupt" in capsys.readouterr().err
    assert not path.exists() and path.with_suffix(".corrupt").exists()
    # A truncated file, and an entry stored under another key.
    path.write_text('{"key": "abc", "sha')
    assert ex.read_cached("abc", tmp_path) is None
    ex.write_cached("def", rec, tmp_path)
    (tmp_path / "def.json").replace(tmp_path / "abc.json")
    assert ex.read_cached("abc", tmp_path) is None


# --------------------------------------------------------------------------------------------- real runs
@pytest.mark.parametrize("method", ex.METHODS)
def test_every_method_trains_and_is_measured(method):
    rec = ex.run_one(ex.make_config(method=method, steps=2, batch_size=2, eval_n=2), profile="tiny")
    assert rec["config"]["method"] == method
    assert 0 < rec["trainable_params"] <= rec["base_params"]
    assert (rec["trainable_pct"] == 100.0) == (method == "full")
    assert rec["peak_mib"] > 0 and rec["sec_per_step"] > 0
    assert len(rec["losses"]) == 2 and all(math.isfinite(x) for x in rec["losses"])
    assert 0.0 <= rec["metric"] <= 1.0
    # the tiny model is random-init: two steps leave it near uniform over its 49,152 tokens, so the held-out answer
    # perplexity, exp(the mean per-token loss), is near 49,152 (measured 46,434 for adalora): a perplexity summed
    # instead of averaged, or taken over the wrong positions, lands orders of magnitude away
    assert abs(math.log(rec["perplexity"]) - math.log(49152)) < 1.0, rec["perplexity"]


def test_parameter_counts_order():
    counts = {m: ex.run_one(ex.make_config(method=m, steps=1, batch_size=1, eval_n=1), profile="tiny")
              ["trainable_params"] for m in ("lora", "vera", "ia3", "full")}
    assert counts["ia3"] < counts["lora"] < counts["full"]
    assert counts["vera"] < counts["lora"]


def test_sweep_caches_resumes_and_reruns_corrupt_entries(tmp_path):
    cfgs = [ex.make_config(method="lora", steps=2, batch_size=2, eval_n=2, r=2)]
    first = ex.run_sweep(cfgs, profile="tiny", workers=1, cache_root=tmp_path, progress=False)
    assert (first.ran, first.cached, first.failed) == (1, 0, [])
    rec = first.records[0]
    assert rec["model"] == ex.model_identity("tiny") and rec["code_version"] == ex.code_version()
    assert {"versions", "machine", "wall_seconds", "peak_mib"} <= set(rec)
    again = ex.run_sweep(cfgs, profile="tiny", workers=1, cache_root=tmp_path, progress=False)
    assert (again.ran, again.cached) == (0, 1) and again.records == first.records
    # Corrupt the cached entry: detected, re-run, and the fresh record (same seed) matches the first.
    (entry,) = tmp_path.glob("*.json")
    entry.write_text(entry.read_text()[:50])
    third = ex.run_sweep(cfgs, profile="tiny", workers=1, cache_root=tmp_path, progress=False)
    assert (third.ran, third.cached) == (1, 0)
    assert third.records[0]["losses"] == rec["losses"]

    out = ex.write_results(third, tmp_path / "results.json", "test")
    res = ex.load_results(out, profile="tiny")
    assert not res.stale, res.reasons
    assert res.find(r=2) == res.records


# ------------------------------------------------------------------------------------------ stale results
def _doc(tmp_path: Path, **overrides) -> Path:
    doc = {"model": ex.model_identity("tiny"), "code_version": ex.code_version(), "records": [], **overrides}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    return path


def test_results_from_another_model_or_code_are_stale(tmp_path):
    assert not ex.load_results(_doc(tmp_path), profile="tiny").stale
    other_model = ex.load_results(_doc(tmp_path, model={"name": "SmolLM2-360M"}), profile="tiny")
    assert other_model.stale and "model" in other_model.reasons[0]
    other_code = ex.load_results(_doc(tmp_path, code_version="000000000000"), profile="tiny")
    assert other_code.stale and "code version" in other_code.reasons[0]


def test_check_provenance_reads_a_file_and_says_whether_it_describes_this_checkout(tmp_path, capsys):
    """check_provenance (notebook 09's first cell) prints where the results came from and, for a file made by other
    code or another model, STALE with every reason; a fresh file is not stale."""
    fresh = ex.check_provenance("tiny", results_path=_doc(tmp_path, produced_by="make sweep", date="2026-12-01"))
    out = capsys.readouterr().out
    assert not fresh.stale and fresh.reasons == []
    assert "produced by: make sweep  on 2026-12-01" in out and f"this checkout: {ex.code_version()}" in out
    assert "STALE" not in out and "reproduce: make sweep" in out
    stale = ex.check_provenance("tiny", results_path=_doc(tmp_path, code_version="000000000000",
                                                          model={"name": "SmolLM2-360M"}))
    out = capsys.readouterr().out
    assert stale.stale and len(stale.reasons) == 2
    assert "STALE" in out and "made by code version 000000000000" in out and "SmolLM2-360M" in out
    ex.check_provenance("tiny", results_path=_doc(tmp_path), quiet=True)
    assert capsys.readouterr().out == ""
    with pytest.raises(FileNotFoundError, match="make sweep"):
        ex.check_provenance("tiny", results_path=tmp_path / "nope.json")


def test_check_provenance_runs_the_grid_live_without_committed_results(tmp_path, monkeypatch, capsys):
    """Off the cpu profile without a file, the grid runs live (a stand-in run_sweep here), is written under out_dir
    and read back as describing this checkout; a failed live run raises rather than drawing a partial grid."""
    seen = {}

    def fake_sweep(configs, profile, model_id, workers=2):
        seen.update(n=len(configs), profile=profile, workers=workers, steps={c.steps for c in configs})
        recs = [{"config": asdict(c), "label": c.label, "model": ex.model_identity("tiny"),
                 "code_version": ex.code_version()} for c in configs]
        return ex.SweepResult(recs, len(recs), 0, seen.get("failed", []), 1.0)

    monkeypatch.setattr(ex, "run_sweep", fake_sweep)
    res = ex.check_provenance("tiny", live_seeds=[0], live_steps=2, workers=3, out_dir=tmp_path)
    assert res.path == tmp_path / "experiments-tiny.json" and res.path.is_file()
    assert not res.stale and len(res.records) == seen["n"] == len(ex.full_grid(seeds=[0]))
    assert seen["profile"] == "tiny" and seen["workers"] == 3 and 2 in seen["steps"]
    assert "running" in capsys.readouterr().out
    seen["failed"] = ["lora r=8 s0: exit 1"]
    with pytest.raises(ex.RunFailedError, match="lora r=8 s0: exit 1"):
        ex.check_provenance("tiny", out_dir=tmp_path)


def test_missing_or_malformed_results_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="make sweep"):
        ex.load_results(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="make sweep"):
        ex.load_results(bad)
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="records"):
        ex.load_results(bad)


# --------------------------------------------------------------------------------------------- analysis
def _rec(seed: int, metric: float, loss_last: float = 0.5, **cfg) -> dict:
    c = ex.make_config(seed=seed, **cfg)
    return {"config": asdict(c), "label": c.label, "metric": metric, "perplexity": 2.0 + metric,
            "trainable_params": 10, "trainable_pct": 0.1, "peak_mib": 100.0, "sec_per_step": 1.0,
            "train_seconds": 20.0, "loss_first": 2.0, "loss_last": loss_last}


def test_study_rows_count_the_seeds_whose_loss_fell():
    # LoRA+ at LoRA's rate diverged in the committed sweep: a rising loss must show in the row, not vanish in a mean.
    recs = [_rec(0, 0.0, loss_last=12.3, method="loraplus"), _rec(1, 0.1, method="loraplus"),
            _rec(0, 0.4, method="loraplus", lr=3e-4), _rec(1, 0.4, method="loraplus", lr=3e-4)]
    assert not ex.learned(recs[0]) and ex.learned(recs[1])
    rows = ex.study_rows(recs, "variants")
    assert [(r["lr"], r["learned"], r["n"]) for r in rows] == [(3e-3, 1, 2), (3e-4, 2, 2)]
    assert "| 1/2 |" in ex.format_rows(rows, ("label", "learned"))


def test_variants_study_holds_a_second_rate_with_lora_as_control():
    cfgs = ex.grid("variants", seeds=(0,))
    assert [c.method for c in cfgs[:len(ex.VARIANTS)]] == list(ex.VARIANTS)
    second = [(c.method, c.lr) for c in cfgs[len(ex.VARIANTS):]]
    assert second == list(ex.VARIANT_SECOND_LR.items()) and ("lora", 3e-4) in second
    assert all(lr < ex.DEFAULT_LR[m] for m, lr in second)


def test_study_rows_aggregate_over_seeds():
    recs = [_rec(s, m, r=1) for s, m in enumerate((0.1, 0.2, 0.3))] + [_rec(s, 0.5, r=8) for s in range(3)]
    rows = ex.study_rows(recs, "rank")
    assert [r["r"] for r in rows] == [1, 8]
    assert rows[0]["n"] == 3 and rows[0]["metric"] == pytest.approx(0.2)
    assert rows[0]["metric_std"] == pytest.approx(0.1)
    assert rows[1]["metric_std"] == 0.0
    assert "0.200 ± 0.100 (n=3)" in ex.format_rows(rows)


def test_effect_against_the_spread():
    a = {"label": "a", "metric": 0.5, "metric_std": 0.05}
    assert ex.effect(a, {"label": "b", "metric": 0.55, "metric_std": 0.05}).verdict == "within noise"
    assert ex.effect(a, {"label": "b", "metric": 0.8, "metric_std": 0.05}).verdict == "b better"
    assert ex.effect(a, {"label": "b", "metric": 0.2, "metric_std": 0.0}).verdict == "a better"
    # One eval example (1/30) is the floor of the noise even when the seeds agree exactly.
    tie = ex.effect({"label": "a", "metric": 0.5, "metric_std": 0.0}, {"label": "b", "metric": 0.55, "metric_std": 0.0})
    assert tie.verdict == "within noise"


def test_claims_are_judged_from_the_records():
    recs = []
    for s in range(3):
        recs += [_rec(s, 0.1, r=1), _rec(s, 0.6, r=8), _rec(s, 0.62, r=64), _rec(s, 0.6 + 0.01 * s, method="full")]
    claims = {c["claim"]: c["verdict"] for c in ex.check_claims(recs)}
    assert claims["Diminishing returns above r=8 (r=1 clearly worse, r=64 hardly better)"] == "supported"
    assert claims["Full fine-tuning gives the best quality"].startswith("not supported")
    assert any(v.startswith("out of reach") for v in claims.values())
    table = ex.format_claims(ex.check_claims(recs))
    assert table.count("\n") == len(claims) + 1


def test_reference_tables_are_labelled_as_claims():
    for study in ("rank", "targets", "memory", "variants"):
        text = ex.reference_table(study)
        assert "claim" in text and "not measured here" in text


def test_live_check_compares_the_files_own_records_and_flags_drift(tmp_path, monkeypatch):
    """live_check re-runs the records of the file (here through a stand-in run_sweep that returns chosen records)
    and is OK only within LIVE_TOLERANCE; a file without those records is refused; a failed re-run raises."""
    configs = ex.grid("check")

    def record(cfg, metric=0.5, ppl=10.0, losses=(3.0, 2.0)):
        return {"config": asdict(cfg), "label": cfg.label, "metric": metric, "perplexity": ppl, "losses": list(losses)}

    committed = [record(c) for c in configs]
    results = ex.Results(tmp_path / "r.json", {"records": committed}, False, [])
    live = {"records": [record(c) for c in configs], "failed": []}
    monkeypatch.setattr(ex, "run_sweep", lambda cfgs, *a, **k: ex.SweepResult(live["records"], len(cfgs), 0,
                                                                               live["failed"], 0.0))
    assert all(c.ok for c in ex.live_check(results)) and len(configs) >= 1
    live["records"] = [record(c, ppl=10.0 * (1 + 2 * ex.LIVE_TOLERANCE["perplexity_rel"])) for c in configs]
    assert not any(c.ok for c in ex.live_check(results)), "a perplexity off by twice the tolerance is drift"
    live["records"] = [record(c, losses=(3.0, 2.1)) for c in configs]
    assert not any(c.ok for c in ex.live_check(results)), "a loss curve off by 0.1 is drift"
    live["failed"] = ["lora r=8: exit 1"]
    with pytest.raises(ex.RunFailedError, match="live re-run failed: lora r=8"):
        ex.live_check(results)
    with pytest.raises(LookupError, match="has no record for"):
        ex.live_check(ex.Results(tmp_path / "r.json", {"records": committed[1:] if len(committed) > 1 else []},
                                 False, []))


@pytest.mark.parametrize("qlora_mib, upcast_mib, verdict", [
    (600.0, 0.0, "supported"),                  # QLoRA below LoRA: the reference's order
    (704.0, 54.0, "not at this model size"),    # the T4 lane at 135M: above LoRA by less than the fp32 upcast
    (704.0, 0.0, "contradicted"),               # on a CPU (no upcast) any QLoRA peak above LoRA's contradicts
    (760.0, 54.0, "contradicted"),              # above by more than the upcast: the 4-bit base saved nothing
])
def test_memory_claim_is_judged_against_the_upcast(qlora_mib, upcast_mib, verdict):
    recs = []
    for s in range(3):
        for method, mib in (("full", 2697.0), ("lora", 688.0), ("qlora", qlora_mib)):
            recs.append({**_rec(s, 0.5, method=method), "peak_mib": mib})
    claims = {c["claim"]: c["verdict"] for c in ex.check_claims(recs, upcast_mib=upcast_mib)}
    assert claims["Peak memory: full > LoRA > QLoRA"].startswith(verdict)
