"""Notebook 09's runs: configurations, grids, cache keys, the model identity, and real runs of every method."""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, replace

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


@pytest.mark.parametrize("kwargs, needle", [({"targets": "q,o"}, "q,k,v,o"), ({"targets": "q,o"}, "q,v"),
                                            ({"task": "poetry"}, "technical"), ({"steps": 0}, "steps"),
                                            ({"lr": -1.0}, "lr"), ({"eval_n": 0}, "eval_n")])


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
    assert ex.make_config(targets="q,v").targets == "q,v" and ex.TARGET_SETS["q,v"] == ("q_proj", "v_proj")


def test_runs_are_scored_on_the_whole_test_split():
    from lora_course import data

    cfg = ex.make_config()
    assert (cfg.steps, cfg.eval_n) == (32, 100)
    assert cfg.eval_n == data.SIZES["test"] == len(data.load_task(cfg.task, "test"))
    # the check study's live runs score a subset, within the split
    assert all(c.eval_n == 30 and c.steps == ex.CHECK_STEPS for c in ex.grid("check"))


def test_labels_name_rank_alpha_and_nondefault_steps():
    assert ex.make_config().label == "lora r=8 a=16 all lr=0.003 s0"
    assert ex.make_config(r=2, alpha=16, lr=1e-3, seed=2).label == "lora r=2 a=16 all lr=0.001 s2"
    assert ex.make_config(r=2, lr=1e-3).label == "lora r=2 a=4 all lr=0.001 s0"
    assert ex.make_config(method="rslora", r=32, alpha=ex.RS_ALPHA).label == "rslora r=32 a=5.66 all lr=0.003 s0"
    assert ex.make_config(method="full").label == "full all lr=3e-05 s0"
    assert ex.make_config(steps=8, targets="q,v").label == "lora r=8 a=16 q,v lr=0.003 8 steps s0"
    assert ex.make_config(method="ia3", steps=ex.CHECK_STEPS).label == "ia3 all lr=0.01 8 steps s0"
    # every configuration of the sweep has its own label (the notebook's tables are keyed by them)
    grid = ex.full_grid(seeds=(0, 1))
    assert len({c.label for c in grid}) == len(grid)


def test_scaling_of_names_the_rule_and_its_scale():
    assert ex.scaling_of(ex.make_config(r=2, alpha=16.0)) == ("fixed", 8.0)
    assert ex.scaling_of(ex.make_config(r=32, alpha=16.0)) == ("fixed", 0.5)
    assert ex.scaling_of(ex.make_config(r=2)) == ("2r", 2.0)
    assert ex.scaling_of(ex.make_config(r=32)) == ("2r", 2.0)
    rule, scale = ex.scaling_of(ex.make_config(method="rslora", r=32, alpha=ex.RS_ALPHA))
    assert rule == "rs" and scale == pytest.approx(ex.RS_ALPHA / math.sqrt(32)) and scale == pytest.approx(1.0)
    assert ex.scaling_of(ex.make_config(method="rslora", r=2, alpha=ex.RS_ALPHA))[1] == pytest.approx(4.0)
    # all three scalings agree at r = 8: scale 2 (and a plain record's config dict reads the same)
    at8 = [ex.make_config(**{**spec, "r": 8}) for spec in ex.SCALINGS.values()]
    assert [ex.scaling_of(c)[1] for c in at8] == pytest.approx([2.0, 2.0, 2.0])
    assert ex.scaling_of(asdict(ex.make_config(r=8, alpha=16.0))) == ("2r", 2.0)


def _rates(cfgs, **match):
    return [c.lr for c in cfgs if all(getattr(c, k) == v for k, v in match.items())]


def test_scaling_study_holds_r8_once_and_each_scaling_elsewhere():
    cfgs = ex.grid("scaling")
    assert len(cfgs) == len(set(cfgs)) == 3 + 2 * len(ex.SCALINGS) * 3
    assert {c.seed for c in cfgs} == {0} and {c.targets for c in cfgs} == {"all"}
    assert {c.r for c in cfgs} == set(ex.SCALING_RANKS) == {2, 8, 32}
    # r = 8 once, at LoRA's three rates, with alpha = 16 (where fixed, 2r and rs agree)
    at8 = [c for c in cfgs if c.r == 8]
    assert [(c.method, c.alpha) for c in at8] == [("lora", 16.0)] * 3 and _rates(at8) == list(ex.LR_GRID["lora"])
    for r in (2, 32):
        for name, spec in ex.SCALINGS.items():
            alpha = spec["alpha"] if spec["alpha"] is not None else 2.0 * r
            group = [c for c in cfgs if c.r == r and c.method == spec["method"] and c.alpha == pytest.approx(alpha)]
            assert _rates(group) == list(ex.LR_GRID["lora"]), (r, name)
            assert {ex.scaling_of(c)[0] for c in group} == {name}
    assert len(ex.LR_GRID["lora"]) == 3


