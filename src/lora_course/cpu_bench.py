"""The course's CPU speed targets, measured on this machine (``make bench``): each figure, its target, what it reached.

Notebooks assert only what a loaded 2-core CI machine cannot fail: structure (the merged model runs no extra
matmuls, padding-free batches compute no padding) and directions with a wide margin. The speed *targets* the
course states live here, measured serially (one group of figures after another, each in a fresh child process so
one crash or one group's threads and memory do not touch the others), with a warm-up and several timed repeats,
interleaved between the ways compared so a burst of load hits them alike. Every figure is a ratio (or a latency)
of **medians**; the spread (min, max) of every measured quantity is recorded with it.

| figure | chapter | target |
|---|---|---|
| a mixed batch of three adapters vs one batch per adapter (throughput) | 07 | >= 2x |
| registry ``activate`` latency | 07 | <= 5 ms |
| ``activate`` vs peft's ``set_adapter`` | 07 | faster (> 1x) |
| ``activate`` < ``hotswap`` < loading the adapter again | 07 | each step slower (> 1x) |
| merged vs LoRA-wrapped decoder forward time | 01 | <= 1.05x |
| padding-free vs padded SFT tokens/s | 06 | > 1x |
| packed vs padded SFT tokens/s | 06 | > 1x |
| llama.cpp (best of F32/Q8_0/Q4_K_M) vs transformers greedy decode tokens/s | 08 | >= 5x (>= 2x over 500M parameters) |

``python -m lora_course.cpu_bench --out results/bench-cpu.json`` prints the table and writes the JSON with the
machine (CPU model, avx2/avx512f/avx512_bf16/amx, cores, torch threads, date). Torch figures run with the thread
count the course's notebooks use (``OMP_NUM_THREADS``, 1 under ``make``); the decode comparison gives both
engines every core (``--decode-threads``), as notebook 08 does. Every measurement reuses the package's own
functions (``adapters``, ``lora``, ``bench``, ``export``, ``gguf_quant``, ``parity``, ``timing``); ``matmul_flops`` is
shared with notebook 01. The exit status is 0 whether or not targets are met (a benchmark
reports), 1 if a group failed to run.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import operator
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .procs import run_module
from .timing import time_calls

_OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le, ">": operator.gt,
                                                   "<": operator.lt}


@dataclass(frozen=True)
class Target:
    """A figure's target: ``value <op> bound`` (e.g. ``>= 2``)."""

    op: str
    bound: float

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"target operator {self.op!r}: use one of {', '.join(_OPS)}")
        if not math.isfinite(self.bound):
            raise ValueError(f"target bound must be a finite number, got {self.bound!r}")

    def met(self, value: float) -> bool:
        """Whether ``value`` meets the target (a NaN never does)."""
        return not math.isnan(value) and _OPS[self.op](value, self.bound)

    def text(self, unit: str) -> str:
        return f"{self.op} {self.bound:g}{' ' if unit == 'ms' else ''}{unit}"


@dataclass
class Quantity:
    """One measured quantity: every timed repeat, in ``unit``."""

    name: str
    unit: str                   # "s", "ms", "tokens/s"
    samples: list[float]

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError(f"{self.name}: no samples measured")

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.samples), max(self.samples)

    def summary(self) -> dict[str, Any]:
        lo, hi = self.spread
        return {"unit": self.unit, "median": self.median, "min": lo, "max": hi, "n": len(self.samples),
                "samples": self.samples}


