"""Is the GGUF still the model you trained? llama.cpp against transformers on the same inputs (notebook 08).

- ``hf_reference`` -> ``HFReference``: transformers' side, computed once: teacher-forced log-probabilities and
  greedy continuations;
- ``check_parity`` -> ``ParityReport``: tokenizer parity, teacher-forced top-1 agreement and KL divergence, greedy
  prefix agreement, with disagreements split into near-ties and decisive ones (``split_disagreements``,
  ``NEAR_TIE_SIGMAS``), so a correct file passes on any CPU's kernels and a broken one fails;
- ``hf_tokens_per_second`` / ``gguf_tokens_per_second``: greedy decode speed of both engines (batch 1, after the
  prompt's prefill), also used by ``cpu_bench``.

The GGUF side runs through ``llama_runtime`` (``load_gguf``; ``gguf_greedy`` is what ``forced_greedy`` stands for).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .export import file_size_mib, format_table
from .llama_runtime import gguf_greedy, load_gguf


# ------------------------------------------------------------------------------------------------- parity
@dataclass
class HFReference:
    """transformers' side of a parity check, computed once and compared with several GGUF files."""

    texts: list[str]
    token_ids: list[list[int]]
    log_probs: list[Any]  # one (n_tokens, vocab) float64 array per text
    prompts: list[str]
    prompt_ids: list[list[int]]
    greedy_ids: list[list[int]]
    max_new_tokens: int
    suppressed_ids: list[int] = field(default_factory=list)  # end-of-sequence ids masked during greedy decoding
    # per prompt and greedy step: the log-probability lead of transformers' chosen token over its runner-up (end of
    # sequence masked), so a greedy divergence can be told apart as a near-tie or a real difference
    greedy_margins: list[list[float]] = field(default_factory=list)

    def select(self, texts: Sequence[int]) -> HFReference:
        """The same reference on the texts at these indices only (every prompt kept): a smaller parity check."""
        bad = [i for i in texts if not 0 <= i < len(self.texts)]
        if bad:
            raise IndexError(f"text indices {bad} out of range: this reference holds {len(self.texts)} texts")
        return replace(self, texts=[self.texts[i] for i in texts], token_ids=[self.token_ids[i] for i in texts],
                       log_probs=[self.log_probs[i] for i in texts])


def hf_reference(hf: Any, tokenizer: Any, texts: Sequence[str], prompts: Sequence[str],
                 max_new_tokens: int = 32) -> HFReference:
    """Teacher-forced log-probabilities over ``texts`` and greedy continuations of ``prompts`` in transformers.

    ``hf`` is a loaded model (run on its own device) or a folder (loaded in fp32 on the CPU); prompts are raw text
    (render chat templates first) tokenized without special tokens added. Greedy continuations run exactly
    ``max_new_tokens`` (end of sequence suppressed, as ``min_new_tokens`` does), so the comparison covers the same
    number of tokens whatever the model says; ``check_parity`` masks the same ids in llama.cpp, else a model that
    ends its turn early would be compared with transformers' second choice.
    """
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32) if isinstance(hf, (str, Path)) \
        else hf
    model.eval()
    device = next(model.parameters()).device   # a model on a GPU runs there (Unsloth, once imported, needs it)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    pids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    lps, greedy, margins = [], [], []
    with torch.inference_mode():
        for row in ids:
            logits = model(torch.tensor([row], device=device)).logits[0].double().cpu()
            lps.append(torch.log_softmax(logits, -1).numpy().astype(np.float64))
        for row in pids:
            out = model.generate(torch.tensor([row], device=device),
                                 attention_mask=torch.ones(1, len(row), dtype=torch.long, device=device),
                                 do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, output_scores=True,
                                 return_dict_in_generate=True)
            greedy.append(out.sequences[0, len(row):].tolist())
            # scores: the processed logits of each step (end of sequence already at -inf, as llama.cpp's side masks)
            top2 = torch.stack([torch.log_softmax(s[0].double(), -1).topk(2).values for s in out.scores]).cpu()
            margins.append((top2[:, 0] - top2[:, 1]).tolist())
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    suppressed = sorted({int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None})
    return HFReference(list(texts), ids, lps, list(prompts), pids, greedy, max_new_tokens, suppressed, margins)


