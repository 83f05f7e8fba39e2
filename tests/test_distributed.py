"""lora_course.distributed and lora_course.scaling: DDP and FSDP2 on CPU processes (gloo) equal one process.

The multi-process tests start their processes from a fresh Python (a subprocess with a timeout, so a hang fails
the test instead of stalling CI): accelerate's notebook_launcher forks, and refuses to once bitsandbytes (which
peft imports) is loaded, as it is in this pytest process. They use the tiny random Llama and 3 steps; together
about a minute on two cores.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lora_course.data import global_batches
from lora_course.distributed import (
    DistributedConfigError,
    LaunchConfig,
    RunResult,
    WrapError,
    check_devices,
    first_error,
    rank_micro_batches,
    resolve_wrap_class,
    save_adapter_on_main,
)
from lora_course.memory_estimate import TrainingSetup
from lora_course.procs import free_port
from lora_course.scaling import (
    batch_plan,
    collective_bytes,
    communication_per_step,
    component_kind,
    estimate_memory_per_rank,
    scaled_lr,
    shape_of,
)
from lora_course.shapes import ALL_LINEAR, LLAMA_3_1_8B

REPO = Path(__file__).resolve().parent.parent
LOSS_ATOL = 1e-5  # fp32 sums over a differently split batch: measured differences are ~1e-6
ADAPTER_ATOL = 1e-5
TIMEOUT = 240  # seconds for one multi-process subprocess; a hang fails here


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONWARNINGS": "ignore"}


# --------------------------------------------------------------------------------------- bad input
def test_unknown_strategy_is_refused_with_the_choices():
    with pytest.raises(DistributedConfigError, match=r"unknown strategy 'zero3'.*ddp, fsdp"):
        LaunchConfig(strategy="zero3")
    with pytest.raises(DistributedConfigError, match="per_device_batch must be a positive integer"):
        LaunchConfig(per_device_batch=0)
    with pytest.raises(DistributedConfigError, match="fail_rank=2 is not a rank"):
        LaunchConfig(num_processes=2, fail_rank=2)


def test_more_processes_than_gpus_is_refused():
    with pytest.raises(DistributedConfigError, match=r"4 processes but this machine has 2 GPU\(s\).*num_processes=2"):
        check_devices(4, device="cuda", available=2)
    check_devices(2, device="cuda", available=2)
    check_devices(8, device="cpu")  # CPU processes share the cores: allowed


def test_wrap_class_is_resolved_or_named_in_the_error(tiny):
    model, _ = tiny
    assert resolve_wrap_class(model).__name__ == "LlamaDecoderLayer"
    assert resolve_wrap_class(model, "LlamaDecoderLayer").__name__ == "LlamaDecoderLayer"
    with pytest.raises(WrapError, match=r"cannot wrap 'GPT2Block'.*LlamaDecoderLayer"):
        resolve_wrap_class(model, "GPT2Block")
    with pytest.raises(WrapError, match=r"cannot wrap 'LlamaRotaryEmbedding'.*no parameters"):
        resolve_wrap_class(model, "LlamaRotaryEmbedding")
    with pytest.raises(WrapError, match=r"cannot wrap 'Embedding'.*tied"):
        resolve_wrap_class(model, "Embedding")  # the tiny Llama ties its input embeddings to the output head


def test_non_zero_rank_saves_nothing_and_rank_zero_saves_a_peft_adapter(tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from lora_course.models import load_base

    model, _ = load_base("tiny")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert save_adapter_on_main(peft_model, tmp_path / "rank1", rank=1) is None
    assert not (tmp_path / "rank1").exists()
    saved = save_adapter_on_main(peft_model, tmp_path / "rank0", rank=0)
    assert saved is not None and (saved / "adapter_model.safetensors").exists()
    base, _ = load_base("tiny")
    reloaded = PeftModel.from_pretrained(base, saved)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, peft_model(ids).logits, atol=1e-6)


def test_global_batch_is_split_the_same_whatever_the_processes():
    batches = global_batches(160, 8, steps=30, seed=0)
    assert all(len(b) == 8 for b in batches) and batches == global_batches(160, 8, steps=30, seed=0)
    assert sorted(i for b in batches[:20] for i in b) == sorted(range(160))  # one epoch, each once
    for world, accum in [(1, 1), (2, 1), (2, 2), (4, 2), (8, 1)]:
        parts = [mb for r in range(world) for mb in rank_micro_batches(batches[0], r, world, accum)]
        assert sorted(i for mb in parts for i in mb) == sorted(batches[0])
    with pytest.raises(DistributedConfigError, match="does not split into 3 processes"):
        rank_micro_batches(batches[0], 0, 3, 1)


def test_first_error_is_the_earliest_rank_failure(tmp_path):
    (tmp_path / "error-rank0.txt").write_text("200.5\nRuntimeError: Connection closed by peer")
    (tmp_path / "error-rank1.txt").write_text("200.1\nRuntimeError: injected failure on rank 1")
    assert first_error(tmp_path).startswith("rank1:\nRuntimeError: injected failure")
    assert first_error(tmp_path / "none") is None


def test_first_error_survives_an_unstamped_error_file(tmp_path):
    """A rank stopped while writing its error file (before train_worker wrote them atomically) left it empty: the
    launcher then failed on it with ValueError (CI, 2026-12-07) instead of naming the rank that failed first."""
    (tmp_path / "error-rank0.txt").write_text("")
    (tmp_path / "error-rank1.txt").write_text("200.1\nRuntimeError: injected failure on rank 1")
    assert first_error(tmp_path).startswith("rank1:\nRuntimeError: injected failure")
    (tmp_path / "error-rank1.txt").unlink()
    assert first_error(tmp_path) == "rank0:\n"  # unstamped alone: still named, never an exception


def test_qlora_fsdp_stores_4bit_weights_in_the_compute_dtype():
    import torch

    from lora_course.distributed import qlora_fsdp_quantization_config

    cfg = qlora_fsdp_quantization_config(torch.bfloat16)
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_quant_storage == torch.bfloat16 == cfg.bnb_4bit_compute_dtype


# --------------------------------------------------------------------------------------- scaling
def test_collective_costs_follow_the_ring_factors():
    assert collective_bytes("all_reduce", 1000, 2) == 1000
    assert collective_bytes("all_reduce", 1200, 3) == 1600
    assert collective_bytes("all_gather", 1200, 3) == 800
    assert collective_bytes("reduce_scatter", 1200, 3, "nccl") == 800
    assert collective_bytes("reduce_scatter", 1200, 3, "gloo") == 1600  # gloo: the price of an all-reduce
    with pytest.raises(ValueError, match="unknown collective 'broadcast'"):
        collective_bytes("broadcast", 1, 2)
    with pytest.raises(ValueError, match="unknown backend 'mpi'"):
        collective_bytes("all_gather", 1, 2, "mpi")


def test_fsdp_divides_model_state_and_ddp_adds_buckets():
    setup = TrainingSetup("lora", batch_size=2, seq_len=512, r=16, targets=ALL_LINEAR)
    one = estimate_memory_per_rank(LLAMA_3_1_8B, setup, 1, "ddp")
    ddp = estimate_memory_per_rank(LLAMA_3_1_8B, setup, 8, "ddp")
    fsdp = estimate_memory_per_rank(LLAMA_3_1_8B, setup, 8, "fsdp")
    w = one.components["weights (bf16)"]
    assert fsdp.components["weights (bf16) / 8 ranks"] == -(-w // 8)
    assert ddp.components["DDP gradient buckets (a copy of the gradients)"] == one.components["LoRA gradients (fp32)"]
    assert fsdp.total < ddp.total and ddp.total > one.total
    with pytest.raises(ValueError, match="unknown strategy 'zero'"):
        estimate_memory_per_rank(LLAMA_3_1_8B, setup, 8, "zero")
    with pytest.raises(ValueError, match="neither model state nor per-process work"):
        component_kind("mystery bytes")


def test_fsdp_moves_the_base_and_ddp_only_the_adapter():
    setup = TrainingSetup("lora", r=16, targets=ALL_LINEAR)
    ddp = communication_per_step(LLAMA_3_1_8B, setup, 8, "ddp")
    fsdp = communication_per_step(LLAMA_3_1_8B, setup, 8, "fsdp")
    lora_bytes = LLAMA_3_1_8B.lora_params(ALL_LINEAR, 16) * 4
    assert ddp.total == pytest.approx(2 * 7 / 8 * lora_bytes)
    assert fsdp.total > 2 * 7 / 8 * LLAMA_3_1_8B.total_params() * 2 * 0.9  # ~2 all-gathers of the bf16 base
    assert communication_per_step(LLAMA_3_1_8B, setup, 1, "fsdp").total == 0
    twice = communication_per_step(LLAMA_3_1_8B, setup, 8, "fsdp", grad_accum=2).collectives
    once = fsdp.collectives
    assert sum(v for k, v in twice.items() if "all-gather" in k) == 2 * sum(v for k, v in once.items()
                                                                            if "all-gather" in k)
    assert communication_per_step(LLAMA_3_1_8B, setup, 8, "ddp", grad_accum=4).total == ddp.total


def test_batch_plan_and_lr_rules():
    assert batch_plan(16, 2, 4) == 2 and batch_plan(16, 8, 2) == 1
    with pytest.raises(ValueError, match="not a multiple of 8 processes x 4"):
        batch_plan(16, 8, 4)
    assert scaled_lr(1e-3, 8, 32, "linear") == pytest.approx(4e-3)
    assert scaled_lr(1e-3, 8, 32, "sqrt") == pytest.approx(2e-3)


# --------------------------------------------------------------------------------- multi-process
_EQUALITY = """
import sys
from lora_course.distributed import LaunchConfig, launch
out = sys.argv[1]
# Several processes first: notebook_launcher forks, and refuses once peft/bitsandbytes are imported here.
launch(LaunchConfig("fsdp", 2, per_device_batch=1, grad_accum=2, steps=3, output_dir=out + "/fsdp2"))
launch(LaunchConfig("ddp", 1, per_device_batch=4, steps=3, output_dir=out + "/one"))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (batch 4), FSDP on 2 processes via notebook_launcher (1 x 2 processes x 2 accumulation) and DDP
    on 2 processes via `accelerate launch` (2 x 2 processes): the same global batch of 4, 3 steps."""
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port", str(free_port()),
           "-m", "lora_course.distributed", "--strategy", "ddp", "--per-device-batch", "2", "--steps", "3",
           "--output-dir", str(out / "ddp2")]
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=TIMEOUT, env=_env(), cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(_EQUALITY), str(out)], check=False,
                       capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert p.returncode == 0, p.stderr[-3000:]
    return {name: RunResult.load(out / name) for name in ("one", "ddp2", "fsdp2")}


def _adapter(run):
    from safetensors.torch import load_file

    return load_file(str(Path(run.adapter_dir) / "adapter_model.safetensors"))


def test_ddp_and_fsdp_give_the_loss_curve_and_adapter_of_one_process(runs):
    one = runs["one"]
    assert len(one.losses) == 3
    for name in ("ddp2", "fsdp2"):
        run = runs[name]
        assert run.world_size == 2
        assert max(abs(a - b) for a, b in zip(run.losses, one.losses)) < LOSS_ATOL, (name, run.losses, one.losses)
        ref, got = _adapter(one), _adapter(run)
        assert ref.keys() == got.keys() and len(ref) == 28  # A and B of 7 modules x 2 layers
        worst = max((ref[k] - got[k]).abs().max().item() for k in ref)
        assert worst < ADAPTER_ATOL, (name, worst)
        assert run.eval_perplexity == pytest.approx(one.eval_perplexity, rel=1e-5)
        assert [r.wrote_adapter for r in run.ranks] == [True, False]  # only rank 0 wrote


def test_saved_adapter_reloads_in_one_process_with_the_same_eval_metric(runs):
    from peft import PeftModel

    from lora_course.data import load_task
    from lora_course.evaluate import perplexity
    from lora_course.models import load_base

    run = runs["fsdp2"]
    base, tok = load_base("tiny")
    model = PeftModel.from_pretrained(base, run.adapter_dir)
    ppl = perplexity(model, tok, load_task("creative", "eval")[:run.config["eval_n"]], batch_size=8, max_length=96)
    assert ppl == pytest.approx(run.eval_perplexity, rel=1e-5)


def test_per_rank_bytes_and_traffic_match_the_estimates(runs, tiny):
    one, ddp, fsdp = runs["one"], runs["ddp2"], runs["fsdp2"]
    full = one.ranks[0]
    for r in ddp.ranks:  # DDP: every rank holds everything
        assert (r.frozen_param_bytes, r.grad_bytes, r.optimizer_bytes) == \
            (full.frozen_param_bytes, full.grad_bytes, full.optimizer_bytes)
    for key in ("frozen_param_bytes", "trainable_param_bytes", "grad_bytes", "optimizer_bytes"):
        assert sum(getattr(r, key) for r in fsdp.ranks) == getattr(full, key), key  # FSDP: shards add up
        assert all(getattr(r, key) <= getattr(full, key) / 2 * 1.01 for r in fsdp.ranks), key
    shape = shape_of(tiny[0])
    setup = TrainingSetup("lora", 2, 96, "fp32", r=8, targets=ALL_LINEAR)
    est = estimate_memory_per_rank(shape, setup, 2, "fsdp", device="cpu").components
    assert fsdp.ranks[0].frozen_param_bytes == est["weights (fp32) / 2 ranks"]
    assert fsdp.ranks[0].trainable_param_bytes == est["LoRA params (fp32) / 2 ranks"]
    assert fsdp.ranks[0].grad_bytes == est["LoRA gradients (fp32) / 2 ranks"]
    assert fsdp.ranks[0].optimizer_bytes == est["optimizer states (adamw, fp32) / 2 ranks"]
    for run, strategy in ((ddp, "ddp"), (fsdp, "fsdp")):
        accum = run.config["grad_accum"]  # FSDP gathers the weights again for every micro-step
        computed = communication_per_step(shape, setup, 2, strategy, backend="gloo", grad_accum=accum).total
        for r in run.ranks:
            assert computed <= r.sent_bytes_per_step <= computed * 1.05, (strategy, computed, r.sent_bytes_per_step)
    assert one.ranks[0].sent_bytes_per_step == 0


_FAIL = """
import sys
from lora_course.distributed import DistributedRunError, LaunchConfig, launch
try:
    launch(LaunchConfig("fsdp", 2, steps=3, fail_rank=1, output_dir=sys.argv[1]))
