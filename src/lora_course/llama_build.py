"""A portable build of llama-cpp-python: the CPU instruction sets chosen from the CPU's flags, never AMX.

Why this exists. llama-cpp-python ships no wheel on PyPI, so pip compiles its vendored llama.cpp, by default
with ``-march=native``. On a Xeon with AMX (``amx_tile``/``amx_int8``/``amx_bf16`` in /proc/cpuinfo) that
native build loads and decodes an F32 GGUF but dies with SIGSEGV in ``_internals.decode`` on the first token
of a Q8_0 or Q4_K_M model (issue 28: llama-cpp-python 0.3.36, a 2-core Xeon with AVX-512 and AMX). Built
with ``GGML_NATIVE=OFF`` the same source decodes both on the same CPU: with AVX2 only (Q8_0 76, Q4_K_M 67
tokens/s on 2 threads) and with AVX-512 but no AMX (79 and 79 tokens/s). So the course builds:

- tier ``avx2`` (the default wherever the CPU has AVX2): AVX, AVX2, FMA, F16C, BMI2, **AMX and AVX-512 off**;
- tier ``sse42``: SSE 4.2 only, for CPUs without AVX2;
- tier ``avx512`` (opt-in, ``LORA_COURSE_LLAMA_TIER=avx512``): the AVX2 sets plus AVX-512 F/CD/VL/DQ/BW and the
  VBMI, VNNI and BF16 extensions the CPU has, AMX still off.

Why AVX2 by default, also on AVX-512 CPUs: it is the build measured to decode Q8_0 and Q4_K_M on both kinds of CPU
the course has met (2026-12-04: built here on an AMD EPYC with AVX2 only, it decoded both there and on an Intel Xeon
with AVX-512 and AMX, the H200 host's, at 1, 2 and 16 threads); issue 28 measured it at Q8_0 76 and Q4_K_M 67
tokens/s on 2 threads of the AMX Xeon, against 79 and 79 for AVX-512 without AMX. The AVX-512 build is not the
default because the course could not confirm it: the one built on the Xeon itself crashed in ``decode`` just like an
AVX2 build made with that machine's toolchain, so the machine, not the instruction set, may be at fault there, and
a default must be a build that is known to work. Runtime-dispatched variants (``GGML_BACKEND_DL`` +
``GGML_CPU_ALL_VARIANTS``) would pick the AMX variant on such a CPU and crash the same way, so they are not used.

pip's wheel cache keys a source build by the sdist alone: a build with other ``CMAKE_ARGS`` silently reuses the
old wheel (seen in issue 28). So the wheel is built with ``--no-cache-dir`` into a folder of the course cache
whose name holds the version, the tier and a hash of the CMake arguments, and installed from there; a second
set-up on a machine of the same tier reuses it, a machine of another tier builds its own.

Standard library only: the Makefile runs this file as a script before the package is installed
(``python src/lora_course/llama_build.py --install``).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

LLAMA_CPP_DIST = "llama-cpp-python"
LLAMA_CPP_PIN = "0.3.36"
TIERS = ("avx512", "avx2", "sse42")

# Every x86 option is set explicitly: with GGML_NATIVE=OFF, ggml turns SSE4.2/AVX/AVX2/BMI2/FMA/F16C on by
# default (its INS_ENB), which an older CPU cannot run.
_AVX2 = {"GGML_SSE42": "sse4_2", "GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_FMA": "fma",
         "GGML_F16C": "f16c", "GGML_BMI2": "bmi2"}
_AVX512_BASE = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")  # ggml's -mavx512{f,cd,vl,dq,bw}
_AVX512_EXTRA = {"GGML_AVX512_VBMI": "avx512vbmi", "GGML_AVX512_VNNI": "avx512_vnni",
                 "GGML_AVX512_BF16": "avx512_bf16"}
_ALWAYS_OFF = ("GGML_NATIVE", "GGML_AVX_VNNI", "GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16",
               "GGML_BACKEND_DL", "GGML_CPU_ALL_VARIANTS")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (the ``flags`` line of /proc/cpuinfo); empty where there is none to read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name (the ``model name`` line of /proc/cpuinfo); '' where there is none to read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8")
        except OSError:
            return ""
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


def cpu_summary(flags: set[str] | None = None) -> dict[str, bool]:
    """The flags that decide the course's kernels: AVX2, AVX-512 (F, BF16), AMX."""
    f = cpu_flags() if flags is None else flags
    return {"avx2": "avx2" in f, "avx512f": "avx512f" in f, "avx512_bf16": "avx512_bf16" in f,
            "amx": bool({"amx_tile", "amx_int8", "amx_bf16"} & f)}


def choose_tier(flags: set[str]) -> str:
    """The default tier for this CPU: ``avx2`` where it has the AVX2 sets, else ``sse42`` (never AMX)."""
    return "avx2" if all(flag in flags for flag in _AVX2.values()) else "sse42"