@dataclass
class Figure:
    """A figure of the benchmark: ``value`` (from the medians of ``quantities``, see ``how``) against ``target``."""

    key: str
    chapter: str
    what: str
    unit: str                     # "x" (a ratio) or "ms"
    target: Target
    value: float
    how: str                      # how the value derives from the quantities' medians
    quantities: list[Quantity]
    note: str = ""
    facts: dict[str, Any] = field(default_factory=dict)  # measured structure next to the timing (e.g. FLOPs)

    @property
    def met(self) -> bool:
        return self.target.met(self.value)

    def quantity(self, name: str) -> Quantity:
        for q in self.quantities:
            if q.name == name:
                return q
        raise KeyError(f"{self.key} has no quantity {name!r}: it has {[q.name for q in self.quantities]}")

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "chapter": self.chapter, "what": self.what, "unit": self.unit,
                "target": self.target.text(self.unit), "target_op": self.target.op,
                "target_bound": self.target.bound, "value": self.value, "met": self.met, "how": self.how,
                "quantities": {q.name: q.summary() for q in self.quantities}, "note": self.note, "facts": self.facts}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Figure:
        qs = [Quantity(n, q["unit"], list(q["samples"])) for n, q in d["quantities"].items()]
        return cls(d["key"], d["chapter"], d["what"], d["unit"], Target(d["target_op"], d["target_bound"]),
                   d["value"], d["how"], qs, d.get("note", ""), d.get("facts", {}))


# ------------------------------------------------------------------------------------------ building figures
def ratio_figure(key: str, chapter: str, what: str, target: Target, num: Quantity, den: Quantity,
                 others: Sequence[Quantity] = (), note: str = "") -> Figure:
    """A figure whose value is ``median(num) / median(den)``."""
    return Figure(key, chapter, what, "x", target, num.median / den.median,
                  f"median {num.name} / median {den.name}", [num, den, *others], note)


def order_figure(key: str, chapter: str, what: str, chain: Sequence[Quantity], note: str = "") -> Figure:
    """``chain[0] < chain[1] < ...`` by medians: the value is the smallest ratio of a step to the one before (> 1)."""
    if len(chain) < 2:
        raise ValueError("an ordering needs at least two quantities")
    steps = [b.median / a.median for a, b in itertools.pairwise(chain)]
    how = "min(" + ", ".join(f"median {b.name} / median {a.name}" for a, b in itertools.pairwise(chain)) + ")"
    return Figure(key, chapter, what, "x", Target(">", 1.0), min(steps), how, list(chain), note)


def latency_figure(key: str, chapter: str, what: str, target: Target, q: Quantity, others: Sequence[Quantity] = (),
                   note: str = "") -> Figure:
    """A figure whose value is ``median(q)`` in milliseconds."""
    if q.unit != "ms":
        raise ValueError(f"{q.name} is in {q.unit}, a latency figure needs ms")
    return Figure(key, chapter, what, "ms", target, q.median, f"median {q.name}", [q, *others], note)


# ------------------------------------------------------------------------------------- shared with notebooks


def _no_flops(*args: Any, **kwargs: Any) -> int:
    return 0


def matmul_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of the weight matrix products ``fn()`` runs (``torch.utils.flop_counter``).

    Fused attention kernels are left out, on every device: the CPU's (``_scaled_dot_product_flash_attention_for_cpu``)
    has no formula in the counter, and the GPU's assert equal query and key/value heads, which grouped-query attention
    (SmolLM2, Llama 3) does not have ("sdpa_flop_count: query/key/value shapes are incompatible", seen on an H200).
    Attention's products have no weights, so they are the same in any two models that differ in their linear layers.
    """
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    skip = {op: _no_flops for op in flop_registry if "attention" in str(op)}
    with FlopCounterMode(display=False, custom_mapping=skip) as counter:
        fn()
    return int(counter.get_total_flops())


def decoder_inputs(tokenizer: Any, task: str = "creative", n: int = 2, max_length: int = 128,
                   device: Any = "cpu") -> dict[str, Any]:
    """Notebook 01's timing batch: the first ``n`` eval examples of ``task``, right-padded (ids and mask)."""
    from .data import collate, load_task, tokenize_example

    feats = [tokenize_example(tokenizer, ex, max_length) for ex in load_task(task, "eval")[:n]]
    batch = collate(feats, tokenizer.pad_token_id)
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


