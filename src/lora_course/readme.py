"""README figures from the files that commands write: each generated block of README.md is rendered from results/.

A block sits between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``; ``BLOCKS`` says which file(s)
each is rendered from and by which command they were written. ``python -m lora_course.readme --write`` rewrites the
blocks from the files, ``--check`` lists every block that differs from its files (``tests/test_readme.py`` runs it,
so a README figure that no longer matches its source fails the tests).

    make bench                 -> results/bench-cpu.json       -> block bench-cpu
    make test-gpu MODEL_ID=... -> results/gpu-lane-real-*.json  -> block gpu-lanes   (GPU_OUT's gpu-lane.json, copied)
    make course                -> results/course-cpu.json       -> block course-cpu
    make sweep                 -> results/experiments.json      -> block experiments
    notebook 09 in the GPU lanes -> results/experiments-gpu-*.json -> block experiments-hardware (with the above)
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

# what a lane row shows of a notebook's recorded metrics (a metric the notebook did not record leaves the cell empty)
LANE_METRICS: dict[str, Callable[[dict[str, Any]], str]] = {
    "04_qlora": lambda m: (f"QLoRA answer perplexity {m['qlora_ppl_before']:.0f} -> {m['qlora_ppl_after']:.1f}; peak "
                           f"MiB full/LoRA/QLoRA {m['full_peak_mib']}/{m['lora_peak_mib']}/{m['qlora_peak_mib']}"),
    "05_sft_with_trl": lambda m: (f"creative form {m['sft_creative_primary_before']:.2f} -> "
                                  f"{m['sft_creative_primary_after']:.2f}; answer perplexity {m['sft_ppl_before']:.0f}"
                                  f" -> {m['sft_ppl_after']:.1f}"),
    "06_unsloth_fast_sft": lambda m: f"answer perplexity {m['ppl_before']:.0f} -> {m['ppl_after']:.1f}" + (
        f"; Unsloth step at lora_dropout 0 / 0.05: {m['unsloth_step_ms_dropout_0']:.0f} / "
        f"{m['unsloth_step_ms_dropout_005']:.0f} ms"
        if "unsloth_step_ms_dropout_0" in m else ""),
    "07_multi_adapter_hot_swap": lambda m: (f"creative form: creative adapter {m['matrix_creative_creative_form']:.2f}"
                                            f", base {m['matrix___base___creative_form']:.2f}"),
    "08_merge_and_export": lambda m: (f"Q8_0 KL {m['q8_0_mean_kl']:.4f}, decisive {m['q8_0_decisive_share']:.2f}; "
                                      f"llama.cpp {m['llama_cpp_speedup']}x transformers"),
    "00_setup_and_first_model": lambda m: f"{m['params_millions']}M parameters; reply: {m['reply'][:60]}",
    "01_lora_from_scratch": lambda m: (f"creative form {m['creative_form_before']:.2f} -> "
                                       f"{m['creative_form_after']:.2f}; full fine-tune's dW: top-16 energy "
                                       f"{m['full_ft_energy_top16']:.2f} (random {m['random_energy_top16']:.2f})"),
    "02_peft_lora": lambda m: (f"creative form {m['creative_form_before']:.2f} -> {m['creative_form_after']:.2f}; "
                               f"answer perplexity {m['perplexity_before']:.0f} -> {m['perplexity_after']:.1f}"
                               f"; adapter {m['adapter_bytes'] / 2**20:.1f} MiB vs base "
                               f"{m['base_model_bytes'] / 2**20:.0f} MiB"),
    "03_nf4_from_scratch": lambda m: (f"bit-exact with bitsandbytes: {m['bit_exact_with_bitsandbytes']}; MSE/var "
                                      f"NF4/INT4/FP4 {m['nf4_mse_over_var_normal']}/{m['int4_mse_over_var_normal']}/"
                                      f"{m['fp4_mse_over_var_normal']}; {m['bits_per_param_plain']} vs "
                                      f"{m['bits_per_param_double_quant']} bits/param"),
    "09_experiments": lambda m: (
        f"{m['runs']} runs; peak MiB full/LoRA/QLoRA {m['peak_mib_full']}/{m['peak_mib_lora']}/{m['peak_mib_qlora']}; "
        + (f"held-out loss at the best rate: full {m['best_full_loss']:.3f}, LoRA {m['best_lora_loss']:.3f} (noise "
           f"threshold {m['noise_loss_threshold']:.3f}); claims {m['claims_supported']}/{m['claims_contradicted']}/"
           f"{m['claims_inconclusive']} supported/contradicted/inconclusive" if "best_lora_loss" in m else
           # the first grid's metrics (20 steps, one rate per method), as earlier lane reports hold them
           f"exact: full {m['rank_full_metric']:.2f}, LoRA r=8 {m['rank_r8_metric']:.2f}")),
    "10_scaling_out": lambda m: (f"{m['processes']} processes; DDP/FSDP vs one process: loss within "
                                 f"{m['ddp_max_loss_diff_vs_one_process']:.0e}/{m['fsdp_max_loss_diff_vs_one_process']:.0e}"
                                 f"; traffic measured/computed {m['ddp_measured_over_computed_traffic']}"),
    "11_training_in_practice": lambda m: (
        f"clipped norm <= {m['max_grad_norm_after_clip']}; lr too high: loss x{m['diverged_loss_ratio']} (caught); "
        f"QLoRA merge into dequantized/16-bit/re-quantized base: KL {abs(m['merge_b_dequantized_mean_kl']):.3f}"
        f"/{m['merge_a_16bit_mean_kl']:.3f}/{m['merge_c_requantized_mean_kl']:.2f}"),
    "12_forgetting_data_and_variants": lambda m: (
        f"other-task ppl {m['other_ppl_before']:.2f} -> full {m['full_other_ppl']:.2f} / "
        f"LoRA {m['lora_other_ppl']:.2f}; "
        f"data ppl clean/noisy/small {m['clean_ppl']:.2f}/{m['noisy_ppl']:.2f}/{m['small_ppl']:.2f}; AdaLoRA ranks "
        f"{m['adalora_rank_min']}-{m['adalora_rank_max']}, total {m['adalora_total_rank']}/{m['adalora_budget']}"),
    "13_capstone": lambda m: (
        f"{m['cleaned_kept']} examples kept ({m['cleaned_duplicates']} duplicates); held-out loss "
        f"{m['eval_loss_start']:.2f} -> {m['eval_loss_end']:.2f}; task metrics {m['task_metric_mean_before']:.2f} -> "
        f"{m['task_metric_mean_after']:.2f}; served {m['served_in_format']:g}/3 in format"
        + (f"; merge vs unmerged (fp32) {m['merge_max_logit_diff']:.0e} logits, the trained model's own "
           f"precision {m['precision_max_logit_diff']:.2g}" if "precision_max_logit_diff" in m else "")
        + (f"; Unsloth merged_16bit into {m['unsloth_merged_16bit_base']}, KL "
           f"{m['unsloth_merged_16bit_mean_kl']:.2f} from the trained function" if "unsloth_merged_16bit_base" in m
           else "")
        + (f"; save_pretrained_gguf Q8_0 in {m['unsloth_gguf_seconds']:.0f} s, KL {m['unsloth_gguf_own_kl']:.4f} "
           f"from its own 16-bit merge, {m['unsloth_gguf_unsloth_kl_vs_trained']:.2f} from the trained function "
           f"(the course's Q8_0: {m['unsloth_gguf_course_kl_vs_trained']:.4f})" if "unsloth_gguf_own_kl" in m else "")),
}


def _lane_row(row: dict[str, Any], with_ran: bool = False, device: str = "") -> str:
    stem = row["notebook"].removesuffix(".ipynb")
    try:
        shown = LANE_METRICS[stem](row.get("metrics", {})) if stem in LANE_METRICS else ""
    except KeyError:
        shown = ""
    status = f"SKIPPED ({row['skipped']})" if row.get("skipped") else row["status"]
    if row.get("error"):
        shown = (shown + "; " if shown else "") + row["error"].replace("|", "/")[:160]
    ran = (row.get("ran") or "-").removesuffix(f" on {device}")  # the device only where it is not the file's
    ran = f" {ran} |" if with_ran else ""
    return f"| {stem} | {status} | {row['seconds']:.0f} |{ran} {shown} |"


def render_gpu_lanes(root: Path = ROOT) -> str:
    """One table per lane file ``results/gpu-lane-real-*.json``: every notebook's status, wall time, key metrics."""
    files = sorted((root / "results").glob("gpu-lane-real-*.json"))
    if not files:
        raise FileNotFoundError(f"no results/gpu-lane-real-*.json under {root}: run `make test-gpu` on the real model "
                                "and copy its gpu-lane.json there")
    out = []
    for f in files:
        doc = json.loads(f.read_text(encoding="utf-8"))
        what = (f"**{doc['device']}**, profile `{doc['profile']}`, emulation `{doc['emulate'] or 'none'}`, "
                f"{doc['dtype']}, {'pretrained' if doc['pretrained'] else 'random-init'} model "
                f"`{Path(doc['model_id']).name}` ({doc['date']}; [{f.name}](results/{f.name})): "
                f"{doc['passed']} ok, {doc['failed']} failed, {doc['skipped']} skipped")
        # ran: when and where each row was produced (a lane runs in groups; gpu_lane merges the groups' rows)
        out += [what, "", "| notebook | status | s | ran | measured |", "|---|---|---|---|---|"]
        out += [_lane_row(r, with_ran=True, device=doc["device"]) for r in doc["notebooks"]]
        # a notebook of the course with no row in this lane's file did not finish there: say so, never leave it out
        ran = {r["notebook"] for r in doc["notebooks"]}
        missing = sorted(nb.name for nb in (root / "notebooks").glob("[0-9][0-9]_*.ipynb") if nb.name not in ran)
        if missing:
            out += ["", "Not in this run (no finished result in the file): " + ", ".join(f"`{m}`" for m in missing)]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def render_bench_cpu(root: Path = ROOT) -> str:
    """``make bench``'s figures against their targets (results/bench-cpu.json)."""
    doc = json.loads((root / "results" / "bench-cpu.json").read_text(encoding="utf-8"))
    m = doc["machine"]
    flags = ", ".join(k for k, v in m["flags"].items() if v) or "none of AVX2/AVX-512/AMX"
    lines = [(f"`make bench` on {m['cpu']} ({m['cores']} cores; {flags}), {m['date']} "
             f"([results/bench-cpu.json](results/bench-cpu.json)): {doc['met']} of {doc['total']} targets met."), "",
             "| chapter | figure | measured | target | met |", "|---|---|---|---|---|"]
    for f in doc["figures"]:
        v = f["value"]
        value = (f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}") + ("x" if f["unit"] == "x" else f" {f['unit']}")
        lines.append(f"| {f['chapter']} | {f['what']} | {value} | {f['target']} | {'yes' if f['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def render_course_cpu(root: Path = ROOT) -> str:
    """``make course`` on a CPU (results/course-cpu.json): every notebook's status, wall time and key metrics."""
    f = root / "results" / "course-cpu.json"
    if not f.exists():
        raise FileNotFoundError(f"no {f}: run `make course` (it copies build/course-report.json there)")
    doc = json.loads(f.read_text(encoding="utf-8"))
    m = doc["machine"]
    flags = ", ".join(k for k, v in m["flags"].items() if v) or "none of AVX2/AVX-512/AMX"
    lines = [(f"`make course` on {m['cpu']} ({m['cores']} cores; {flags}), {m['date']}, profile `cpu` "
              f"([results/course-cpu.json](results/course-cpu.json)): {doc['passed']} ok, {doc['failed']} failed, "
              f"{doc['skipped']} skipped."), "", "| notebook | status | s | measured |", "|---|---|---|---|"]
    lines += [_lane_row(r) for r in doc["notebooks"]]
    return "\n".join(lines) + "\n"


def render_experiments(root: Path = ROOT) -> str:
    """``make sweep``'s grid (results/experiments.json): how it ran, the noise, each method and rank at its best
    rate, and the references' claims as notebook 09 judges them (``claims.check_claims`` on the file's records)."""
    from .claims import best_rows, check_claims, measure_noise, study_rows

    doc = json.loads((root / "results" / "experiments.json").read_text(encoding="utf-8"))
    recs, m = doc["records"], doc["machine"]
    flags = ", ".join(k for k, v in m.get("flags", {}).items() if v) or "none of AVX2/AVX-512/AMX"
    noise = measure_noise(recs)
    lines = [(f"`make sweep` on {m.get('cpu')} ({m.get('cores')} cores; {flags}), {doc['date']}: {len(recs)} runs in "
             f"{doc['sweep_seconds'] / 60:.0f} min ({doc['ran_now']} run, {doc['cached']} from the cache; code version "
             f"{doc['code_version']}; [results/experiments.json](results/experiments.json)). Noise: {noise}."), "",
             "| configuration | best rate | held-out loss | exact match (of 100) | peak MiB | s/step |",
             "|---|---|---|---|---|---|"]
    for study in ("methods", "scaling", "targets"):
        for b in best_rows(study_rows(recs, study)):
            edge = " (edge)" if b["at_edge"] else ""
            lines.append(f"| {b['label'].rsplit(' lr=', 1)[0]} ({study}) | {b['lr']:g}{edge} | {b['loss']:.3f} | "
                         f"{b['metric']:.2f} | {b['peak_mib']:.0f} | {b['sec_per_step']:.2f} |")
    lines += ["", "| the references' claim | source | verdict |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {c['source']} | {c['verdict']} |" for c in check_claims(recs)]
    return "\n".join(lines) + "\n"


def render_experiments_hardware(root: Path = ROOT) -> str:
    """The same grid on the CPU and in both GPU lanes (``sweep.COMMITTED_GRIDS``): where and how fast each ran, each
    method's best held-out loss per machine, and every claim's verdict per machine (``claims.verdicts_across``)."""
    from .claims import agreement_summary, format_best_across, format_verdicts_across, measure_noise, verdicts_across
    from .memory_estimate import qlora_upcast_bytes
    from .shapes import SMOLLM2_135M
    from .sweep import COMMITTED_GRIDS

    grids = []
    for g in COMMITTED_GRIDS:
        doc = json.loads((root / "results" / g.file).read_text(encoding="utf-8"))
        if not str(doc["model"]["name"]).startswith("SmolLM2-135M"):
            raise ValueError(f"results/{g.file} is a grid of {doc['model']['name']}, not the course's SmolLM2-135M: "
                             "re-create it on the course's model (see sweep.COMMITTED_GRIDS for how)")
        grids.append((g, doc))
    lines = ["| machine | file | where | runs | wall | noise: held-out loss sd (threshold) |",
             "|---|---|---|---|---|---|"]
    for g, doc in grids:
        m, noise = doc["machine"], measure_noise(doc["records"])
        where = f"{m['gpu']} ({m['cpu']} host)" if m.get("gpu") else f"{m['cpu']}, {m['cores']} cores"
        lines.append(f"| {g.name} | [results/{g.file}](results/{g.file}) | {where}, {doc['date'][:10]}, torch "
                     f"{doc['versions']['torch']} | {len(doc['records'])} | {doc['sweep_seconds'] / 60:.0f} min | "
                     f"{noise.loss_sd:.4f} ({noise.threshold('loss'):.3f}) |")
    rows = verdicts_across([(g.name, doc["records"], qlora_upcast_bytes(SMOLLM2_135M, g.compute) / 2**20)
                            for g, doc in grids])
    lines += ["", format_best_across([(g.name, doc["records"]) for g, doc in grids]), "",
              format_verdicts_across(rows), "", agreement_summary(rows) + "."]
    return "\n".join(lines) + "\n"


BLOCKS: dict[str, Callable[[Path], str]] = {"bench-cpu": render_bench_cpu, "gpu-lanes": render_gpu_lanes,
                                            "course-cpu": render_course_cpu, "experiments": render_experiments,
                                            "experiments-hardware": render_experiments_hardware}


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- generated:{re.escape(name)} -->\n)(.*?)(<!-- /generated:{re.escape(name)} -->)",
                      re.DOTALL)


