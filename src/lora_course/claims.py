"""Notebook 09's results read as evidence: study tables, each method at its best rate, effects against measured noise.

``study_rows`` aggregates a sweep's records (``sweep.load_results``) per configuration of a study (mean and spread
over seeds). The primary metric is continuous: the held-out answer loss (``heldout_loss``, the log of the answer
perplexity on the 100-example test split), with exact match on the same 100 items beside it. ``measure_noise``
reads the ``noise`` study (one configuration, three seeds) and derives the threshold a difference must clear;
``best_rows`` picks each configuration's best learning rate (and flags a best rate at the grid's edge); ``compare``
turns a difference into "b better", "a better" or "inconclusive"; ``check_claims`` judges each of the references'
claims the records can reach as supported, contradicted or inconclusive (``REFERENCE_CLAIMS`` quotes their tables).
"""
from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .experiments import grid, in_study, scaling_of


# ================================================================================================ analysis
def learned(record: dict[str, Any]) -> bool:
    """Whether a run's training loss ended below where it started (False: it diverged or did not move)."""
    return float(record["loss_last"]) < float(record["loss_first"])


def heldout_loss(record: dict[str, Any]) -> float:
    """The run's held-out answer loss in nats per token: the log of its answer perplexity on the test split."""
    return math.log(float(record["perplexity"]))


def _group_key(cfg: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in cfg.items() if k != "seed"}, sort_keys=True)


