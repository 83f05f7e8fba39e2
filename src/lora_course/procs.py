"""Fresh processes: run a course module in its own Python process and read its JSON back; a free local port.

Measurements that must not share a process (peak memory, a benchmark's compiled kernels, Unsloth's patches to
transformers, BLAS thread counts) run as ``python -m lora_course.<module> ...`` in a child process that prints one
JSON object per line; ``run_module`` returns those objects or raises with the child's exit code and the tail of its
output, so a failure far away in a child says what happened.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any


def run_module(module: str, args: list[str], *, what: str, timeout: float, env: dict[str, str] | None = None,
               prefix: str = "{", expect: int | None = None, error: type[Exception] = RuntimeError) -> list[Any]:
    """``python -m <module> <args>`` in a fresh process (this environment plus ``env``); the JSON objects of the
    stdout lines starting with ``prefix``. Raises ``error`` naming ``what`` when the child fails, prints none, or
    prints other than ``expect`` of them."""
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, check=False,
                          timeout=timeout, env={**os.environ, **(env or {})})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(prefix)]
    if proc.returncode != 0 or not lines or (expect is not None and len(lines) != expect):
        counted = f", {len(lines)} of {expect} results" if expect is not None else ""
        raise error(f"{what} failed (exit {proc.returncode}{counted}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return [json.loads(ln) for ln in lines]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a local server or a process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


__all__ = ["free_port", "run_module"]
