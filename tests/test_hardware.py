"""Hardware detection and the precision rules: native bf16 from the compute capability, the T4 emulation switch,
``train_precision`` per training mode, the plain loop's fp16 GradScaler, one GPU on Kaggle, the GPU lane's options.

No GPU here: ``torch.cuda`` is monkeypatched to describe one (``fake_gpu``); the fp16 loop runs on the CPU, where
torch has fp16 autocast and a GradScaler too.
"""
import json
import types

import pytest
import torch

from lora_course import hardware

GIB = 2**30


def _props(name: str, cap: tuple[int, int], gib: float) -> types.SimpleNamespace:
    return types.SimpleNamespace(name=name, major=cap[0], minor=cap[1], total_memory=int(gib * GIB))


@pytest.fixture
def fake_gpu(monkeypatch):
    """``fake_gpu(name, capability, total_gib, count=1)``: torch.cuda describes that GPU; returns the fraction calls.

    ``torch.cuda.is_bf16_supported`` answers True whatever the GPU, as it does on a real T4 (emulated bf16): the
    course must not read it. ``get_device_capability`` is not patched: the course must not need it either.
    """
    calls: list[tuple[float, int]] = []
    monkeypatch.setattr(hardware, "_memory_limited", {})
    monkeypatch.delenv(hardware.EMULATE_ENV, raising=False)

    def install(name: str, cap: tuple[int, int], gib: float, count: int = 1) -> list[tuple[float, int]]:
        props = _props(name, cap, gib)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                            lambda fraction, device=None: calls.append((fraction, device)))
        return calls

    return install


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv(hardware.EMULATE_ENV, raising=False)


# --------------------------------------------------------------------------------------------- detection
@pytest.mark.parametrize("name, cap, dtype", [
    ("NVIDIA H200", (9, 0), torch.bfloat16), ("NVIDIA A100-SXM4-80GB", (8, 0), torch.bfloat16),
    ("NVIDIA A10G", (8, 6), torch.bfloat16), ("Tesla T4", (7, 5), torch.float16),
    ("Tesla V100-SXM2-16GB", (7, 0), torch.float16),
])
def test_native_bf16_follows_the_compute_capability_not_is_bf16_supported(fake_gpu, name, cap, dtype):
    fake_gpu(name, cap, 16.0)
    assert torch.cuda.is_bf16_supported()  # what torch says on a T4 too
    info = hardware.gpu_info()
    assert info.native_bf16 == (dtype == torch.bfloat16) == hardware.native_bf16()
    assert (info.name, info.capability, info.emulated) == (name, cap, None)
    assert hardware.select_dtype() == hardware.select_dtype("cuda:0") == dtype
    assert hardware.select_dtype("cpu") == torch.float32


def test_without_cuda_everything_is_fp32(no_gpu):
    info = hardware.gpu_info()
    assert (info.available, info.name, info.capability, info.native_bf16, info.n_gpus) == (False, "cpu", None,
                                                                                            False, 0)
    assert hardware.select_dtype() == torch.float32
    for mode in hardware.MODES:
        p = hardware.train_precision(mode)
        assert (p.device, p.precision, p.model_dtype, p.fp16, p.bf16, p.grad_scaler) == (
            "cpu", "fp32", torch.float32, False, False, False)


def test_emulating_a_t4_on_an_h200(fake_gpu, monkeypatch):
    real_capability_fn = torch.cuda.get_device_capability
    calls = fake_gpu("NVIDIA H200", (9, 0), 139.8)
    monkeypatch.setenv(hardware.EMULATE_ENV, "t4")
    info = hardware.gpu_info()
    assert (info.capability, info.native_bf16, info.emulated) == ((7, 5), False, "t4")
    assert (info.real_capability, info.real_name) == ((9, 0), "NVIDIA H200")  # what compilers keep seeing
    assert info.memory_bytes == 15 * GIB and info.real_memory_bytes == int(139.8 * GIB)
    assert "NVIDIA H200" in info.name and "T4" in info.name
    assert calls == [(pytest.approx(15 / 139.8), 0)], "the 15 GiB cap is applied to the device"
    hardware.gpu_info()
    hardware.select_dtype()
    assert len(calls) == 1, "once per device and process"
    assert hardware.select_dtype() == torch.float16
    assert torch.cuda.get_device_capability is real_capability_fn, "the course never patches torch's capability"
    full = hardware.train_precision("full")
    assert (full.model_dtype, full.compute_dtype, full.fp16, full.grad_scaler) == (torch.float32, torch.float16,
                                                                                   True, True)
    # the SFT recipe decides as on a T4: fp16, a 15 GiB GPU's batch cap
    from lora_course.sft import build_recipe, detect_hardware

    hw = detect_hardware()
    assert (hw.bf16, hw.compute_capability, hw.memory_gib) == (False, (7, 5), 15.0)
    recipe = build_recipe(hw, backend="transformers", effective_batch_size=8, quiet=True)
    assert (recipe.precision, recipe.per_device_train_batch_size) == ("fp16", 2)
    kw = recipe.sft_kwargs("/tmp/out", 1)
    assert (kw["fp16"], kw["bf16"]) == (True, False)


