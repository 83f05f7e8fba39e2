"""Notebook 09's sweep: runs of ``experiments`` in fresh processes, cached on disk, resumed, written and re-checked.

Each run executes in a fresh Python process (``run_isolated``: ``python -m lora_course.experiments --run-one``), so
its peak memory is its own; its record is cached under ``experiments.run_key`` (configuration, code version, model
identity) with a checksum, so an interrupted sweep resumes where it stopped, an unchanged run is never repeated, and
a corrupt or foreign cache entry is detected, ignored and re-run. ``write_results`` writes a sweep's records with
how, where and when they were produced (``results/experiments.json`` for ``make sweep``); ``load_results`` reads
such a file back and says whether it still describes this model and code; ``check_provenance`` is notebook 09's
reading of it and ``live_check`` re-runs a few of its runs now and compares.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .experiments import (
    RunConfig,
    RunFailedError,
    _sha,
    code_version,
    full_grid,
    grid,
    make_config,
    model_identity,
    run_key,
)
from .paths import cache_dir, write_text_atomic
from .procs import run_module


# ================================================================================================== cache
def _record_sha(record: dict[str, Any]) -> str:
    return _sha(json.dumps(record, sort_keys=True).encode())


def cache_path(key: str, root: Path | None = None) -> Path:
    """Where the record of run ``key`` is cached."""
    return (root or cache_dir() / "experiments") / f"{key}.json"


def read_cached(key: str, root: Path | None = None) -> dict[str, Any] | None:
    """The cached record of run ``key``, or None when absent or corrupt (unreadable, wrong key, checksum mismatch).

    A corrupt entry is reported on stderr and renamed aside, so it is re-run and never used.
    """
    path = cache_path(key, root)
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        ok = (isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("record"), dict)
              and entry.get("sha256") == _record_sha(entry["record"]))
    except (ValueError, OSError):
        ok = False
    if not ok:
        print(f"[experiments] corrupt cache entry {path.name}: ignored and re-run", file=sys.stderr)
        path.replace(path.with_suffix(".corrupt"))
        return None
    return entry["record"]


def write_cached(key: str, record: dict[str, Any], root: Path | None = None) -> Path:
    """Cache a run's record atomically (temporary file, then rename), with a checksum of its content."""
    return write_text_atomic(cache_path(key, root),
                             json.dumps({"key": key, "sha256": _record_sha(record), "record": record}, indent=1))


# ================================================================================================== sweeps
def run_isolated(cfg: RunConfig, profile: str = "cpu", model_id: str | None = None, timeout: float = 1800,
                 threads: int = 1) -> dict[str, Any]:
    """``run_one`` in a fresh Python process (its own peak memory), with ``threads`` BLAS threads."""
    payload = json.dumps({"config": asdict(cfg), "profile": profile, "model_id": model_id})
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536"),
           "TOKENIZERS_PARALLELISM": "false"}
    return run_module("lora_course.experiments", ["--run-one", payload], what=f"run {cfg.label}", timeout=timeout,
                      env=env, error=RunFailedError)[-1]


@dataclass
class SweepResult:
    """A sweep's records (cached or fresh, in grid order) and what it cost."""

    records: list[dict[str, Any]]
    ran: int
    cached: int
    failed: list[str]
    seconds: float


def run_sweep(configs: Iterable[RunConfig], profile: str = "cpu", model_id: str | None = None, workers: int = 2,
              threads: int = 1, cache_root: Path | None = None, progress: bool = True) -> SweepResult:
    """Run every configuration not cached yet (``workers`` processes at a time), cache each record as it lands.

    Records carry their key, the model identity, the code version, the library versions and the machine. A
    progress bar shows runs done and the ETA (from the mean time of this sweep's fresh runs). A failed run is
    reported and left out; re-running the sweep retries it and keeps everything else.
    """
    from .env import machine_info, package_versions

    configs = [make_config(**asdict(c)) for c in configs]
    model = model_identity(profile, model_id)
    code = code_version()
    keys = [run_key(c, model, code) for c in configs]
    meta = {"model": model, "code_version": code, "versions": package_versions(), "machine": machine_info(),
            "profile": profile}
    records: dict[str, dict[str, Any]] = {}
    for k in keys:
        rec = read_cached(k, cache_root)
        if rec is not None:
            records[k] = rec
    todo = [(k, c) for k, c in zip(keys, configs) if k not in records]
    todo = list(dict(todo).items())
    cached = len(set(keys)) - len(todo)
    failed: list[str] = []
    t0 = time.perf_counter()
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"sweep ({cached} cached)", unit="run", smoothing=0)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(run_isolated, c, profile, model_id, 1800, threads): (k, c) for k, c in todo}
        for fut in as_completed(futures):
            k, c = futures[fut]
            try:
                rec = {**fut.result(), "key": k, **meta}
            except (RunFailedError, subprocess.TimeoutExpired) as err:
                failed.append(f"{c.label}: {str(err)[-600:]}")
                print(f"[experiments] {c.label} failed: {str(err)[-600:]}", file=sys.stderr)
            else:
                write_cached(k, rec, cache_root)
                records[k] = rec
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(c.label)
    if bar is not None:
        bar.close()
    ordered = [records[k] for k in dict.fromkeys(keys) if k in records]
    return SweepResult(ordered, len(todo) - len(failed), cached, failed, time.perf_counter() - t0)


