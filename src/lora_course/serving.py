"""Measuring a multi-adapter server (notebook 07, ``make bench``): latency, throughput, the noise floor, greedy replies.

The registry that serves the adapters is ``lora_course.adapters.AdapterRegistry``; this module measures it:

- ``mixed_vs_sequential`` -> ``Throughput``: one routed mixed batch against one batch per adapter (and peft's own
  ``adapter_names`` mixed batch for reference).
- ``noise_floor`` -> ``NoiseFloor``: how far a row's logits move with the batch it runs in (same adapter, pure
  rounding), the tolerance a mixed batch is checked against in any precision (``FLOOR_K`` floors).
- ``greedy_tokens`` / ``compare_greedy``: greedy replies of a mixed batch against each adapter alone, compared only
  away from near-ties.
- ``evaluate_matrix``: every adapter on every task in one routed batch per task.
- ``bench``: the chapter's speed targets, as ``python -m lora_course.adapters --bench`` prints them.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .adapters import AdapterRegistry, AdapterRegistryError
from .timing import median_ms, time_calls


@dataclass
class Throughput:
    """Mixed batch (every adapter's rows in one batch) against one batch per adapter, same rows and tokens.

    Each ``*_s`` is the median of the timed runs kept in ``samples`` (seconds, one list per way).
    """

    rows: int
    new_tokens: int
    mixed_s: float
    sequential_s: float                        # activate + generate per adapter, peft's forward
    sequential_routed_s: float | None = None   # one routed batch per adapter (the mixed batch's own forward)
    peft_mixed_s: float | None = None          # peft's own adapter_names mixed batch
    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def best_sequential_s(self) -> float:
        """The faster of the sequential ways measured."""
        return min(s for s in (self.sequential_s, self.sequential_routed_s) if s is not None)

    @property
    def ratio(self) -> float:
        """Throughput of the mixed batch over the faster sequential way (a ratio of medians)."""
        return self.best_sequential_s / self.mixed_s

    @property
    def peft_ratio(self) -> float | None:
        return None if self.peft_mixed_s is None else self.best_sequential_s / self.peft_mixed_s

    def tokens_per_s(self, seconds: float) -> float:
        return self.rows * self.new_tokens / seconds


def mixed_vs_sequential(registry: AdapterRegistry, prompts: dict[str, list[Any]], new_tokens: int = 32,
                        repeats: int = 3, with_peft: bool = True, with_routed_sequential: bool = True,
                        warmup: bool = True) -> Throughput:
    """Time serving ``prompts`` ({adapter: its prompts}) as one mixed batch vs one batch per adapter.

    Every row generates exactly ``new_tokens`` tokens (``min_new_tokens``), so both ways do the same work. After one
    untimed run of each way (``warmup``), the ways are timed ``repeats`` times *interleaved* (mixed, sequential, ...,
    then again), so a burst of load from other processes falls on every way alike; each figure is the median. The
    sequential way with peft's forward (activate, generate) is always measured; ``with_routed_sequential`` adds one
    batch per adapter through the routed forward, so the ratio shows batching alone, not a faster forward.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: time each way at least once")
    rows = [(n, p) for n, ps in prompts.items() for p in ps]
    names, texts = [n for n, _ in rows], [p for _, p in rows]
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}

    def sequential() -> None:
        for n, ps in prompts.items():
            registry.activate(n)
            registry.generate(ps, **kw)

    def sequential_routed() -> None:
        for n, ps in prompts.items():
            registry.generate(ps, adapter_names=[n] * len(ps), **kw)

    ways: dict[str, Callable[[], Any]] = {"mixed": lambda: registry.generate(texts, names, **kw),
                                          "sequential": sequential}
    if with_routed_sequential:
        ways["sequential_routed"] = sequential_routed
    if with_peft:
        ways["peft_mixed"] = lambda: registry.generate(texts, names, engine="peft", **kw)
    previous = registry.active
    try:
        samples = time_calls(ways, repeats=repeats, warmup=1 if warmup else 0)  # interleaved: load hits every way
    finally:
        registry.activate(previous)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return Throughput(len(rows), new_tokens, med["mixed"], med["sequential"], med.get("sequential_routed"),
                      med.get("peft_mixed"), samples)


# ------------------------------------------------------------------------------------- the noise floor
FLOOR_K = 4.0
"""How many noise floors a correct mixed batch may differ from each adapter alone (``NoiseFloor.bound``).

A row of a mixed batch differs from the same row alone by two roundings: the batch composition (other rows, left
padding: what the floor measures with the same adapter and peft's forward) and the routed LoRA arithmetic (stacked
A, pre-scaled B, one more rounding of the sum per layer), a source of the same kind and size. Two such sources
stay under 2 floors; 4 leaves a factor 2 for kernels chosen by shape that were not measured here. Measured on
SmolLM2-135M (CPU, logits up to ~34), mixed vs alone over the floor: fp32 0.87 (4.5e-5 / 5.1e-5), bf16 1.25
(0.47 / 0.375), fp16 0.82 (0.047 / 0.057); a misrouted row moves by whole logits (``NoiseFloor.gap``).
"""