def test_methods_and_targets_studies_try_three_rates_each():
    cfgs = ex.grid("methods")
    methods = ("full", "lora", "qlora", "dora", "loraplus")
    assert len(cfgs) == len(set(cfgs)) == 3 * len(methods)
    for m in methods:
        rates = _rates(cfgs, method=m)
        assert rates == list(ex.LR_GRID[m]) and len(rates) == 3, m
        assert all(2 < b / a < 4 for a, b in itertools.pairwise(rates)), m  # about a factor of 3 apart
    # the LoRA family shares one grid; LoRA+ (B steps at 16x) tries a third of it: one grid step lower
    assert ex.LR_GRID["qlora"] == ex.LR_GRID["dora"] == ex.LR_GRID["rslora"] == ex.LR_GRID["lora"]
    plus, lora = ex.LR_GRID["loraplus"], ex.LR_GRID["lora"]
    assert all(2 < b / a < 4 for a, b in zip(plus, lora, strict=True)) and plus[1:] == lora[:-1]
    assert {(c.r, c.targets, c.alpha) for c in cfgs} == {(8, "all", 16.0)}
    targets = ex.grid("targets")
    for t in ("q,v", "all"):
        assert _rates(targets, targets=t) == list(ex.LR_GRID["lora"]), t
    assert len(targets) == 6


def test_noise_study_always_holds_its_three_seeds():
    assert [c.seed for c in ex.grid("noise")] == list(ex.NOISE_SEEDS) == [0, 1, 2]
    assert [c.seed for c in ex.grid("noise", seeds=(0,))] == [0, 1, 2]
    assert [c.seed for c in ex.grid("noise", seeds=(5,))] == [5, 0, 1, 2]
    assert {replace(c, seed=0) for c in ex.grid("noise")} == {ex.make_config(lr=1e-3)}
    # other studies take the seeds they are given (default: seed 0 only)
    assert {c.seed for c in ex.grid("methods")} == {0}
    assert {c.seed for c in ex.grid("methods", seeds=(0, 1))} == {0, 1}


def test_full_grid_holds_each_configuration_once():
    grid = ex.full_grid()
    assert len(grid) == len(set(grid)) == 40
    per_study = {s: set(ex.grid(s)) for s in ex.STUDIES}
    assert set(grid) == set().union(*per_study.values())
    # LoRA r=8 on all layers at 1e-3, seed 0, serves the scaling, methods, targets and noise studies: once
    shared = ex.make_config(lr=1e-3)
    assert grid.count(shared) == 1
    assert [s for s in ex.STUDIES if shared in per_study[s]] == ["scaling", "methods", "targets", "noise"]
    assert [s for s in ex.STUDIES if ex.in_study({"config": asdict(shared)}, s)] == ["scaling", "methods", "targets",
                                                                                      "noise"]
    assert not any(ex.in_study({"config": asdict(ex.make_config(r=4))}, s) for s in ex.STUDIES)
    assert sorted(c.seed for c in grid if replace(c, seed=0) == shared) == [0, 1, 2]
    assert {c.method for c in grid} == {"full", "lora", "qlora", "rslora", "dora", "loraplus", "ia3"}
    two = ex.full_grid(seeds=(0, 1))
    assert len(two) == len(set(two)) == 2 * 40 - 3  # the noise study's seeds 0 and 1 are not repeated


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


def test_in_study_recognises_a_grid_run_with_its_steps_overridden():
    """Notebook 09's live grid may run every configuration with other steps (check_provenance's live_steps): its
    records still belong to their studies, so the noise study and the claims can be read from them."""
    from dataclasses import asdict

    short = ex.full_grid(steps=2)
    noise = [c for c in short if ex.in_study({"config": asdict(c)}, "noise")]
    assert sorted(c.seed for c in noise) == list(ex.NOISE_SEEDS) and {c.steps for c in noise} == {2}
    assert all(any(ex.in_study({"config": asdict(c)}, s) for s in ex.STUDIES) for c in short)
    assert not ex.in_study({"config": asdict(ex.make_config(steps=2, lr=2e-3))}, "methods")  # a rate off the grid