def write_results(result: SweepResult, path: Path, command: str) -> Path:
    """Write a sweep's records to ``path`` (atomically) with how, where and when they were produced."""
    first = result.records[0] if result.records else {}
    doc = {
        "produced_by": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "model": first.get("model"),
        "code_version": first.get("code_version"),
        "versions": first.get("versions"),
        "machine": first.get("machine"),
        "sweep_seconds": round(result.seconds, 1),
        "ran_now": result.ran,
        "cached": result.cached,
        "run_wall_seconds_sum": round(sum(float(r.get("wall_seconds", 0)) for r in result.records), 1),
        "failed": result.failed,
        "records": [{k: v for k, v in r.items() if k not in ("model", "code_version", "versions", "machine")}
                    | {"model_name": r.get("model", {}).get("name")} for r in result.records],
    }
    return write_text_atomic(path, json.dumps(doc, indent=1))


# ============================================================================================ reading results
@dataclass
class Results:
    """A results file read back: its records, whether it describes this model and code, and why not."""

    path: Path
    doc: dict[str, Any]
    stale: bool
    reasons: list[str]

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.doc.get("records", [])

    def find(self, **match: Any) -> list[dict[str, Any]]:
        """The records whose resolved configuration has every ``key=value`` of ``match``."""
        cfgs = {k: v for k, v in match.items()}
        return [r for r in self.records if all(r["config"].get(k) == v for k, v in cfgs.items())]


def load_results(path: Path, profile: str = "cpu", model_id: str | None = None,
                 recorded_stack: bool = False) -> Results:
    """Read a results file and check it against the current model and code: ``stale`` with the reasons if not.

    A file made from another model or another code version must not be plotted as if it described this one.
    ``recorded_stack``: hash this checkout's code with the library versions the file records rather than the
    installed ones (a grid run on a GPU machine's torch, read on a CPU): the code must still be this checkout's.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: produce it with `make sweep` (85 min on 2 cores)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): re-create it with `make sweep`") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("records"), list):
        raise ValueError(  # noqa: TRY004 - a malformed file, not a wrong argument type
            f"{path} has no 'records' list: it is not a sweep results file; re-create it with `make sweep`")
    reasons = []
    model = model_identity(profile, model_id)
    if doc.get("model") != model:
        reasons.append(f"made from model {doc.get('model')}, not the current {model}")
    if recorded_stack:
        try:
            code = code_version(doc.get("versions") or {})
        except ValueError as err:
            reasons.append(str(err))
            code = None
    else:
        code = code_version()
    if code is not None and doc.get("code_version") != code:
        reasons.append(f"made by code version {doc.get('code_version')}, not the current {code} "
                       "(the training, evaluation or experiment code changed since)")
    return Results(path, doc, bool(reasons), reasons)


@dataclass(frozen=True)
class CommittedGrid:
    """A committed results file of notebook 09's grid and the hardware it ran on."""

    name: str      # a column title
    file: str      # under results/
    compute: str   # the dtype the runs computed in (what QLoRA's fp32 embeddings/norms add depends on it)
    made_by: str   # how to make it again


COMMITTED_GRIDS: tuple[CommittedGrid, ...] = (
    CommittedGrid("CPU fp32", "experiments.json", "float32", "make sweep"),
    CommittedGrid("GPU bf16", "experiments-gpu-bf16.json", "bfloat16",
                  "notebook 09, GPU lane bf16: scripts/gpu_lanes.sh"),
    CommittedGrid("GPU as T4 (fp16)", "experiments-gpu-t4.json", "float16",
                  "notebook 09, GPU lane as a T4: fp16, scripts/gpu_lanes.sh"),
)
"""The same 40-run grid on three machines' numerics. ``make sweep`` is the CPU's (85 min on 2 cores, above the
course's hour: the GPU lanes run the grid in ~7 min each, live inside notebook 09, and their files come back with
the lane's report). The GPU files are checked against this checkout with the library versions they record."""


def load_committed_grids(profile: str = "cpu", model_id: str | None = None,
                         root: Path | None = None) -> list[tuple[CommittedGrid, Results]]:
    """Every committed grid of ``COMMITTED_GRIDS`` that exists, read and checked (``Results.stale``) against the
    profile's model and this checkout's code, hashed with the library versions each file records (so the CPU's file
    still reads as current on the GPU machine, and the GPU's on a CPU)."""
    root = Path(root) if root else default_results_path().parent
    return [(g, load_results(root / g.file, profile, model_id, recorded_stack=True))
            for g in COMMITTED_GRIDS if (root / g.file).is_file()]



# ============================================================================================ the live check
@dataclass
class LiveCheck:
    """A committed record re-run now: the differences and whether they are within tolerance."""

    label: str
    committed: dict[str, Any]
    live: dict[str, Any]
    metric_diff: float
    perplexity_rel: float
    loss_diff: float
    ok: bool