def test_emulation_never_raises_the_memory_of_a_smaller_gpu(fake_gpu, monkeypatch):
    calls = fake_gpu("Tesla T4", (7, 5), 14.6)
    monkeypatch.setenv(hardware.EMULATE_ENV, "T4 ")
    info = hardware.gpu_info()
    assert info.memory_bytes == int(14.6 * GIB) and calls == []


def test_unknown_emulation_names_the_choices(fake_gpu, monkeypatch):
    fake_gpu("NVIDIA H200", (9, 0), 139.8)
    monkeypatch.setenv(hardware.EMULATE_ENV, "k80")
    with pytest.raises(ValueError, match=r"LORA_COURSE_EMULATE='k80'.*t4.*unset it"):
        hardware.select_dtype()


def test_emulation_without_cuda_leaves_the_cpu_path(no_gpu, monkeypatch):
    monkeypatch.setenv(hardware.EMULATE_ENV, "t4")
    assert hardware.select_dtype() == torch.float32
    assert "no CUDA GPU" in hardware.describe()["emulating"]


def test_describe_has_what_the_doctor_shows(fake_gpu, monkeypatch):
    fake_gpu("NVIDIA H200", (9, 0), 139.8, count=2)
    rep = hardware.describe()
    assert rep["compute_capability"] == "9.0" and rep["native_bf16"] and rep["gpu_count"] == 2
    assert rep["dtype"] == "bfloat16" and "emulating" not in rep
    monkeypatch.setenv(hardware.EMULATE_ENV, "t4")
    rep = hardware.describe()
    assert (rep["compute_capability"], rep["native_bf16"], rep["torch_bf16_supported"]) == ("7.5", False, True)
    assert rep["gpu_memory_gib"] == 15.0 and rep["gpu_memory_real_gib"] == 139.8 and rep["dtype"] == "float16"
    assert "9.0" in rep["emulating"]


# ---------------------------------------------------------------------------------------- precision rules
F32, F16, B16 = torch.float32, torch.float16, torch.bfloat16


@pytest.mark.parametrize("gpu, mode, expected", [
    # (model_dtype, compute_dtype, adapter_dtype, fp16, bf16, grad_scaler, loop_amp)
    (("NVIDIA H100", (9, 0)), "full", (B16, B16, None, False, True, False, "off")),
    (("NVIDIA H100", (9, 0)), "lora", (B16, B16, F32, False, True, False, "off")),
    (("NVIDIA H100", (9, 0)), "qlora", (B16, B16, F32, False, True, False, "off")),
    (("NVIDIA H100", (9, 0)), "inference", (B16, B16, None, False, False, False, "off")),
    (("Tesla T4", (7, 5)), "full", (F32, F16, None, True, False, True, "fp16")),
    (("Tesla T4", (7, 5)), "lora", (F16, F16, F32, True, False, True, "fp16")),
    (("Tesla T4", (7, 5)), "qlora", (F16, F16, F32, True, False, True, "fp16")),
    (("Tesla T4", (7, 5)), "inference", (F16, F16, None, False, False, False, "off")),
])
def test_train_precision_by_gpu_and_mode(fake_gpu, gpu, mode, expected):
    fake_gpu(*gpu, 16.0)
    p = hardware.train_precision(mode)
    assert (p.model_dtype, p.compute_dtype, p.adapter_dtype, p.fp16, p.bf16, p.grad_scaler, p.loop_amp) == expected
    assert p.trainer_flags() == {"fp16": expected[3], "bf16": expected[4]}
    assert p.reason and gpu[0] in p.reason
    assert json.loads(json.dumps(p.as_dict()))["model_dtype"] == str(expected[0]).replace("torch.", "")