def study_rows(records: Sequence[dict[str, Any]], study: str) -> list[dict[str, Any]]:
    """One row per configuration of ``study`` (in grid order), aggregated over its seeds.

    Each row: the label (without seed), method, rank, alpha, scaling rule and scale (LoRA family), targets, learning
    rate, seeds, trainable parameters and %, mean and standard deviation over seeds of the held-out ``loss``, the
    exact-match ``metric`` and the perplexity, mean peak MiB, seconds a step and training time, and in how many
    seeds the training loss fell (``learned``).
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if in_study(r, study):
            groups.setdefault(_group_key(r["config"]), []).append(r)
    order = [_group_key(asdict(c)) for c in grid(study, seeds=(0,))]
    rows = []
    for key in sorted(groups, key=lambda k: order.index(k) if k in order else len(order)):
        rs = groups[key]
        cfg = rs[0]["config"]
        values = {"loss": [heldout_loss(r) for r in rs], "metric": [float(r["metric"]) for r in rs],
                  "perplexity": [float(r["perplexity"]) for r in rs]}
        lora_family = cfg["method"] not in ("full", "ia3", "prefix", "vera")
        scaling, scale = scaling_of(cfg) if lora_family else ("", float("nan"))
        row = {"label": rs[0]["label"].rsplit(" s", 1)[0], "method": cfg["method"], "r": cfg["r"],
               "alpha": cfg["alpha"], "scaling": scaling, "scale": scale, "targets": cfg["targets"], "lr": cfg["lr"],
               "steps": cfg["steps"], "eval_n": cfg["eval_n"], "seeds": sorted(r["config"]["seed"] for r in rs),
               "n": len(rs), "trainable_params": rs[0]["trainable_params"], "trainable_pct": rs[0]["trainable_pct"],
               "peak_mib": statistics.fmean(float(r["peak_mib"]) for r in rs),
               "sec_per_step": statistics.fmean(float(r["sec_per_step"]) for r in rs),
               "train_seconds": statistics.fmean(float(r["train_seconds"]) for r in rs),
               "learned": sum(learned(r) for r in rs)}
        for name, vs in values.items():
            row[name] = statistics.fmean(vs)
            row[name + "_std"] = statistics.stdev(vs) if len(vs) > 1 else 0.0
            row[name + "_values"] = vs
        rows.append(row)
    return rows


def format_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str] = ("label", "trainable_pct", "loss", "metric",
                "peak_mib", "sec_per_step")) -> str:
    """A Markdown table of study rows: means with their spread over seeds (mean ± sd, n seeds)."""
    head = {"label": "configuration", "trainable_params": "trainable params", "trainable_pct": "trainable %",
            "loss": "held-out loss", "metric": "exact match", "perplexity": "perplexity", "peak_mib": "peak MiB",
            "sec_per_step": "s/step", "train_seconds": "train s", "learned": "loss fell", "lr": "rate",
            "scale": "scale", "at_edge": "best rate at grid edge"}
    out = ["| " + " | ".join(head.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row[c]
            if c == "learned":
                cells.append(f"{v}/{row['n']}")
            elif c in ("loss", "metric", "perplexity") and row["n"] > 1:
                cells.append(f"{v:.3f} ± {row[c + '_std']:.3f} (n={row['n']})")
            elif c == "trainable_pct":
                cells.append(f"{v:.3f}%")
            elif c == "trainable_params":
                cells.append(f"{v:,}")
            elif c == "lr":
                cells.append(f"{v:g}")
            elif isinstance(v, bool):
                cells.append("yes" if v else "no")
            elif isinstance(v, float):
                cells.append(f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}")
            else:
                cells.append(str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


# =================================================================================================== noise
@dataclass(frozen=True)
class Noise:
    """The noise a difference between two runs must clear, measured from one configuration's seeds.

    ``loss_sd`` and ``metric_sd``: the standard deviation over seeds (training order and adapter initialisation)
    of the held-out loss and of exact match. Exact match also has the sampling noise of its ``items`` answers,
    sqrt(p (1 - p) / items) at the measured rate p, and a resolution of one item; its noise is the largest of the
    three. Two single runs differ by chance with a standard deviation sqrt(2) times one run's, so a difference
    counts when it exceeds ``threshold`` = 2 sqrt(2) x noise (about a 95% two-sided band for normal noise).
    """

    loss_sd: float
    metric_sd: float
    metric_mean: float
    items: int
    seeds: int

    @property
    def metric_noise(self) -> float:
        p = self.metric_mean
        return max(self.metric_sd, math.sqrt(p * (1 - p) / self.items), 1 / self.items)

    def threshold(self, what: str = "loss") -> float:
        """The smallest difference in ``what`` (``loss`` or ``metric``) that counts as an effect."""
        return 2 * math.sqrt(2) * (self.loss_sd if what == "loss" else self.metric_noise)

    def __str__(self) -> str:
        return (f"{self.seeds} seeds: held-out loss sd {self.loss_sd:.4f} (threshold {self.threshold('loss'):.4f}); "
                f"exact match sd {self.metric_sd:.3f}, sampling sd of {self.items} items at p={self.metric_mean:.2f} "
                f"{math.sqrt(self.metric_mean * (1 - self.metric_mean) / self.items):.3f} "
                f"(threshold {self.threshold('metric'):.3f})")


def measure_noise(records: Sequence[dict[str, Any]]) -> Noise:
    """The ``noise`` study's spread over seeds; ``LookupError`` when fewer than two of its seeds are in ``records``."""
    rows = study_rows(records, "noise")
    if not rows or rows[0]["n"] < 2:
        raise LookupError("the records hold fewer than two seeds of the noise study: run `make sweep`")
    row = rows[0]
    return Noise(row["loss_std"], row["metric_std"], row["metric"], int(row["eval_n"]), row["n"])


# ============================================================================================ best rates
def best_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each configuration at its best learning rate (lowest held-out loss), in the order first seen.

    Rows that differ only in the rate form one group. Each returned row adds ``by_lr`` (rate -> held-out loss),
    ``rates`` (tried, ascending) and ``at_edge``: the best rate is the lowest or highest tried, so a better one may
    lie outside the grid and the method's comparison is a lower bound on what it can do.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        key = json.dumps({k: row[k] for k in ("method", "r", "alpha", "targets", "steps", "eval_n")}, sort_keys=True)
        groups.setdefault(key, []).append(row)
    out = []
    for members in groups.values():
        best = min(members, key=lambda m: m["loss"])
        rates = sorted(m["lr"] for m in members)
        out.append({**best, "by_lr": {m["lr"]: m["loss"] for m in sorted(members, key=lambda m: m["lr"])},
                    "rates": rates, "at_edge": len(rates) > 1 and best["lr"] in (rates[0], rates[-1])})
    return out


