"""``make course``: execute every notebook with papermill into ``build/`` and write ``build/course-report.md``.

Each notebook runs in its own papermill process (``cwd`` = notebooks/), with ``LORA_COURSE_METRICS`` pointing at
``build/metrics/<notebook>.json`` so its ``record_metric`` calls are collected. The report lists each notebook's
status, wall time and recorded metrics; the exit code is non-zero when any notebook failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .report import METRICS_ENV


@dataclass
class NotebookRun:
    """The outcome of executing one notebook."""

    notebook: str
    ok: bool
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    skipped: str = ""  # why it did not run (e.g. the GPU lane on a machine with too few GPUs); "" when it ran
    ran: str = ""  # when and where this row was produced, where a report merges rows of several runs (the GPU lane)


def run_notebook(path: Path, out_dir: Path, parameters: dict[str, Any] | None = None,
                 environ: dict[str, str] | None = None) -> NotebookRun:
    """Execute ``path`` with papermill into ``out_dir`` (outputs kept there) and collect its metrics; ``environ``
    adds to this process's environment for that notebook alone."""
    path = Path(path).resolve()
    out_dir = Path(out_dir).resolve()
    metrics_file = out_dir / "metrics" / f"{path.stem}.json"
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "papermill", str(path), str(out_dir / path.name), "--cwd", str(path.parent),
           "--kernel", "python3", "--log-output", "--no-progress-bar"]
    for k, v in (parameters or {}).items():
        cmd += ["-p", k, str(v)]
    env = {**os.environ, **(environ or {}), METRICS_ENV: str(metrics_file)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    (out_dir / f"{path.stem}.log").write_text(proc.stdout + proc.stderr)
    metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.exists() else {}
    error = "" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]
    return NotebookRun(path.name, proc.returncode == 0, seconds, metrics, error)


def write_report(runs: list[NotebookRun], out: Path) -> Path:
    """Write the markdown course report: one row per notebook, then each notebook's metrics."""
    host = os.uname().nodename if hasattr(os, "uname") else ""
    lines = ["# Course report", "",
             f"Executed with papermill on {host} ({os.cpu_count()} cores), {time.strftime('%Y-%m-%d %H:%M')}.", "",
             "| notebook | status | wall time (s) | metrics |", "|---|---|---|---|"]
    for r in runs:
        status = f"SKIPPED: {r.skipped}" if r.skipped else "ok" if r.ok else f"FAILED: {r.error}"
        lines.append(f"| {r.notebook} | {status} | {r.seconds:.0f} | {len(r.metrics)} |")
    for r in runs:
        lines += ["", f"## {r.notebook}", ""]
        lines += [f"- `{k}`: {v}" for k, v in sorted(r.metrics.items())] or ["(no metrics recorded)"]
    path = Path(out) / "course-report.md"
    path.write_text("\n".join(lines) + "\n")
    write_report_json(runs, Path(out) / "course-report.json")
    return path


def write_report_json(runs: list[NotebookRun], path: Path) -> Path:
    """The same report as data, with the machine it ran on (``make course`` copies it to results/course-cpu.json,
    which README's course-map figures are rendered from: ``python -m lora_course.readme``)."""
    from .env import machine_info
    from .paths import write_text_atomic

    doc = {"produced_by": "make course (python -m lora_course.course)", "machine": machine_info(),
           "passed": sum(r.ok and not r.skipped for r in runs), "failed": sum(not r.ok for r in runs),
           "skipped": sum(bool(r.skipped) for r in runs),
           "notebooks": [{**asdict(r), "status": "SKIPPED" if r.skipped else "ok" if r.ok else "FAILED"} for r in runs]}
    return write_text_atomic(path, json.dumps(doc, indent=1) + "\n")


def schedule(notebooks: list[Path], solo: list[Path]) -> tuple[list[Path], list[Path]]:
    """Split ``notebooks`` (sorted) into those that run side by side and those that run after them, one at a time.

    A notebook that compares speeds on every core (e.g. llama.cpp against transformers) must not share the machine
    with another notebook, or the comparison measures the neighbour. ``solo`` entries not in ``notebooks`` are ignored.
    """
    alone_set = {Path(p).resolve() for p in solo}
    ordered = sorted(Path(nb) for nb in notebooks)
    return ([nb for nb in ordered if nb.resolve() not in alone_set],
            [nb for nb in ordered if nb.resolve() in alone_set])


def solo_environ(notebook: Path, all_cores: list[Path]) -> dict[str, str]:
    """The environment a solo notebook adds: ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` = every usable CPU for those
    in ``all_cores``.

    Under ``make`` every notebook gets one thread (two run side by side on two cores). A notebook that then runs
    alone in one process, such as 08 (llama.cpp's parity checks and quantization, torch's training), would leave
    the other core idle: measured on a 2-core AVX2 EPYC, 08 took 151 s with one thread and 135 s with two.
    Both variables: torch's CPU wheel starts with the smaller of the two as its thread count, so with the
    Makefile's ``MKL_NUM_THREADS=1`` left in place ``OMP_NUM_THREADS=2`` alone gives ``torch.get_num_threads() == 1``
    (measured with torch 2.13 on a 2-core Intel Xeon: a 1024 x 1024 matmul 13.8 ms, 7.3-8.4 ms with both set to 2;
    notebooks 07, 11, 12 and 13, which do not set torch's threads themselves, ran on one core in every course run
    until this was found).
    """
    from .hardware import usable_cpus

    wanted = {Path(p).resolve() for p in all_cores}
    if Path(notebook).resolve() not in wanted:
        return {}
    n = str(usable_cpus())
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("build"))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="papermill parameter for every notebook, e.g. -p PROFILE cpu")
    parser.add_argument("--solo", nargs="*", type=Path, default=[],
                        help="notebooks that run after the others, alone (their speed comparisons need every core)")
    parser.add_argument("--all-cores", nargs="*", type=Path, default=[],
                        help="solo notebooks whose one process may use every core: OMP_NUM_THREADS and "
                             "MKL_NUM_THREADS = the usable CPUs (not for a notebook that starts processes of its own "
                             "to fill the cores)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    params = dict(args.parameter)
    together, alone = schedule(args.notebooks, [*args.solo, *args.all_cores])
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        runs = list(pool.map(lambda nb: run_notebook(nb, args.out, params), together))
    runs += [run_notebook(nb, args.out, params, solo_environ(nb, args.all_cores)) for nb in alone]
    runs.sort(key=lambda r: r.notebook)
    for r in runs:
        print(f"{'ok    ' if r.ok else 'FAILED'} {r.notebook:40s} {r.seconds:6.0f} s  {r.error}")
    print(f"report: {write_report(runs, args.out)}")
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
