"""Notebook 09's analysis: study rows over seeds, the noise over seeds, best rates, effects against the noise, and the
references' claims judged."""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict

import pytest

from lora_course import claims as cl
from lora_course import experiments as ex


# ------------------------------------------------------------------------------------------------ records
def _rec(seed: int, metric: float = 0.5, loss_last: float = 0.5, loss: float = 1.0, peak_mib: float = 100.0,
         sec_per_step: float = 1.0, **cfg) -> dict:
    """A synthetic sweep record; ``loss`` is its held-out loss (the record stores the perplexity, exp(loss))."""
    c = ex.make_config(seed=seed, **cfg)
    return {"config": asdict(c), "label": c.label, "metric": metric, "perplexity": math.exp(loss),
            "trainable_params": 10, "trainable_pct": 0.1, "peak_mib": peak_mib, "sec_per_step": sec_per_step,
            "train_seconds": 20.0, "loss_first": 2.0, "loss_last": loss_last}


NOISE_LOSSES = (1.00, 1.01, 0.99)   # sd 0.01: the loss threshold is 2 sqrt(2) x 0.01 = 0.028
THR = 2 * math.sqrt(2) * 0.01


def _noise(losses=NOISE_LOSSES, metrics=(0.5, 0.5, 0.5), **kw) -> list[dict]:
    """The noise study: LoRA r=8 at 1e-3 on all layers, one record per seed."""
    return [_rec(s, metric=m, loss=v, lr=1e-3, **kw) for s, (v, m) in enumerate(zip(losses, metrics, strict=True))]


def _rated(losses: dict[float, float], **cfg) -> list[dict]:
    """Seed-0 records of one configuration at several rates (``{lr: held-out loss}``)."""
    return [_rec(0, loss=v, lr=lr, **cfg) for lr, v in losses.items()]


# --------------------------------------------------------------------------------------------- analysis
def test_heldout_loss_is_the_log_of_the_perplexity():
    assert cl.heldout_loss({"perplexity": math.e}) == pytest.approx(1.0)
    assert cl.heldout_loss(_rec(0, loss=0.37)) == pytest.approx(0.37)


def test_study_rows_count_the_seeds_whose_loss_fell():
    # LoRA+ at the top of its grid (1e-3) diverging on one seed: a rising loss must show in the row, not vanish in a
    # mean.
    recs = [_rec(0, 0.0, loss_last=12.3, method="loraplus", lr=1e-3), _rec(1, 0.1, method="loraplus", lr=1e-3),
            _rec(0, 0.4, method="loraplus", lr=1e-4), _rec(1, 0.4, method="loraplus", lr=1e-4)]
    assert not cl.learned(recs[0]) and cl.learned(recs[1])
    rows = cl.study_rows(recs, "methods")
    assert [(r["lr"], r["learned"], r["n"]) for r in rows] == [(1e-4, 2, 2), (1e-3, 1, 2)]  # in grid order
    assert "| 1/2 |" in cl.format_rows(rows, ("label", "learned"))


def test_study_rows_aggregate_over_seeds():
    recs = [_rec(s, m, loss=v, r=2, alpha=16.0, lr=1e-3) for s, m, v in zip(range(3), (0.1, 0.2, 0.3), (1.0, 1.2, 1.4),
                                                                              strict=True)]
    recs += [_rec(s, 0.5, r=8, lr=1e-3) for s in range(2)]
    recs += [_rec(0, 0.9, r=4), _rec(0, 0.9, r=2, lr=1e-3, targets="q,v")]  # in no cell of the scaling study
    rows = cl.study_rows(recs, "scaling")
    assert [(r["r"], r["alpha"]) for r in rows] == [(8, 16.0), (2, 16.0)]  # grid order: r = 8 first
    r8, r2 = rows
    assert r2["label"] == "lora r=2 a=16 all lr=0.001" and r2["seeds"] == [0, 1, 2]
    assert (r2["scaling"], r2["scale"], r8["scaling"], r8["scale"]) == ("fixed", 8.0, "2r", 2.0)
    assert (r2["steps"], r2["eval_n"]) == (32, 100)
    assert r2["n"] == 3 and r2["metric"] == pytest.approx(0.2) and r2["metric_std"] == pytest.approx(0.1)
    assert r2["loss"] == pytest.approx(1.2) and r2["loss_std"] == pytest.approx(0.2)
    assert r2["loss_values"] == pytest.approx([1.0, 1.2, 1.4])
    assert r2["perplexity"] == pytest.approx(statistics.fmean([math.exp(v) for v in (1.0, 1.2, 1.4)]))
    assert r8["n"] == 2 and r8["metric_std"] == 0.0 and r8["loss_std"] == 0.0
    table = cl.format_rows(rows)
    assert "0.200 ± 0.100 (n=3)" in table and "1.200 ± 0.200 (n=3)" in table
    line = cl.format_rows(rows, ("label", "lr", "scale")).splitlines()[3]
    assert line == "| lora r=2 a=16 all lr=0.001 | 0.001 | 8.000 |"


