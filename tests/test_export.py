"""GGUF export (issue 12): clear errors for each bad input and no partial file after a failed export; the real
path on the tiny model (llama.cpp's converter, parity with transformers, Q8_0 / Q4_K_M reports); the Ollama
Modelfile and the Go-template renderer checked against the course's Jinja chat template."""
import json
import os
import shutil
from pathlib import Path

import pytest

from lora_course import export, modelfile
from lora_course.export import (
    ExportError,
    OutputExistsError,
    TokenizerError,
    UnknownQuantizationError,
    UnsupportedArchitectureError,
    check_parity,
    check_tokenizer_files,
    gguf_tensor_stats,
    gguf_tokenizer_summary,
    hf_reference,
    quantize,
    to_gguf,
)
from lora_course.modelfile import (
    DEFAULT_CONVERSATIONS,
    check_modelfile,
    go_template,
    parse_modelfile,
    render_go_template,
    write_modelfile,
)
from lora_course.models import tiny_model_dir

PARITY_TEXTS = [
    "def add(a, b):\n    return a + b  # 3 + 4 == 7\n",
    "Convert 12.5 km to m: {\"value\": 12500, \"unit\": \"m\"}",
    "Ünïcödé — naïve café, 東京 and emoji ✓",
    "<|im_start|>user\nWrite a poem about the sea.<|im_end|>\n<|im_start|>assistant\nThe",
]
PARITY_PROMPTS = ["<|im_start|>user\nConvert 3 km to m.<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def tiny_dir():
    return tiny_model_dir()


@pytest.fixture(scope="module")
def tiny_tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_dir, tmp_path_factory):
    """The tiny model converted once by llama.cpp's own converter (f32: the exact baseline)."""
    return to_gguf(tiny_dir, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", outtype="f32")


def _model_copy(src: Path, dst: Path, skip=(), config=None) -> Path:
    """A copy of a model folder without the files in ``skip`` (weights linked, not copied)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name in skip or f.name == "COMPLETE.json":
            continue
        if f.suffix == ".safetensors":
            os.symlink(f, dst / f.name)
        else:
            shutil.copy(f, dst / f.name)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _leftovers(folder: Path, name: str) -> list[str]:
    """Temporary siblings an export of ``name`` may have left behind."""
    return [p.name for p in folder.iterdir() if p.name.startswith(f".{name}.")]


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("arch", [["XLNetLMHeadModel"], ["MyToyForCausalLM"], None])
def test_unsupported_architecture_is_refused_before_converting(tiny_dir, tmp_path, arch):
    model = _model_copy(tiny_dir, tmp_path / "model", config={"architectures": arch})
    out = tmp_path / "out.gguf"
    with pytest.raises(UnsupportedArchitectureError, match="not supported by llama.cpp's convert_hf_to_gguf"):
        to_gguf(model, out)
    assert not out.exists() and not _leftovers(tmp_path, out.name)


def test_supported_architectures_are_read_from_the_converter():
    archs = export.supported_architectures()
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"} <= archs
    assert "XLNetLMHeadModel" not in archs and len(archs) > 50


@pytest.mark.parametrize("skip, match", [
    (("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"), "has no tokenizer"),
    (("tokenizer_config.json",), "has no tokenizer_config.json"),
])
def test_missing_tokenizer_files_are_refused(tiny_dir, tmp_path, skip, match):
    model = _model_copy(tiny_dir, tmp_path / "model", skip=skip)
    out = tmp_path / "out.gguf"
    with pytest.raises(TokenizerError, match=match) as err:
        to_gguf(model, out)
    assert "save_pretrained" in str(err.value)  # the fix
    assert not out.exists() and not _leftovers(tmp_path, out.name)


def test_tokenizer_llama_cpp_cannot_load_is_refused(tiny_dir, tmp_path):
    """Byte-level BPE dressed as byte-fallback BPE (transformers' GGUF loader) converts to a vocabulary without
    byte tokens that makes llama.cpp abort on load: refused with the reason, before the converter runs."""
    assert check_tokenizer_files(tiny_dir) == "gpt2"
    model = _model_copy(tiny_dir, tmp_path / "model")
    tj = json.loads((model / "tokenizer.json").read_text())
    tj["model"]["byte_fallback"] = True
    tj["decoder"] = {"type": "Sequence", "decoders": [{"type": "Fuse"}]}
    (model / "tokenizer.json").write_text(json.dumps(tj))
    out = tmp_path / "out.gguf"
    with pytest.raises(TokenizerError, match=r"std::out_of_range") as err:
        to_gguf(model, out)
    assert "256 of 256 missing" in str(err.value)
    assert not out.exists()
    # with the byte tokens present the same form is loadable (SentencePiece-style BPE such as Llama 2's)
    tj["model"]["vocab"].update({f"<0x{b:02X}>": len(tj["model"]["vocab"]) + b for b in range(256)})
    (model / "tokenizer.json").write_text(json.dumps(tj))
    assert check_tokenizer_files(model) == "llama-bpe-fallback"


def test_existing_output_is_refused_unless_overwrite(tiny_dir, tiny_gguf, tiny_tok, tmp_path):
    out = tmp_path / "exists.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        to_gguf(tiny_dir, out)
    with pytest.raises(FileExistsError):  # OutputExistsError is also a FileExistsError
        quantize(tiny_gguf, out, "Q8_0")
    with pytest.raises(OutputExistsError):
        write_modelfile(tiny_gguf, tiny_tok, out)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(OutputExistsError):
        export.lora_to_gguf(adapter, tiny_dir, out)
    assert out.read_bytes() == b"keep me"
    report = quantize(tiny_gguf, out, "Q8_0", overwrite=True)
    assert report.path == out and out.read_bytes()[:4] == b"GGUF"
    assert not _leftovers(tmp_path, out.name)


def test_merge_refuses_bad_input(tiny_dir, tmp_path):
    with pytest.raises(ExportError, match="adapter_config.json"):
        export.merge_adapter(tiny_dir, tmp_path, tmp_path / "merged")
    (tmp_path / "merged").mkdir()
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(OutputExistsError):
        export.merge_adapter(tiny_dir, tmp_path, tmp_path / "merged")


@pytest.mark.parametrize("name", ["Q3_X", "q4_k_xl", "int4", ""])
def test_unknown_quantization_is_refused(tiny_gguf, tmp_path, name):
    out = tmp_path / "q.gguf"
    with pytest.raises(UnknownQuantizationError, match="unknown quantization") as err:
        quantize(tiny_gguf, out, name)
    assert "Q4_K_M" in str(err.value) and "Q8_0" in str(err.value)  # lists the names that exist
    assert not out.exists()


def test_unknown_converter_outtype_is_refused(tiny_dir, tmp_path):
    with pytest.raises(UnknownQuantizationError, match="use quantize"):
        to_gguf(tiny_dir, tmp_path / "x.gguf", outtype="q4_k_m")
    assert not (tmp_path / "x.gguf").exists()


def test_quantization_names_are_llama_cpps():
    import llama_cpp

    types = export.quantization_types()
    assert types["Q8_0"] == llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0 and types["Q4_K_M"] == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert {"F32", "F16", "BF16", "Q6_K", "Q4_0"} <= set(types)


# ------------------------------------------------------------------------------------ no partial file
def test_failed_conversion_leaves_no_partial_file(tiny_dir, tmp_path):
    """The converter itself fails (corrupt weights): nothing at the destination, an old file kept intact."""
    model = _model_copy(tiny_dir, tmp_path / "model", skip=("model.safetensors",))
    real = (tiny_dir / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(real[:8] + b"{not json" + real[17:4096])
    out = tmp_path / "out.gguf"
    with pytest.raises(ExportError, match="convert_hf_to_gguf.py on .* failed"):
        to_gguf(model, out, outtype="f32")
    assert not out.exists() and not _leftovers(tmp_path, out.name)
    out.write_bytes(b"previous export")
    with pytest.raises(ExportError, match="failed"):
        to_gguf(model, out, outtype="f32", overwrite=True)
    assert out.read_bytes() == b"previous export" and not _leftovers(tmp_path, out.name)


def test_failed_quantization_leaves_no_partial_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    out = tmp_path / "bad-Q8_0.gguf"
    with pytest.raises(ExportError, match="llama_model_quantize.*failed"):
        quantize(bad, out, "Q8_0")
    assert not out.exists() and not _leftovers(tmp_path, out.name)
    with pytest.raises(ExportError, match="to_gguf first"):
        quantize(tmp_path / "missing.gguf", out, "Q8_0")


def test_atomic_path_removes_the_temporary_file_on_error(tmp_path):
    out = tmp_path / "f.bin"
    with pytest.raises(RuntimeError, match="boom"), export._atomic_path(out) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- real conversion
def test_to_gguf_stores_a_tokenizer_llama_cpp_loads(tiny_gguf, tiny_tok):
    summary = gguf_tokenizer_summary(tiny_gguf)
    assert summary["model"] == "gpt2" and summary["pre"] == "smollm"
    assert summary["n_vocab"] == len(tiny_tok) and summary["eos"] == tiny_tok.eos_token_id == 2
    assert summary["chat_template"]


def test_check_parity_of_the_f32_gguf(tiny_dir, tiny_gguf, tiny_tok):
    report = check_parity(tiny_dir, tiny_gguf, PARITY_TEXTS, PARITY_PROMPTS, tokenizer=tiny_tok, max_new_tokens=16,
                          n_threads=1)
    assert report.tokenizer_parity == 1.0, report
    assert report.n_positions == sum(len(tiny_tok(t, add_special_tokens=False)["input_ids"]) for t in PARITY_TEXTS)
    assert report.top1_agreement >= 0.99 and report.mean_kl < 1e-4, report
    assert report.greedy_prefix == [16] and report.greedy_agreement == 1.0
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


def test_quantize_q8_0_reports_the_tensors_kept_in_another_type(tiny_gguf, tmp_path):
    _, _, f32_rows = gguf_tensor_stats(tiny_gguf)
    report = quantize(tiny_gguf, tmp_path / "tiny-Q8_0.gguf", "q8_0", nthread=1)
    assert report.qtype == "Q8_0" and report.n_tensors == len(f32_rows) == 20
    _, _, rows = gguf_tensor_stats(report.path)
    stored = {name: t for name, _, t in rows}
    norms = {name for name, shape, _ in f32_rows if len(shape) == 1}
    assert {t.name for t in report.other_types} == norms and len(norms) == 5  # 2 layers x 2 norms + output norm
    assert all(t.stored == stored[t.name] == "F32" and "1-D" in t.reason for t in report.other_types)
    assert all(t == "Q8_0" for n, t in stored.items() if n not in norms)
    assert 8.4 < report.bits_per_weight < 8.6  # 34 bytes per block of 32, norms negligible
    # tensor bytes 8.5/32 of f32's (the file also holds the 49k-token vocabulary, large next to 3M weights)
    assert gguf_tensor_stats(report.path)[1] / gguf_tensor_stats(tiny_gguf)[1] == pytest.approx(8.5 / 32, abs=0.01)
    assert report.size_mib < export.file_size_mib(tiny_gguf) / 2
    assert "5 of 20 tensors in another type" in str(report)


def test_quantize_k_quant_reports_fallbacks_for_narrow_rows(tiny_gguf, tmp_path):
    """Rows of 64 or 128 are not a multiple of the k-quants' 256: every 2-D tensor falls back, and says why."""
    report = quantize(tiny_gguf, tmp_path / "tiny-Q4_K_M.gguf", "Q4_K_M", nthread=1)
    matrices = [t for t in report.other_types if len(t.shape) == 2]
    assert len(report.other_types) == report.n_tensors == 20 and len(matrices) == 15
    assert all("not a multiple of Q4_K's block of 256" in t.reason for t in matrices)
    assert set(report.type_counts()) <= {"F32", "Q5_0", "Q8_0", "Q6_K"}


# ------------------------------------------------------------------------------------------ Modelfile
def test_write_modelfile_agrees_with_the_jinja_template(tiny_gguf, tiny_tok, tmp_path):
    modelfile = write_modelfile(tiny_gguf, tiny_tok, tmp_path / "Modelfile", parameters={"temperature": 0})
    spec = parse_modelfile(modelfile.read_text())
    assert spec["FROM"] == str(tiny_gguf.resolve())  # not next to the Modelfile: absolute
    assert ("stop", "<|im_end|>") in spec["PARAMETER"] and ("temperature", "0") in spec["PARAMETER"]
    check = check_modelfile(modelfile, tiny_tok)
    assert check.ok and not check.missing_stops, check
    assert len(check.results) == len(DEFAULT_CONVERSATIONS)
    # next to the GGUF the path is relative, and a SYSTEM line is rendered like a system message
    local = write_modelfile(tiny_gguf, tiny_tok, tiny_gguf.parent / "Modelfile", system="Answer briefly.")
    spec = parse_modelfile(local.read_text())
    assert spec["FROM"] == f"./{tiny_gguf.name}" and spec["SYSTEM"] == "Answer briefly."
    check = check_modelfile(local, tiny_tok)
    assert check.ok, check
    assert all("Answer briefly." in go for conv, go, _ in check.results if conv[0]["role"] != "system")
    local.unlink()


def test_write_modelfile_with_an_adapter_line_and_a_clear_error_for_missing_files(tiny_gguf, tiny_tok, tmp_path):
    adapter = tiny_gguf.parent / "adapter-test.gguf"
    adapter.write_bytes(b"GGUF")  # only its path goes into the Modelfile
    try:
        out = write_modelfile(tiny_gguf, tiny_tok, tiny_gguf.parent / "Modelfile.adapter", adapter=adapter)
        spec = parse_modelfile(out.read_text())
        assert spec["FROM"] == f"./{tiny_gguf.name}" and spec["ADAPTER"] == "./adapter-test.gguf"
        assert check_modelfile(out, tiny_tok).ok
        out.unlink()
    finally:
        adapter.unlink()
    with pytest.raises(ExportError, match="adapter GGUF .* does not exist: write it first"):
        write_modelfile(tiny_gguf, tiny_tok, tmp_path / "Modelfile", adapter=tmp_path / "nope.gguf")
    assert not (tmp_path / "Modelfile").exists()


def test_check_modelfile_catches_a_wrong_template_or_missing_stop(tiny_gguf, tiny_tok, tmp_path):
    text = write_modelfile(tiny_gguf, tiny_tok, tmp_path / "Modelfile").read_text()
    wrong = text.replace("{{ .Content }}<|im_end|>\n", "{{ .Content }}<|im_end|>")
    assert wrong != text
    check = check_modelfile(wrong, tiny_tok)
    assert not check.ok and not all(go == jinja for _, go, jinja in check.results)
    no_stop = "\n".join(line for line in text.splitlines() if not line.startswith("PARAMETER stop"))
    check = check_modelfile(no_stop, tiny_tok)
    assert not check.ok and check.missing_stops == ["<|im_end|>"]
    with pytest.raises(ExportError, match="no TEMPLATE"):
        check_modelfile("FROM ./x.gguf\nPARAMETER stop x\n", tiny_tok)


def test_unsupported_chat_template_is_refused(tiny_gguf, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                         "{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    with pytest.raises(ExportError, match="unsupported chat template"):
        write_modelfile(tiny_gguf, tok, tmp_path / "Modelfile")
    tok.chat_template = None
    with pytest.raises(ExportError, match="no chat template"):
        write_modelfile(tiny_gguf, tok, tmp_path / "Modelfile")
    assert not (tmp_path / "Modelfile").exists()


# ------------------------------------------------------------------------------- Go-template renderer
def test_go_template_renders_the_course_chat_template(cpu_tokenizer):
    """The Go template derived from SmolLM2's chat template renders every conversation like the Jinja one,
    including its default system prompt when the conversation has none."""
    template = go_template(cpu_tokenizer)
    assert "You are a helpful AI assistant named SmolLM" in template
    conversations = DEFAULT_CONVERSATIONS + [
        [{"role": "user", "content": "  spaces  \n\n and a tab\t"}],
        [{"role": "system", "content": ""}, {"role": "user", "content": "empty system"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
         {"role": "assistant", "content": "d"}, {"role": "user", "content": "{{ .Content }} is text here"}],
    ]
    for conv in conversations:
        jinja = cpu_tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert render_go_template(template, conv) == jinja, conv
    # an empty conversation renders the default system prompt, as Go's short-circuit `or` allows
    assert render_go_template(template, []).startswith("<|im_start|>system\nYou are a helpful")


MSGS = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]


@pytest.mark.parametrize("template, expected", [
    ("{{ range .Messages }}{{ .Role }}:{{ .Content }};{{ end }}", "system:S;user:U1;assistant:A1;user:U2;"),
    ("{{ range $i, $m := .Messages }}{{ $i }}={{ $m.Role }} {{ end }}", "0=system 1=user 2=assistant 3=user "),
    ("{{ range .Messages }}{{ if eq .Role \"user\" }}[{{ .Content }}]{{ else }}-{{ end }}{{ end }}", "-[U1]-[U2]"),
    ("{{ range .Messages }}{{ if ne .Role \"system\" }}{{ $.System }}{{ end }}{{ end }}", "XXX"),
    ("{{ len .Messages }} {{ (index .Messages 1).Content }} {{ index .Messages 3 \"Content\" }}", "4 U1 U2"),
    ("a  {{- \" b \" -}}  \n c", "a b c"),
    ("{{ if and .Messages (not .Missing) }}yes{{ end }}{{ or \"\" 0 \"z\" }}", "yesz"),
    ("{{ range .Empty }}x{{ else }}none{{ end }}", "none"),
])
def test_go_template_renderer(template, expected):
    msgs = [{"Role": m["role"], "Content": m["content"]} for m in MSGS]
    data = {"Messages": msgs, "System": "X", "Empty": [], "Missing": None}
    out: list[str] = []
    modelfile._go_exec(modelfile._go_parse(template), data, {"$": data}, out)
    assert "".join(out) == expected


def test_go_template_renderer_rejects_malformed_templates():
    with pytest.raises(ExportError, match="has no"):
        render_go_template("{{ range .Messages }}x", MSGS)
    with pytest.raises(ExportError, match="unexpected"):
        render_go_template("x{{ end }}", MSGS)
    with pytest.raises(ExportError, match="cannot parse|unsupported"):
        render_go_template("{{ .Role | printf }}", MSGS)


# ------------------------------------------------------------------------------------ GGUF internals
def test_gguf_header_reader_agrees_with_gguf_py(tiny_gguf, tmp_path):
    from gguf import GGUFReader

    reader = GGUFReader(str(tiny_gguf))
    meta, tensors = export.read_gguf_header(tiny_gguf, decode=("tokenizer.ggml.tokens",))
    assert tensors == [(t.name, tuple(int(x) for x in t.shape), int(t.tensor_type)) for t in reader.tensors]
    assert meta["tokenizer.ggml.tokens"] == reader.fields["tokenizer.ggml.tokens"].contents()
    assert meta["tokenizer.ggml.merges"] == len(reader.fields["tokenizer.ggml.merges"].contents())  # not decoded
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
    n_el, n_bytes, _ = gguf_tensor_stats(tiny_gguf)
    assert (n_el, n_bytes) == (sum(int(t.n_elements) for t in reader.tensors),
                               sum(int(t.n_bytes) for t in reader.tensors))
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ExportError, match="not a GGUF file"):
        export.read_gguf_header(tmp_path / "x.gguf")


def test_gguf_greedy_never_picks_suppressed_ids(tiny_gguf, tiny_tok):
    llm = export.load_gguf(tiny_gguf, n_threads=1)
    ids = tiny_tok("The sea", add_special_tokens=False)["input_ids"]
    free = export.gguf_greedy(llm, ids, 8)
    assert len(free) == 8 and free == export.gguf_greedy(llm, ids, 8)  # deterministic
    banned = export.gguf_greedy(llm, ids, 8, suppress_ids=[free[0]])
    assert len(banned) == 8 and free[0] not in banned


class _FakeClock:
    """A clock the decode runs advance by a chosen amount: the rate arithmetic checked without timing anything, so
    a loaded CI machine cannot move it (a sleep-based version failed its window under load)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_decode_rate_stays_sane_when_a_loaded_cpu_makes_the_prefill_run_slower(monkeypatch):
    from lora_course.export import _decode_rate

    clock = _FakeClock()
    monkeypatch.setattr(export.time, "perf_counter", clock.perf_counter)
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


def test_split_disagreements_tells_near_ties_from_real_ones():
    import numpy as np

    from lora_course.export import split_disagreements

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


def test_a_hub_id_is_resolved_to_its_cached_snapshot_for_the_converters(tiny_dir, tmp_path, monkeypatch):
    """Colab's profiles load a hub id: the converters need files, so the id resolves to the hub cache's snapshot
    (what from_pretrained downloaded); offline with nothing cached it is a clear error, not 'no config.json'."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    assert export.local_model_folder(tiny_dir) == tiny_dir
    with pytest.raises(ExportError, match=r"'someone/some-model'.*load it once with from_pretrained"):
        export.local_model_folder("someone/some-model")
    with pytest.raises(ExportError, match="neither a local model folder nor a hub id"):
        export.local_model_folder(tmp_path / "missing" / "folder")
    # the hub cache's layout: refs/main names the commit, snapshots/<commit>/ holds the files
    repo = tmp_path / "hub" / "models--someone--some-model"
    snap = repo / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_dir, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert export.local_model_folder("someone/some-model") == snap
    out = to_gguf("someone/some-model", tmp_path / "hub-id-f32.gguf", outtype="f32")
    assert gguf_tokenizer_summary(out) == gguf_tokenizer_summary(to_gguf(tiny_dir, tmp_path / "dir.gguf", "f32"))


def test_served_model_answers_within_max_tokens_and_stops_with_the_block(tiny_gguf):
    """export.serve + chat_completion: the OpenAI-compatible server answers a chat completion within max_tokens on
    localhost, and is gone once the block ends (the port closed, a request refused)."""
    import socket
    import urllib.error

    from lora_course.export import chat_completion, serve

    messages = [{"role": "user", "content": "Convert 3 km to m."}]
    with serve(tiny_gguf, n_threads=1, n_ctx=256) as url:
        assert url.startswith("http://127.0.0.1:")
        port = int(url.rsplit(":", 1)[1])
        reply = chat_completion(url, messages, max_tokens=8)
        choice = reply["choices"][0]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length") and 0 < reply["usage"]["completion_tokens"] <= 8
        assert reply["usage"]["prompt_tokens"] > len(messages[0]["content"].split())  # the template was applied
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the server still listens after the with block"
    with pytest.raises(urllib.error.URLError):
        chat_completion(url, messages, timeout=2)


def test_evaluate_gguf_scores_the_files_own_greedy_replies(tiny_gguf, tiny_tok):
    from lora_course.data import load_task, prompt_messages
    from lora_course.evaluate import MAX_NEW_TOKENS, score
    from lora_course.export import evaluate_gguf, gguf_chat, load_gguf

    examples = load_task("technical", "eval")[:2]
    llm = load_gguf(tiny_gguf)
    result = evaluate_gguf(tiny_gguf, tiny_tok, "technical", examples, llm=llm)
    replies = gguf_chat(llm, tiny_tok, [prompt_messages(ex) for ex in examples], MAX_NEW_TOKENS["technical"])
    assert result.outputs == replies and result.task == "technical" and result.perplexity is None
    assert result.metrics == score("technical", replies, examples)


# ----------------------------------------------------------------------- the literal command lines (issue 24)
def _outfile(cmd: list[str]) -> Path:
    return Path(cmd[cmd.index("--outfile") + 1])


def test_to_gguf_runs_exactly_convert_command(tiny_dir, tmp_path, monkeypatch):
    """The command notebook 08 prints is the one to_gguf runs (one source of truth), with a temporary --outfile."""
    seen = []
    monkeypatch.setattr(export, "_run_converter", lambda cmd, conv, what, timeout: seen.append(cmd))
    out = tmp_path / "x.gguf"
    with pytest.raises(ExportError, match="wrote no file"):  # nothing ran: the converter was replaced
        to_gguf(tiny_dir, out, outtype="f16")
    (cmd,) = seen
    tmp = _outfile(cmd)
    assert tmp.parent == out.parent and tmp != out  # a temporary sibling, renamed when complete
    assert cmd == export.convert_command(export.local_model_folder(tiny_dir), tmp, "f16")
    assert Path(cmd[1]).name == "convert_hf_to_gguf.py" and cmd[2] == str(tiny_dir) and cmd[-2:] == ["--outtype", "f16"]
    with pytest.raises(UnknownQuantizationError, match="use quantize"):
        export.convert_command(tiny_dir, out, "q4_k_m")


def test_lora_to_gguf_runs_exactly_lora_convert_command(tiny_dir, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(export, "_run_converter", lambda cmd, conv, what, timeout: seen.append(cmd))
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ExportError, match="wrote no file"):
        export.lora_to_gguf(tmp_path, tiny_dir, tmp_path / "a.gguf")
    (cmd,) = seen
    assert cmd == export.lora_convert_command(tmp_path, export.local_model_folder(tiny_dir), _outfile(cmd), "f32")
    assert Path(cmd[1]).name == "convert_lora_to_gguf.py" and cmd[cmd.index("--base") + 1] == str(tiny_dir)


def test_quantize_calls_llama_model_quantize_as_quantize_command_says(tiny_gguf, tmp_path, monkeypatch):
    """quantize() passes the library the input, the type and the threads that the printed llama-quantize line names."""
    import llama_cpp

    seen = []

    def fake(inp, out, params):
        seen.append((inp.decode(), out.decode(), params.ftype, params.nthread))
        return 1  # failed: nothing written

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", fake)
    out = tmp_path / "q.gguf"
    argv = export.quantize_command(tiny_gguf, out, "q4_k_m", nthread=3)
    assert argv == ["llama-quantize", str(tiny_gguf), str(out), "Q4_K_M", "3"]
    with pytest.raises(ExportError, match="failed with code 1"):
        quantize(tiny_gguf, out, "q4_k_m", nthread=3)
    ((inp, tmp, ftype, nthread),) = seen
    assert inp == argv[1] and Path(tmp).parent == out.parent and not out.exists()
    assert ftype == export.quantization_types()[argv[3]] and nthread == int(argv[4])


@pytest.mark.parametrize("name", ["Q3_X", "int4", ""])
def test_quantize_command_refuses_unknown_types(name):
    with pytest.raises(UnknownQuantizationError, match="unknown quantization") as err:
        export.quantize_command("in.gguf", "out.gguf", name)
    assert "Q4_K_M" in str(err.value)


def test_serve_starts_exactly_server_command(tiny_gguf, monkeypatch):
    seen = []

    class Exited:  # a server process that died at once
        returncode = 1

        def poll(self):
            return 1

        def terminate(self):
            pass

        def wait(self, timeout=None):
            return 1

        def kill(self):
            pass

    def fake_popen(cmd, **kwargs):
        seen.append(cmd)
        return Exited()

    monkeypatch.setattr(export.subprocess, "Popen", fake_popen)
    with pytest.raises(ExportError, match="exited with 1"), export.serve(tiny_gguf, port=12345, n_threads=2):
        pass
    assert seen == [export.server_command(tiny_gguf, 12345, 2)]
    cmd = seen[0]
    assert cmd[1:3] == ["-m", "llama_cpp.server"] and cmd[cmd.index("--host") + 1] == "127.0.0.1"


def test_nominal_bits_per_weight_from_the_block_formats(tiny_gguf, tmp_path):
    bits = {q: export.nominal_bits_per_weight(q) for q in ("F32", "F16", "Q8_0", "q5_k_m", "Q4_K_M", "Q4_0")}
    assert bits == {"F32": 32.0, "F16": 16.0, "Q8_0": 8.5, "q5_k_m": 5.5, "Q4_K_M": 4.5, "Q4_0": 4.5}
    for name in ("MOSTLY_Q4_1_SOME_F16", "Q3_X"):
        with pytest.raises(UnknownQuantizationError, match="one target tensor type"):
            export.nominal_bits_per_weight(name)
    # a file holds at least the nominal bits: norms stay F32, fallbacks and recipes only go up
    for q in ("Q8_0", "Q4_K_M"):
        report = quantize(tiny_gguf, tmp_path / f"{q}.gguf", q)
        assert report.bits_per_weight >= export.nominal_bits_per_weight(q), (q, report.bits_per_weight)