@dataclass(frozen=True)
class NoiseFloor:
    """How much a row's next-token logits move with the batch it runs in, the adapter unchanged.

    ``alone[i]``: prompt ``i`` alone (a batch of one) with ``route[i]`` activated (peft's forward). The same prompt
    with the same adapter also runs in the batch of all prompts (left-padded to the longest) and in that batch plus
    a longer filler prompt (every row padded, one more row); ``floor`` is the largest difference of a row between
    any two of these compositions: pure rounding, since the function computed is the same. ``gap`` is what a row
    routed to the wrong adapter would show: over rows, the smallest max |difference| between the row's logits with
    its own adapter and with any other name of the route (``inf`` with a single name).
    """

    route: tuple[str, ...]
    alone: Any                  # (rows, vocab) float32
    floor: float
    per_row: tuple[float, ...]  # each row's floor
    gap: float
    eps: float                  # one unit in the last place of the largest |logit| in the model's dtype
    k: float = FLOOR_K

    @property
    def bound(self) -> float:
        """The largest difference from ``alone`` a correct computation may show: ``k * floor + eps``."""
        return self.k * self.floor + self.eps

    @property
    def separates(self) -> bool:
        """Whether the bound tells a correct row from a misrouted one (``bound < gap``): else the check is blind."""
        return self.bound < self.gap

    def max_diff(self, logits: Any) -> float:
        """max |logits - alone| over rows and vocabulary (``logits``: (rows, vocab), rows in route order)."""
        if tuple(logits.shape) != tuple(self.alone.shape):
            raise ValueError(f"logits of shape {tuple(logits.shape)} for a route of {len(self.route)} rows "
                             f"(alone: {tuple(self.alone.shape)}): pass one row per prompt, in route order")
        return float((logits.float().cpu() - self.alone).abs().max())

    def within(self, logits: Any) -> bool:
        """True when ``logits`` equal ``alone`` up to the bound and the bound separates (a check that can fail)."""
        return self.separates and self.max_diff(logits) <= self.bound


def _filler(prompts: Sequence[Any], tokenizer: Any) -> str:
    """A plain-text prompt longer than every prompt given (so every row of a batch with it gets left padding)."""
    texts = [p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
             for p in prompts]
    return max(texts, key=lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])) + \
        " one two three four five six seven eight"