def supports(tier: str, flags: set[str]) -> bool:
    """Whether a CPU with ``flags`` can run a ``tier`` build (``avx512`` needs all five base AVX-512 sets)."""
    if tier == "sse42":
        return "sse4_2" in flags
    if tier == "avx2":
        return all(flag in flags for flag in _AVX2.values())
    return supports("avx2", flags) and all(flag in flags for flag in _AVX512_BASE)


def cmake_args(tier: str, flags: set[str] | None = None) -> list[str]:
    """The CMake arguments of ``tier``; for ``avx512`` the optional extensions follow ``flags`` (all on if None)."""
    if tier not in TIERS:
        raise ValueError(f"unknown llama.cpp CPU tier {tier!r}: use one of {TIERS} "
                         "(or unset LORA_COURSE_LLAMA_TIER to choose from this CPU)")
    on = {"GGML_SSE42"}
    if tier in ("avx2", "avx512"):
        on |= set(_AVX2)
    if tier == "avx512":
        on.add("GGML_AVX512")
        on |= {opt for opt, flag in _AVX512_EXTRA.items() if flags is None or flag in flags}
    options = [*_AVX2, "GGML_AVX512", *_AVX512_EXTRA, *_ALWAYS_OFF]
    return [f"-D{opt}={'ON' if opt in on else 'OFF'}" for opt in options]


def build_key(version: str, tier: str, args: list[str]) -> str:
    """The wheel folder's name: version, tier and a hash of the exact CMake arguments."""
    digest = hashlib.sha1(" ".join(args).encode()).hexdigest()[:10]
    return f"llama-cpp-python-{version}-{tier}-{digest}"


def wheel_dir(key: str) -> Path:
    """Where built wheels live: ``$LORA_COURSE_CACHE/llama-cpp-wheels/<key>`` (default ~/.cache/lora-course)."""
    env = os.environ.get("LORA_COURSE_CACHE")
    root = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lora-course"
    return root / "llama-cpp-wheels" / key


def plan(version: str = LLAMA_CPP_PIN, tier: str | None = None, flags: set[str] | None = None) -> dict:
    """What a build here would be: tier, CMake arguments, cache key and wheel folder."""
    if platform.machine().lower() not in ("x86_64", "amd64") and tier is None:
        tier_name, args = "native", ["-DGGML_NATIVE=OFF"]  # not x86: ggml's defaults for the architecture
    else:
        f = cpu_flags() if flags is None else flags
        tier_name = tier or os.environ.get("LORA_COURSE_LLAMA_TIER") or choose_tier(f)
        args = cmake_args(tier_name, f)
        if f and not supports(tier_name, f):
            raise ValueError(f"this CPU cannot run a llama.cpp build of tier {tier_name!r} (its flags lack "
                             f"what the tier needs): unset LORA_COURSE_LLAMA_TIER or use {choose_tier(f)!r}")
    key = build_key(version, tier_name, args)
    return {"version": version, "tier": tier_name, "cmake_args": args, "key": key, "wheel_dir": wheel_dir(key)}


def build_wheel(p: dict, python: str = sys.executable) -> Path:
    """Build the wheel of plan ``p`` (or reuse the one already in its folder); return its path."""
    out: Path = p["wheel_dir"]
    found = list(out.glob("llama_cpp_python-*.whl"))
    if found:
        return max(found)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CMAKE_ARGS=" ".join(p["cmake_args"]),
               CMAKE_BUILD_PARALLEL_LEVEL=os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2)))
    cmd = [python, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-cache-dir", "--no-binary", LLAMA_CPP_DIST,
           f"{LLAMA_CPP_DIST}=={p['version']}", "-w", str(tmp)]
    print(f"llama-cpp-python {p['version']}: building tier {p['tier']} ({' '.join(p['cmake_args'])})", flush=True)
    try:
        subprocess.run(cmd, env=env, check=True)
        wheels = sorted(tmp.glob("llama_cpp_python-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip wheel built no llama_cpp_python wheel in {tmp}")
        if not out.exists():  # published whole: an interrupted build leaves no half-filled wheel folder
            tmp.replace(out)
    finally:
        if tmp.exists():
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    return max(out.glob("llama_cpp_python-*.whl"))


def install(p: dict, python: str = sys.executable) -> Path:
    """Build (or reuse) the wheel of plan ``p`` and install it into ``python``'s environment."""
    wheel = build_wheel(p, python)
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", str(wheel)],
                   check=True)
    return wheel


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tier", choices=TIERS, help="force a tier (default: from this CPU's flags)")
    ap.add_argument("--version", default=LLAMA_CPP_PIN)
    ap.add_argument("--python", default=sys.executable, help="the interpreter whose environment gets the wheel")
    ap.add_argument("--install", action="store_true", help="build if needed and install into --python's env")
    ap.add_argument("--wheel", action="store_true", help="build if needed and print the wheel's path")
    args = ap.parse_args(argv)
    p = plan(args.version, args.tier)
    print(f"CPU {cpu_summary()}; llama.cpp tier {p['tier']}; wheel folder {p['wheel_dir']}")
    if args.install:
        print(f"installed {install(p, args.python)}")
    elif args.wheel:
        print(build_wheel(p, args.python))


if __name__ == "__main__":
    main()