# ------------------------------------------------------------------------------------------------ the groups
def _load(profile: str, model_id: str | None) -> tuple[Any, Any]:
    from .models import load_base

    return load_base(profile, model_id, device="cpu")


def merge_figures(profile: str = "cpu", model_id: str | None = None, repeats: int = 9, r: int = 8,
                  seed: int = 0) -> list[Figure]:
    """01: decoder forward time of a LoRA-wrapped model (every linear layer, rank ``r``) vs the same model merged."""
    import copy

    import torch

    from .lora import add_lora_to_model, count_lora_params, merge_lora_weights

    model, tok = _load(profile, model_id)
    torch.manual_seed(seed)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    add_lora_to_model(model, targets, r=r, alpha=2 * r)
    with torch.no_grad():  # a trained-looking adapter: B is zero at initialisation
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.01)
    merged = merge_lora_weights(copy.deepcopy(model))
    inputs = decoder_inputs(tok)

    def fwd(m: Any) -> Callable[[], Any]:
        def run() -> None:
            with torch.inference_mode():
                m.model(**inputs)
        return run

    times = time_calls({"wrapped": fwd(model), "merged": fwd(merged)}, repeats=repeats, warmup=2)
    extra = matmul_flops(fwd(model)) - matmul_flops(fwd(merged))
    expected = 2 * inputs["input_ids"].numel() * count_lora_params(model)
    wrapped = Quantity("wrapped", "s", times["wrapped"])
    merged_q = Quantity("merged", "s", times["merged"])
    fig = ratio_figure("01_merged_vs_wrapped", "01", "merged vs LoRA-wrapped decoder forward time",
                       Target("<=", 1.05), merged_q, wrapped,
                       note=f"batch {tuple(inputs['input_ids'].shape)}, r={r} on every linear layer; the wrapped "
                            f"model runs {extra:,} more matmul FLOPs (2 x tokens x LoRA parameters = {expected:,})")
    fig.facts = {"extra_matmul_flops": extra, "lora_matmul_flops": expected}
    return [fig]


def adapter_figures(profile: str = "cpu", model_id: str | None = None, repeats: int = 3, rows: int = 2,
                    new_tokens: int = 48, switch_repeats: int = 7, activate_repeat: int = 300) -> list[Figure]:
    """07: the registry's mixed batch vs one batch per adapter, activate latency, and activate < hotswap < load.

    The throughput is notebook 07's comparison (``rows`` prompts per adapter, ``new_tokens`` each, sequential =
    activate + generate per adapter), warmed up by a short run of both ways, then timed ``repeats`` times interleaved.
    """
    from .adapters import AdapterRegistry
    from .course_adapters import course_adapter
    from .data import TASKS, load_task, prompt_messages
    from .serving import mixed_vs_sequential
    from .timing import timed_ms

    model, tok = _load(profile, model_id)
    paths = {t: course_adapter(t, model, tok, profile=profile, model_id=model_id).path for t in TASKS}
    reg = AdapterRegistry(model, tok)
    for t, p in paths.items():
        reg.load(t, p)
    prompts = {t: [prompt_messages(ex) for ex in load_task(t, "eval")[:rows]] for t in TASKS}
    common = {"with_peft": False, "with_routed_sequential": False, "warmup": False}
    mixed_vs_sequential(reg, prompts, new_tokens=4, repeats=1, **common)  # warm-up: both ways, a few tokens
    tp = mixed_vs_sequential(reg, prompts, new_tokens=new_tokens, repeats=repeats, **common)
    mixed, seq = Quantity("mixed", "s", tp.samples["mixed"]), Quantity("sequential", "s", tp.samples["sequential"])
    figs = [ratio_figure("07_mixed_batch", "07", f"mixed batch of {len(TASKS)} adapters vs one batch per adapter "
                         "(throughput)", Target(">=", 2.0), seq, mixed,
                         note=f"{len(TASKS)} adapters x {rows} rows x {new_tokens} new tokens; sequential = "
                              "activate + generate per adapter")]

    names = reg.names
    turn = iter(range(10**9))
    act = Quantity("activate", "ms", timed_ms(lambda: reg.activate(names[next(turn) % len(names)]),
                                              repeat=activate_repeat))
    peft_ms = Quantity("peft_set_adapter", "ms",
                       timed_ms(lambda: reg.activate_with_peft(names[next(turn) % len(names)]), repeat=30))
    figs.append(latency_figure("07_activate_ms", "07", "registry activate latency", Target("<=", 5.0), act))
    figs.append(ratio_figure("07_activate_vs_peft", "07", "activate vs peft set_adapter (speed-up)", Target(">", 1.0),
                             peft_ms, act))

    reg.load("slot", paths[TASKS[0]])
    swap, load = [], []
    for j in range(switch_repeats + 1):  # the first round is the warm-up
        t0 = time.perf_counter()
        reg.hotswap("slot", paths[TASKS[1 + j % 2]])
        t1 = time.perf_counter()
        reg.load("again", paths[TASKS[0]])
        t2 = time.perf_counter()
        reg.unload("again")
        if j:
            swap.append((t1 - t0) * 1e3)
            load.append((t2 - t1) * 1e3)
    figs.append(order_figure("07_switch_order", "07", "activate < hotswap < load again (each step slower)",
                             [Quantity("activate", "ms", act.samples), Quantity("hotswap", "ms", swap),
                              Quantity("load_again", "ms", load)],
                             note=f"{len(names)} adapters loaded; hotswap copies an adapter's weights into a loaded "
                                  "one, load_again checks and injects a new one"))
    return figs


