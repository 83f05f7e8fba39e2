"""Notebook 09's experiments on the real model: one run, its configuration and cache key, and the course's grids.

Each *run* trains one configuration (a method, rank, target set, learning rate, steps, seed) on one task of the
course data with ``train.train_steps``, then measures the task metric and answer perplexity on the held-out split
(``evaluate.evaluate_task``), its trainable parameters, its peak memory and its time (``run_one``, meant for a fresh
Python process, so each peak memory is its own, measured as in notebook 04: the model's tensor bytes plus the rise
of peak RSS during training). A run's cache key (``run_key``) hashes

- the resolved configuration,
- the code that shapes a result (the functions ``code_version`` hashes, plus ``EXPERIMENTS_VERSION``), and
- the model's identity (its cache folder's name, its source's hash and its config, never a timestamp).

The sweep that runs a grid in fresh processes, caches each record under its key and resumes is ``sweep``; the study
tables and the references' claims judged from its results are ``claims``. ``make sweep`` (this module's CLI,
``python -m lora_course.experiments``) runs every study's grid (``full_grid``) and writes
``results/experiments.json``; notebook 09 draws from that file and re-runs a live subset to catch stale results.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

EXPERIMENTS_VERSION = 2
"""Bump when a change outside the hashed functions changes what a run measures."""

METHODS: tuple[str, ...] = ("full", "lora", "qlora", "rslora", "dora", "loraplus", "pissa", "olora", "adalora",
                            "vera", "ia3", "prefix")
"""What a run trains: every weight (``full``), a LoRA, a LoRA on an NF4 base, or one of LoRA's variants."""