except DistributedRunError as e:
    print("CAUGHT", e)
"""


def test_one_failing_rank_ends_every_rank_with_its_error(tmp_path):
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(_FAIL), str(tmp_path / "nb")], check=False,
                       capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert "CAUGHT" in p.stdout, p.stderr[-3000:]
    assert "First failure, rank1:" in p.stdout and "injected failure on rank 1 at step 1" in p.stdout
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port", str(free_port()),
           "-m", "lora_course.distributed", "--strategy", "ddp", "--steps", "3", "--fail-rank", "1",
           "--output-dir", str(tmp_path / "cli")]
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=TIMEOUT, env=_env(), cwd=REPO)
    assert p.returncode != 0
    assert "injected failure on rank 1" in first_error(tmp_path / "cli")
    assert not (tmp_path / "cli" / "result.json").exists()


def test_run_with_failing_rank_injects_the_failure_and_returns_the_error(monkeypatch):
    """The helper behind notebook 10's failure demo: it makes the last rank (or the one named) fail at the step
    given, returns the launcher's error text and the time, None when nothing failed, and refuses a rank that the
    run does not have before launching anything."""
    from lora_course import distributed

    seen = []

    def fake_launch(cfg):
        seen.append(cfg)
        if cfg.fail_rank is not None and "ok" not in cfg.task:
            raise distributed.DistributedRunError(f"First failure, rank{cfg.fail_rank}:\ninjected failure")

    monkeypatch.setattr(distributed, "launch", fake_launch)
    error, seconds = distributed.run_with_failing_rank(LaunchConfig("fsdp", 2, per_device_batch=1))
    assert error.startswith("First failure, rank1:") and seen[-1].fail_rank == 1 and seen[-1].fail_step == 1
    assert 0 <= seconds < 5
    error, _ = distributed.run_with_failing_rank(LaunchConfig("ddp", 3), fail_rank=0, fail_step=2)
    assert "rank0:" in error and (seen[-1].fail_rank, seen[-1].fail_step, seen[-1].num_processes) == (0, 2, 3)
    assert distributed.run_with_failing_rank(LaunchConfig("ddp", 2, task="ok"))[0] is None
    n = len(seen)
    with pytest.raises(DistributedConfigError, match="fail_rank=2 is not a rank of a 2-process run"):
        distributed.run_with_failing_rank(LaunchConfig("ddp", 2), fail_rank=2)
    assert len(seen) == n, "nothing is launched for a bad rank"


def test_fork_safe_cuda_check_sets_nvml_and_keeps_a_choice_already_made(monkeypatch):
    from lora_course import distributed

    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    distributed.fork_safe_cuda_check()
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "0")
    distributed.fork_safe_cuda_check()
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "0"