def noise_floor(registry: AdapterRegistry, prompts: Sequence[Any], route: Sequence[str],
                k: float = FLOOR_K) -> NoiseFloor:
    """Measure the ``NoiseFloor`` of ``prompts`` each run with its ``route`` name (``BASE`` allowed); see there.

    Needs ``len(prompts) >= 1`` and one name per prompt; the registry's active adapter is restored afterwards.
    """
    import torch

    route = list(route)
    if len(route) != len(prompts) or not route:
        raise AdapterRegistryError(f"{len(route)} route names for {len(prompts)} prompts: give one name per prompt")
    for n in route:
        registry._require(n, allow_base=True)
    n_rows = len(prompts)
    padded = list(prompts) + [_filler(prompts, registry.tokenizer)]
    previous = registry.active
    try:
        alone = []
        for p, name in zip(prompts, route):
            registry.activate(name)
            alone.append(registry.next_token_logits([p]).cpu())
        alone_t = torch.cat(alone)
        batch, more = {}, {}
        for name in dict.fromkeys(route):
            registry.activate(name)
            batch[name] = registry.next_token_logits(prompts).cpu()
            more[name] = registry.next_token_logits(padded)[:n_rows].cpu()
    finally:
        registry.activate(previous)
    per_row, gaps = [], []
    for i, name in enumerate(route):
        views = (alone_t[i], batch[name][i], more[name][i])
        per_row.append(max(float((a - b).abs().max()) for j, a in enumerate(views) for b in views[j + 1:]))
        others = [float((batch[o][i] - alone_t[i]).abs().max()) for o in batch if o != name]
        gaps.append(min(others, default=math.inf))
    dtype = next(registry.model.parameters()).dtype
    eps = float(alone_t.abs().max()) * float(torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0
    return NoiseFloor(tuple(route), alone_t, max(per_row), tuple(per_row), min(gaps), eps, k)


@dataclass(frozen=True)
class GreedyComparison:
    """Greedy tokens of one route against each row alone, compared only where a flip would mean something.

    Per row: ``first_diff`` is the first generated position where the two differ (``None``: identical, end of
    sequence included), ``margin`` the alone run's top-1 minus top-2 logit there. A difference at a position
    whose margin is at most ``2 * bound`` is a near-tie (each run may move each logit by up to ``bound``, so the
    two may rank the top tokens either way) and is not counted; any other difference is real.
    """

    first_diff: tuple[int | None, ...]
    margin: tuple[float | None, ...]
    bound: float
    texts: tuple[str, ...]        # the route's replies
    alone_texts: tuple[str, ...]

    @property
    def identical(self) -> bool:
        return all(d is None for d in self.first_diff)

    @property
    def real_differences(self) -> list[int]:
        """The rows whose replies differ at a position that is not a near-tie."""
        return [i for i, (d, m) in enumerate(zip(self.first_diff, self.margin))
                if d is not None and (m is None or m > 2 * self.bound)]

    @property
    def ok(self) -> bool:
        return not self.real_differences


def greedy_tokens(registry: AdapterRegistry, prompts: Sequence[Any], adapter_names: Sequence[str] | None = None,
                  max_new_tokens: int = 16) -> tuple[list[list[int]], list[Any]]:
    """Greedy token ids of each row up to and including its end-of-sequence token, and its raw logits per step."""
    batch, out = registry._generate(prompts, adapter_names, max_new_tokens=max_new_tokens, output_logits=True,
                                    return_dict_in_generate=True)
    eos = registry.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    new = out.sequences[:, batch["input_ids"].shape[1]:].tolist()
    ids, logits = [], []
    for r, row in enumerate(new):
        end = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
        ids.append(row[:end])
        logits.append(_row_logits(out.logits, r, end))
    return ids, logits


def _row_logits(step_logits: Sequence[Any], row: int, end: int) -> Any:
    """(steps, vocab) float32 logits of ``row`` from ``generate``'s per-step (rows, vocab) logits, first ``end``
    steps."""
    import torch

    return torch.stack([s[row].float().cpu() for s in step_logits[:end]])


def compare_greedy(registry: AdapterRegistry, prompts: Sequence[Any], route: Sequence[str], bound: float,
                   max_new_tokens: int = 16) -> GreedyComparison:
    """``GreedyComparison`` of ``prompts`` as one routed batch against each prompt alone with its adapter."""
    ids, _ = greedy_tokens(registry, prompts, route, max_new_tokens)
    previous = registry.active
    alone_ids, alone_logits = [], []
    try:
        for p, name in zip(prompts, route):
            registry.activate(name)
            i, lg = greedy_tokens(registry, [p], None, max_new_tokens)
            alone_ids += i
            alone_logits += lg
    finally:
        registry.activate(previous)
    first, margins = [], []
    for got, want, lg in zip(ids, alone_ids, alone_logits):
        d = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if d is None and len(got) != len(want):
            d = min(len(got), len(want))
        first.append(d)
        if d is None or d >= lg.shape[0]:
            margins.append(None)
        else:
            top2 = lg[d].topk(2).values
            margins.append(float(top2[0] - top2[1]))
    dec = registry.tokenizer.batch_decode
    return GreedyComparison(tuple(first), tuple(margins), bound,
                            tuple(t.strip() for t in dec(ids, skip_special_tokens=True)),
                            tuple(t.strip() for t in dec(alone_ids, skip_special_tokens=True)))


def evaluate_matrix(registry: AdapterRegistry, examples: dict[str, list[dict[str, Any]]], names: Sequence[str],
                    max_new_tokens: dict[str, int] | None = None) -> dict[tuple[str, str], Any]:
    """Score every adapter in ``names`` (``BASE`` allowed) on every task of ``examples``: {(name, task): EvalResult}.

    One routed batch per task holds every adapter's copy of that task's prompts, so the base is read once for all
    of them; the replies are scored with ``lora_course.evaluate.score``.
    """
    from .data import prompt_messages
    from .evaluate import MAX_NEW_TOKENS, EvalResult, score

    out: dict[tuple[str, str], Any] = {}
    for task, exs in examples.items():
        convs = [prompt_messages(ex) for ex in exs]
        route = [n for n in names for _ in exs]
        new = (max_new_tokens or {}).get(task, MAX_NEW_TOKENS[task])
        replies = registry.generate(convs * len(names), adapter_names=route, max_new_tokens=new)
        for i, n in enumerate(names):
            mine = replies[i * len(exs):(i + 1) * len(exs)]
            out[(n, task)] = EvalResult(task, score(task, mine, exs), None, mine)
    return out


# ============================================================================================== benchmark
def bench(registry: AdapterRegistry, prompts: dict[str, list[Any]], new_tokens: int = 32, repeats: int = 2,
          activate_repeat: int = 300) -> dict[str, float]:
    """The chapter's targets, measured: activate latency (ours and peft's) and mixed-batch throughput."""
    names = list(prompts)
    cycle = iter(range(10**9))
    fast = median_ms(lambda: registry.activate(names[next(cycle) % len(names)]), repeat=activate_repeat)
    peft_ms = median_ms(lambda: registry.activate_with_peft(names[next(cycle) % len(names)]), repeat=20)
    tp = mixed_vs_sequential(registry, prompts, new_tokens=new_tokens, repeats=repeats)
    return {"activate_ms": fast, "peft_set_adapter_ms": peft_ms, "mixed_s": tp.mixed_s,
            "sequential_s": tp.sequential_s, "sequential_routed_s": tp.sequential_routed_s,
            "peft_mixed_s": tp.peft_mixed_s or float("nan"), "ratio": tp.ratio, "peft_ratio": tp.peft_ratio or 0.0,
            "rows": tp.rows, "new_tokens": new_tokens}


__all__ = ["FLOOR_K", "GreedyComparison", "NoiseFloor", "Throughput", "bench", "compare_greedy", "evaluate_matrix",
           "greedy_tokens", "mixed_vs_sequential", "noise_floor"]