@pytest.mark.parametrize("gpu", [("NVIDIA H100", (9, 0)), ("Tesla T4", (7, 5)), ("Tesla V100", (7, 0)), None])
def test_precision_invariants(fake_gpu, no_gpu, gpu):
    if gpu:
        fake_gpu(*gpu, 16.0)
    for mode in hardware.MODES:
        p = hardware.train_precision(mode)
        assert not (p.fp16 and p.bf16), "TrainingArguments refuses both"
        assert p.grad_scaler == p.fp16 == (p.loop_amp == "fp16")
        if p.grad_scaler:  # GradScaler.unscale_ takes fp32 gradients only
            assert (p.adapter_dtype if mode in ("lora", "qlora") else p.model_dtype) == F32
        assert (p.adapter_dtype is not None) == (mode in ("lora", "qlora"))


def test_train_precision_rejects_bad_input(no_gpu):
    with pytest.raises(ValueError, match="unknown training mode 'dora'.*full, lora, qlora, inference"):
        hardware.train_precision("dora")
    with pytest.raises(ValueError, match="device must be 'cuda' or 'cpu'"):
        hardware.train_precision("lora", "mps")
    with pytest.raises(ValueError, match="without a CUDA GPU: ask for device='cpu'"):
        hardware.train_precision("lora", "cuda")
    t4 = hardware.GPUInfo(True, "Tesla T4", (7, 5), 15 * GIB, 2)  # asking about another machine needs no GPU
    assert hardware.train_precision("full", "cuda", gpu=t4).model_dtype == torch.float32


# ------------------------------------------------------------------------------------------- the loop's amp
def test_compute_dtypes_see_fp16_weights_and_4bit_compute(tiny):
    import bitsandbytes as bnb

    model, _ = tiny
    assert hardware.compute_dtypes(model) == {F32}
    lin = bnb.nn.Linear4bit(16, 16, compute_dtype=F16)
    holder = torch.nn.Sequential(torch.nn.Linear(16, 16), lin)
    assert F16 in hardware.compute_dtypes(holder), "NF4 layers computing in fp16 make the model an fp16 one"
    assert hardware.compute_dtypes(torch.nn.Linear(4, 4).half()) == {F16}
    assert hardware.loop_amp(holder) == "off", "only GPU models get fp16 autocast automatically"
    with pytest.raises(ValueError, match="unknown amp 'fp8'"):
        hardware.resolve_loop_amp(model, "fp8")


@pytest.fixture
def lora_tiny():
    from peft import LoraConfig, get_peft_model

    from lora_course.models import load_base

    model, tok = load_base("tiny")
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM", init_lora_weights=False)), tok


def test_fp16_with_fp16_trainable_weights_fails_with_the_fix():
    layer = torch.nn.Linear(4, 4).half()
    with pytest.raises(ValueError, match=r"fp32 trainable parameters, found float16.*master weights"):
        hardware.check_scalable(list(layer.parameters()))
    bf = torch.nn.Linear(4, 4).to(B16)
    with pytest.raises(ValueError, match="found bfloat16"):
        hardware.check_scalable(list(bf.parameters()))
    hardware.check_scalable(list(torch.nn.Linear(4, 4).parameters()))


def test_train_steps_fp16_loop_scales_the_loss_and_skips_overflowing_steps(lora_tiny):
    """The plain loop as it runs on a T4 (``amp="auto"`` picks fp16 there; forced here on the CPU, which has fp16
    autocast and a GradScaler too): it trains, and a step whose forward overflowed changes no weight."""
    from lora_course.data import load_task
    from lora_course.train import train_steps

    model, tok = lora_tiny
    examples = load_task("creative", "train")[:8]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in trainable.items()}
    log = train_steps(model, tok, examples, steps=2, batch_size=2, lr=1e-3, amp="fp16")
    assert len(log.losses) == 2 and all(torch.isfinite(torch.tensor(log.losses)))
    assert any(not torch.equal(start[n], p) for n, p in trainable.items()), "the fp16 loop trained"
    assert all(p.dtype == F32 and torch.isfinite(p).all() for p in trainable.values())
    trained = {n: p.detach().clone() for n, p in trainable.items()}
    # an fp16 overflow in the forward (what a T4 met without loss scaling): the scaler sees inf gradients and skips
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, out: out * float("inf"))
    try:
        log = train_steps(model, tok, examples, steps=1, batch_size=2, lr=1e-3, amp="fp16")
    finally:
        hook.remove()
    assert not all(torch.isfinite(torch.tensor(log.losses)))
    assert all(torch.equal(trained[n], p) for n, p in trainable.items()), "an overflowing step must not be applied"
    with pytest.raises(ValueError, match="fp32 trainable parameters"):
        train_steps(model.half(), tok, examples, steps=1, batch_size=2,
                    amp="fp16")