# ------------------------------------------------------------------------------------------------ noise
def test_measure_noise_reads_the_noise_study():
    noise = cl.measure_noise(_noise(metrics=(0.4, 0.5, 0.6)) + _rated({3e-3: 3.0}))
    assert (noise.seeds, noise.items) == (3, 100)
    assert noise.loss_sd == pytest.approx(0.01) and noise.threshold("loss") == pytest.approx(THR)
    assert noise.metric_mean == pytest.approx(0.5) and noise.metric_sd == pytest.approx(0.1)
    assert noise.metric_noise == pytest.approx(0.1)  # above the sampling sd sqrt(.25/100) = 0.05
    assert noise.threshold("metric") == pytest.approx(2 * math.sqrt(2) * 0.1)
    assert "3 seeds" in str(noise)
    # Seeds that agree exactly: exact match still has the sampling noise of its 100 items ...
    same = cl.measure_noise(_noise(metrics=(0.5, 0.5, 0.5)))
    assert same.metric_noise == pytest.approx(0.05)
    # ... and at a rate of 0 (no sampling spread) one item, 1/100, is the floor.
    zero = cl.measure_noise(_noise(metrics=(0.0, 0.0, 0.0)))
    assert zero.metric_noise == pytest.approx(0.01)
    assert zero.threshold("metric") == pytest.approx(2 * math.sqrt(2) / 100)


def test_measure_noise_needs_two_seeds():
    with pytest.raises(LookupError, match="make sweep"):
        cl.measure_noise(_noise()[:1] + _rated({3e-4: 1.0}))
    with pytest.raises(LookupError):
        cl.measure_noise([])
    assert cl.measure_noise(_noise()[:2]).seeds == 2


# ------------------------------------------------------------------------------------------- best rates
def test_best_rows_pick_the_lowest_loss_and_flag_the_grid_edge():
    recs = (_rated({1e-5: 1.5, 3e-5: 1.2, 1e-4: 0.9}, method="full")          # best at the top of its grid
            + _rated({3e-4: 1.1, 3e-3: 1.3}) + _noise()                         # best in the middle (1e-3: 1.0)
            + _rated({1e-4: 0.8, 3e-4: 1.0, 1e-3: 1.4}, method="loraplus"))     # best at the bottom
    best = cl.best_rows(cl.study_rows(recs, "methods"))
    assert [(b["method"], b["lr"]) for b in best] == [("full", 1e-4), ("lora", 1e-3), ("loraplus", 1e-4)]
    full, lora, plus = best
    assert (full["at_edge"], lora["at_edge"], plus["at_edge"]) == (True, False, True)
    assert lora["rates"] == [3e-4, 1e-3, 3e-3] and lora["loss"] == pytest.approx(1.0) and lora["n"] == 3
    assert lora["by_lr"] == pytest.approx({3e-4: 1.1, 1e-3: 1.0, 3e-3: 1.3})
    assert list(lora["by_lr"]) == [3e-4, 1e-3, 3e-3]
    # a single rate is not "at the edge" of anything
    (only,) = cl.best_rows(cl.study_rows(_rated({3e-4: 1.0}, method="dora"), "methods"))
    assert only["rates"] == [3e-4] and not only["at_edge"]


# ------------------------------------------------------------------------------------- effects, verdicts
@pytest.mark.parametrize("b_loss, verdict, claim", [
    (1.0 - 2 * THR, "b better", "supported"),       # b lower by more than the threshold
    (1.0 - THR / 2, "inconclusive", "inconclusive"),  # inside the noise, either way
    (1.0 + THR / 2, "inconclusive", "inconclusive"),
    (1.0 + 2 * THR, "a better", "contradicted"),    # the claimed winner is worse beyond the noise
], ids=["b-beyond", "b-inside", "a-inside", "a-beyond"])
def test_compare_against_the_noise_and_judge(b_loss, verdict, claim):
    noise = cl.measure_noise(_noise())
    e = cl.compare({"label": "a", "loss": 1.0}, {"label": "b", "loss": b_loss}, noise)
    assert (e.a, e.b, e.what, e.verdict) == ("a", "b", "loss", verdict)
    assert e.diff == pytest.approx(b_loss - 1.0) and e.threshold == pytest.approx(THR)
    assert cl.judge(e, "b better").startswith(claim)
    assert "held-out loss" in str(e) and verdict in str(e)
    # a claim of equality is never supported: inside the noise is inconclusive, beyond it contradicted
    assert cl.judge(e, "equal").startswith("inconclusive" if verdict == "inconclusive" else "contradicted")
    if verdict != "inconclusive":
        assert cl.judge(e, "a better") == ("contradicted" if claim == "supported" else "supported")


