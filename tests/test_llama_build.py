"""The portable llama.cpp build (issue 28): the CPU tier chosen from the CPU's flags, never AMX, a cache key per
build; the installed build decodes quantized GGUFs in a child process (the environment doctor's check)."""
import importlib.util
import re

import pytest

from lora_course import llama_build as lb

# /proc/cpuinfo flags of the three kinds of machine the course meets (trimmed to what matters).
XEON_AMX = ("fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi2 avx512f avx512dq avx512cd avx512bw avx512vl "
            "avx512vbmi avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8")
EPYC_ZEN2 = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi2"
OLD = "fpu sse sse2 ssse3 sse4_1 sse4_2"


def _flags(line):
    return lb.cpu_flags(f"processor\t: 0\nflags\t\t: {line}\n")


def _opts(args):
    return dict(re.fullmatch(r"-D(\w+)=(ON|OFF)", a).groups() for a in args)


def test_cpu_flags_are_read_from_cpuinfo():
    assert _flags(XEON_AMX) >= {"avx512f", "amx_int8", "avx2"}
    assert lb.cpu_flags("no flags line here") == set()
    assert lb.cpu_model("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n") == "Intel(R) Xeon(R) Processor"
    assert lb.cpu_model("no model line") == ""
    assert lb.cpu_summary(_flags(XEON_AMX)) == {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx": True}
    assert lb.cpu_summary(_flags(EPYC_ZEN2)) == {"avx2": True, "avx512f": False, "avx512_bf16": False,
                                                 "amx": False}


def test_an_amx_xeon_gets_the_verified_avx2_build_and_avx512_only_on_request():
    flags = _flags(XEON_AMX)
    assert lb.choose_tier(flags) == "avx2"  # the build seen decoding Q8_0/Q4_K_M on an AMX Xeon (llama_build doc)
    opts = _opts(lb.cmake_args("avx2", flags))
    assert opts["GGML_AVX512"] == "OFF" and opts["GGML_AMX_INT8"] == "OFF" and opts["GGML_NATIVE"] == "OFF"
    assert lb.supports("avx512", flags)
    opts = _opts(lb.cmake_args("avx512", flags))
    assert opts["GGML_NATIVE"] == "OFF"  # -march=native would turn AMX on
    assert opts["GGML_AMX_TILE"] == opts["GGML_AMX_INT8"] == opts["GGML_AMX_BF16"] == "OFF"
    assert opts["GGML_AVX512"] == opts["GGML_AVX512_BF16"] == opts["GGML_AVX512_VNNI"] == "ON"
    assert opts["GGML_BACKEND_DL"] == opts["GGML_CPU_ALL_VARIANTS"] == "OFF"  # would dispatch to the AMX variant


def test_avx2_cpu_and_old_cpu_get_what_they_run():
    assert lb.choose_tier(_flags(EPYC_ZEN2)) == "avx2"
    opts = _opts(lb.cmake_args("avx2", _flags(EPYC_ZEN2)))
    assert opts["GGML_AVX2"] == opts["GGML_FMA"] == opts["GGML_F16C"] == "ON" and opts["GGML_AVX512"] == "OFF"
    assert lb.choose_tier(_flags(OLD)) == "sse42"
    opts = _opts(lb.cmake_args("sse42", _flags(OLD)))
    # ggml turns AVX/AVX2/FMA/F16C/BMI2 on by default once GGML_NATIVE is off: each must be off explicitly
    assert opts["GGML_SSE42"] == "ON" and all(opts[k] == "OFF" for k in ("GGML_AVX", "GGML_AVX2", "GGML_FMA",
                                                                         "GGML_F16C", "GGML_BMI2"))
    # AVX-512 without all five base sets (e.g. only avx512f) is not enough for ggml's -mavx512{f,cd,vl,dq,bw}
    assert not lb.supports("avx512", _flags(EPYC_ZEN2 + " avx512f"))
    assert not lb.supports("avx2", _flags(OLD)) and lb.supports("sse42", _flags(OLD))


def test_avx512_extensions_follow_the_cpu():
    opts = _opts(lb.cmake_args("avx512", _flags(EPYC_ZEN2 + " avx512f avx512cd avx512vl avx512dq avx512bw")))
    assert opts["GGML_AVX512"] == "ON" and opts["GGML_AVX512_BF16"] == opts["GGML_AVX512_VBMI"] == "OFF"


def test_cache_key_changes_with_the_build_and_unknown_tier_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_COURSE_CACHE", str(tmp_path))
    a = lb.plan(tier="avx2", flags=_flags(XEON_AMX))
    b = lb.plan(tier="avx512", flags=_flags(XEON_AMX))
    c = lb.plan(tier="avx512", flags=_flags(XEON_AMX).difference({"avx512_bf16"}))
    assert len({a["key"], b["key"], c["key"]}) == 3  # pip's cache would have reused one wheel for all three
    assert a["wheel_dir"].parent == tmp_path / "llama-cpp-wheels"
    monkeypatch.setenv("LORA_COURSE_LLAMA_TIER", "avx512")
    assert lb.plan(flags=_flags(XEON_AMX))["tier"] == "avx512"
    with pytest.raises(ValueError, match="cannot run a llama.cpp build of tier 'avx512'.*use 'avx2'"):
        lb.plan(flags=_flags(EPYC_ZEN2))  # forcing a tier the CPU cannot run is refused, not built
    with pytest.raises(ValueError, match="unknown llama.cpp CPU tier 'native'.*use one of"):
        lb.cmake_args("native")


def test_a_built_wheel_is_reused_not_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_COURSE_CACHE", str(tmp_path))
    p = lb.plan(tier="avx2", flags=_flags(EPYC_ZEN2))
    p["wheel_dir"].mkdir(parents=True)
    wheel = p["wheel_dir"] / "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl"
    wheel.write_bytes(b"")
    monkeypatch.setattr(lb.subprocess, "run", lambda *a, **k: pytest.fail("rebuilt a cached wheel"))
    assert lb.build_wheel(p) == wheel


needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed (the export extra)")


@needs_llama
def test_installed_llama_cpp_has_no_amx_and_matches_this_cpus_tier():
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    info = info.decode() if isinstance(info, bytes) else str(info)
    assert "AMX_INT8 = 1" not in info and "AMX_BF16 = 1" not in info, info
    tier = lb.choose_tier(lb.cpu_flags())
    if tier == "avx512":
        assert "AVX512 = 1" in info, info
    elif tier == "avx2":
        assert "AVX2 = 1" in info and "AVX512 = 1" not in info, info


@needs_llama
def test_llama_cpp_decodes_quantized_ggufs_in_a_child_process():
    from lora_course.llama_runtime import llama_cpp_check

    rep = llama_cpp_check()
    assert rep["ok"], rep
    assert "Q8_0" in rep["detail"] and "Q4_K_M" in rep["detail"] and not rep["amx"]


@needs_llama
def test_llama_cpp_check_names_the_crash_and_the_fix(monkeypatch):
    """A child that dies of a signal (as the AMX build did) is reported with the signal and the rebuild command."""
    from lora_course import llama_runtime

    monkeypatch.setattr(llama_runtime, "_PROBE_CHILD",
                        "import os, signal; print('{\"system_info\": \"AMX_INT8 = 1\"}', "
                        "flush=True); os.kill(os.getpid(), signal.SIGSEGV)")
    rep = llama_runtime.llama_cpp_check()
    assert not rep["ok"] and rep["amx"]
    assert "SIGSEGV" in rep["detail"] and "llama_build.py --install" in rep["fix"], rep