def sft_figures(profile: str = "cpu", model_id: str | None = None, repeats: int = 3, measure_steps: int = 3,
                seed: int = 0) -> list[Figure]:
    """06: SFT tokens/s of padded vs padding-free vs packed batches (notebook 06's CPU table, more steps)."""
    from . import bench
    from .models import resolve_source

    _, source = resolve_source(profile, model_id)
    size = bench.notebook_settings(False)
    size["measure_steps"] = measure_steps
    median = size.pop("median")
    configs = bench.side_by_side(False, r=16, **size)
    from transformers import AutoTokenizer

    from .models import prepare_tokenizer

    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(source))
    rows = bench.make_rows(tok, configs[0], median, seed=seed)
    runs: dict[str, list[float]] = {c.batching: [] for c in configs}
    for _ in range(repeats):  # interleaved; every run has its own warm-up steps
        for c in configs:
            runs[c.batching].append(bench.run_config(c, source, rows, seed=seed).tokens_per_s)
    q = {k: Quantity(k, "tokens/s", v) for k, v in runs.items()}
    note = (f"{size['batch_size']} chats a step (median {median} tokens, max {size['max_length']}), "
            f"{size['warmup_steps']} warm-up + {measure_steps} measured steps a run")
    return [ratio_figure("06_padding_free", "06", "padding-free vs padded SFT tokens/s", Target(">", 1.0),
                         q["padding_free"], q["padded"], note=note),
            ratio_figure("06_packed", "06", "packed vs padded SFT tokens/s", Target(">", 1.0), q["packed"], q["padded"],
                         note=note)]


def decode_gguf_files(source: str | Path, quants: Sequence[str] = ("Q8_0", "Q4_K_M")) -> dict[str, Path]:
    """The base model's F32 GGUF (notebook 08's ``base-<name>-f32.gguf``) and its quantizations, in the course cache.

    Built once (``export.to_gguf``, ``gguf_quant.quantize``); a file at its path is complete (written and renamed).
    """
    from .export import to_gguf
    from .gguf_quant import quantize
    from .paths import cache_dir

    folder = cache_dir() / "exports"
    folder.mkdir(parents=True, exist_ok=True)
    name = Path(str(source)).name
    files = {"F32": folder / f"base-{name}-f32.gguf"}
    if not files["F32"].exists():
        to_gguf(source, files["F32"], outtype="f32")
    for q in quants:
        files[q] = folder / f"base-{name}-{q}.gguf"
        if not files[q].exists():
            quantize(files["F32"], files[q], q)
    return files


