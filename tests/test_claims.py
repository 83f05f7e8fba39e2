"""Notebook 09's analysis: study rows over seeds, effects against the noise, and the references' claims judged."""
from __future__ import annotations

from dataclasses import asdict

import pytest

from lora_course import claims as cl
from lora_course import experiments as ex


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
    assert not cl.learned(recs[0]) and cl.learned(recs[1])
    rows = cl.study_rows(recs, "variants")
    assert [(r["lr"], r["learned"], r["n"]) for r in rows] == [(3e-3, 1, 2), (3e-4, 2, 2)]
    assert "| 1/2 |" in cl.format_rows(rows, ("label", "learned"))


def test_study_rows_aggregate_over_seeds():
    recs = [_rec(s, m, r=1) for s, m in enumerate((0.1, 0.2, 0.3))] + [_rec(s, 0.5, r=8) for s in range(3)]
    rows = cl.study_rows(recs, "rank")
    assert [r["r"] for r in rows] == [1, 8]
    assert rows[0]["n"] == 3 and rows[0]["metric"] == pytest.approx(0.2)
    assert rows[0]["metric_std"] == pytest.approx(0.1)
    assert rows[1]["metric_std"] == 0.0
    assert "0.200 ± 0.100 (n=3)" in cl.format_rows(rows)


def test_effect_against_the_spread():
    a = {"label": "a", "metric": 0.5, "metric_std": 0.05}
    assert cl.effect(a, {"label": "b", "metric": 0.55, "metric_std": 0.05}).verdict == "within noise"
    assert cl.effect(a, {"label": "b", "metric": 0.8, "metric_std": 0.05}).verdict == "b better"
    assert cl.effect(a, {"label": "b", "metric": 0.2, "metric_std": 0.0}).verdict == "a better"
    # One eval example (1/30) is the floor of the noise even when the seeds agree exactly.
    tie = cl.effect({"label": "a", "metric": 0.5, "metric_std": 0.0}, {"label": "b", "metric": 0.55, "metric_std": 0.0})
    assert tie.verdict == "within noise"


def test_claims_are_judged_from_the_records():
    recs = []
    for s in range(3):
        recs += [_rec(s, 0.1, r=1), _rec(s, 0.6, r=8), _rec(s, 0.62, r=64), _rec(s, 0.6 + 0.01 * s, method="full")]
    claims = {c["claim"]: c["verdict"] for c in cl.check_claims(recs)}
    assert claims["Diminishing returns above r=8 (r=1 clearly worse, r=64 hardly better)"] == "supported"
    assert claims["Full fine-tuning gives the best quality"].startswith("not supported")
    assert any(v.startswith("out of reach") for v in claims.values())
    table = cl.format_claims(cl.check_claims(recs))
    assert table.count("\n") == len(claims) + 1


def test_reference_tables_are_labelled_as_claims():
    for study in ("rank", "targets", "memory", "variants"):
        text = cl.reference_table(study)
        assert "claim" in text and "not measured here" in text


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
    claims = {c["claim"]: c["verdict"] for c in cl.check_claims(recs, upcast_mib=upcast_mib)}
    assert claims["Peak memory: full > LoRA > QLoRA"].startswith(verdict)
