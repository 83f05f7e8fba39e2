"""Parity of a GGUF file with transformers (issue 12): the f32 file agrees with its source, a reference that is not
this model's is detected, disagreements are split into near-ties and real ones, and the decode-rate arithmetic stays
sane on a loaded CPU."""
import pytest

from lora_course import parity
from lora_course.parity import check_parity, hf_reference

PARITY_TEXTS = [
    "def add(a, b):\n    return a + b  # 3 + 4 == 7\n",
    "Convert 12.5 km to m: {\"value\": 12500, \"unit\": \"m\"}",
    "Ünïcödé — naïve café, 東京 and emoji ✓",
    "<|im_start|>user\nWrite a poem about the sea.<|im_end|>\n<|im_start|>assistant\nThe",
]
PARITY_PROMPTS = ["<|im_start|>user\nConvert 3 km to m.<|im_end|>\n<|im_start|>assistant\n"]


# -------------------------------------------------------------------------------------------------- agreement
def test_check_parity_of_the_f32_gguf(tiny_dir, tiny_gguf, tiny_tok):
    report = check_parity(tiny_dir, tiny_gguf, PARITY_TEXTS, PARITY_PROMPTS, tokenizer=tiny_tok, max_new_tokens=16,
                          n_threads=1)
    assert report.tokenizer_parity == 1.0, report
    assert report.n_positions == sum(len(tiny_tok(t, add_special_tokens=False)["input_ids"]) for t in PARITY_TEXTS)
    assert report.top1_agreement >= 0.99 and report.mean_kl < 1e-4, report
    assert report.greedy_prefix == [16] and report.greedy_agreement == 1.0
    assert report.greedy_divergence_margins == [] and report.greedy_decisive_divergences == 0
    table = str(report)
    assert "top-1 agree" in table and "tiny-f32.gguf" in table and "5/5" in table  # 4 texts + 1 prompt


def test_check_parity_detects_a_different_model(tiny_dir, tiny_gguf, tiny_tok):
    """Against a reference that is not this model's (log-probabilities of another position, other greedy tokens)
    the report must show disagreement: the comparison is not vacuous."""
    import numpy as np

    ref = hf_reference(tiny_dir, tiny_tok, PARITY_TEXTS[:2], PARITY_PROMPTS, max_new_tokens=8)
    ref.log_probs = [np.roll(lp, 1, axis=-1) for lp in ref.log_probs]
    ref.greedy_ids = [[(t + 1) % len(tiny_tok) for t in ids] for ids in ref.greedy_ids]
    report = check_parity(tiny_dir, tiny_gguf, reference=ref, n_threads=1)
    assert report.tokenizer_parity == 1.0
    assert report.top1_agreement < 0.2 and report.mean_kl > 0.01, report
    assert report.greedy_prefix == [0]


def test_greedy_divergence_is_split_by_the_references_margin(tiny_dir, tiny_gguf, tiny_tok):
    """A greedy continuation that leaves transformers' path is a near-tie when transformers' own lead at that step is
    within the noise, and a decisive divergence when it is not: the same file, two references that differ only in
    the recorded margin at the step where their tokens were changed."""
    ref = hf_reference(tiny_dir, tiny_tok, PARITY_TEXTS[:2], PARITY_PROMPTS, max_new_tokens=8)
    assert len(ref.greedy_margins) == 1 and len(ref.greedy_margins[0]) == 8
    assert all(m >= 0 for m in ref.greedy_margins[0])
    ref.greedy_ids = [ids[:3] + [(t + 1) % len(tiny_tok) for t in ids[3:]] for ids in ref.greedy_ids]
    ref.greedy_margins = [m[:3] + [1e-12] + m[4:] for m in ref.greedy_margins]   # a tie at the changed step
    tie = check_parity(tiny_dir, tiny_gguf, reference=ref, n_threads=1)
    assert tie.greedy_prefix == [3] and tie.greedy_divergence_margins == [1e-12], tie
    assert tie.greedy_decisive_divergences == 0, tie
    ref.greedy_margins = [m[:3] + [5.0] + m[4:] for m in ref.greedy_margins]      # a clear lead at that step
    clear = check_parity(tiny_dir, tiny_gguf, reference=ref, n_threads=1)
    assert clear.greedy_prefix == [3] and clear.greedy_decisive_divergences == 1, clear
    assert "1 (1)" in str(clear)