def decode_figures(profile: str = "cpu", model_id: str | None = None, repeats: int = 5, n_tokens: int = 32,
                   threads: int | None = None) -> list[Figure]:
    """08: greedy decode tokens/s (batch 1) of llama.cpp (F32, Q8_0, Q4_K_M) vs transformers, same threads."""
    import torch

    from .data import load_task, prompt_messages
    from .evaluate import chat_prompts
    from .hardware import usable_cpus
    from .parity import gguf_tokens_per_second, hf_tokens_per_second

    threads = threads or usable_cpus()
    torch.set_num_threads(threads)
    model, tok = _load(profile, model_id)
    info = model.lora_course_info
    files = decode_gguf_files(info.source)
    prompt = chat_prompts(tok, [prompt_messages(load_task("creative", "eval")[0])])[0]
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    runs: dict[str, list[float]] = {"transformers": [], **{f"llama.cpp {k}": [] for k in files}}
    for _ in range(repeats):  # interleaved; each call warms up, then times a 1-token and an n-token run
        runs["transformers"].append(hf_tokens_per_second(model, tok, prompt, n_tokens, repeats=1))
        for k, path in files.items():
            runs[f"llama.cpp {k}"].append(gguf_tokens_per_second(path, ids, n_tokens, n_threads=threads, repeats=1))
    q = {k: Quantity(k, "tokens/s", v) for k, v in runs.items()}
    best = max((v for k, v in q.items() if k.startswith("llama.cpp")), key=lambda x: x.median)
    big = info.n_params >= 5e8
    return [ratio_figure("08_llama_cpp_decode", "08", "llama.cpp (best of F32/Q8_0/Q4_K_M) vs transformers decode "
                         "tokens/s", Target(">=", 2.0 if big else 5.0), best, q["transformers"],
                         [v for k, v in q.items() if k.startswith("llama.cpp") and v is not best],
                         note=f"{threads} thread(s) for both engines, {n_tokens} new tokens after the prompt, "
                              f"batch 1; target 5x for the course's 135M model, 2x over 500M parameters "
                              f"({info.n_params / 1e6:.0f}M here)")]


GROUPS: dict[str, Callable[..., list[Figure]]] = {"merge": merge_figures, "adapters": adapter_figures,
                                                  "sft": sft_figures, "decode": decode_figures}
"""Run in this order (short ones first, so a late failure costs least)."""


# ------------------------------------------------------------------------------------------------- running
def run_group_in_child(group: str, profile: str, model_id: str | None, repeats: int | None,
                       decode_threads: int | None, timeout: float = 900) -> list[Figure]:
    """One group in a fresh Python process (its threads, memory and any crash stay there); its figures back."""
    args = ["--child", group, "--profile", profile]
    args += ["--model-id", model_id] if model_id else []
    args += ["--repeats", str(repeats)] if repeats else []
    args += ["--decode-threads", str(decode_threads)] if decode_threads else []
    doc = run_module("lora_course.cpu_bench", args, what=f"group {group!r}", timeout=timeout, prefix='{"figures"')[-1]
    return [Figure.from_json(d) for d in doc["figures"]]


def _fmt(v: float, unit: str) -> str:
    if unit == "ms":
        return f"{v:.3f} ms"
    return f"{v:.2f}x"


def _qfmt(q: Quantity) -> str:
    lo, hi = q.spread
    return f"{q.name} {q.median:.3g} [{lo:.3g}-{hi:.3g}] {q.unit} (n={len(q.samples)})"