@dataclass(frozen=True)
class Effect:
    """A difference between two configurations in held-out loss or exact match, against the measured noise."""

    a: str
    b: str
    what: str            # "loss" (lower is better) or "metric" (exact match, higher is better)
    diff: float          # b - a
    threshold: float     # Noise.threshold(what)
    verdict: str         # "b better", "a better" or "inconclusive"

    def __str__(self) -> str:
        name = "held-out loss" if self.what == "loss" else "exact match"
        return f"{self.b} vs {self.a}: {name} {self.diff:+.3f} (noise threshold {self.threshold:.3f}): {self.verdict}"


def compare(row_a: dict[str, Any], row_b: dict[str, Any], noise: Noise, what: str = "loss") -> Effect:
    """Whether ``row_b`` beats ``row_a`` on ``what`` by more than the noise threshold, loses by more, or neither."""
    diff = row_b[what] - row_a[what]
    thr = noise.threshold(what)
    gain = -diff if what == "loss" else diff
    verdict = "b better" if gain > thr else "a better" if gain < -thr else "inconclusive"
    return Effect(row_a["label"], row_b["label"], what, diff, thr, verdict)


def judge(e: Effect, expect: str) -> str:
    """A claim's verdict from an effect: ``expect`` is what the claim predicts, ``"b better"``, ``"a better"`` or
    ``"equal"``. A difference inside the noise never supports a claim of a difference, nor proves an equality."""
    if e.verdict == "inconclusive":
        return f"inconclusive: the difference is inside the noise (±{e.threshold:.3f})"
    if expect == "equal":
        return f"contradicted: {e.b if e.verdict == 'b better' else e.a} is better beyond the noise"
    return "supported" if e.verdict == expect else "contradicted"


REFERENCE_CLAIMS: dict[str, dict[str, Any]] = {
    "rank": {"source": "004 (README of a PEFT project), Experiment 1: GPT-small on an instruction dataset",
             "columns": ("configuration", "trainable %", "accuracy", "perplexity"),
             "rows": [("r=1", "0.01%", "62.3%", "18.7"), ("r=4", "0.05%", "71.2%", "14.2"),
                      ("r=8", "0.1%", "74.8%", "12.5"), ("r=16", "0.2%", "76.1%", "12.1"),
                      ("r=64", "0.8%", "77.2%", "11.8"), ("Full FT", "100%", "77.9%", "11.5")],
             "insight": "Diminishing returns above r=8 for most tasks"},
    "targets": {"source": "004, Experiment 3: LoRA on different module combinations",
                "columns": ("target modules", "trainable params", "accuracy"),
                "rows": [("Q only", "25K", "68.2%"), ("Q, K", "50K", "72.4%"), ("Q, K, V", "75K", "75.3%"),
                         ("Q, K, V, O", "100K", "76.1%"), ("All (incl MLP)", "150K", "76.8%")],
                "insight": "Q, K, V projections most important"},
    "memory": {"source": "004, Experiment 2: a 7B model with different methods",
               "columns": ("method", "peak memory", "accuracy", "training time"),
               "rows": [("Full FT", "42GB", "81.2%", "8h"), ("LoRA", "12GB", "79.8%", "4h"),
                        ("QLoRA", "9GB", "78.1%", "5h")],
               "insight": "LoRA gives best memory/quality tradeoff"},
    "scaling": {"source": "002 (PEFT guide), 'Alpha'; 001 and 004, 'Alpha'; 000, 'rsLoRA'",
                "columns": ("setting", "what the references say"),
                "rows": [("alpha = r", "scaling = 1 (001)"),
                         ("alpha = 2r", "scaling = 2, 'set to 2×r for stability' (002, 004)"),
                         ("alpha / r", "'effective_lr = (alpha/r) * lr' (002)"),
                         ("rsLoRA", "'proper scaling for higher ranks': use_rslora=True, alpha / sqrt(r) (000)")],
                "insight": "alpha = 2r is the rule of thumb; rsLoRA is for high ranks"},
    "variants": {"source": "000 (LoRA/PEFT reference), 'When to Use PEFT vs Full Fine-Tuning'; 002 on VeRA",
                 "columns": ("method", "use when", "avoid when"),
                 "rows": [("LoRA", "7B+ models, limited VRAM, need multiple task adapters",
                           "Very small models (<1B), need maximum quality"),
                          ("QLoRA", "13B+ models, single GPU, memory-constrained",
                           "High-throughput training, inference speed critical"),
                          ("Full Fine-Tuning", "Small models, abundant compute, maximum performance needed",
                           "Large models, limited resources"),
                          ("Prefix Tuning", "Generation tasks, need interpretable soft prompts",
                           "Complex reasoning tasks"),
                          ("IA3", "Extreme efficiency needed, inference overhead critical",
                           "Tasks needing high adapter capacity"),
                          ("VeRA (002)", ("Even fewer trainable parameters than LoRA; maintains competitive "
                                          "performance; faster training"), "")],
                 "insight": "each method has a regime; the course checks the parts its data can reach"},
}
"""The references' ablation tables and 'when to use which' table, quoted as their claims (not results)."""


