"""Notebook 09's results read as evidence: study tables over seeds, effects against the noise, the references' claims.

``study_rows`` aggregates a sweep's records (``sweep.load_results``) per configuration of a study (mean and spread
over seeds), ``effect`` tells a difference from the noise of the seeds, and ``check_claims`` judges each of the
references' claims that the records can reach (``REFERENCE_CLAIMS``, quoted by ``reference_table``).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .experiments import grid, in_study


# ================================================================================================ analysis
def learned(record: dict[str, Any]) -> bool:
    """Whether a run's training loss ended below where it started (False: it diverged or did not move)."""
    return float(record["loss_last"]) < float(record["loss_first"])


def _group_key(cfg: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in cfg.items() if k != "seed"}, sort_keys=True)


def study_rows(records: Sequence[dict[str, Any]], study: str) -> list[dict[str, Any]]:
    """One row per configuration of ``study`` (in grid order), aggregated over its seeds.

    Each row: the label (without seed), method, rank, targets, seeds, trainable parameters and %, and mean and
    standard deviation over seeds of the task metric and perplexity, mean peak MiB, seconds a step and training time,
    and in how many seeds the training loss fell (``learned``).
    """
    import statistics

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if in_study(r, study):
            groups.setdefault(_group_key(r["config"]), []).append(r)
    order = [_group_key(asdict(c)) for c in grid(study, seeds=(0,))]
    rows = []
    for key in sorted(groups, key=lambda k: order.index(k) if k in order else len(order)):
        rs = groups[key]
        cfg = rs[0]["config"]

        def mean(name: str, rs: list[dict[str, Any]] = rs) -> float:
            return statistics.fmean(float(r[name]) for r in rs)

        def std(name: str, rs: list[dict[str, Any]] = rs) -> float:
            return statistics.stdev(float(r[name]) for r in rs) if len(rs) > 1 else 0.0

        rows.append({"label": rs[0]["label"].rsplit(" s", 1)[0], "method": cfg["method"], "r": cfg["r"],
                     "targets": cfg["targets"], "lr": cfg["lr"], "seeds": sorted(r["config"]["seed"] for r in rs),
                     "n": len(rs), "trainable_params": rs[0]["trainable_params"],
                     "trainable_pct": rs[0]["trainable_pct"], "metric": mean("metric"), "metric_std": std("metric"),
                     "perplexity": mean("perplexity"), "perplexity_std": std("perplexity"),
                     "peak_mib": mean("peak_mib"), "sec_per_step": mean("sec_per_step"),
                     "train_seconds": mean("train_seconds"), "metric_values": [r["metric"] for r in rs],
                     "learned": sum(learned(r) for r in rs)})
    return rows


