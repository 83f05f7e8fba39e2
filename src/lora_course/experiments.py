"""Notebook 09's experiments on the real model: a cached, resumable sweep runner and the course's grids.

Each *run* trains one configuration (a method, rank, target set, learning rate, steps, seed) on one task of the
course data with ``train.train_steps``, then measures the task metric and answer perplexity on the held-out split
(``evaluate.evaluate_task``), its trainable parameters, its peak memory and its time. Runs execute in fresh
Python processes (so each peak memory is its own, measured as in notebook 04: the model's tensor bytes plus the rise
of peak RSS during training) and their records are cached on disk under a key that hashes

- the resolved configuration,
- the code that shapes a result (the functions listed in ``_CODE``, plus ``EXPERIMENTS_VERSION``), and
- the model's identity (its cache folder's name, its source's hash and its config, never a timestamp),

so an interrupted sweep resumes where it stopped, an unchanged run is never repeated, and a corrupt or foreign cache
entry is detected, ignored and re-run. ``make sweep`` runs ``GRIDS`` (all four studies, 3 seeds) and writes
``results/experiments.json``; notebook 09 draws from that file and re-runs a live subset to catch stale results.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from .paths import cache_dir, write_text_atomic
from .procs import run_module

EXPERIMENTS_VERSION = 1
"""Bump when a change outside the hashed functions changes what a run measures."""

METHODS: tuple[str, ...] = ("full", "lora", "qlora", "rslora", "dora", "loraplus", "pissa", "olora", "adalora",
                            "vera", "ia3", "prefix")
"""What a run trains: every weight (``full``), a LoRA, a LoRA on an NF4 base, or one of LoRA's variants."""