def test_compare_exact_match_higher_is_better():
    noise = cl.Noise(loss_sd=0.01, metric_sd=0.0, metric_mean=0.5, items=100, seeds=3)  # metric noise 0.05
    a = {"label": "a", "metric": 0.5}
    assert cl.compare(a, {"label": "b", "metric": 0.7}, noise, "metric").verdict == "b better"
    assert cl.compare(a, {"label": "b", "metric": 0.6}, noise, "metric").verdict == "inconclusive"  # < 0.141
    assert cl.compare(a, {"label": "b", "metric": 0.3}, noise, "metric").verdict == "a better"
    assert "exact match" in str(cl.compare(a, {"label": "b", "metric": 0.7}, noise, "metric"))


# ------------------------------------------------------------------------------------------ rate transfer
def _scaling_recs(shape: dict[tuple[str, int], dict[float, float]]) -> list[dict]:
    """The scaling study: r = 8 with its best rate 1e-3 (the noise seeds), and r = 2, 32 per ``shape``."""
    recs = _noise() + _rated({3e-4: 1.2, 3e-3: 1.3})
    for (name, r), losses in shape.items():
        spec = ex.SCALINGS[name]
        recs += _rated(losses, method=spec["method"], alpha=spec["alpha"], r=r)
    return recs


CLEAR = {3e-4: 1.2, 1e-3: 1.0, 3e-3: 1.3}   # best at r = 8's rate, resolved (neighbours worse beyond the noise)


def test_rate_transfer_verdicts():
    recs = _scaling_recs({("2r", 2): CLEAR, ("2r", 32): CLEAR,
                          ("fixed", 2): {3e-4: 0.8, 1e-3: 1.0, 3e-3: 1.4}, ("fixed", 32): CLEAR,
                          ("rs", 2): {3e-4: 0.995, 1e-3: 1.0, 3e-3: 1.3}, ("rs", 32): CLEAR})
    noise = cl.measure_noise(recs)
    evidence, verdict = cl.rate_transfer(recs, "2r", noise)
    assert verdict == "supported", evidence
    assert "r=8 best 0.001" in evidence and "r=2: best rate 0.001" in evidence
    # reusing r = 8's 1e-3 at r = 2 costs 0.2 against the best 3e-4 (an edge of the grid): beyond the noise
    evidence, verdict = cl.rate_transfer(recs, "fixed", noise)
    assert verdict.startswith("contradicted"), evidence
    assert "r=2: best rate 0.0003 (grid edge)" in evidence and "+0.200" in evidence
    # another best rate, but reusing r = 8's costs less than the noise
    evidence, verdict = cl.rate_transfer(recs, "rs", noise)
    assert verdict.startswith("inconclusive"), evidence


def test_rate_transfer_is_inconclusive_when_the_optimum_is_not_resolved():
    flat = {3e-4: 1.01, 1e-3: 1.0, 3e-3: 1.01}   # the same best rate, but its neighbours are within the noise
    recs = _scaling_recs({("2r", 2): CLEAR, ("2r", 32): flat})
    assert cl.rate_transfer(recs, "2r", cl.measure_noise(recs))[1].startswith("inconclusive")


def test_rate_transfer_without_the_other_ranks_is_out_of_reach():
    recs = _scaling_recs({("2r", 2): CLEAR})
    noise = cl.measure_noise(recs)
    evidence, verdict = cl.rate_transfer(recs, "2r", noise)
    assert evidence == "no r = 32 runs" and verdict.startswith("out of reach")
    assert cl.rate_transfer(_noise(), "fixed", noise)[1].startswith("out of reach")


# ---------------------------------------------------------------------------------------------- claims
RATE_CLAIMS = ("alpha = 2r keeps the effective rate (alpha/r) * lr, so one learning rate fits every rank",
               "alpha fixed (scale 1/r): the rate need not be retuned when r changes",
               "rsLoRA (alpha/sqrt(r)): the rate carries over between ranks")