TARGET_SETS: dict[str, tuple[str, ...]] = {
    "q": ("q_proj",),
    "q,k": ("q_proj", "k_proj"),
    "q,k,v": ("q_proj", "k_proj", "v_proj"),
    "q,k,v,o": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "q,v": ("q_proj", "v_proj"),
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
"""Each method's rate when a configuration names none (a probe per method on the technical task at 20 steps): the
``check`` study's and notebook 12's. Notebook 09 compares methods over ``LR_GRID`` instead, each at its best rate."""


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
    steps: int = 32                # 128 of the 160 training examples: the loss has flattened (notebook 09 checks)
    batch_size: int = 4
    max_length: int = 96
    seed: int = 0
    eval_n: int = 100              # held-out examples scored from the test split (data.SIZES["test"] = 100)

    def resolved(self) -> RunConfig:
        """The configuration with its defaults filled in: what the cache key and the record hold."""
        return replace(self, alpha=float(self.alpha if self.alpha is not None else 2 * self.r),
                       lr=float(self.lr if self.lr is not None else DEFAULT_LR[self.method]))

    @property
    def label(self) -> str:
        """A short human-readable name, e.g. ``lora r=8 a=16 all lr=0.003 s0``."""
        c = self.resolved()
        rank = "" if c.method in ("full", "ia3", "prefix") else f" r={c.r} a={c.alpha:.3g}"
        steps = "" if c.steps == RunConfig.steps else f" {c.steps} steps"
        return f"{c.method}{rank} {c.targets} lr={c.lr:g}{steps} s{c.seed}"


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
LR_GRID: dict[str, tuple[float, ...]] = {
    "full": (1e-5, 3e-5, 1e-4),          # every weight moves: a LoRA-sized step wrecks the model
    "lora": (3e-4, 1e-3, 3e-3), "rslora": (3e-4, 1e-3, 3e-3), "dora": (3e-4, 1e-3, 3e-3),
    "qlora": (3e-4, 1e-3, 3e-3),
    "loraplus": (1e-4, 3e-4, 1e-3),      # B steps at 16x the rate: a third of LoRA's grid
}
"""Three learning rates per method, a factor of about 3 apart: each method is compared at its best rate on the
continuous metric (``claims.best_rows``), and a best rate at the grid's edge is flagged. LoRA's grid is centred on
1e-3: at 32 steps its held-out loss was lower at 1e-3 (0.220) than at ``DEFAULT_LR``'s 3e-3 (0.262)."""
RS_ALPHA = 2 * 8 ** 0.5
"""rsLoRA's alpha in the scaling study: its scale alpha / sqrt(r) equals LoRA's alpha / r = 2 at r = 8, so all three
scalings share the r = 8 runs and differ only away from it."""
SCALINGS: dict[str, dict[str, Any]] = {
    "fixed": {"method": "lora", "alpha": 16.0},      # Hu et al.: alpha fixed, scale 16 / r
    "2r": {"method": "lora", "alpha": None},         # the references' rule of thumb: alpha = 2r, scale 2
    "rs": {"method": "rslora", "alpha": RS_ALPHA},   # rsLoRA: scale alpha / sqrt(r)
}
"""The scaling study's three ways to set LoRA's scale as the rank changes (all equal at r = 8)."""
SCALING_RANKS: tuple[int, ...] = (2, 8, 32)
STUDIES: tuple[str, ...] = ("scaling", "methods", "targets", "noise", "check")
NOISE_SEEDS: tuple[int, ...] = (0, 1, 2)
"""The ``noise`` study: LoRA r = 8 at 1e-3 with three seeds, the spread every verdict is judged against."""
CHECK_STEPS = 8
"""The ``check`` study: short runs that notebook 09 re-runs live (<= 120 s for both) and compares with the file."""


def scaling_of(cfg: RunConfig | dict[str, Any]) -> tuple[str, float]:
    """Which scaling rule a LoRA configuration follows (``fixed``, ``2r``, ``rs``, or ``2r`` at r = 8 where all
    agree) and its scale: alpha / sqrt(r) for rsLoRA, alpha / r otherwise."""
    c = cfg if isinstance(cfg, dict) else asdict(cfg.resolved())
    alpha, r = float(c["alpha"]), int(c["r"])
    if c["method"] == "rslora":
        return "rs", alpha / r ** 0.5
    return ("2r" if alpha == 2 * r else "fixed"), alpha / r


def grid(study: str, seeds: Sequence[int] | None = None, **common: Any) -> list[RunConfig]:
    """The configurations of one study for each seed (default: seed 0; ``noise`` adds ``NOISE_SEEDS`` to any).

    - ``scaling``: LoRA at r = 2, 8, 32 under each of ``SCALINGS`` (r = 8 once: all three agree there), each at
      ``LR_GRID["lora"]``;
    - ``methods``: full fine-tuning, LoRA, QLoRA, DoRA and LoRA+ at r = 8 on all linear layers, each at its
      ``LR_GRID``;
    - ``targets``: LoRA r = 8 on ``q,v`` (the LoRA paper's choice) and on all linear layers, each at three rates;
    - ``noise``: LoRA r = 8 at 1e-3, three seeds;
    - ``check``: two short runs notebook 09 re-runs live (scored on 30 test examples to stay within its budget).
    """
    rows: list[dict[str, Any]]
    if study == "scaling":
        rows = [{"method": "lora", "r": 8, "lr": lr} for lr in LR_GRID["lora"]]
        rows += [{**SCALINGS[name], "r": r, "lr": lr} for r in SCALING_RANKS if r != 8 for name in SCALINGS
                 for lr in LR_GRID["lora"]]
    elif study == "methods":
        rows = [{"method": m, "lr": lr} for m in ("full", "lora", "qlora", "dora", "loraplus") for lr in LR_GRID[m]]
    elif study == "targets":
        rows = [{"method": "lora", "targets": t, "lr": lr} for t in ("q,v", "all") for lr in LR_GRID["lora"]]
    elif study == "noise":
        rows = [{"method": "lora", "lr": 1e-3}]
    elif study == "check":
        rows = [{"method": m, "steps": CHECK_STEPS, "eval_n": 30} for m in ("lora", "ia3")]
    else:
        raise ExperimentConfigError(f"unknown study {study!r}: choose one of {', '.join(STUDIES)}")
    if seeds is None:
        seeds = (0,)
    if study == "noise":  # its spread over seeds is what every verdict is judged against: always all of them
        seeds = tuple(dict.fromkeys((*seeds, *NOISE_SEEDS)))
    return [make_config(**{**common, **row}, seed=s) for s in seeds for row in rows]


def full_grid(seeds: Sequence[int] | None = None, studies: Sequence[str] = STUDIES, **common: Any) -> list[RunConfig]:
    """Every study's configurations, each distinct configuration once (LoRA r=8 on all layers serves three)."""
    out: dict[RunConfig, None] = {}
    for study in studies:
        for cfg in grid(study, seeds, **common):
            out.setdefault(cfg)
    return list(out)


def in_study(record: dict[str, Any], study: str, **common: Any) -> bool:
    """Whether a record's configuration belongs to ``study`` (any seed), also in a grid run with every run's steps
    overridden (``full_grid(steps=...)``, as notebook 09's live grid on the GPU profiles can be)."""
    cfg = make_config(**record["config"])
    overrides = ({}, {"steps": cfg.steps}) if "steps" not in common else ({},)
    return any(replace(c, seed=cfg.seed) == cfg for extra in overrides
               for c in grid(study, seeds=(cfg.seed,), **common, **extra))


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


def code_version(stack: dict[str, str] | None = None) -> str:
    """12 hex digits over everything besides the model that decides a run's result: ``EXPERIMENTS_VERSION``, the
    source of the functions that build, train, measure and evaluate a run, the task data it reads (the files'
    bytes), and the versions of the libraries that compute it (``STACK``).

    ``stack``: library versions to hash instead of the installed ones (a results file's ``versions``), so a file
    made on another machine (the GPU's torch) can be checked against this checkout's code.
    """
    from importlib.metadata import version

    if stack is not None:
        missing = [name for name in STACK if not stack.get(name)]
        if missing:
            raise ValueError(f"no version of {', '.join(missing)} in {stack}: a results file records every library of "
                             f"STACK ({', '.join(STACK)}); re-create it with `make sweep` or notebook 09's live grid")

    from .data import SPLITS, TASKS, collate, load_task, tokenize_example
    from .evaluate import evaluate_task, generate, perplexity, score
    from .memory import cpu_peak_bytes, cpu_peak_start
    from .models import load_for_method
    from .paths import data_dir
    from .train import train_steps

    funcs = (train_steps, tokenize_example, collate, load_task, evaluate_task, generate, perplexity, score,
             build_model, run_one, RunConfig.resolved, load_for_method, cpu_peak_start, cpu_peak_bytes)
    data = {f"{t}/{split}": _sha((data_dir() / t / f"{split}.jsonl").read_bytes())[:16]
            for t in TASKS for split in SPLITS if (data_dir() / t / f"{split}.jsonl").is_file()}
    blob = json.dumps({"version": EXPERIMENTS_VERSION, "defaults": DEFAULT_LR, "targets": TARGET_SETS,
                       "code": [_sha(inspect.getsource(f).encode()) for f in funcs], "data": data,
                       "stack": {name: (stack[name] if stack is not None else version(name)).split("+")[0]
                                 for name in STACK}}, sort_keys=True)
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

    from .models import load_base, load_for_method

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
        from .bnb_interop import dequantized_copy

        evaluated = dequantized_copy(model)
    evaluated.config.use_cache = True
    t_eval = time.perf_counter()
    result = evaluate_task(evaluated, tok, cfg.task, load_task(cfg.task, "test")[:cfg.eval_n])
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


# ===================================================================================================== CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-one", help="(internal) run one JSON configuration in this process and print its record")
    p.add_argument("--studies", default=",".join(STUDIES), help=f"comma-separated studies: {', '.join(STUDIES)}")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds for every study (default: 0; the noise study adds NOISE_SEEDS)")
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
    from .sweep import read_cached, run_sweep, write_results  # here, not at the top: sweep imports this module

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