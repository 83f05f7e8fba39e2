"""GGUF export (issue 12): clear errors for each bad input and no partial file after a failed export; llama.cpp's
converter on the tiny model (the tokenizer it stores, the GGUF header, a hub id resolved to its snapshot) and the
literal converter command lines (issue 24); also the tests of the modules export builds on, llama_converter (the
converter's architectures) and gguf_inspect (tokenizer checks, the GGUF header). Quantization, parity, the llama.cpp
runtime and the Modelfile have their own test files, one per module: test_gguf_quant.py, test_parity.py,
test_llama_runtime.py, test_modelfile.py."""
import json
import os
import shutil
from pathlib import Path

import pytest

from lora_course import export, gguf_inspect, llama_converter
from lora_course.export import (
    ExportError,
    OutputExistsError,
    TokenizerError,
    UnknownQuantizationError,
    UnsupportedArchitectureError,
    to_gguf,
)
from lora_course.gguf_inspect import check_tokenizer_files, gguf_tokenizer_summary
from lora_course.gguf_quant import gguf_tensor_stats, quantize
from lora_course.modelfile import write_modelfile


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


# -------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("arch", [["XLNetLMHeadModel"], ["MyToyForCausalLM"], None])
def test_unsupported_architecture_is_refused_before_converting(tiny_dir, tmp_path, arch):
    model = _model_copy(tiny_dir, tmp_path / "model", config={"architectures": arch})
    out = tmp_path / "out.gguf"
    with pytest.raises(UnsupportedArchitectureError, match="not supported by llama.cpp's convert_hf_to_gguf"):
        to_gguf(model, out)
    assert not out.exists() and not _leftovers(tmp_path, out.name)


def test_supported_architectures_are_read_from_the_converter():
    archs = llama_converter.supported_architectures()
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


def test_save_model_folder_writes_a_convertible_folder_and_refuses_an_unmerged_model(tiny_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    out = export.save_model_folder(model, tok, tmp_path / "plain")
    again = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert all(torch.equal(p, dict(again.named_parameters())[n]) for n, p in model.named_parameters())
    assert (out / "tokenizer_config.json").exists() and not _leftovers(tmp_path, "plain")
    with pytest.raises(OutputExistsError):
        export.save_model_folder(model, tok, out)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with pytest.raises(ExportError, match="merge it first"):
        export.save_model_folder(peft_model, tok, tmp_path / "unmerged")
    assert not (tmp_path / "unmerged").exists()


def test_unknown_converter_outtype_is_refused(tiny_dir, tmp_path):
    with pytest.raises(UnknownQuantizationError, match="use quantize"):
        to_gguf(tiny_dir, tmp_path / "x.gguf", outtype="q4_k_m")
    assert not (tmp_path / "x.gguf").exists()


# -------------------------------------------------------------------------------------------- no partial file
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


# -------------------------------------------------------------------------------------------- real conversion
def test_to_gguf_stores_a_tokenizer_llama_cpp_loads(tiny_gguf, tiny_tok):
    summary = gguf_tokenizer_summary(tiny_gguf)
    assert summary["model"] == "gpt2" and summary["pre"] == "smollm"
    assert summary["n_vocab"] == len(tiny_tok) and summary["eos"] == tiny_tok.eos_token_id == 2
    assert summary["chat_template"]


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


# --------------------------------------------------------------------------------------------- GGUF internals
def test_gguf_header_reader_agrees_with_gguf_py(tiny_gguf, tmp_path):
    from gguf import GGUFReader

    reader = GGUFReader(str(tiny_gguf))
    meta, tensors = gguf_inspect.read_gguf_header(tiny_gguf, decode=("tokenizer.ggml.tokens",))
    assert tensors == [(t.name, tuple(int(x) for x in t.shape), int(t.tensor_type)) for t in reader.tensors]
    assert meta["tokenizer.ggml.tokens"] == reader.fields["tokenizer.ggml.tokens"].contents()
    assert meta["tokenizer.ggml.merges"] == len(reader.fields["tokenizer.ggml.merges"].contents())  # not decoded
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
    n_el, n_bytes, _ = gguf_tensor_stats(tiny_gguf)
    assert (n_el, n_bytes) == (sum(int(t.n_elements) for t in reader.tensors),
                               sum(int(t.n_bytes) for t in reader.tensors))
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ExportError, match="not a GGUF file"):
        gguf_inspect.read_gguf_header(tmp_path / "x.gguf")


# ----------------------------------------------------------------------- the literal command lines (issue 24)
def _outfile(cmd: list[str]) -> Path:
    return Path(cmd[cmd.index("--outfile") + 1])


def test_to_gguf_runs_exactly_convert_command(tiny_dir, tmp_path, monkeypatch):
    """The command notebook 08 prints is the one to_gguf runs (one source of truth), with a temporary --outfile."""
    seen = []
    # patched where to_gguf looks it up: export imports llama_converter's _run_converter by name, so patching
    # llama_converter._run_converter would leave to_gguf running the real converter
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


def test_cached_base_gguf_converts_once_and_names_the_file_after_the_model(tiny_dir, tmp_path, monkeypatch):
    """Notebooks 08 and 13 share the base GGUF: the first call converts, later calls reuse the file."""
    monkeypatch.setenv("LORA_COURSE_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_to_gguf(folder, out, outtype="f16", **kw):
        calls.append((Path(folder), Path(out).name, outtype))
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(b"GGUF")
        return Path(out)

    monkeypatch.setattr(export, "to_gguf", fake_to_gguf)
    first = export.cached_base_gguf(tiny_dir)
    again = export.cached_base_gguf(tiny_dir)
    assert first == again and first.name == f"base-{Path(tiny_dir).name}-f32.gguf"
    assert calls == [(Path(tiny_dir), first.name, "f32")]