def format_table(figures: Sequence[Figure]) -> str:
    """Chapter, figure, target, reached, met, and each quantity's median [min-max] over its repeats."""
    head = f"{'ch':<3} {'figure':<72} {'target':>10} {'reached':>10} {'met':>4}"
    lines = [head, "-" * len(head)]
    for f in figures:
        lines.append(f"{f.chapter:<3} {f.what[:72]:<72} {f.target.text(f.unit):>10} {_fmt(f.value, f.unit):>10} "
                     f"{'yes' if f.met else 'NO':>4}")
        lines.append("      " + "; ".join(_qfmt(q) for q in f.quantities))
    return "\n".join(lines)


def report(figures: Sequence[Figure], machine: dict[str, Any], failed: dict[str, str] | None = None,
           seconds: float | None = None) -> dict[str, Any]:
    """The JSON document ``--out`` writes."""
    return {"machine": machine, "figures": [f.to_json() for f in figures],
            "met": sum(f.met for f in figures), "total": len(figures), "failed": failed or {},
            "seconds": None if seconds is None else round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The course's CPU speed targets, measured here (serial, medians).")
    p.add_argument("--out", type=Path, help="write the JSON report here (e.g. results/bench-cpu.json)")
    p.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated groups among {', '.join(GROUPS)}")
    p.add_argument("--profile", default="cpu")
    p.add_argument("--model-id", default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed repeats of every group (default: each group's)")
    p.add_argument("--decode-threads", type=int, default=None, help="threads of both engines in the decode "
                   "comparison (default: every core)")
    p.add_argument("--in-process", action="store_true", help="run the groups in this process (no child processes)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    kw: dict[str, Any] = {"profile": a.profile, "model_id": a.model_id}
    if a.repeats:
        kw["repeats"] = a.repeats
    if a.child:
        if a.child == "decode" and a.decode_threads:
            kw["threads"] = a.decode_threads
        figs = GROUPS[a.child](**kw)
        print(json.dumps({"figures": [f.to_json() for f in figs]}), flush=True)
        return 0
    groups = [g.strip() for g in a.groups.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        p.error(f"unknown group(s) {unknown}: choose among {', '.join(GROUPS)}")
    t0 = time.perf_counter()
    from .env import machine_info

    machine = machine_info(a.decode_threads)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), flush=True)
    figures: list[Figure] = []
    failed: dict[str, str] = {}
    for g in groups:
        tg = time.perf_counter()
        try:
            if a.in_process:
                gkw = dict(kw, **({"threads": a.decode_threads} if g == "decode" and a.decode_threads else {}))
                got = GROUPS[g](**gkw)
            else:
                got = run_group_in_child(g, a.profile, a.model_id, a.repeats, a.decode_threads)
        except (RuntimeError, OSError, ValueError, ImportError, subprocess.TimeoutExpired) as e:
            # one group failing (e.g. llama.cpp missing or crashing) ends no other
            failed[g] = str(e)[-2000:]
            print(f"group {g} FAILED: {str(e)[-2000:]}", flush=True)
            continue
        figures += got
        print(f"group {g}: {time.perf_counter() - tg:.0f} s", flush=True)
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(report(figures, machine, failed, time.perf_counter() - t0), indent=1))
    print()
    print(format_table(figures))
    print(f"\n{sum(f.met for f in figures)} of {len(figures)} targets met on {machine['cpu']} "
          f"({', '.join(k for k, v in machine['flags'].items() if v) or 'no avx2'}), {machine['cores']} cores, "
          f"{machine['date']}; {time.perf_counter() - t0:.0f} s")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report(figures, machine, failed, time.perf_counter() - t0), indent=1))
        print(f"wrote {a.out}")
    return 1 if failed else 0


__all__ = ["GROUPS", "Figure", "Quantity", "Target", "adapter_figures", "decode_figures", "decode_gguf_files",
           "decoder_inputs", "format_table", "latency_figure", "matmul_flops", "merge_figures",
           "order_figure", "ratio_figure", "report", "sft_figures"]

if __name__ == "__main__":
    sys.exit(main())