@dataclass
class ParityReport:
    """How closely a GGUF model reproduces transformers on the same inputs."""

    name: str
    tokenizer_match: int
    tokenizer_total: int
    top1_agreement: float
    mean_kl: float
    max_kl: float
    n_positions: int
    greedy_prefix: list[int]
    greedy_len: int
    size_mib: float = 0.0
    # Near-tie accounting (see ``split_disagreements``): the quantization's logit noise, and how many positions are
    # decisive (the reference's top-1 leads its top-2 by at least NEAR_TIE_SIGMAS times that noise).
    gap_noise: float = 0.0
    decisive: int = 0
    decisive_disagree: int = 0
    near_tie_disagree: int = 0
    # Greedy divergences (a prompt whose greedy tokens differ before max_new_tokens), split the same way: at the
    # first differing step, transformers' lead of its token over the runner-up (``HFReference.greedy_margins``)
    # compared with NEAR_TIE_SIGMAS x gap_noise. A near-tie there may go either way with the summation order.
    greedy_divergence_margins: list[float] = field(default_factory=list)
    greedy_decisive_divergences: int = 0

    @property
    def tokenizer_parity(self) -> float:
        """Share of texts tokenized identically by llama.cpp and transformers."""
        return self.tokenizer_match / max(self.tokenizer_total, 1)

    @property
    def decisive_share(self) -> float:
        """Share of positions where the reference's choice is clear of the noise (a broken model drives it to 0)."""
        return self.decisive / max(self.n_positions, 1)

    @property
    def decisive_agreement(self) -> float:
        """Top-1 agreement on the decisive positions alone: near-ties, which any CPU's kernels may flip, left out."""
        return 1.0 - self.decisive_disagree / max(self.decisive, 1)

    @property
    def greedy_agreement(self) -> float:
        """Mean share of greedy tokens equal to transformers' before the first difference."""
        return sum(self.greedy_prefix) / max(len(self.greedy_prefix) * self.greedy_len, 1)

    def row(self) -> dict[str, Any]:
        return {"model": self.name, "MiB": round(self.size_mib, 1),
                "tokenizer": f"{self.tokenizer_match}/{self.tokenizer_total}",
                "top-1 agree": f"{100 * self.top1_agreement:.1f}%", "mean KL": f"{self.mean_kl:.4f}",
                "max KL": f"{self.max_kl:.3f}", "noise": f"{self.gap_noise:.3f}",
                "decisive": f"{100 * self.decisive_share:.0f}% of {self.n_positions}",
                "disagree (decisive/near-tie)": f"{self.decisive_disagree}/{self.near_tie_disagree}",
                "greedy prefix": "/".join(str(p) for p in self.greedy_prefix) + f" of {self.greedy_len}",
                "greedy diverged (decisive)": f"{len(self.greedy_divergence_margins)} "
                                              f"({self.greedy_decisive_divergences})"}

    def __str__(self) -> str:
        return format_table([self.row()])


NEAR_TIE_SIGMAS = 4.0
"""A position is decisive when the reference's top-1 log-probability leads its top-2 by >= 4 sigma of the measured
noise of that gap. For Gaussian noise a flip there has probability 3e-5; the noise of llama.cpp's kernels has heavier
tails than that, so a check allows a few decisive flips per thousand (notebook 08), never a rate a broken file has."""