LIVE_TOLERANCE = {"metric": 2 / 30, "perplexity_rel": 0.02, "loss": 0.02}
"""How far a live re-run may drift from its committed record (another CPU's float rounding can flip a greedy
token or two): 2 of 30 held-out answers, 2% of perplexity, 0.02 in any step's training loss."""


def live_check(results: Results, study: str = "check", profile: str = "cpu", model_id: str | None = None,
               workers: int = 2, cache_root: Path | None = None) -> list[LiveCheck]:
    """Re-run ``study``'s configurations now (fresh, uncached unless ``cache_root`` holds them) and compare.

    Raises ``LookupError`` when the results file lacks a record for one of them (it was made by another grid).
    """
    import tempfile

    configs = grid(study)
    committed = []
    for cfg in configs:
        found = [r for r in results.records if r["config"] == asdict(cfg)]
        if not found:
            raise LookupError(f"{results.path} has no record for {cfg.label}: re-create it with `make sweep`")
        committed.append(found[0])
    with tempfile.TemporaryDirectory() as tmp:
        sweep = run_sweep(configs, profile, model_id, workers=workers, cache_root=cache_root or Path(tmp),
                          progress=False)
    if sweep.failed:
        raise RunFailedError("live re-run failed: " + "; ".join(sweep.failed))
    out = []
    for old, new in zip(committed, sweep.records):
        md = abs(new["metric"] - old["metric"])
        pr = abs(new["perplexity"] / old["perplexity"] - 1)
        ld = max(abs(a - b) for a, b in zip(new["losses"], old["losses"]))
        ok = (md <= LIVE_TOLERANCE["metric"] + 1e-9 and pr <= LIVE_TOLERANCE["perplexity_rel"]
              and ld <= LIVE_TOLERANCE["loss"])
        out.append(LiveCheck(old["label"], old, new, md, pr, ld, ok))
    return out


def default_results_path() -> Path:
    """The committed results file: ``results/experiments.json`` at the repository root."""
    return Path(__file__).resolve().parents[2] / "results" / "experiments.json"


def provenance_lines(results: Results) -> list[str]:
    """How, where and from what a results file was produced, and whether it describes this checkout: the short
    summary notebook 09 prints before drawing anything from the file."""
    doc = results.doc
    invocation = (f"this invocation: {doc.get('sweep_seconds', 0) / 60:.0f} min ({doc.get('ran_now')} runs made, "
                  f"{doc.get('cached')} from the cache); every run's own wall time, summed: "
                  f"{doc.get('run_wall_seconds_sum', 0) / 60:.0f} min")
    lines = [f"results: {results.path}",
             f"produced by: {doc.get('produced_by')}  on {doc.get('date')}",
             invocation,
             f"machine: {doc.get('machine')}",
             f"model: {doc.get('model')}",
             f"versions: {doc.get('versions')}",
             f"{len(results.records)} runs; code version {doc.get('code_version')} (this checkout: {code_version()})"]
    if results.stale:
        lines += ["", "STALE - these results do not describe this checkout, so nothing below is drawn from them:",
                  *(f"  - {reason}" for reason in results.reasons),
                  "Re-create them with `make sweep` (85 min on 2 cores; unchanged runs come from the cache)."]
    lines.append("reproduce: make sweep   "
                 "(python -m lora_course.experiments --workers 2 --out results/experiments.json)")
    return lines


def check_provenance(profile: str = "cpu", model_id: str | None = None, results_path: str | Path | None = None,
                     live_seeds: Sequence[int] = (0,), live_steps: int | None = None, workers: int = 2,
                     out_dir: str | Path = "build", quiet: bool = False) -> Results:
    """The results notebook 09 draws from, checked against this checkout (model identity and code version).

    ``results_path`` given: that file, read with ``load_results``. Else, on the ``cpu`` profile, the committed
    file (``default_results_path()``); any other profile has no committed results for its model, so the whole grid
    runs live now (``live_seeds``, ``live_steps`` steps a run, ``workers`` processes) and is written to
    ``out_dir/experiments-<profile>.json`` first; a failed run raises ``RunFailedError``. Prints
    ``provenance_lines`` unless ``quiet``; ``Results.stale`` (with ``reasons``) says whether the file may be used.
    """
    from .models import resolve_profile

    profile = resolve_profile(profile)
    if results_path or profile == "cpu":
        path = Path(results_path) if results_path else default_results_path()
    else:
        configs = full_grid(seeds=list(live_seeds), **({"steps": live_steps} if live_steps else {}))
        if not quiet:
            print(f"running {len(configs)} configurations live on the {profile} profile")
        sweep = run_sweep(configs, profile, model_id, workers=workers)
        if sweep.failed:
            raise RunFailedError(f"{len(sweep.failed)} run(s) of the live grid failed:\n" + "\n".join(sweep.failed))
        path = write_results(sweep, Path(out_dir) / f"experiments-{profile}.json",
                             f"notebook 09, profile {profile}, seeds {list(live_seeds)}")
    results = load_results(path, profile, model_id)
    if not quiet:
        print("\n".join(provenance_lines(results)))
    return results
