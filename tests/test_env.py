"""The environment doctor reports what this machine is and what the course decides on it, from the same sources the
course decides from (the CPU flags reader, hardware.describe, resolve_profile, installed package versions)."""
import os

import torch

from lora_course import env, hardware
from lora_course.llama_build import cpu_summary


def test_doctor_reports_this_machine_and_the_courses_choices(monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    rep = env.print_doctor("auto", check_bnb=True)
    out = capsys.readouterr().out
    assert rep["torch"] == torch.__version__ and rep["peft"] != "not installed"
    assert rep["device"] == "cpu" and rep["profile"] == "cpu" and rep["dtype"] == "float32"  # no GPU here
    assert rep["OMP_NUM_THREADS"] == "3" and rep["cpu_cores"] == os.cpu_count()
    flags = [k for k, v in cpu_summary().items() if v]
    assert rep["cpu_flags"] == (", ".join(flags) or "none of avx2/avx512f/avx512_bf16/amx")
    assert {k: rep[k] for k in hardware.describe()} == hardware.describe()
    assert 0 < rep["ram_available_gib"] <= rep["ram_total_gib"]
    # bitsandbytes' CPU 4-bit kernels as measured now: the eval forward repacks exactly on AVX512-BF16 CPUs
    assert ("repacks" in rep["bnb_cpu_eval_forward"]) == cpu_summary()["avx512_bf16"], rep["bnb_cpu_eval_forward"]
    assert rep["bnb_cpu_dequantize"].startswith(("equals the NF4 definition", "deviates from the NF4 definition"))
    for key in ("profile", "cpu_flags", "bnb_cpu_eval_forward"):  # the printed table shows what was returned
        assert any(line.startswith(key) and line.rstrip().endswith(str(rep[key])) for line in out.splitlines()), key


def test_package_versions_names_missing_packages():
    assert env.package_versions(("torch", "no-such-package-xyz")) == {"torch": torch.__version__,
                                                                      "no-such-package-xyz": "not installed"}


def test_machine_info_is_the_one_record_of_the_machine_for_every_report():
    from lora_course.env import machine_info

    info = machine_info(decode_threads=3)
    # what make course / make bench (README's figures) and make sweep (results/experiments.json) each read
    assert {"cpu", "flags", "cores", "torch_threads", "date", "platform", "python", "torch"} <= set(info)
    assert info["decode_threads"] == 3 and info["cores"] == os.cpu_count()
    assert set(info["flags"]) == {"avx2", "avx512f", "avx512_bf16", "amx"}