def test_upcast_trainable_undoes_trls_bf16_cast(lora_tiny):
    from lora_course.sft import _fp16_ready

    model, _ = lora_tiny
    for p in model.parameters():  # what TRL 1.15's SFTTrainer does to a quantized model's trainable parameters
        if p.requires_grad:
            p.data = p.data.to(B16)
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    n_trainable = sum(p.requires_grad for p in model.parameters())
    trainer = types.SimpleNamespace(args=types.SimpleNamespace(fp16=False), model=model)
    assert _fp16_ready(trainer, quiet=True) is trainer
    assert all(p.dtype == B16 for p in model.parameters() if p.requires_grad), "bf16 runs keep TRL's choice"
    trainer.args.fp16 = True
    _fp16_ready(trainer, quiet=True)
    assert all(p.dtype == F32 for p in model.parameters() if p.requires_grad)
    assert {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad} == frozen
    assert hardware.upcast_trainable(model) == 0 and n_trainable > 0


# ------------------------------------------------------------------------------------------- several GPUs
def test_single_device_stops_dataparallel_on_two_visible_gpus(monkeypatch, tmp_path):
    from transformers import TrainingArguments
    from transformers.training_args import ParallelMode

    for var in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)

    def args_on(n: int) -> TrainingArguments:
        a = TrainingArguments(output_dir=str(tmp_path), report_to="none")
        a._n_gpu = n  # what TrainingArguments' device set-up finds on a machine with n GPUs, one process
        return a

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    two = args_on(2)
    assert two.parallel_mode == ParallelMode.NOT_DISTRIBUTED  # Trainer would wrap nn.DataParallel
    assert hardware.single_device(two) is two
    assert two.n_gpu == 1 and two.parallel_mode == ParallelMode.NOT_PARALLEL
    assert two.train_batch_size == two.per_device_train_batch_size
    monkeypatch.setenv("WORLD_SIZE", "2")  # launched by accelerate/torchrun: left to the distributed set-up
    assert hardware.launched_distributed() and hardware.single_device(args_on(2)).n_gpu == 2
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert hardware.single_device(args_on(1)).n_gpu == 1


def test_sft_config_is_single_device(monkeypatch, tmp_path):
    from lora_course.sft import Hardware, build_recipe

    seen = []
    monkeypatch.setattr(hardware, "single_device", lambda args: seen.append(args) or args)
    cfg = build_recipe(Hardware("cpu", "cpu", 16.0), max_length=64, quiet=True).sft_config(str(tmp_path), 2)
    assert seen == [cfg]


# ------------------------------------------------------------------------------------------------ GPU lane
def test_lane_environment_sets_or_validates_the_emulation(monkeypatch):
    from lora_course.gpu_lane import lane_environment

    monkeypatch.delenv(hardware.EMULATE_ENV, raising=False)
    assert lane_environment("t4", {"A": "1"}) == {"A": "1", hardware.EMULATE_ENV: "t4"}
    assert lane_environment(None, {"A": "1"}) == {"A": "1"}
    with pytest.raises(ValueError, match="--emulate 'a100'"):
        lane_environment("a100", {})
    with pytest.raises(ValueError, match="LORA_COURSE_EMULATE='p100'"):
        lane_environment(None, {hardware.EMULATE_ENV: "p100"})
    assert hardware.EMULATE_ENV not in __import__("os").environ, "validation leaves this process alone"


