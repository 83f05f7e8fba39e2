"""The Ollama Modelfile of an exported model (issue 12): written from the tokenizer's chat template and checked against
the Jinja template, an ADAPTER line, clear errors for missing files and unsupported templates, and the Go-template
renderer that checks it."""
import pytest

from lora_course import modelfile
from lora_course.export import ExportError
from lora_course.modelfile import (
    DEFAULT_CONVERSATIONS,
    check_modelfile,
    go_template,
    parse_modelfile,
    render_go_template,
    write_modelfile,
)
from lora_course.models import tiny_model_dir


# -------------------------------------------------------------------------------------------------- Modelfile
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


# --------------------------------------------------------------------------------------- Go-template renderer
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
