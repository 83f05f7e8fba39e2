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


def memory_gib() -> dict[str, float]:
    """Total and available system memory in GiB (from /proc/meminfo where it exists)."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        kib = {k: int(v.split()[0]) for k, v in info.items() if k in ("MemTotal", "MemAvailable")}
        return {"total": kib["MemTotal"] / 2**20, "available": kib["MemAvailable"] / 2**20}
    except (OSError, KeyError, ValueError):
        return {}


def doctor(profile: str = "auto") -> dict[str, Any]:
    """A report of the environment and the choices the course makes on it (profile, dtype, threads)."""
    import torch

    from .models import resolve_profile, select_dtype

    cuda = torch.cuda.is_available()
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        **package_versions(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else None,
        "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
        "profile": resolve_profile(profile),
        "dtype": str(select_dtype()).replace("torch.", ""),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
    }
    mem = memory_gib()
    if mem:
        report["ram_total_gib"] = round(mem["total"], 1)
        report["ram_available_gib"] = round(mem["available"], 1)
    if cuda:
        props = torch.cuda.get_device_properties(0)
        report["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return report


def print_doctor(profile: str = "auto") -> dict[str, Any]:
    """Print ``doctor()`` as an aligned table and return it."""
    rep = doctor(profile)
    width = max(map(len, rep))
    for k, v in rep.items():
        print(f"{k:<{width}}  {v}")
    return rep