def test_lane_model_dir_must_be_a_local_model_folder(tmp_path):
    from lora_course.gpu_lane import check_model_dir

    with pytest.raises(ValueError, match="not a folder.*offline"):
        check_model_dir("HuggingFaceTB/SmolLM2-360M-Instruct")
    with pytest.raises(ValueError, match="no config.json"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert check_model_dir(tmp_path) == tmp_path.resolve()


def test_lane_report_has_each_notebooks_status_and_time(tmp_path):
    from lora_course.course import NotebookRun
    from lora_course.gpu_lane import write_lane_report

    runs = [NotebookRun("00_a.ipynb", True, 12.3, {"wall_seconds": 12.0}),
            NotebookRun("07_b.ipynb", False, 40.0, {}, "AssertionError: 0.6875 | x"),
            NotebookRun("10_c.ipynb", True, 0.0, skipped="needs 2 or more GPUs")]
    lane = {"date": "2026-12-04 10:00", "device": "NVIDIA H200 deciding as a Tesla T4", "gpus": 1, "profile": "colab",
            "emulate": "t4", "dtype": "float16", "model_id": "/m", "pretrained": True, "tests": "exit 0 in 80 s"}
    jpath, mpath = write_lane_report(runs, tmp_path, lane)
    doc = json.loads(jpath.read_text())
    assert [(r["notebook"], r["status"], r["seconds"]) for r in doc["notebooks"]] == [
        ("00_a.ipynb", "ok", 12.3), ("07_b.ipynb", "FAILED", 40.0), ("10_c.ipynb", "SKIPPED", 0.0)]
    assert (doc["passed"], doc["failed"], doc["skipped"], doc["emulate"]) == (1, 1, 1, "t4")
    md = mpath.read_text()
    assert "| 07_b.ipynb | FAILED | 40 | 0 | AssertionError: 0.6875 / x |" in md
    assert "SKIPPED: needs 2 or more GPUs" in md and "emulation `t4`" in md and "exit 0 in 80 s" in md


def test_lane_runs_every_notebook_under_the_emulation_and_reports(monkeypatch, tmp_path):
    from lora_course import gpu_lane
    from lora_course.course import NotebookRun

    monkeypatch.setenv(hardware.EMULATE_ENV, "")  # restored after the test: main() exports the lane's value
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    seen = []

    def fake_run(nb, out, params, environ):
        seen.append((nb.name, dict(params), __import__("os").environ.get(hardware.EMULATE_ENV)))
        return NotebookRun(nb.name, nb.name.startswith("00"), 1.5, {}, "" if nb.name.startswith("00") else "boom")

    monkeypatch.setattr(gpu_lane, "run_notebook", fake_run)
    monkeypatch.setattr(gpu_lane, "_describe_lane", lambda env, model_id: {
        "device": "H200 as T4", "gpus": 1, "dtype": "float16", "capability": (7, 5), "memory_gib": 15.0,
        "pretrained": True})
    nbs = [tmp_path / "00_a.ipynb", tmp_path / "05_b.ipynb"]
    for nb in nbs:
        nb.write_text(json.dumps({"cells": []}))
    rc = gpu_lane.main(["--model-id", str(model), "--profile", "colab", "--emulate", "t4", "--skip-tests",
                        "--out", str(tmp_path / "out"), *map(str, nbs)])
    assert rc == 1, "a failed notebook fails the lane"
    assert seen == [("00_a.ipynb", {"PROFILE": "colab", "MODEL_ID": str(model.resolve())}, "t4"),
                    ("05_b.ipynb", {"PROFILE": "colab", "MODEL_ID": str(model.resolve())}, "t4")]
    doc = json.loads((tmp_path / "out" / "gpu-lane.json").read_text())
    assert [(r["notebook"], r["status"]) for r in doc["notebooks"]] == [("00_a.ipynb", "ok"), ("05_b.ipynb", "FAILED")]
    assert doc["emulate"] == "t4" and doc["profile"] == "colab" and doc["dtype"] == "float16"
    assert (tmp_path / "out" / "course-report.md").is_file()


def test_lane_in_groups_ends_as_one_report_and_runs_solo_notebooks_last_with_every_core(monkeypatch, tmp_path):
    from lora_course import gpu_lane
    from lora_course.course import NotebookRun

    monkeypatch.setenv(hardware.EMULATE_ENV, "")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_lane, "_describe_lane", lambda env, model_id: {
        "device": "H200", "gpus": 1, "dtype": "bfloat16", "capability": (9, 0), "memory_gib": 139.8,
        "pretrained": True})
    monkeypatch.setattr(gpu_lane, "usable_cpus", lambda: 16)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    order = []

    def fake_run(nb, out, params, environ):
        order.append((nb.name, environ["OMP_NUM_THREADS"]))
        return NotebookRun(nb.name, not nb.name.startswith("05"), 2.0, {"m": 1}, "" if nb.name[:2] != "05" else "x")

    monkeypatch.setattr(gpu_lane, "run_notebook", fake_run)
    nbs = {n: tmp_path / f"{n}.ipynb" for n in ("00_a", "05_b", "08_c", "09_d")}
    for nb in nbs.values():
        nb.write_text(json.dumps({"cells": []}))
    out = tmp_path / "out"
    common = ["--model-id", str(model), "--skip-tests", "--out", str(out)]
    # group 1: two side by side (16 cores / 2 workers each), then 08 alone with all 16
    assert gpu_lane.main([*common, "--workers", "2", "--solo", str(nbs["08_c"]),
                          *map(str, (nbs["00_a"], nbs["05_b"], nbs["08_c"])) ]) == 1
    assert sorted(order[:2]) == [("00_a.ipynb", "8"), ("05_b.ipynb", "8")] and order[2] == ("08_c.ipynb", "16")
    # group 2 of the same lane: 09 joins the report; 05's failure stays in it and still fails the lane
    assert gpu_lane.main([*common, str(nbs["09_d"])]) == 1
    doc = json.loads((out / "gpu-lane.json").read_text())
    assert [(r["notebook"], r["status"]) for r in doc["notebooks"]] == [
        ("00_a.ipynb", "ok"), ("05_b.ipynb", "FAILED"), ("08_c.ipynb", "ok"), ("09_d.ipynb", "ok")]
    assert doc["notebooks"][0]["metrics"] == {"m": 1} and doc["passed"] == 3
    # every row says which run produced it (a lane's groups run at different times)
    assert all(r["ran"].endswith(" on H200") and r["ran"][:4].isdigit() for r in doc["notebooks"]), doc["notebooks"]
    # 05 run again and passing: the lane passes as a whole
    monkeypatch.setattr(gpu_lane, "run_notebook", lambda nb, out, params, environ: NotebookRun(nb.name, True, 1.0))
    assert gpu_lane.main([*common, str(nbs["05_b"])]) == 0
    # another lane's settings into the same folder start a fresh report
    assert gpu_lane.main([*common, "--profile", "colab", str(nbs["00_a"])]) == 0
    doc = json.loads((out / "gpu-lane.json").read_text())
    assert [r["notebook"] for r in doc["notebooks"]] == ["00_a.ipynb"] and doc["profile"] == "colab"
    with pytest.raises(SystemExit):
        gpu_lane.main([*common, "--workers", "0", str(nbs["00_a"])])


