"""The environment doctor: what this machine is, what the course will do on it, and why.

``doctor()`` gathers library versions, the device and its precision support, the profile ``auto`` picks,
memory and threads, so a learner can compare their set-up with the course's measured numbers.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
from typing import Any

KEY_PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "bitsandbytes", "accelerate", "gguf",
                "llama_cpp_python", "unsloth")


def package_versions(names: tuple[str, ...] = KEY_PACKAGES) -> dict[str, str]:
    """Installed version of each package, or 'not installed'."""
    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine_info(decode_threads: int | None = None) -> dict[str, Any]:
    """The machine a result was measured on, for every report that records one (``make course``, ``make bench``,
    ``make sweep``): CPU model and flags, cores, threads, memory, the GPU when there is one, versions, date, load."""
    import time

    import torch

    from .hardware import usable_cpus
    from .llama_build import cpu_model, cpu_summary

    info: dict[str, Any] = {
        "cpu": cpu_model() or platform.processor() or "unknown", "flags": cpu_summary(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "decode_threads": decode_threads or usable_cpus(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__,
        **package_versions(("transformers", "peft", "trl", "llama_cpp_python")),
        "date": time.strftime("%Y-%m-%d %H:%M")}
    try:
        info["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (OSError, ValueError):
        pass
    try:
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except (AssertionError, RuntimeError):  # a report is written even where CUDA answers but cannot start
        pass
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def memory_gib() -> dict[str, float]:
    """Total and available system memory in GiB (from /proc/meminfo where it exists)."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        kib = {k: int(v.split()[0]) for k, v in info.items() if k in ("MemTotal", "MemAvailable")}
        return {"total": kib["MemTotal"] / 2**20, "available": kib["MemAvailable"] / 2**20}
    except (OSError, KeyError, ValueError):
        return {}


def doctor(profile: str = "auto", check_llama: bool = False, check_bnb: bool = False) -> dict[str, Any]:
    """A report of the environment and the choices the course makes on it (profile, dtype, threads).

    The CPU's flags are part of it because some kernels depend on them: bitsandbytes' CPU 4-bit kernels change
    layout and precision on AVX512-BF16 CPUs, and llama.cpp built with AMX crashed on quantized models (issue 28).
    ``check_llama`` decodes small Q8_0 and Q4_K_M GGUFs in a child process (``llama_runtime.llama_cpp_check``) and
    says what to do when that fails; ``check_bnb`` measures bitsandbytes' CPU 4-bit kernels
    (``bnb_interop.bnb_cpu_report``).
    """
    import platform as _platform

    import torch

    from . import hardware
    from .llama_build import cpu_model, cpu_summary
    from .models import resolve_profile

    cuda = torch.cuda.is_available()
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        **package_versions(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else None,
        # precision follows native bf16 (compute capability >= 8.0), not torch.cuda.is_bf16_supported(), which is
        # True on a T4 by emulation; LORA_COURSE_EMULATE=t4 makes the course decide as on a T4 (hardware.py)
        **hardware.describe(),
        "profile": resolve_profile(profile),
        "cpu": cpu_model() or _platform.processor() or "unknown",
        "cpu_flags": ", ".join(k for k, v in cpu_summary().items() if v) or "none of avx2/avx512f/avx512_bf16/amx",
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
    }
    mem = memory_gib()
    if mem:
        report["ram_total_gib"] = round(mem["total"], 1)
        report["ram_available_gib"] = round(mem["available"], 1)
    if check_bnb:
        from .bnb_interop import bnb_cpu_report

        bnb = bnb_cpu_report(blocksizes=(64, 128, 256))
        off = {bs: d["verdict"] for bs, d in bnb["dequantize"].items() if d["max_abs_diff"] > 0}
        report["bnb_cpu_dequantize"] = ("equals the NF4 definition (blocksizes 64/128/256)" if not off
                                        else f"deviates from the NF4 definition at blocksizes {sorted(off)}")
        report["bnb_cpu_eval_forward"] = ("repacks the 4-bit weight and computes in "
                                          f"{bnb['forward']['eval_forward_dtype']}"
                                          if bnb["forward"]["eval_forward_repacks"] else "float32, weight unchanged")
    if check_llama:
        from .llama_runtime import llama_cpp_check

        rep = llama_cpp_check()
        report["llama_cpp_decodes_quantized"] = rep["ok"]
        report["llama_cpp_check"] = rep["detail"] + (f" -> {rep['fix']}" if rep["fix"] else "")
        report["llama_cpp_amx"] = rep["amx"]
    return report



def print_doctor(profile: str = "auto", check_llama: bool = False, check_bnb: bool = False) -> dict[str, Any]:
    """Print ``doctor()`` as an aligned table and return it."""
    rep = doctor(profile, check_llama, check_bnb)
    width = max(map(len, rep))
    for k, v in rep.items():
        print(f"{k:<{width}}  {v}")
    return rep
