"""llama.cpp at run time, through llama-cpp-python: load, decode and serve a GGUF file (notebooks 08 and 00).

- ``load_gguf``, ``gguf_greedy``, ``gguf_chat``, ``evaluate_gguf``: a quiet ``llama_cpp.Llama`` with the course's
  thread count, greedy decoding (with ids it must never pick), chat replies through the transformers chat template
  and the task metric of a GGUF model;
- ``llama_cpp_check``: does this machine's llama.cpp decode quantized GGUFs? Checked in a child process on small
  files (``probe_ggufs``), since a bad build dies of a signal (issue 28); ``env.doctor(check_llama=True)`` (notebook
  00) and ``python -m lora_course.export --check`` report it;
- ``serve`` / ``chat_completion``: ``python -m llama_cpp.server`` (OpenAI-compatible) on 127.0.0.1 with a bounded
  start-up wait, and one chat completion against it; ``server_command`` is its command line.

The files come from ``export.to_gguf`` and ``gguf_quant.quantize``; ``parity`` compares them with transformers.
"""
from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .export import ExportError, OutputExistsError, llama_threads, to_gguf
from .gguf_quant import quantize
from .paths import cache_dir
from .procs import free_port


# ------------------------------------------------------------------------------------------------ llama.cpp
def load_gguf(gguf_path: str | Path, n_ctx: int = 512, n_threads: int | None = None, logits_all: bool = False,
              lora_path: str | Path | None = None, **kwargs: Any) -> Any:
    """A quiet ``llama_cpp.Llama`` on the CPU with the course's thread count (``OMP_NUM_THREADS``)."""
    from llama_cpp import Llama

    n = n_threads or llama_threads()
    return Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=n, n_threads_batch=n, logits_all=logits_all,
                 lora_path=str(lora_path) if lora_path else None, verbose=False, seed=0, **kwargs)


def gguf_greedy(llm: Any, prompt_ids: Sequence[int], max_new_tokens: int,
                stop_ids: Sequence[int] = (), suppress_ids: Sequence[int] = ()) -> list[int]:
    """Greedy continuation of ``prompt_ids`` in llama.cpp (temperature 0), stopping at ``stop_ids``.

    ``suppress_ids`` are never chosen (their logits set to -inf), as transformers' ``min_new_tokens`` does to
    the end-of-sequence ids.
    """
    processors = None
    if suppress_ids:
        import numpy as np
        from llama_cpp import LogitsProcessorList

        banned = list(suppress_ids)

        def _suppress(_input_ids: Any, scores: Any) -> Any:
            scores[banned] = -np.inf
            return scores

        processors = LogitsProcessorList([_suppress])
    llm.reset()
    out: list[int] = []
    for tok in llm.generate(list(prompt_ids), temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                            logits_processor=processors):
        if tok in stop_ids:
            break
        out.append(int(tok))
        if len(out) >= max_new_tokens:
            break
    return out


def gguf_chat(llm: Any, tokenizer: Any, conversations: list[list[dict[str, str]]],
              max_new_tokens: int = 32) -> list[str]:
    """Greedy chat replies from a GGUF model, prompts rendered by the transformers chat template.

    The same prompt text as ``lora_course.evaluate.generate`` and the same decoding (greedy, stop at eos), so a
    task metric computed on these replies compares with the transformers model's.
    """
    from .evaluate import chat_prompts

    stops = {tokenizer.eos_token_id, llm.token_eos()}
    replies = []
    for text in chat_prompts(tokenizer, conversations):
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        new = gguf_greedy(llm, ids, max_new_tokens, tuple(s for s in stops if s is not None))
        replies.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return replies


def evaluate_gguf(gguf_path: str | Path, tokenizer: Any, task: str, examples: list[dict[str, Any]],
                  n_threads: int | None = None, llm: Any = None) -> Any:
    """The task metric of a GGUF model on ``examples``: an ``EvalResult`` like ``evaluate_task`` (no perplexity)."""
    from .data import prompt_messages
    from .evaluate import MAX_NEW_TOKENS, EvalResult, score

    llm = llm or load_gguf(gguf_path, n_threads=n_threads)
    outputs = gguf_chat(llm, tokenizer, [prompt_messages(ex) for ex in examples], MAX_NEW_TOKENS[task])
    return EvalResult(task, score(task, outputs, examples), None, outputs)


# ------------------------------------------------------------------------------------------- self-check
PROBE_QUANTS = ("Q8_0", "Q4_K_M")
_PROBE_CHILD = r"""
import json, sys
import llama_cpp
info = llama_cpp.llama_print_system_info()
info = info.decode() if isinstance(info, bytes) else str(info)
print(json.dumps({"system_info": info}), flush=True)
for path in sys.argv[1:]:
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_threads=1, n_threads_batch=1, verbose=False, seed=0)
    llm.eval([1, 2, 3, 4, 5])
    tokens = [int(llm.sample(temp=0.0))]
    print(json.dumps({"path": path, "decoded": tokens}), flush=True)
"""