def _methods_recs(full=0.9, qlora=1.1, dora=1.01, loraplus=1.2, qv=1.005, peaks=None, speeds=None) -> list[dict]:
    """The methods study at three rates each (best in the middle, loss given) plus the targets study, and the noise
    study's seeds (LoRA at 1e-3, loss 1.0)."""
    peaks = peaks or {"full": 2697.0, "lora": 688.0, "qlora": 600.0, "dora": 700.0, "loraplus": 688.0}
    speeds = speeds or {"qlora": 2.0}
    recs = [{**r, "peak_mib": peaks["lora"]} for r in _noise()]
    for m, best in (("full", full), ("lora", 1.0), ("qlora", qlora), ("dora", dora), ("loraplus", loraplus)):
        lo, mid, hi = ex.LR_GRID[m]
        rates = {lo: best + 0.3, hi: best + 0.4} if m == "lora" else {lo: best + 0.3, mid: best, hi: best + 0.4}
        recs += _rated(rates, method=m, peak_mib=peaks[m], sec_per_step=speeds.get(m, 1.0))
    recs += _rated({3e-4: qv + 0.3, 1e-3: qv, 3e-3: qv + 0.4}, targets="q,v")
    return recs


def test_claims_are_judged_from_the_records():
    recs = _methods_recs()
    claims = {c["claim"]: c for c in cl.check_claims(recs)}
    verdicts = {k: c["verdict"] for k, c in claims.items()}
    assert verdicts["Full fine-tuning gives the best quality"] == "supported"                  # 0.1 lower loss
    assert verdicts["QLoRA loses a little quality against LoRA (78.1% vs 79.8%)"] == "supported"  # 0.1 higher
    assert verdicts["DoRA improves on LoRA ('better learning capacity')"].startswith("inconclusive")  # 0.01
    assert verdicts["LoRA+ (B learns 16x faster than A) learns better in the same steps"] == "contradicted"
    assert verdicts["Attention projections matter most: adding O and the MLP to them gains little"].startswith(
        "inconclusive")
    assert verdicts["Peak memory: full > LoRA > QLoRA"] == "supported"
    assert verdicts["QLoRA trains slower than LoRA (5h vs 4h)"] == "supported"
    assert verdicts["LoRA for 7B+ models; QLoRA for 13B+ on a single GPU"].startswith("out of reach")
    # each method is compared at its best rate: LoRA+'s best (3e-4) against LoRA's (1e-3)
    assert "loraplus r=8 a=16 all lr=0.0003 vs lora r=8 a=16 all lr=0.001" in claims[
        "LoRA+ (B learns 16x faster than A) learns better in the same steps"]["measured"]
    # without the scaling study's other ranks its claims are out of reach, and rank claims are left out
    assert all(claims[c]["verdict"].startswith("out of reach") for c in RATE_CLAIMS)
    assert not any("Higher rank" in k for k in claims)
    table = cl.format_claims(cl.check_claims(recs))
    assert table.count("\n") == len(claims) + 1


def test_claims_compare_full_finetuning_only_beyond_the_noise():
    verdict = {c["claim"]: c["verdict"] for c in cl.check_claims(_methods_recs(full=1.0 + THR / 2))}
    assert verdict["Full fine-tuning gives the best quality"].startswith("inconclusive")
    verdict = {c["claim"]: c["verdict"] for c in cl.check_claims(_methods_recs(full=1.0 + 2 * THR))}
    assert verdict["Full fine-tuning gives the best quality"] == "contradicted"
    # the targets claim of equality is contradicted by a difference beyond the noise
    verdict = {c["claim"]: c["verdict"] for c in cl.check_claims(_methods_recs(qv=1.2))}
    assert verdict["Attention projections matter most: adding O and the MLP to them gains little"].startswith(
        "contradicted")


def test_claims_judge_the_scaling_study():
    recs = _scaling_recs({(name, r): CLEAR for name in ex.SCALINGS for r in (2, 32)})
    # r = 32 (2r) better than r = 8 beyond the noise; r = 2 no worse than r = 8
    recs = [r for r in recs if not (r["config"]["r"] == 32 and r["config"]["method"] == "lora"
                                    and r["config"]["alpha"] == 64.0)]
    recs += _rated({3e-4: 1.1, 1e-3: 0.8, 3e-3: 1.2}, r=32)
    claims = {c["claim"]: c["verdict"] for c in cl.check_claims(recs)}
    assert [claims[c] for c in RATE_CLAIMS] == ["supported"] * 3
    assert claims["Higher rank gives higher quality (r=64 'best', 'maximum quality')"] == "supported"
    assert claims["A very small rank learns clearly less than r=8 (r=1 62% vs r=8 75%)"].startswith("inconclusive")
    assert claims["rsLoRA: higher ranks pay off (proper scaling for high-rank training)"].startswith("inconclusive")