TARGET_SETS: dict[str, tuple[str, ...]] = {
    "q": ("q_proj",),
    "q,k": ("q_proj", "k_proj"),
    "q,k,v": ("q_proj", "k_proj", "v_proj"),
    "q,k,v,o": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
"""The target-module sets of the ablation, by short name (Llama projection names)."""

DEFAULT_LR: dict[str, float] = {
    "full": 3e-5,      # every weight moves: LoRA's step size would wreck the model
    "lora": 3e-3, "qlora": 3e-3, "rslora": 3e-3, "dora": 3e-3, "loraplus": 3e-3, "olora": 3e-3, "adalora": 3e-3,
    "pissa": 3e-4,     # the adapter holds the principal part of W: a LoRA-sized step moves the model too far
    "vera": 1e-2,      # VeRA trains only scaling vectors: its paper uses ~10x LoRA's rate
    "ia3": 1e-2,       # (IA)^3 likewise trains only rescaling vectors
    "prefix": 1e-2,    # prefix tuning trains virtual tokens' key/values
}
"""Each method's learning rate for the course's budget (a probe per method on the technical task; see notebook 09)."""


class ExperimentConfigError(ValueError):
    """A run configuration names an unknown key, method, task or target set; the message lists the valid ones."""


class RunFailedError(RuntimeError):
    """A run's process failed; the message carries the end of its error output."""


@dataclass(frozen=True)
class RunConfig:
    """One run: what to train, how long, and on which task; ``None`` fields take the method's defaults."""

    method: str = "lora"
    task: str = "technical"
    r: int = 8                     # rank (LoRA family; AdaLoRA's target rank; VeRA's shared rank is ``vera_r``)
    alpha: float | None = None     # None: 2 * r
    targets: str = "all"           # a key of TARGET_SETS
    lr: float | None = None        # None: DEFAULT_LR[method]
    steps: int = 20
    batch_size: int = 4
    max_length: int = 96
    seed: int = 0
    eval_n: int = 30               # held-out examples scored (the whole eval split is 30)

    def resolved(self) -> RunConfig:
        """The configuration with its defaults filled in: what the cache key and the record hold."""
        return replace(self, alpha=float(self.alpha if self.alpha is not None else 2 * self.r),
                       lr=float(self.lr if self.lr is not None else DEFAULT_LR[self.method]))

    @property
    def label(self) -> str:
        """A short human-readable name, e.g. ``lora r=8 all s0``."""
        c = self.resolved()
        rank = "" if c.method in ("full", "ia3", "prefix") else f" r={c.r}"
        return f"{c.method}{rank} {c.targets} lr={c.lr:g} s{c.seed}"


CONFIG_KEYS: tuple[str, ...] = tuple(f.name for f in fields(RunConfig))


def make_config(**kwargs: Any) -> RunConfig:
    """A checked ``RunConfig``: unknown keys, methods, tasks or target sets raise an error that lists the valid ones."""
    from .data import TASKS

    unknown = sorted(set(kwargs) - set(CONFIG_KEYS))
    if unknown:
        raise ExperimentConfigError(f"unknown configuration key(s) {unknown}: valid keys are {', '.join(CONFIG_KEYS)}")
    cfg = RunConfig(**kwargs)
    if cfg.method not in METHODS:
        raise ExperimentConfigError(f"unknown method/variant {cfg.method!r}: choose one of {', '.join(METHODS)}")
    if cfg.task not in TASKS:
        raise ExperimentConfigError(f"unknown task {cfg.task!r}: choose one of {', '.join(TASKS)}")
    if cfg.targets not in TARGET_SETS:
        raise ExperimentConfigError(f"unknown target set {cfg.targets!r}: choose one of {', '.join(TARGET_SETS)}")
    for name in ("r", "steps", "batch_size", "max_length", "eval_n"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise ExperimentConfigError(f"{name} must be a positive integer, got {getattr(cfg, name)!r}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise ExperimentConfigError(f"lr must be positive, got {cfg.lr!r}")
    return cfg.resolved()


# ================================================================================================= grids
RANKS: tuple[int, ...] = (1, 2, 4, 8, 16, 64)
VARIANTS: tuple[str, ...] = ("lora", "rslora", "dora", "loraplus", "pissa", "olora", "adalora", "vera", "ia3",
                             "prefix")
STUDIES: tuple[str, ...] = ("rank", "targets", "memory", "variants", "check")
STUDY_SEEDS: dict[str, tuple[int, ...]] = {"rank": (0, 1, 2), "targets": (0, 1, 2), "memory": (0, 1, 2),
                                           "variants": (0, 1), "check": (0,)}
"""Seeds per study: 3 where the spread over seeds is the question, 2 for the variants (LoRA's 3 seeds give the
spread they are compared with), 1 for the live check. The whole grid fits an hour on 2 cores (``make sweep``)."""
VARIANT_SECOND_LR: dict[str, float] = {"lora": 3e-4, "loraplus": 3e-4, "olora": 3e-4}
"""A second learning rate in the variants study, a tenth of LoRA's: at LoRA's 3e-3 the committed sweep measured
LoRA+ (whose ``B`` then steps at 16 x 3e-3) diverging on both seeds and OLoRA on one (training loss rose). The
second rows tell a method that fails from a rate that does; plain LoRA at the same tenth is their control."""
CHECK_STEPS = 8
"""The ``check`` study: short runs that notebook 09 re-runs live (<= 120 s for both) and compares with the file."""


def grid(study: str, seeds: Sequence[int] | None = None, **common: Any) -> list[RunConfig]:
    """The configurations of one study (``rank``, ``targets``, ``memory``, ``variants``, ``check``) for each seed."""
    rows: list[dict[str, Any]]
    if study == "rank":
        rows = [{"method": "lora", "r": r} for r in RANKS] + [{"method": "full"}]
    elif study == "targets":
        rows = [{"method": "lora", "targets": t} for t in TARGET_SETS]
    elif study == "memory":
        rows = [{"method": m} for m in ("full", "lora", "qlora")]
    elif study == "variants":
        rows = [{"method": v} for v in VARIANTS] + [{"method": m, "lr": lr} for m, lr in VARIANT_SECOND_LR.items()]
    elif study == "check":
        rows = [{"method": "lora", "steps": CHECK_STEPS}, {"method": "ia3", "steps": CHECK_STEPS}]
    else:
        raise ExperimentConfigError(f"unknown study {study!r}: choose one of {', '.join(STUDIES)}")
    seeds = STUDY_SEEDS[study] if seeds is None else seeds
    return [make_config(**{**common, **row}, seed=s) for s in seeds for row in rows]


def full_grid(seeds: Sequence[int] | None = None, studies: Sequence[str] = STUDIES, **common: Any) -> list[RunConfig]:
    """Every study's configurations, each distinct configuration once (LoRA r=8 on all layers serves three)."""
    out: dict[RunConfig, None] = {}
    for study in studies:
        for cfg in grid(study, seeds, **common):
            out.setdefault(cfg)
    return list(out)


def in_study(record: dict[str, Any], study: str, **common: Any) -> bool:
    """Whether a record's configuration belongs to ``study`` (any seed)."""
    cfg = make_config(**record["config"])
    return any(replace(c, seed=cfg.seed) == cfg for c in grid(study, seeds=(cfg.seed,), **common))


# ================================================================================================ identity
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha(path: Path) -> str:
    """sha256 of a file read in 16 MiB chunks (a model's weights: ~0.5 GB for the course's, about a second)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def model_identity(profile: str = "cpu", model_id: str | None = None) -> dict[str, Any]:
    """What identifies the base model of a sweep, without loading it and stable across machines.

    A local folder: its name, its config.json's hash and its weight files' hashes, plus the source hash the course
    cache recorded when it built the folder (never a path or a timestamp). A hub id: the id.
    """
    from .models import resolve_source

    _, source = resolve_source(profile, model_id)
    path = Path(source)
    if not path.is_dir():
        return {"name": source}
    ident: dict[str, Any] = {"name": path.name}
    if (path / "config.json").is_file():
        ident["config_sha256"] = _sha((path / "config.json").read_bytes())[:16]
    ident["weights"] = {p.name: _file_sha(p)[:16] for p in sorted(path.glob("*.safetensors"))}
    marker = path / "COMPLETE.json"
    if marker.is_file():
        src = json.loads(marker.read_text(encoding="utf-8")).get("source_head_sha256")
        if src:
            ident["source_head_sha256"] = src
    return ident


STACK: tuple[str, ...] = ("torch", "transformers", "peft", "bitsandbytes")  # the libraries a run's numbers depend on


def code_version() -> str:
    """12 hex digits over everything besides the model that decides a run's result: ``EXPERIMENTS_VERSION``, the
    source of the functions that build, train, measure and evaluate a run, the task data it reads (the files'
    bytes), and the versions of the libraries that compute it (``STACK``)."""
    from importlib.metadata import version

    from .data import TASKS, collate, load_task, tokenize_example
    from .evaluate import evaluate_task, generate, perplexity, score
    from .memory import cpu_peak_bytes, cpu_peak_start
    from .models import load_for_method
    from .paths import data_dir
    from .train import train_steps

    funcs = (train_steps, tokenize_example, collate, load_task, evaluate_task, generate, perplexity, score,
             build_model, run_one, RunConfig.resolved, load_for_method, cpu_peak_start, cpu_peak_bytes)
    data = {f"{t}/{split}": _sha((data_dir() / t / f"{split}.jsonl").read_bytes())[:16]
            for t in TASKS for split in ("train", "eval") if (data_dir() / t / f"{split}.jsonl").is_file()}
    blob = json.dumps({"version": EXPERIMENTS_VERSION, "defaults": DEFAULT_LR, "targets": TARGET_SETS,
                       "code": [_sha(inspect.getsource(f).encode()) for f in funcs], "data": data,
                       "stack": {name: version(name).split("+")[0] for name in STACK}}, sort_keys=True)
    return _sha(blob.encode())[:12]


def run_key(cfg: RunConfig, model: dict[str, Any], code: str) -> str:
    """The cache key of one run: 16 hex digits over its resolved configuration, the model and the code version."""
    blob = json.dumps({"config": asdict(cfg.resolved()), "model": model, "code": code}, sort_keys=True)
    return _sha(blob.encode())[:16]


# ================================================================================================== a run
def build_model(cfg: RunConfig, profile: str = "cpu", model_id: str | None = None) -> tuple[Any, Any, Any, Any]:
    """The model to train for ``cfg``, its tokenizer, its optimizer (None: plain AdamW) and a per-step hook.

    ``full`` unfreezes every weight; ``qlora`` loads the base in NF4 with double quantization (fp32 compute on a
    CPU) under a LoRA; the variants are peft configurations on the plain base with the same rank and targets.
    """
    import torch
    from peft import AdaLoraConfig, IA3Config, LoraConfig, PrefixTuningConfig, VeraConfig, get_peft_model

    from .memory import load_for_method
    from .models import load_base

    cfg = cfg.resolved()
    targets = list(TARGET_SETS[cfg.targets])
    optimizer, on_step = None, None
    if cfg.method in ("full", "qlora"):
        model, tok = load_for_method(cfg.method, profile, model_id, r=cfg.r, targets=tuple(targets))
        if cfg.method == "qlora" and cfg.alpha != 2 * cfg.r:
            raise ExperimentConfigError("qlora runs use alpha = 2r (memory.load_for_method): leave alpha unset")
        if cfg.method == "full":
            for p in model.parameters():
                p.requires_grad_(True)
        return model, tok, optimizer, on_step
    model, tok = load_base(profile, model_id)
    model.config.use_cache = False
    lora = {"r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": 0.0, "target_modules": targets,
            "task_type": "CAUSAL_LM"}
    if cfg.method in ("lora", "loraplus"):
        config: Any = LoraConfig(**lora)
    elif cfg.method == "rslora":
        config = LoraConfig(**lora, use_rslora=True)      # scale alpha / sqrt(r) instead of alpha / r
    elif cfg.method == "dora":
        config = LoraConfig(**lora, use_dora=True)        # magnitude vector + LoRA on the direction
    elif cfg.method in ("pissa", "olora"):
        # PiSSA: A, B from W's top-r singular vectors (fast SVD), W keeps the rest; OLoRA: from a QR of W.
        config = LoraConfig(**lora, init_lora_weights="pissa_niter_4" if cfg.method == "pissa" else "olora")
    elif cfg.method == "adalora":
        # Starts at 1.5x the rank and prunes to r by importance between 20% and 70% of the steps.
        config = AdaLoraConfig(**{k: v for k, v in lora.items() if k != "r"}, init_r=max(cfg.r * 3 // 2, cfg.r + 1),
                               target_r=cfg.r, total_step=cfg.steps, tinit=cfg.steps // 5,
                               tfinal=cfg.steps * 3 // 10, deltaT=1)
    elif cfg.method == "vera":
        # One pair of frozen random matrices (rank 256) shared by all layers; only scaling vectors train. VeRA needs
        # every target of one shape, so it adapts the attention projections of equal width.
        same = [t for t in targets if t in ("q_proj", "o_proj")] or targets[:1]
        config = VeraConfig(r=256, target_modules=same, vera_dropout=0.0, task_type="CAUSAL_LM")
    elif cfg.method == "ia3":
        ia3_targets = [t for t in targets if t in ("k_proj", "v_proj", "down_proj")] or targets[:1]
        config = IA3Config(target_modules=ia3_targets, task_type="CAUSAL_LM",
                           feedforward_modules=[t for t in ia3_targets if t == "down_proj"])
    elif cfg.method == "prefix":
        config = PrefixTuningConfig(num_virtual_tokens=16, task_type="CAUSAL_LM")
    else:  # make_config rejects it first
        raise ExperimentConfigError(f"unknown method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    torch.manual_seed(cfg.seed)  # adapter initialisation depends on the seed
    model = get_peft_model(model, config)
    if cfg.method == "loraplus":
        from peft.optimizers import create_loraplus_optimizer

        optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=cfg.lr, loraplus_lr_ratio=16.0)
    if cfg.method == "adalora":
        def on_step(step: int) -> None:
            model.base_model.update_and_allocate(step)
    return model, tok, optimizer, on_step


_ADAPTER_PARAM_MARKERS = ("lora_", "vera_", "ia3_", "prompt_encoder")


def _numel(p: Any) -> int:
    """Parameters a tensor stands for: a 4-bit bitsandbytes weight packs two per byte (its quant_state has the
    shape)."""
    state = getattr(p, "quant_state", None)
    return int(state.shape.numel()) if state is not None else p.numel()


def trainable_counts(model: Any) -> tuple[int, int]:
    """(trainable parameters, parameters of the base model) of a model; the base count leaves out adapter weights."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = getattr(model, "get_base_model", lambda: model)()
    base_params = sum(_numel(p) for n, p in base.named_parameters() if not any(k in n for k in _ADAPTER_PARAM_MARKERS))
    return trainable, base_params


def run_one(cfg: RunConfig, profile: str = "cpu", model_id: str | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration in *this* process; returns its record (call it in a fresh process)."""
    import bitsandbytes  # noqa: F401 - imported before the memory baseline, so library code is not counted
    import torch

    from .data import load_task
    from .evaluate import evaluate_task
    from .memory import cpu_peak_bytes, cpu_peak_start
    from .train import train_steps

    cfg = cfg.resolved()
    torch.manual_seed(cfg.seed)
    t_wall = time.perf_counter()
    model, tok, optimizer, on_step = build_model(cfg, profile, model_id)
    trainable, base_params = trainable_counts(model)
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        mark = cpu_peak_start(model)
    log = train_steps(model, tok, load_task(cfg.task, "train"), steps=cfg.steps, batch_size=cfg.batch_size,
                      lr=cfg.lr, seed=cfg.seed, max_length=cfg.max_length, optimizer=optimizer, on_step=on_step)
    peak = torch.cuda.max_memory_allocated() if cuda else cpu_peak_bytes(mark)
    evaluated = model
    if cfg.method == "qlora" and not cuda:
        # bitsandbytes decodes every weight at each CPU forward: generate from a decoded copy (same function)
        from .nf4 import dequantized_copy

        evaluated = dequantized_copy(model)
    evaluated.config.use_cache = True
    t_eval = time.perf_counter()
    result = evaluate_task(evaluated, tok, cfg.task, load_task(cfg.task, "eval")[:cfg.eval_n])
    eval_seconds = time.perf_counter() - t_eval
    return {
        "config": asdict(cfg),
        "label": cfg.label,
        "metric": result.primary,
        "metrics": result.metrics,
        "perplexity": result.perplexity,
        "trainable_params": trainable,
        "base_params": base_params,
        "trainable_pct": 100.0 * trainable / base_params,
        "peak_mib": round(peak / 2**20, 1),
        "peak_kind": "cuda max_memory_allocated" if cuda else "cpu tensor bytes + training RSS rise",
        "train_seconds": round(log.seconds, 2),
        "sec_per_step": round(log.sec_per_step, 3),
        "eval_seconds": round(eval_seconds, 2),
        "wall_seconds": round(time.perf_counter() - t_wall, 2),
        "loss_first": log.losses[0],
        "loss_last": log.losses[-1],
        "losses": [round(x, 4) for x in log.losses],
        "sample_output": result.outputs[0] if result.outputs else "",
        "threads": torch.get_num_threads(),
    }


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


def load_results(path: Path, profile: str = "cpu", model_id: str | None = None) -> Results:
    """Read a results file and check it against the current model and code: ``stale`` with the reasons if not.

    A file made from another model or another code version must not be plotted as if it described this one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: produce it with `make sweep` (about an hour on 2 cores)")
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
    code = code_version()
    if doc.get("code_version") != code:
        reasons.append(f"made by code version {doc.get('code_version')}, not the current {code} "
                       "(the training, evaluation or experiment code changed since)")
    return Results(path, doc, bool(reasons), reasons)


def learned(record: dict[str, Any]) -> bool:
    """Whether a run's training loss ended below where it started (False: it diverged or did not move)."""
    return float(record["loss_last"]) < float(record["loss_first"])


# ================================================================================================ analysis
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
                  "Re-create them with `make sweep` (about an hour on 2 cores; unchanged runs come from the cache)."]
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


# ===================================================================================================== CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-one", help="(internal) run one JSON configuration in this process and print its record")
    p.add_argument("--studies", default=",".join(STUDIES), help=f"comma-separated studies: {', '.join(STUDIES)}")
    p.add_argument("--seeds", default=None, help="comma-separated seeds for every study (default: STUDY_SEEDS)")
    p.add_argument("--steps", type=int, default=None, help="override every run's steps")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--profile", default="cpu")
    p.add_argument("--model-id", default=None)
    p.add_argument("--out", default="results/experiments.json")
    p.add_argument("--dry-run", action="store_true", help="list the configurations and how many are cached")
    args = p.parse_args(argv)
    if args.run_one:
        payload = json.loads(args.run_one)
        record = run_one(make_config(**payload["config"]), payload.get("profile", "cpu"), payload.get("model_id"))
        print(json.dumps(record))
        return 0
    common = {"steps": args.steps} if args.steps else {}
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None
    configs = full_grid(seeds, args.studies.split(","), **common)
    if args.dry_run:
        model, code = model_identity(args.profile, args.model_id), code_version()
        cached = sum(read_cached(run_key(c, model, code)) is not None for c in configs)
        for c in configs:
            print(c.label)
        print(f"{len(configs)} runs, {cached} cached, code version {code}")
        return 0
    result = run_sweep(configs, args.profile, args.model_id, workers=args.workers)
    command = "python -m lora_course.experiments " + " ".join(argv if argv is not None else sys.argv[1:])
    write_results(result, Path(args.out), command.strip())
    print(f"{len(result.records)} records ({result.ran} run now, {result.cached} cached, {len(result.failed)} failed) "
          f"in {result.seconds / 60:.1f} min -> {args.out}")
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