def test_rows_of_a_report_written_before_rows_had_a_date_get_that_reports_date(tmp_path):
    """previous_runs: a row with no ``ran`` of its own was produced no later than the report it was read from."""
    from lora_course.gpu_lane import previous_runs
    from lora_course.readme import _lane_row

    lane = {"profile": "gpu", "emulate": None, "model_id": "/m"}
    doc = {**lane, "date": "2026-12-06 21:07", "device": "NVIDIA H100",
           "notebooks": [{"notebook": "00_a.ipynb", "status": "ok", "seconds": 3.0},
                         {"notebook": "13_b.ipynb", "status": "ok", "seconds": 4.0, "ran": "2026-12-07 06:35 on X"}]}
    (tmp_path / "gpu-lane.json").write_text(json.dumps(doc))
    rows = previous_runs(tmp_path, lane)
    assert [r.ran for r in rows] == ["2026-12-06 21:07 on NVIDIA H100", "2026-12-07 06:35 on X"]
    # README: the run's date, and its device only where it is not the file's
    row = {"notebook": "00_a.ipynb", "status": "ok", "seconds": 3.0, "ran": rows[0].ran}
    assert _lane_row(row, with_ran=True, device="NVIDIA H100") == "| 00_a | ok | 3 | 2026-12-06 21:07 |  |"
    assert _lane_row({**row, "ran": rows[1].ran}, with_ran=True, device="NVIDIA H100").startswith(
        "| 00_a | ok | 3 | 2026-12-07 06:35 on X |")
    assert _lane_row(row) == "| 00_a | ok | 3 |  |"  # the CPU course's table has no such column


def test_usable_cpus_follows_the_affinity_mask(monkeypatch):
    """Thread pools are sized by the CPUs this process may use (a taskset or container limit), not the host's count."""
    from lora_course import hardware

    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {8, 9, 10, 11, 12, 13, 14, 15}, raising=False)
    assert hardware.usable_cpus() == 8
    monkeypatch.delattr(hardware.os, "sched_getaffinity")  # macOS, Windows
    assert hardware.usable_cpus() == 16
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: None)
    assert hardware.usable_cpus() == 1