def probe_ggufs(quants: Sequence[str] = PROBE_QUANTS) -> dict[str, Path]:
    """Small quantized GGUFs of the tiny random Llama (64 wide: every matmul fits llama.cpp's AMX kernels'
    alignment for Q8_0), built once into the course cache for ``llama_cpp_check``."""
    folder = cache_dir() / "llama-probe"
    folder.mkdir(parents=True, exist_ok=True)
    f32 = folder / "tiny-f32.gguf"
    out = {q: folder / f"tiny-{q}.gguf" for q in quants}
    if all(p.exists() for p in out.values()):
        return out
    # Two processes sharing the cache (notebooks run side by side) may both find a file missing and both build it.
    # Each writes a temporary name and renames it when complete, so a file that appeared meanwhile is whole: the
    # loser of the race keeps the winner's file (the same bytes: same model, same deterministic converter).
    with contextlib.suppress(OutputExistsError):
        if not f32.exists():
            from .models import tiny_model_dir

            to_gguf(tiny_model_dir(), f32, "f32")
    for q, path in out.items():
        with contextlib.suppress(OutputExistsError):
            if not path.exists():
                quantize(f32, path, q)
    return out


def llama_cpp_check(timeout: float = 120.0, quants: Sequence[str] = PROBE_QUANTS) -> dict[str, Any]:
    """Does this machine's llama.cpp decode quantized GGUFs? Checked in a child process, since a bad build dies
    of a signal (a native build with AMX crashed in ``decode`` on Q8_0 and Q4_K_M, issue 28), which would take the
    notebook's kernel with it.

    Returns ``ok``, ``detail``, ``fix`` (what to do when not ok), ``system_info`` (llama.cpp's CPU features, e.g.
    ``AVX2 = 1 | AMX_INT8 = 0``) and ``amx`` (whether the build uses AMX).
    """
    import importlib.util

    from .llama_build import plan

    rebuild = (f"rebuild it portably: `python src/lora_course/llama_build.py --install` in the course's clone "
               f"(tier {plan()['tier']} on this CPU, AMX off), then restart the kernel")
    if importlib.util.find_spec("llama_cpp") is None:
        return {"ok": False, "detail": "llama-cpp-python is not installed (notebook 08 needs it)",
                "fix": "install the export extra: `make setup` locally, or the setup cell of notebook 08 on "
                       "Colab/Kaggle", "system_info": "", "amx": False}
    paths = probe_ggufs(quants)
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE_CHILD, *map(str, paths.values())], check=False,
                              capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "detail": f"decoding the probe GGUFs took over {timeout:.0f} s", "fix": rebuild,
                "system_info": "", "amx": False}
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    info = lines[0]["system_info"] if lines else ""
    amx = bool(re.search(r"AMX_INT8 = 1|AMX_BF16 = 1|AMX_TILE = 1", info))
    decoded = [Path(x["path"]).stem.removeprefix("tiny-") for x in lines[1:]]
    if proc.returncode != 0:
        import signal

        died = (f"died of {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
                else f"exited with {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
        failed = [q for q in paths if q not in decoded]
        return {"ok": False, "detail": f"llama.cpp {died} decoding a {failed[0] if failed else '?'} GGUF "
                f"(decoded: {decoded or 'none'}; build: {info.strip() or 'unknown'})", "fix": rebuild,
                "system_info": info, "amx": amx}
    return {"ok": True, "detail": f"decoded {', '.join(decoded)} GGUFs in a child process", "fix": "",
            "system_info": info, "amx": amx}


# ------------------------------------------------------------------------------------------------ serving
SERVER_PACKAGES = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")


def server_command(gguf_path: str | Path, port: int, n_threads: int | None = None, n_ctx: int = 1024) -> list[str]:
    """The argv ``serve`` starts: ``python -m llama_cpp.server --model FILE`` on 127.0.0.1 only."""
    n = n_threads or llama_threads()
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path), "--host", "127.0.0.1",
            "--port", str(port), "--n_threads", str(n), "--n_threads_batch", str(n), "--n_ctx", str(n_ctx)]


@contextlib.contextmanager
def serve(gguf_path: str | Path, port: int | None = None, n_threads: int | None = None, n_ctx: int = 1024,
          startup_timeout: float = 60.0) -> Iterator[str]:
    """Run llama-cpp-python's OpenAI-compatible server on 127.0.0.1 for the ``with`` block; yields its base URL.

    Bound to localhost only, with a bounded wait for start-up (the process is killed and its log shown if it does
    not answer in time) and always stopped at the end of the block.
    """
    import importlib.util

    missing = [p for p in SERVER_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ExportError(f"llama_cpp.server needs {', '.join(missing)}: pip install 'llama-cpp-python[server]'")
    port = port or free_port()
    log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)  # noqa: SIM115
    cmd = server_command(gguf_path, port, n_threads, n_ctx)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise ExportError(f"llama_cpp.server exited with {proc.returncode}:\n"
                                  f"{Path(log.name).read_text(encoding='utf-8', errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ExportError(f"llama_cpp.server did not answer within {startup_timeout:.0f} s:\n"
                                  f"{Path(log.name).read_text(encoding='utf-8', errors='replace')[-2000:]}")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        Path(log.name).unlink(missing_ok=True)


def chat_completion(url: str, messages: list[dict[str, str]], max_tokens: int = 64, timeout: float = 60.0,
                    **extra: Any) -> dict[str, Any]:
    """POST one OpenAI-style chat completion (greedy unless told otherwise) and return the JSON response."""
    body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, **extra}).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())