def test_split_disagreements_tells_near_ties_from_real_ones():
    import numpy as np

    from lora_course.parity import split_disagreements

    rng = np.random.default_rng(0)
    n, v = 400, 50
    logits = rng.normal(0, 3, (n, v))
    logits[: n // 10, 1] = logits[: n // 10].max(-1) - 0.01  # 40 near-ties: top-2 within 0.01 of the top-1
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    noisy = ref + rng.normal(0, 0.02, ref.shape)  # a correct 8-bit file: small noise
    good = split_disagreements(ref, noisy)
    assert good["positions"] == n and 0.005 < good["noise"] < 0.1, good
    assert good["decisive_disagree"] == 0 and good["near_tie_disagree"] <= n // 10, good
    assert good["decisive"] >= 0.8 * n, good
    broken = split_disagreements(ref, ref + rng.normal(0, 3.0, ref.shape))  # a broken file: noise as large as logits
    assert broken["decisive"] < 0.3 * n, broken  # its own noise leaves few decisive positions
    assert broken["agree"] < good["agree"]
    wrong = split_disagreements(ref, np.roll(ref, 1, axis=-1))  # every position scored against another token
    assert wrong["agree"] < 0.1 * n and wrong["decisive"] < 0.5 * n


# ------------------------------------------------------------------------------------------------------ speed
class _FakeClock:
    """A clock the decode runs advance by a chosen amount: the rate arithmetic checked without timing anything, so
    a loaded CI machine cannot move it (a sleep-based version failed its window under load)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_decode_rate_stays_sane_when_a_loaded_cpu_makes_the_prefill_run_slower(monkeypatch):
    from lora_course.parity import _decode_rate

    clock = _FakeClock()
    monkeypatch.setattr(parity.time, "perf_counter", clock.perf_counter)
    calls = []

    def run(n: int) -> int:  # the 1-token runs are slowed down, as by another process on the same core
        calls.append(n)
        clock.now += 0.03 if n == 1 else 0.002 * n
        return n

    rate = _decode_rate(run, 10, repeats=2)
    assert rate == pytest.approx(9 / 0.02), rate  # the n-token run counted whole (never ~1e9 from a ~0 difference)
    assert calls.count(10) == 2

    def steady(n: int) -> int:  # prefill 20 ms, then 5 ms a token: the decode rate is 200 tokens/s
        clock.now += 0.02 + 0.005 * n
        return n

    assert _decode_rate(steady, 20, repeats=2) == pytest.approx(19 / (0.005 * 19))

    spikes = iter([0.0, 0.5])  # warm-up, then a burst of load in the first repeat: the best repeat counts

    def bursty(n: int) -> int:
        clock.now += 0.02 + 0.005 * n + next(spikes, 0.0)
        return n

    assert _decode_rate(bursty, 20, repeats=2) == pytest.approx(200.0)


def test_forced_greedy_is_what_greedy_decoding_writes(tiny_gguf, tiny_tok):
    """forced_greedy (one teacher-forced pass over a given continuation) picks, at every step up to the first
    difference, the token llama.cpp's own greedy decoding writes; given that decoding's own tokens it agrees at every
    step, given another continuation it differs where that one does; suppressed ids are never chosen."""
    from lora_course.llama_runtime import gguf_greedy, load_gguf

    llm = load_gguf(tiny_gguf, n_threads=1, logits_all=True)
    ids = tiny_tok(PARITY_PROMPTS[0], add_special_tokens=False)["input_ids"]
    decoded = gguf_greedy(llm, ids, 12)
    assert parity.forced_greedy(llm, ids, decoded) == decoded
    other = decoded[:5] + [(t + 1) % len(tiny_tok) for t in decoded[5:]]
    forced = parity.forced_greedy(llm, ids, other)
    assert forced[:6] == decoded[:6] and forced[5] != other[5]
    banned = parity.forced_greedy(llm, ids, decoded, suppress_ids=[decoded[0]])
    # the same tokens fed: a step changes only where its choice was the suppressed id
    assert decoded[0] not in banned
    assert all(b == d for b, d in zip(banned, decoded) if d != decoded[0]) and banned[0] != decoded[0]
    assert parity.forced_greedy(llm, ids, []) == []


def test_a_reference_restricted_to_some_texts(tiny_dir, tiny_gguf, tiny_tok):
    ref = hf_reference(tiny_dir, tiny_tok, PARITY_TEXTS, PARITY_PROMPTS, max_new_tokens=4)
    part = ref.select([1, 3])
    assert part.texts == [PARITY_TEXTS[1], PARITY_TEXTS[3]] and part.token_ids == [ref.token_ids[1], ref.token_ids[3]]
    assert part.log_probs[0] is ref.log_probs[1] and part.prompts == ref.prompts and part.greedy_ids == ref.greedy_ids
    report = check_parity(tiny_dir, tiny_gguf, reference=part, n_threads=1)
    assert report.n_positions == len(ref.token_ids[1]) + len(ref.token_ids[3]) and report.tokenizer_total == 3
    with pytest.raises(IndexError, match="out of range"):
        ref.select([4])