def reference_table(study: str) -> str:
    """The references' table for ``study`` as Markdown, labelled as their claim with its source."""
    claim = REFERENCE_CLAIMS[study]
    out = [f"*The references' claim ({claim['source']}); not measured here:*", "",
           "| " + " | ".join(claim["columns"]) + " |", "|" + "---|" * len(claim["columns"])]
    out += ["| " + " | ".join(row) + " |" for row in claim["rows"]]
    out += ["", f"*Their insight: \"{claim['insight']}\"*"]
    return "\n".join(out)


def _row(rows: Sequence[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r[k] == v for k, v in match.items())), None)


def _best(rows: Sequence[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return _row(best_rows([r for r in rows if all(r[k] == v for k, v in match.items())]))


def rate_transfer(records: Sequence[dict[str, Any]], scaling: str, noise: Noise) -> tuple[str, str]:
    """Whether the learning rate best at r = 8 is still best at r = 2 and r = 32 under ``scaling``: the evidence and
    the verdict on the claim that it is (supported only when every rank's best rate is r = 8's and resolved, i.e.
    a neighbouring rate is worse beyond the noise; contradicted when reusing r = 8's rate costs more than the noise
    at some rank)."""
    rows = study_rows(records, "scaling")
    base = _best(rows, r=8, method="lora", alpha=16.0)
    if base is None:
        return "no r = 8 runs", "out of reach: the scaling study is missing"
    parts, costs, same, resolved = [], [], True, True
    thr = noise.threshold("loss")
    for r in (2, 32):
        group = [x for x in rows if x["r"] == r and x["scaling"] == scaling]
        best = _row(best_rows(group))
        reuse = _row(group, lr=base["lr"])
        if best is None or reuse is None:
            return f"no r = {r} runs", "out of reach: the scaling study is missing"
        cost = reuse["loss"] - best["loss"]
        costs.append(cost)
        same &= best["lr"] == base["lr"]
        resolved &= not best["at_edge"] and any(v - best["loss"] > thr for lr, v in best["by_lr"].items())
        parts.append(f"r={r}: best rate {best['lr']:g}{' (grid edge)' if best['at_edge'] else ''}, "
                     f"reusing r=8's {base['lr']:g} costs {cost:+.3f}")
    evidence = f"r=8 best {base['lr']:g}; " + "; ".join(parts) + f" (noise threshold {thr:.3f})"
    if max(costs) > thr:
        return evidence, "contradicted: the rate tuned at r = 8 is worse beyond the noise at another rank"
    if same and resolved:
        return evidence, "supported"
    return evidence, "inconclusive: reusing r = 8's rate costs less than the noise, but the optimum is not resolved"


def check_claims(records: Sequence[dict[str, Any]], upcast_mib: float = 0.0) -> list[dict[str, str]]:
    """The references' claims that these records can test, each with the measured evidence and a verdict.

    Every comparison puts each configuration at its best learning rate (``best_rows``) and judges the difference
    in held-out loss against the noise measured over seeds (``measure_noise``, ``compare``, ``judge``): a verdict
    is "supported", "contradicted" or "inconclusive" (inside the noise). Memory and time come from the runs'
    measurements; a claim about 7B+ models is out of reach and says so. ``upcast_mib``: what the QLoRA base holds in
    fp32 beyond LoRA's compute dtype (``memory_estimate.qlora_upcast_bytes``; 0 on a CPU).
    """
    out: list[dict[str, str]] = []

    def add(claim: str, source: str, evidence: str, verdict: str) -> None:
        out.append({"claim": claim, "source": source, "measured": evidence, "verdict": verdict})

    noise = measure_noise(records)
    # ---- scaling: does one learning rate fit every rank?
    for scaling, claim, source in (
            ("2r", "alpha = 2r keeps the effective rate (alpha/r) * lr, so one learning rate fits every rank",
             "002 'Alpha'"),
            ("fixed", "alpha fixed (scale 1/r): the rate need not be retuned when r changes",
             "Hu et al. 2021 (LoRA) §4.1"),
            ("rs", "rsLoRA (alpha/sqrt(r)): the rate carries over between ranks", "000 'rsLoRA'")):
        add(claim, source, *rate_transfer(records, scaling, noise))
    scal = study_rows(records, "scaling")
    by_rank = {r: min(best_rows([x for x in scal if x["r"] == r]), key=lambda x: x["loss"], default=None)
               for r in (2, 8, 32)}
    if all(by_rank.values()):
        e = compare(by_rank[8], by_rank[32], noise)
        add("Higher rank gives higher quality (r=64 'best', 'maximum quality')", "000 rank table", str(e),
            judge(e, "b better"))
        e = compare(by_rank[2], by_rank[8], noise)
        add("A very small rank learns clearly less than r=8 (r=1 62% vs r=8 75%)", "004 exp. 1", str(e),
            judge(e, "b better"))
    rs2, rs32 = _best(scal, r=2, scaling="rs"), _best(scal, r=32, scaling="rs")
    if rs2 and rs32:
        e = compare(rs2, rs32, noise)
        add("rsLoRA: higher ranks pay off (proper scaling for high-rank training)", "000 'rsLoRA'", str(e),
            judge(e, "b better"))
    # ---- methods, each at its best rate
    meth = study_rows(records, "methods")
    best = {m: _best(meth, method=m) for m in ("full", "lora", "qlora", "dora", "loraplus")}
    lo = best["lora"]
    if lo and best["full"]:
        e = compare(lo, best["full"], noise)
        add("Full fine-tuning gives the best quality", "004 exp. 1-2, 000 'maximum performance'", str(e),
            judge(e, "b better"))
    if lo and best["qlora"]:
        e = compare(lo, best["qlora"], noise)
        add("QLoRA loses a little quality against LoRA (78.1% vs 79.8%)", "004 exp. 2", str(e), judge(e, "a better"))
    if lo and best["dora"]:
        e = compare(lo, best["dora"], noise)
        add("DoRA improves on LoRA ('better learning capacity')", "000 'DoRA', 002", str(e), judge(e, "b better"))
    if lo and best["loraplus"]:
        e = compare(lo, best["loraplus"], noise)
        add("LoRA+ (B learns 16x faster than A) learns better in the same steps", "002 'LoRA+'", str(e),
            judge(e, "b better"))
    f, ql = best["full"], best["qlora"]
    if f and lo and ql:
        if f["peak_mib"] > lo["peak_mib"] > ql["peak_mib"]:
            verdict = "supported"
        elif f["peak_mib"] > lo["peak_mib"] and ql["peak_mib"] < lo["peak_mib"] + upcast_mib:
            verdict = (f"not at this model size: QLoRA is {ql['peak_mib'] - lo['peak_mib']:.0f} MiB above LoRA, less "
                       f"than the {upcast_mib:.0f} MiB its fp32 embeddings/norms add (prepare_model_for_kbit_training)"
                       "; the 4-bit saving wins at 1B+")
        else:
            verdict = "contradicted"
        add("Peak memory: full > LoRA > QLoRA", "004 exp. 2, 003",
            f"full {f['peak_mib']:.0f} MiB, LoRA {lo['peak_mib']:.0f} MiB, QLoRA {ql['peak_mib']:.0f} MiB", verdict)
        add("QLoRA trains slower than LoRA (5h vs 4h)", "004 exp. 2",
            f"LoRA {lo['sec_per_step']:.2f} s/step, QLoRA {ql['sec_per_step']:.2f} s/step (bitsandbytes)",
            "supported" if ql["sec_per_step"] > lo["sec_per_step"] else "contradicted")
    # ---- target modules
    tg = study_rows(records, "targets")
    qv, allr = _best(tg, targets="q,v"), _best(tg, targets="all")
    if qv and allr:
        e = compare(qv, allr, noise)
        add("Attention projections matter most: adding O and the MLP to them gains little", "004 exp. 3", str(e),
            judge(e, "equal"))
    add("LoRA for 7B+ models; QLoRA for 13B+ on a single GPU", "000", "a 135M model",
        "out of reach: these runs cannot test claims about 7B+ models")
    return out


def format_claims(claims: Sequence[dict[str, str]]) -> str:
    """The checked claims as a Markdown table."""
    out = ["| the references' claim | source | measured here | verdict |", "|---|---|---|---|"]
    out += [f"| {c['claim']} | {c['source']} | {c['measured']} | {c['verdict']} |" for c in claims]
    return "\n".join(out)


def verdicts_across(grids: Sequence[tuple[str, Sequence[dict[str, Any]], float]]) -> list[dict[str, Any]]:
    """The references' claims judged on several grids (``(name, records, upcast_mib)`` each, e.g. the same grid on
    a CPU and on a GPU): one row per claim with ``verdicts`` by grid name and ``agree`` (the same verdict word
    everywhere) and ``conflict`` (supported on one grid, contradicted on another)."""
    judged = [(name, check_claims(records, upcast_mib)) for name, records, upcast_mib in grids]
    rows = []
    for i, first in enumerate(judged[0][1] if judged else []):
        verdicts = {name: claims[i]["verdict"] for name, claims in judged}
        words = {v.split(":")[0] for v in verdicts.values()}
        rows.append({"claim": first["claim"], "source": first["source"], "verdicts": verdicts,
                     "agree": len(words) == 1, "conflict": {"supported", "contradicted"} <= words})
    return rows


def format_verdicts_across(rows: Sequence[dict[str, Any]]) -> str:
    """``verdicts_across`` as a Markdown table: one column per grid, each verdict's first word."""
    names = list(rows[0]["verdicts"]) if rows else []
    out = ["| the references' claim | source | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    out += [f"| {r['claim']} | {r['source']} | " + " | ".join(r["verdicts"][n].split(":")[0] for n in names) + " |"
            for r in rows]
    return "\n".join(out)


def agreement_summary(rows: Sequence[dict[str, Any]]) -> str:
    """One line on ``verdicts_across``'s rows: how many claims agree on every grid, and which conflict."""
    n_grids = len(rows[0]["verdicts"]) if rows else 0
    conflicts = [r["claim"] for r in rows if r["conflict"]]
    return (f"{sum(r['agree'] for r in rows)} of {len(rows)} claims get the same verdict on all {n_grids} machines; "
            f"supported on one and contradicted on another: {'; '.join(conflicts) or 'none'}")


def format_best_across(grids: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> str:
    """Each method's best held-out loss (and the rate it came at) in the ``methods`` study of several grids
    (``(name, records)`` each), as a Markdown table with one column per grid."""
    best = {name: {b["method"]: b for b in best_rows(study_rows(records, "methods"))} for name, records in grids}
    out = ["| method: best held-out loss at its rate | " + " | ".join(best) + " |", "|---|" + "---|" * len(best)]
    methods = dict.fromkeys(m for bb in best.values() for m in bb)   # the study's methods, in the grid's order
    out += [f"| {m} | " + " | ".join(f"{bb[m]['loss']:.3f} at {bb[m]['lr']:g}" if m in bb else "-"
                                      for bb in best.values()) + " |" for m in methods]
    return "\n".join(out)