def _top2_gap(ref: Any, q: Any) -> tuple[Any, Any, Any]:
    """Per position: the reference's top-1 margin over its top-2, the quantized model's error on that gap, and
    whether the quantized model's top-1 differs from the reference's."""
    import numpy as np

    ref = np.asarray(ref, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    top2 = np.argpartition(-ref, 1, axis=-1)[:, :2]
    rows = np.arange(len(ref))
    first = np.where(ref[rows, top2[:, 0]] >= ref[rows, top2[:, 1]], top2[:, 0], top2[:, 1])
    second = np.where(first == top2[:, 0], top2[:, 1], top2[:, 0])
    margin = ref[rows, first] - ref[rows, second]
    return margin, (q[rows, first] - q[rows, second]) - margin, q.argmax(-1) != first


def split_disagreements(ref_logp: Any, logq: Any, sigmas: float = NEAR_TIE_SIGMAS) -> dict[str, float]:
    """Top-1 disagreements between a reference and a quantized model, split into near-ties and real ones.

    ``ref_logp`` and ``logq`` are (positions, vocab) log-probabilities, or lists of such arrays (one per text).
    Per position, ``a``/``b`` are the reference's top-1/top-2 tokens, ``margin = ref[a] - ref[b]`` and the quantized
    model's error on that gap is ``e = (logq[a] - logq[b]) - margin``. The noise is the RMS of ``e`` over positions:
    what quantization (and the CPU's kernels) do to the one gap that decides the top-1. A disagreement where
    ``margin < sigmas * noise`` is a near-tie (a coin toss that another CPU's summation order may call the other
    way); elsewhere it is real.

    Why it separates a correct file from a broken one on any CPU: top-1 agreement alone moves by a token or two of a
    ~100-token sample with the kernels (0.94 vs 0.92 for the same Q8_0 on two CPUs); real disagreements are rare on a
    correct file, and a broken file's noise is so large that few positions stay decisive (``decisive``).
    """

    pairs = list(zip(ref_logp, logq)) if isinstance(ref_logp, (list, tuple)) else [(ref_logp, logq)]
    return _summarise_gaps([_top2_gap(r, q) for r, q in pairs if len(r)], sigmas)


def _summarise_gaps(parts: list[tuple[Any, Any, Any]], sigmas: float = NEAR_TIE_SIGMAS) -> dict[str, float]:
    import numpy as np

    if not parts:
        return {"noise": 0.0, "positions": 0, "decisive": 0, "decisive_disagree": 0, "near_tie_disagree": 0,
                "agree": 0}
    margin, err, disagree = (np.concatenate(x) for x in zip(*parts))
    noise = float(np.sqrt(np.mean(err ** 2)))
    decisive = margin >= sigmas * noise
    return {"noise": noise, "positions": len(margin), "decisive": int(decisive.sum()),
            "decisive_disagree": int((disagree & decisive).sum()),
            "near_tie_disagree": int((disagree & ~decisive).sum()), "agree": int((~disagree).sum())}


def check_parity(hf_dir: Any, gguf_path: str | Path, texts: Sequence[str] = (), prompts: Sequence[str] = (),
                 tokenizer: Any = None, max_new_tokens: int = 32, n_threads: int | None = None,
                 reference: HFReference | None = None, name: str | None = None,
                 lora_path: str | Path | None = None) -> ParityReport:
    """Compare a GGUF model with its transformers source on the same texts and prompts.

    - tokenizer parity: llama.cpp's token ids equal transformers' for each text and prompt;
    - teacher-forced next-token agreement (top-1) and KL(transformers || llama.cpp), mean and max over positions;
    - greedy prefix: how many of ``max_new_tokens`` greedy tokens match before the first difference (both
      engines with the end-of-sequence ids masked, so both produce exactly ``max_new_tokens``); llama.cpp's side is
      ``forced_greedy``, its greedy choice at every step of transformers' continuation in one pass, which up to
      the first difference is what its own greedy decoding writes; where they differ, the reference's margin at
      that step says whether it was a near-tie (any kernel may call it the other way, and the rest of the
      continuation then follows another path) or a decisive divergence (a real difference).

    Pass ``reference`` (from ``hf_reference``) to reuse transformers' side for several files.
    """
    import numpy as np

    if reference is None:
        if tokenizer is None:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
        reference = hf_reference(hf_dir, tokenizer, texts, prompts, max_new_tokens)
    llm = load_gguf(gguf_path, n_ctx=512, n_threads=n_threads, logits_all=True, lora_path=lora_path)
    tok_ok = 0
    for text, want in zip(reference.texts + reference.prompts, reference.token_ids + reference.prompt_ids):
        tok_ok += llm.tokenize(text.encode(), add_bos=False, special=True) == want
    kls: list[float] = []
    gaps = []  # per text: (margin, error on the gap, disagreement), not the (tokens x vocab) arrays
    for row, ref in zip(reference.token_ids, reference.log_probs):
        llm.reset()
        llm.eval(row)
        logits = np.asarray(llm.scores[:len(row)], dtype=np.float64)
        logq = logits - logits.max(-1, keepdims=True)
        logq -= np.log(np.exp(logq).sum(-1, keepdims=True))
        kl = (np.exp(ref) * (ref - logq)).sum(-1)
        kls.extend(kl.tolist())
        gaps.append(_top2_gap(ref, logq))
    split = _summarise_gaps(gaps)
    agree, n = split["agree"], split["positions"]
    prefix, diverged = [], []
    for i, (pid, want) in enumerate(zip(reference.prompt_ids, reference.greedy_ids)):
        got = forced_greedy(llm, pid, want, suppress_ids=reference.suppressed_ids)
        k = 0
        while k < min(len(got), len(want)) and got[k] == want[k]:
            k += 1
        prefix.append(k)
        if k < min(len(got), len(want)):
            margins = reference.greedy_margins[i] if i < len(reference.greedy_margins) else []
            diverged.append(float(margins[k]) if k < len(margins) else math.inf)  # unknown margin: decisive
    del llm
    decisive_div = sum(m >= NEAR_TIE_SIGMAS * split["noise"] for m in diverged)
    return ParityReport(name or Path(gguf_path).name, tok_ok, len(reference.texts) + len(reference.prompts),
                        agree / max(n, 1), float(np.mean(kls)) if kls else math.nan,
                        float(np.max(kls)) if kls else math.nan, n, prefix, reference.max_new_tokens,
                        file_size_mib(gguf_path), split["noise"], split["decisive"], split["decisive_disagree"],
                        split["near_tie_disagree"], diverged, decisive_div)


def forced_greedy(llm: Any, prompt_ids: Sequence[int], continuation: Sequence[int],
                  suppress_ids: Sequence[int] = ()) -> list[int]:
    """llama.cpp's greedy choice (argmax, ``suppress_ids`` never chosen) at every step of a given continuation of
    ``prompt_ids``, from one teacher-forced pass over prompt + continuation (``llm`` built with ``logits_all=True``).

    Up to the first step where it differs from ``continuation``, both condition on the same tokens, so it is exactly
    the prefix llama.cpp's own greedy decoding (``gguf_greedy``) writes, in one batched evaluation instead of one
    evaluation per token (notebook 08: ~1 s instead of ~5 s a file for three prompts of 32 tokens). The batched and
    the one-token kernels sum in different orders, which can only move a near-tie, and near-ties are told apart.
    """
    import numpy as np

    n = len(continuation)
    if n == 0:
        return []
    llm.reset()
    llm.eval(list(prompt_ids) + list(continuation)[:-1])
    start = len(prompt_ids) - 1                     # the logits after the prompt's last token predict step 0
    logits = np.array(llm.scores[start:start + n], dtype=np.float64)
    if suppress_ids:
        logits[:, list(suppress_ids)] = -np.inf
    return logits.argmax(-1).tolist()


# ------------------------------------------------------------------------------------------------- speed
def _decode_rate(run: Callable[[int], int], n_tokens: int, repeats: int) -> float:
    """New tokens per second of ``run(n)`` (which decodes n tokens and returns how many it made) after prefill.

    The time of a 1-token run (prefill + first token) is subtracted from an ``n_tokens`` run; each is the best of
    ``repeats`` runs, so a burst of load from other processes on a shared CPU does not decide the number.
    """
    run(2)  # warm-up
    best = 0.0
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        run(1)
        t1 = time.perf_counter()
        made = run(n_tokens)
        t2 = time.perf_counter()
        t_one, t_n = t1 - t0, t2 - t1
        # Subtract the prefill only when the pair is consistent: on a loaded CPU the 1-token run can take longer
        # than the n-token run, and the difference would be ~0 (an absurd rate). Then count the whole run.
        decode = t_n - t_one if t_n - t_one > 0.25 * t_n else t_n
        best = max(best, (made - 1) / decode)
    return best


def hf_tokens_per_second(model: Any, tokenizer: Any, prompt: str, n_tokens: int = 64, repeats: int = 3) -> float:
    """transformers' greedy decoding speed (batch 1): new tokens per second after the prompt's prefill."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    kw = {"do_sample": False, "pad_token_id": tokenizer.pad_token_id}

    def run(n: int) -> int:
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=n, min_new_tokens=n, **kw)
        return out.shape[1] - ids["input_ids"].shape[1]

    return _decode_rate(run, n_tokens, repeats)


def gguf_tokens_per_second(gguf_path: str | Path, prompt_ids: Sequence[int], n_tokens: int = 64,
                           n_threads: int | None = None, repeats: int = 3) -> float:
    """llama.cpp's greedy decoding speed (batch 1): new tokens per second after the prompt's prefill."""
    llm = load_gguf(gguf_path, n_threads=n_threads)
    return _decode_rate(lambda n: len(gguf_greedy(llm, prompt_ids, n)), n_tokens, repeats)
