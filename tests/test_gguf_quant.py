"""GGUF quantization (issue 12): llama.cpp's quantization names, unknown types refused, the tensors each type keeps
in another type and why, bits per weight against the block formats, and quantize() calling the library exactly as the
printed llama-quantize command line says (issue 24)."""
from pathlib import Path

import pytest

from lora_course import export, gguf_quant
from lora_course.export import ExportError, UnknownQuantizationError
from lora_course.gguf_quant import gguf_tensor_stats, quantize


# -------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", ["Q3_X", "q4_k_xl", "int4", ""])
def test_unknown_quantization_is_refused(tiny_gguf, tmp_path, name):
    out = tmp_path / "q.gguf"
    with pytest.raises(UnknownQuantizationError, match="unknown quantization") as err:
        quantize(tiny_gguf, out, name)
    assert "Q4_K_M" in str(err.value) and "Q8_0" in str(err.value)  # lists the names that exist
    assert not out.exists()


def test_quantization_names_are_llama_cpps():
    import llama_cpp

    types = gguf_quant.quantization_types()
    assert types["Q8_0"] == llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0 and types["Q4_K_M"] == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert {"F32", "F16", "BF16", "Q6_K", "Q4_0"} <= set(types)


# ------------------------------------------------------------------------------------------ real quantization
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
    # the summary has one line per (stored type, reason), the details one per tensor
    groups = report.groups()
    assert sum(len(ts) for _, _, ts in groups) == 20 and len(groups) < 20
    assert len(str(report).splitlines()) == 2 + len(groups)
    assert len(report.details().splitlines()) == 1 + 20 and all(t.name in report.details() for t in report.other_types)


def test_what_c_code_writes_to_stderr_goes_into_the_report_not_the_output(capfd):
    """llama.cpp prints a two-line fallback warning per tensor a k-quant cannot store (on SmolLM2's Q4_K_M: 360 lines
    in notebook 08's output); quantize collects file descriptor 2 while llama.cpp runs, and restores it after."""
    import os
    import sys

    got: list[str] = []
    with gguf_quant._stderr_captured(got):
        os.write(2, b"warning: blk.0.attn_k.weight - ncols 576 not divisible by 256\n")
        print("-> falling back to q5_0", file=sys.stderr)  # llama-cpp-python's log callback writes this way
    os.write(2, b"after\n")
    assert "ncols 576" in "".join(got) and "falling back to q5_0" in "".join(got)
    err = capfd.readouterr().err
    assert "falling back" not in err and "after" in err


def test_nominal_bits_per_weight_from_the_block_formats(tiny_gguf, tmp_path):
    bits = {q: gguf_quant.nominal_bits_per_weight(q) for q in ("F32", "F16", "Q8_0", "q5_k_m", "Q4_K_M", "Q4_0")}
    assert bits == {"F32": 32.0, "F16": 16.0, "Q8_0": 8.5, "q5_k_m": 5.5, "Q4_K_M": 4.5, "Q4_0": 4.5}
    for name in ("MOSTLY_Q4_1_SOME_F16", "Q3_X"):
        with pytest.raises(UnknownQuantizationError, match="one target tensor type"):
            gguf_quant.nominal_bits_per_weight(name)
    # a file holds at least the nominal bits: norms stay F32, fallbacks and recipes only go up
    for q in ("Q8_0", "Q4_K_M"):
        report = quantize(tiny_gguf, tmp_path / f"{q}.gguf", q)
        assert report.bits_per_weight >= gguf_quant.nominal_bits_per_weight(q), (q, report.bits_per_weight)


# ------------------------------------------------------------------------ the literal command line (issue 24)
def test_quantize_calls_llama_model_quantize_as_quantize_command_says(tiny_gguf, tmp_path, monkeypatch):
    """quantize() passes the library the input, the type and the threads that the printed llama-quantize line names."""
    import llama_cpp

    seen = []

    def fake(inp, out, params):
        seen.append((inp.decode(), out.decode(), params.ftype, params.nthread))
        return 1  # failed: nothing written

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", fake)
    out = tmp_path / "q.gguf"
    argv = gguf_quant.quantize_command(tiny_gguf, out, "q4_k_m", nthread=3)
    assert argv == ["llama-quantize", str(tiny_gguf), str(out), "Q4_K_M", "3"]
    with pytest.raises(ExportError, match="failed with code 1"):
        quantize(tiny_gguf, out, "q4_k_m", nthread=3)
    ((inp, tmp, ftype, nthread),) = seen
    assert inp == argv[1] and Path(tmp).parent == out.parent and not out.exists()
    assert ftype == gguf_quant.quantization_types()[argv[3]] and nthread == int(argv[4])


@pytest.mark.parametrize("name", ["Q3_X", "int4", ""])
def test_quantize_command_refuses_unknown_types(name):
    with pytest.raises(UnknownQuantizationError, match="unknown quantization") as err:
        gguf_quant.quantize_command("in.gguf", "out.gguf", name)
    assert "Q4_K_M" in str(err.value)