def rendered(readme: str, root: Path = ROOT) -> str:
    """``readme`` with every generated block rendered again from its files; a missing marker is an error."""
    for name, render in BLOCKS.items():
        pat = _pattern(name)
        if not pat.search(readme):
            raise ValueError(f"README.md has no block {name!r}: add '<!-- generated:{name} -->' and "
                             f"'<!-- /generated:{name} -->' where it belongs, then run "
                             "python -m lora_course.readme --write")
        text = render(root)
        readme = pat.sub(lambda m, t=text: m.group(1) + t + m.group(3), readme)
    return readme


def check(root: Path = ROOT) -> list[str]:
    """The names of the README blocks that differ from what their files give (empty: the README is current)."""
    readme = (root / "README.md").read_text(encoding="utf-8")
    fresh = rendered(readme, root)
    return [name for name in BLOCKS
            if _pattern(name).search(readme).group(2) != _pattern(name).search(fresh).group(2)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="rewrite README.md's generated blocks from results/")
    p.add_argument("--check", action="store_true", help="exit 1 naming the blocks that differ from their files")
    a = p.parse_args(argv)
    path = ROOT / "README.md"
    if a.write:
        from .paths import write_text_atomic

        write_text_atomic(path, rendered(path.read_text(encoding="utf-8")))
        print(f"README.md: blocks {', '.join(BLOCKS)} rendered from results/")
        return 0
    stale = check()
    if stale:
        print(f"README.md blocks out of date with their files: {', '.join(stale)} "
              "(python -m lora_course.readme --write)", file=sys.stderr)
        return 1
    print("README.md's generated blocks match results/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