def test_claims_need_the_noise_study():
    recs = [r for r in _methods_recs() if not (r["config"]["lr"] == 1e-3 and r["config"]["method"] == "lora"
                                               and r["config"]["targets"] == "all" and r["config"]["seed"] > 0)]
    with pytest.raises(LookupError, match="noise"):
        cl.check_claims(recs)


def test_reference_tables_are_labelled_as_claims():
    assert {"rank", "targets", "memory", "scaling"} <= set(cl.REFERENCE_CLAIMS)
    for study in cl.REFERENCE_CLAIMS:
        text = cl.reference_table(study)
        assert "claim" in text and "not measured here" in text and cl.REFERENCE_CLAIMS[study]["source"] in text


@pytest.mark.parametrize("qlora_mib, upcast_mib, verdict", [
    (600.0, 0.0, "supported"),                  # QLoRA below LoRA: the reference's order
    (704.0, 54.0, "not at this model size"),    # the T4 lane at 135M: above LoRA by less than the fp32 upcast
    (704.0, 0.0, "contradicted"),               # on a CPU (no upcast) any QLoRA peak above LoRA's contradicts
    (760.0, 54.0, "contradicted"),              # above by more than the upcast: the 4-bit saving was nothing
])
def test_memory_claim_is_judged_against_the_upcast(qlora_mib, upcast_mib, verdict):
    recs = _methods_recs(peaks={"full": 2697.0, "lora": 688.0, "qlora": qlora_mib, "dora": 700.0, "loraplus": 688.0})
    claims = {c["claim"]: c for c in cl.check_claims(recs, upcast_mib=upcast_mib)}
    claim = claims["Peak memory: full > LoRA > QLoRA"]
    assert claim["verdict"].startswith(verdict)
    assert claim["measured"] == f"full 2697 MiB, LoRA 688 MiB, QLoRA {qlora_mib:.0f} MiB"


def test_verdicts_across_machines_agree_and_flag_a_conflict():
    """verdicts_across: one row per claim with each machine's verdict; ``agree`` when the verdict word is the same
    everywhere, ``conflict`` when one machine supports what another contradicts (notebook 09 refuses that)."""
    same = cl.verdicts_across([("a", _methods_recs(), 0.0), ("b", _methods_recs(), 0.0)])
    assert len(same) == len(cl.check_claims(_methods_recs()))
    assert all(r["agree"] and not r["conflict"] for r in same)
    full = "Full fine-tuning gives the best quality"
    # machine b: full fine-tuning worse than LoRA beyond the noise (contradicted), a: better (supported)
    rows = {r["claim"]: r for r in cl.verdicts_across([("a", _methods_recs(), 0.0),
                                                       ("b", _methods_recs(full=1.0 + 2 * THR), 0.0),
                                                       ("c", _methods_recs(full=1.0 + THR / 2), 0.0)])}
    assert [rows[full]["verdicts"][m].split(":")[0] for m in "abc"] == ["supported", "contradicted", "inconclusive"]
    assert rows[full]["conflict"] and not rows[full]["agree"]
    # inconclusive beside supported is no conflict (each machine's own noise decides)
    two = {r["claim"]: r for r in cl.verdicts_across([("a", _methods_recs(), 0.0),
                                                      ("c", _methods_recs(full=1.0 + THR / 2), 0.0)])}
    assert not two[full]["conflict"] and not two[full]["agree"]
    assert cl.agreement_summary(list(rows.values())).endswith(f"supported on one and contradicted on another: {full}")
    assert cl.agreement_summary(same).startswith(f"{len(same)} of {len(same)} claims get the same verdict on all 2")
    assert cl.agreement_summary(same).endswith(": none")
    best = cl.format_best_across([("a", _methods_recs()), ("b", _methods_recs(full=0.8))])
    assert best.splitlines()[0].endswith("| a | b |") and "| full | 0.900 at 3e-05 | 0.800 at 3e-05 |" in best
    assert "| lora | 1.000 at 0.001 | 1.000 at 0.001 |" in best
    table = cl.format_verdicts_across(list(rows.values()))
    assert table.splitlines()[0].endswith("| a | b | c |")
    assert f"| {full} | " in table and "| supported | contradicted | inconclusive |" in table