def format_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str] = ("label", "trainable_pct", "metric",
                "perplexity", "peak_mib", "sec_per_step")) -> str:
    """A Markdown table of study rows: means with their spread over seeds (mean ± sd, n seeds)."""
    head = {"label": "configuration", "trainable_params": "trainable params", "trainable_pct": "trainable %",
            "metric": "task metric", "perplexity": "eval perplexity", "peak_mib": "peak MiB",
            "sec_per_step": "s/step", "train_seconds": "train s", "learned": "loss fell"}
    out = ["| " + " | ".join(head.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row[c]
            if c == "learned":
                cells.append(f"{v}/{row['n']}")
            elif c in ("metric", "perplexity") and row["n"] > 1:
                cells.append(f"{v:.3f} ± {row[c + '_std']:.3f} (n={row['n']})")
            elif c == "trainable_pct":
                cells.append(f"{v:.3f}%")
            elif c == "trainable_params":
                cells.append(f"{v:,}")
            elif isinstance(v, float):
                cells.append(f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}")
            else:
                cells.append(str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


@dataclass(frozen=True)
class Effect:
    """A difference of mean metrics between two configurations, against the spread over seeds."""

    a: str
    b: str
    diff: float          # mean(b) - mean(a)
    noise: float         # the larger seed standard deviation, at least one eval example's worth
    verdict: str         # "b better", "a better" or "within noise"

    def __str__(self) -> str:
        return f"{self.b} - {self.a} = {self.diff:+.3f} (noise {self.noise:.3f}): {self.verdict}"


def effect(row_a: dict[str, Any], row_b: dict[str, Any], resolution: float = 1 / 30) -> Effect:
    """Whether ``row_b`` beats ``row_a`` on the task metric by more than twice the noise.

    The noise is the larger of the two standard deviations over seeds and ``resolution`` (one held-out example of
    30): a difference inside twice that is not evidence of anything at these sample sizes.
    """
    diff = row_b["metric"] - row_a["metric"]
    noise = max(row_a["metric_std"], row_b["metric_std"], resolution)
    verdict = "within noise" if abs(diff) <= 2 * noise else (f"{row_b['label']} better" if diff > 0
                                                              else f"{row_a['label']} better")
    return Effect(row_a["label"], row_b["label"], diff, noise, verdict)


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


def check_claims(records: Sequence[dict[str, Any]], upcast_mib: float = 0.0) -> list[dict[str, str]]:
    """The references' claims that these records can test, each with the measured evidence and a verdict.

    Verdicts come from ``effect`` (a difference beyond twice the spread over seeds) and from measured memory and
    time; a claim about 7B+ models or about other tasks is out of reach and says so instead of being judged.
    ``upcast_mib``: what the QLoRA base holds in fp32 beyond LoRA's compute dtype
    (``memory_estimate.qlora_upcast_bytes``; 0 on a CPU). A QLoRA peak above LoRA's by less than that is the size
    regime, not a broken quantization.
    """
    out: list[dict[str, str]] = []

    def add(claim: str, source: str, evidence: str, verdict: str) -> None:
        out.append({"claim": claim, "source": source, "measured": evidence, "verdict": verdict})

    rank = study_rows(records, "rank")
    r1, r8, r64 = (_row(rank, method="lora", r=r) for r in (1, 8, 64))
    full = _row(rank, method="full")
    if r1 and r8 and r64:
        low, high = effect(r1, r8), effect(r8, r64)
        verdict = ("supported" if low.verdict.endswith("better") and low.diff > 0 and high.verdict == "within noise"
                   else "not supported: r=1 is as good as r=8 here" if low.verdict == "within noise"
                   else "not supported")
        add("Diminishing returns above r=8 (r=1 clearly worse, r=64 hardly better)", "004 exp. 1",
            f"{low}; {high}", verdict)
    if full and r8:
        e = effect(r8, full)
        add("Full fine-tuning gives the best quality", "004 exp. 1-2, 003",
            str(e), "supported" if e.verdict == f"{full['label']} better" else
            "not supported: LoRA r=8 is as good within the seed spread" if e.verdict == "within noise"
            else "contradicted: LoRA r=8 is better")
    tg = study_rows(records, "targets")
    q, qkv, allr = (_row(tg, targets=t) for t in ("q", "q,k,v", "all"))
    if q and qkv and allr:
        e1, e2 = effect(q, qkv), effect(qkv, allr)
        add("Q, K, V most important: Q < Q,K,V, adding O and the MLP gains little", "004 exp. 3",
            f"{e1}; {e2}", "supported" if e1.diff > 0 and e1.verdict != "within noise" and e2.verdict == "within noise"
            else "not supported")
    mem = study_rows(records, "memory")
    f, lo, ql = (_row(mem, method=m) for m in ("full", "lora", "qlora"))
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
        e = effect(lo, ql)
        add("QLoRA loses a little quality against LoRA (78.1% vs 79.8%)", "004 exp. 2",
            str(e), "within the seed spread: no loss measurable here" if e.verdict == "within noise"
            else ("supported" if e.diff < 0 else "contradicted: QLoRA better"))
        add("QLoRA trains slower than LoRA (5h vs 4h)", "004 exp. 2",
            f"LoRA {lo['sec_per_step']:.2f} s/step, QLoRA {ql['sec_per_step']:.2f} s/step (bitsandbytes)",
            "supported" if ql["sec_per_step"] > lo["sec_per_step"] else "contradicted")
    var = study_rows(records, "variants")
    lv, vera, ia3, prefix = (_row(var, method=m) for m in ("lora", "vera", "ia3", "prefix"))
    if lv and vera:
        e = effect(lv, vera)
        fewer = vera["trainable_params"] < lv["trainable_params"]
        add("VeRA: fewer trainable parameters than LoRA, competitive quality, faster training", "002",
            f"{vera['trainable_params']:,} vs {lv['trainable_params']:,} params; {e}; "
            f"{vera['sec_per_step']:.2f} vs {lv['sec_per_step']:.2f} s/step",
            ("supported"
             if fewer and e.verdict != f"{lv['label']} better" and vera["sec_per_step"] <= lv["sec_per_step"]
             else "partly: fewer parameters" + ("" if e.verdict != f"{lv['label']} better" else ", but lower quality")
             + ("" if vera["sec_per_step"] <= lv["sec_per_step"] else ", and not faster per step")))
    if lv and ia3:
        e = effect(lv, ia3)
        add("IA3: extreme efficiency, but short of capacity where LoRA has it", "000",
            f"{ia3['trainable_params']:,} params ({ia3['trainable_pct']:.3f}%); {e}",
            "capacity not limiting on this task: IA3 matches or beats LoRA" if e.verdict != f"{lv['label']} better"
            else "supported: IA3 below LoRA")
    if lv and prefix:
        e = effect(lv, prefix)
        add("Prefix tuning suits generation tasks", "000", str(e),
            "prefix tuning below LoRA on this task" if e.verdict == f"{lv['label']} better"
            else "prefix tuning on par with LoRA on this task")
    if full and r8:
        e = effect(r8, full)
        add("Avoid LoRA on very small models (<1B) when maximum quality is needed", "000",
            f"SmolLM2-135M: {e}", "supported: full fine-tuning better" if e.verdict == f"{full['label']} better"
            else "not supported on this task: LoRA r=8 within the spread of (or above) full fine-tuning")
    add("LoRA for 7B+ models; QLoRA for 13B+ on a single GPU", "000", "a 135M model on a CPU",
        "out of reach: these runs cannot test claims about 7B+ models")
    return out


def format_claims(claims: Sequence[dict[str, str]]) -> str:
    """The checked claims as a Markdown table."""
    out = ["| the references' claim | source | measured here | verdict |", "|---|---|---|---|"]
    out += [f"| {c['claim']} | {c['source']} | {c['measured']} | {c['verdict']} |" for c in claims]
    return "\n".join(out)
