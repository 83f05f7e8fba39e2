"""LoRA on several processes: DDP and FSDP2 from torch.distributed, launched through accelerate.

The course's recipe (chat-formatted task data, answer-only loss, LoRA on every linear layer, AdamW) runs on N
processes with an existing engine, never a home-made one:

- ``ddp``: ``torch.nn.parallel.DistributedDataParallel``. Every rank holds the whole model; after backward the
  LoRA gradients are all-reduced, so every rank takes the same optimizer step.
- ``fsdp``: FSDP2, ``torch.distributed.fsdp.fully_shard`` on each decoder layer, then on the model. The frozen base
  and the trainable LoRA weights sit in the same sharded units: each rank keeps 1/N of every parameter, gradient and
  optimizer state; a layer's full weights exist only while it runs (all-gather), gradients are reduce-scattered.

``launch(config)`` runs it from a notebook with ``accelerate.notebook_launcher`` (forked processes) and
``accelerate launch -m lora_course.distributed ...`` runs the same worker from the shell. On CPU: gloo, fp32.
Process groups come from ``accelerate.PartialState``; each rank reads its slice of the *same global batch*
(per-process batch x processes x accumulation) and the loss is normalised by the global number of answer tokens,
so 1 process and N processes compute the same gradient. At the end the adapter is gathered (a collective: every
rank takes part) and saved once, by rank 0, as a normal peft adapter (``PeftModel.from_pretrained`` loads it).

Sources: PyTorch docs "Getting Started with Distributed Data Parallel" and "torch.distributed.fsdp.fully_shard"
(FSDP2); accelerate's ``notebook_launcher`` and ``accelerate launch``; QLoRA + FSDP: Answer.AI, "You can now train a
70b language model at home" (2024), which stores the 4-bit weights in a float dtype (``bnb_4bit_quant_storage``) so
FSDP can flatten and shard them with the rest of the model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .data import global_batches
from .paths import write_text_atomic
from .procs import free_port

STRATEGIES: tuple[str, ...] = ("ddp", "fsdp")
METHODS: tuple[str, ...] = ("lora", "qlora")
RESULT_FILE = "result.json"
ADAPTER_DIR = "adapter"


class DistributedConfigError(ValueError):
    """A distributed run is asked for something that cannot work; the message says what to change."""


class WrapError(DistributedConfigError):
    """FSDP cannot wrap the layer class asked for; the message names it and the classes that would work."""


class DistributedRunError(RuntimeError):
    """A rank failed: every rank was stopped, and the message carries the failing rank's own error."""


@dataclass(frozen=True)
class LaunchConfig:
    """One distributed LoRA run. Global batch = ``per_device_batch x num_processes x grad_accum``."""

    strategy: str = "ddp"  # ddp | fsdp
    num_processes: int = 2  # one process per GPU; on CPU, processes share the cores
    profile: str = "tiny"  # lora_course.models profile; the GPU profiles use MODEL_ID
    model_id: str | None = None
    task: str = "creative"
    per_device_batch: int = 2  # examples per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    steps: int = 4
    lr: float = 1e-3
    r: int = 8
    lora_alpha: int = 16
    max_length: int = 96
    seed: int = 0
    eval_n: int = 8  # held-out examples for the answer perplexity after training
    method: str = "lora"  # lora | qlora (4-bit base: a GPU with bitsandbytes)
    wrap_class: str | None = None  # FSDP unit class; None: the model's own decoder layer (_no_split_modules)
    output_dir: str = ""  # result.json and adapter/ are written here (by rank 0)
    fail_rank: int | None = None  # fault injection: this rank raises at ``fail_step`` (shows error handling)
    fail_step: int = 1

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise DistributedConfigError(
                f"unknown strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)} (ddp replicates the "
                "model on every process, fsdp shards it)")
        if self.method not in METHODS:
            raise DistributedConfigError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        for name in ("num_processes", "per_device_batch", "grad_accum", "steps", "r"):
            if getattr(self, name) < 1:
                raise DistributedConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.fail_rank is not None and not 0 <= self.fail_rank < self.num_processes:
            raise DistributedConfigError(
                f"fail_rank={self.fail_rank} is not a rank of a {self.num_processes}-process run")

    @property
    def global_batch(self) -> int:
        return self.per_device_batch * self.num_processes * self.grad_accum


@dataclass
class RankStats:
    """What one rank held after its last backward (local shards under FSDP), and what it sent per step."""

    rank: int
    frozen_param_bytes: int
    trainable_param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    sent_bytes_per_step: float  # bytes this process wrote to its sockets per training step (gloo over TCP)
    wrote_adapter: bool


@dataclass
class RunResult:
    """The outcome of a run, written by rank 0 to ``output_dir/result.json``."""

    config: dict[str, Any]
    world_size: int
    losses: list[float]  # global mean answer-token loss of every step
    eval_perplexity: float  # answer perplexity of the trained model on ``eval_n`` held-out examples
    adapter_dir: str
    seconds: float
    ranks: list[RankStats] = field(default_factory=list)

    @classmethod
    def load(cls, output_dir: str | Path) -> RunResult:
        path = Path(output_dir) / RESULT_FILE
        if not path.exists():
            raise DistributedRunError(f"{path} was not written: the run did not finish (see its error above)")
        data = json.loads(path.read_text(encoding="utf-8"))
        data["ranks"] = [RankStats(**r) for r in data["ranks"]]
        return cls(**data)


# ------------------------------------------------------------------------------------------- checks
def fork_safe_cuda_check() -> None:
    """Let this process ask whether CUDA is there without initialising it, so it can still fork GPU processes.

    ``notebook_launcher`` forks the notebook's kernel; a child forked after the parent initialised the CUDA driver
    cannot use CUDA. With ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` (kept if already set) ``torch.cuda.is_available()``
    counts the GPUs through NVML instead (``torch.cuda.device_count()`` does so anyway). ``launch`` calls it too.
    """
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")


def check_devices(num_processes: int, device: str | None = None, available: int | None = None) -> None:
    """Refuse more processes than GPUs: each process owns one GPU (two processes on one GPU only contend)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not device.startswith("cuda"):
        return
    available = torch.cuda.device_count() if available is None else available
    if num_processes > available:
        raise DistributedConfigError(
            f"asked for {num_processes} processes but this machine has {available} GPU(s): use "
            f"num_processes={available} (one process per GPU), or grad_accum to keep the global batch")


def _decoder_layer_names(model: Any) -> list[str]:
    names: list[str] = []
    for m in model.modules():
        names += [n for n in (getattr(m, "_no_split_modules", None) or []) if n not in names]
    return names


def resolve_wrap_class(model: Any, wrap_class: str | None = None) -> type:
    """The module class FSDP shards one instance at a time (default: the model's decoder layer class).

    Raises ``WrapError`` naming the class when the model has no such module, when its modules hold no parameters,
    or when they share a parameter with modules outside them (tied weights cannot be split across FSDP units).
    """
    name = wrap_class or (_decoder_layer_names(model) or [None])[0]
    found = {type(m).__name__: type(m) for m in model.modules()}
    counts: dict[str, int] = {}
    for m in model.modules():
        if any(True for _ in m.parameters(recurse=False)) or type(m).__name__.endswith("Layer"):
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    repeated = sorted(n for n, c in counts.items() if c > 1 and n.endswith("Layer"))
    hint = f"classes that repeat in this model: {', '.join(repeated) or 'none found'}"
    if name is None:
        raise WrapError(f"{type(model).__name__} does not declare its decoder layer class (_no_split_modules): "
                        f"pass wrap_class=... ({hint})")
    if name not in found:
        raise WrapError(f"FSDP cannot wrap {name!r}: {type(model).__name__} has no module of that class. Pass "
                        f"wrap_class as one of its layer classes ({hint})")
    cls = found[name]
    instances = [m for m in model.modules() if isinstance(m, cls)]
    inside = {id(p) for m in instances for p in m.parameters()}
    if not inside:
        raise WrapError(f"FSDP cannot wrap {name!r}: its modules hold no parameters, so there is nothing to shard "
                        f"({hint})")
    outside = set()
    stack = [model]
    while stack:
        m = stack.pop()
        if isinstance(m, cls):
            continue
        outside |= {id(p) for p in m.parameters(recurse=False)}
        stack += list(m.children())
    if inside & outside:
        raise WrapError(f"FSDP cannot wrap {name!r}: its weights are tied to modules outside it (e.g. tied input "
                        f"and output embeddings), and one parameter cannot live in two FSDP units ({hint})")
    return cls


def qlora_fsdp_quantization_config(compute_dtype: Any) -> Any:
    """The 4-bit settings that let FSDP shard a QLoRA base: NF4 with double quant, *stored* in the compute dtype.

    bitsandbytes packs two 4-bit weights per uint8 by default; FSDP flattens all parameters of a unit into one
    buffer of one dtype, so the packed weights are stored as ``compute_dtype`` elements instead (same bytes).
    """
    from .bnb_interop import qlora_quantization_config

    return qlora_quantization_config(compute_dtype, storage_dtype=compute_dtype)


# --------------------------------------------------------------------------------------- data schedule
# global_batches (every step's examples, the same on every rank) lives in data.py, beside the loop's other data code.


def rank_micro_batches(batch: list[int], rank: int, world_size: int, grad_accum: int) -> list[list[int]]:
    """This rank's micro-batches of one global batch: micro-step m of rank r takes chunk ``m * world + r``."""
    per = len(batch) // (world_size * grad_accum)
    if per * world_size * grad_accum != len(batch):
        raise DistributedConfigError(f"a global batch of {len(batch)} does not split into {world_size} processes x "
                                     f"{grad_accum} micro-steps")
    return [batch[(m * world_size + rank) * per:(m * world_size + rank + 1) * per] for m in range(grad_accum)]


def answer_tokens(feature: dict[str, list[int]]) -> int:
    """Tokens that carry loss in one example (labels after the one-token shift of causal LM)."""
    return sum(1 for t in feature["labels"][1:] if t != -100)


# --------------------------------------------------------------------------------------- model pieces
def _local(t: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _nbytes(t: Any) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def rank_state_bytes(model: Any, optimizer: Any) -> dict[str, int]:
    """Bytes this rank holds in parameters (frozen / trainable), gradients and optimizer states: local shards only.

    Optimizer states are AdamW's two moments; its per-tensor ``step`` counters (one scalar per parameter tensor,
    replicated on every rank) are left out, as notebook 04's estimator leaves them out.
    """
    import torch

    params = list(model.parameters())
    opt = sum(_nbytes(v) for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim())
    return {"frozen_param_bytes": sum(_nbytes(p) for p in params if not p.requires_grad),
            "trainable_param_bytes": sum(_nbytes(p) for p in params if p.requires_grad),
            "grad_bytes": sum(_nbytes(p.grad) for p in params if p.grad is not None),
            "optimizer_bytes": opt}


def gather_adapter_state(peft_model: Any) -> dict[str, Any]:
    """Full (unsharded) copies of the trainable parameters, on CPU. A collective under FSDP: call it on every rank."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if isinstance(p, DTensor) else p
            out[name] = full.detach().to("cpu", copy=True)
    return out


def save_adapter_on_main(peft_model: Any, path: str | Path, rank: int, state: dict[str, Any] | None = None
                         ) -> Path | None:
    """Gather the adapter (every rank must call this) and save it as a normal peft adapter on rank 0 only.

    Other ranks write nothing and return None: several processes writing one folder would race.
    """
    state = gather_adapter_state(peft_model) if state is None else state
    if rank != 0:
        return None
    path = Path(path)
    peft_model.save_pretrained(path, state_dict=state)
    return path


def _sent_bytes() -> int:
    """Bytes this process has passed to write()/writev() so far (Linux /proc/self/io ``wchar``): gloo's TCP sends."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar line")


def _build_model(cfg: LaunchConfig, device: str) -> tuple[Any, Any]:
    import torch
    from peft import get_peft_model

    from .models import load_base, resolve_source, select_dtype
    from .shapes import ALL_LINEAR
    from .targets import build_lora_config

    if cfg.method == "qlora":
        if not device.startswith("cuda"):
            raise DistributedConfigError("method='qlora' shards a 4-bit base with FSDP on GPUs; on CPU use 'lora'")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .models import prepare_tokenizer

        _, source = resolve_source(cfg.profile, cfg.model_id)
        dtype = select_dtype(device)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map={"": device},
                                                     quantization_config=qlora_fsdp_quantization_config(dtype))
        tok = prepare_tokenizer(AutoTokenizer.from_pretrained(source))
    else:
        model, tok = load_base(cfg.profile, cfg.model_id, device=device)
    model.config.use_cache = False
    torch.manual_seed(cfg.seed)  # the same LoRA init on every rank (FSDP does not broadcast; DDP would)
    lcfg = build_lora_config(model, r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=ALL_LINEAR)
    return get_peft_model(model, lcfg), tok


def _token_loss_sum(model: Any, batch: dict[str, Any]) -> Any:
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")


def shard_model(peft_model: Any, world_size: int, device: str, wrap_class: str | None = None) -> Any:
    """FSDP2: ``fully_shard`` each decoder layer (LoRA weights included), then the model. Returns the root unit.

    The root is the transformers model inside the peft wrapper, so parameter names (and the saved adapter) stay
    peft's. With a base in bf16/fp16 and LoRA weights in fp32, a mixed-precision policy gives every unit one
    compute dtype (FSDP all-gathers a unit's parameters as one buffer of one dtype); gradients are reduced in fp32.
    """
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    root = peft_model.base_model.model
    cls = resolve_wrap_class(root, wrap_class)
    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (world_size,))
    dtypes = {p.dtype for p in root.parameters() if p.is_floating_point()}
    base_dtype = min(dtypes, key=lambda d: torch.finfo(d).bits)
    mp = MixedPrecisionPolicy(param_dtype=base_dtype, reduce_dtype=torch.float32) if len(dtypes) > 1 else None
    kwargs = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
    for module in list(root.modules()):
        if isinstance(module, cls):
            fully_shard(module, **kwargs)
    fully_shard(root, **kwargs)
    return root


def _process_info(cfg: LaunchConfig) -> tuple[int, int, str, Any]:
    """(rank, world size, device, accelerate state or None). One process without a launcher needs no group."""
    import torch

    cuda = torch.cuda.is_available() and cfg.profile not in ("cpu", "tiny")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, "cuda" if cuda else "cpu", None
    from accelerate import PartialState

    state = PartialState(cpu=not cuda)  # gloo on CPU, nccl on GPUs
    return state.process_index, state.num_processes, str(state.device), state


def train_worker(cfg: LaunchConfig) -> None:
    """Everything one rank does: build, wrap, train on its slice of each global batch, evaluate, save, report.

    A rank that fails writes its traceback to ``output_dir/error-rank<r>.txt`` first, so that the launcher can
    show the error that started it all rather than the "connection closed" the other ranks see next.
    """
    rank = int(os.environ.get("RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # forked from a Jupyter kernel, progress bars would try to talk to the notebook through the parent's socket
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if type(sys.stdout).__module__.startswith("ipykernel"):  # print to the kernel's own streams, not its socket
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    try:
        _train(cfg)
    except BaseException as e:
        import traceback

        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        # whole or not at all: the launcher reads these files while the other ranks are being stopped, and a rank killed
        # mid-write left an empty file that first_error could not parse (seen once in CI, 2026-12-07)
        write_text_atomic(Path(cfg.output_dir) / f"error-rank{rank}.txt", f"{time.time():.6f}\n{text}")
        raise


def _train(cfg: LaunchConfig) -> None:
    import contextlib

    import torch
    import torch.distributed as dist

    from .data import collate, load_task, tokenize_example
    from .evaluate import perplexity

    rank, world, device, state = _process_info(cfg)
    if world != cfg.num_processes:
        raise DistributedConfigError(f"launched with {world} processes but the config asks for {cfg.num_processes}:"
                                     f" pass --num-processes {world} (or launch {cfg.num_processes})")
    check_devices(world, device)
    t0 = time.perf_counter()
    peft_model, tok = _build_model(cfg, device)
    model = peft_model
    if world > 1 and cfg.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(peft_model, device_ids=[state.local_process_index] if device.startswith("cuda") else None)
    fsdp_root = shard_model(peft_model, world, device, cfg.wrap_class) if world > 1 and cfg.strategy == "fsdp" \
        else None
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)

    feats = [tokenize_example(tok, ex, cfg.max_length) for ex in load_task(cfg.task, "train")]
    losses, sent, stats = [], [], {}
    model.train()
    for step, batch_idx in enumerate(global_batches(len(feats), cfg.global_batch, cfg.steps, cfg.seed)):
        if cfg.fail_rank == rank and step == cfg.fail_step:
            raise RuntimeError(f"injected failure on rank {rank} at step {step} (LaunchConfig.fail_rank)")
        n_tokens = sum(answer_tokens(feats[i]) for i in batch_idx)  # of the whole global batch: same on all ranks
        micro = rank_micro_batches(batch_idx, rank, world, cfg.grad_accum)
        w0, local_sum = _sent_bytes(), 0.0
        for m, idx in enumerate(micro):
            last = m == len(micro) - 1
            batch = {k: v.to(device) for k, v in collate([feats[i] for i in idx], tok.pad_token_id).items()}
            sync = contextlib.nullcontext()
            if world > 1 and cfg.strategy == "ddp" and not last:
                sync = model.no_sync()  # accumulate locally; all-reduce once, on the last micro-step
            if fsdp_root is not None:
                fsdp_root.set_requires_gradient_sync(last)
            with sync:
                loss_sum = _token_loss_sum(model, batch)  # summed over this micro-batch's answer tokens
                # DDP and FSDP average gradients over ranks: x world undoes that, / n_tokens makes it the global mean
                (loss_sum * world / n_tokens).backward()
            local_sum += loss_sum.item()
        opt.step()
        sent.append(_sent_bytes() - w0)
        if step == cfg.steps - 1:
            stats = rank_state_bytes(peft_model, opt)
        opt.zero_grad(set_to_none=True)
        total = torch.tensor([local_sum], dtype=torch.float64, device=device)  # NCCL reduces only GPU tensors
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / n_tokens)

    eval_examples = load_task(cfg.task, "eval")[:cfg.eval_n]
    ppl = perplexity(peft_model, tok, eval_examples, batch_size=cfg.eval_n, max_length=cfg.max_length)
    adapter = gather_adapter_state(peft_model)  # a collective under FSDP: every rank takes part
    saved = save_adapter_on_main(peft_model, Path(cfg.output_dir) / ADAPTER_DIR, rank, adapter)
    steady = sent[1:] or sent  # the first step also pays one-off set-up traffic
    mine = RankStats(rank, sent_bytes_per_step=sum(steady) / len(steady), wrote_adapter=saved is not None, **stats)
    everyone: list[Any] = [None] * world
    if world > 1:
        dist.all_gather_object(everyone, asdict(mine))
    else:
        everyone = [asdict(mine)]
    if rank == 0:
        result = RunResult(asdict(cfg), world, losses, ppl, str(saved), time.perf_counter() - t0,
                           [RankStats(**r) for r in everyone])
        path = Path(cfg.output_dir) / RESULT_FILE
        path.write_text(json.dumps(asdict(result), indent=1))
    if state is not None:
        state.wait_for_everyone()
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- launch
def first_error(output_dir: str | Path) -> str | None:
    """The traceback of the rank that failed first (the others then only see their peer disappear)."""
    found = []
    for f in Path(output_dir).glob("error-rank*.txt"):
        stamp, _, text = f.read_text(encoding="utf-8").partition("\n")
        try:
            when = float(stamp)
        except ValueError:  # not written by train_worker (which writes atomically): after every stamped one
            when = math.inf
        found.append((when, f.stem.removeprefix("error-"), text))
    if not found:
        return None
    stamp, who, text = min(found)
    return f"{who}:\n{text}"


def launch(cfg: LaunchConfig) -> RunResult:
    """Run ``cfg`` on ``cfg.num_processes`` processes with ``accelerate.notebook_launcher``; return rank 0's result.

    One process runs here, in this process. Several are forked, so call it before this process touches a GPU or
    imports bitsandbytes (peft imports it): accelerate refuses otherwise. If any rank fails, every rank is stopped
    and ``DistributedRunError`` carries the failing rank's own traceback.
    """
    fork_safe_cuda_check()
    check_devices(cfg.num_processes)
    cfg = replace(cfg, output_dir=cfg.output_dir or tempfile.mkdtemp(prefix=f"lora-{cfg.strategy}-"))
    if cfg.num_processes == 1:
        train_worker(cfg)
        return RunResult.load(cfg.output_dir)
    from accelerate import notebook_launcher

    try:
        notebook_launcher(train_worker, args=(cfg,), num_processes=cfg.num_processes, use_port=str(free_port()))
    except Exception as e:  # noqa: BLE001 - re-raised with the failing rank's own error
        cause = first_error(cfg.output_dir) or f"{type(e).__name__}: {e}"
        raise DistributedRunError(f"the {cfg.strategy} run on {cfg.num_processes} processes failed and every rank "
                                  f"was stopped. First failure, {cause}") from None
    return RunResult.load(cfg.output_dir)


def run_with_failing_rank(cfg: LaunchConfig, fail_rank: int | None = None,
                          fail_step: int = 1) -> tuple[str | None, float]:
    """Launch ``cfg`` with one rank made to raise at ``fail_step`` (default: the last rank) and time the launch.

    Returns ``(error, seconds)``: the ``DistributedRunError`` text (the first failure: that rank's own traceback),
    or ``None`` if the run did not fail, and the seconds until every rank had stopped (the launcher's elastic agent
    stops all of them as soon as one exits with an error). Notebook 10 shows with it that no rank hangs.
    """
    fail_rank = cfg.num_processes - 1 if fail_rank is None else fail_rank
    cfg = replace(cfg, fail_rank=fail_rank, fail_step=fail_step)  # a rank the run does not have is refused here
    t0 = time.perf_counter()
    try:
        launch(cfg)
        error = None
    except DistributedRunError as e:
        error = str(e)
    return error, time.perf_counter() - t0


def _parser() -> argparse.ArgumentParser:
    d = LaunchConfig()
    p = argparse.ArgumentParser(
        prog="python -m lora_course.distributed",
        description="LoRA on several processes with DDP or FSDP2. Under `accelerate launch` (or torchrun) each "
                    "process runs the worker; run plainly, it forks the processes itself (notebook_launcher).")
    p.add_argument("--strategy", default=d.strategy, help="ddp | fsdp")
    p.add_argument("--num-processes", type=int, default=int(os.environ.get("WORLD_SIZE", d.num_processes)))
    for name in ("profile", "model_id", "task", "method", "wrap_class"):
        p.add_argument(f"--{name.replace('_', '-')}", default=getattr(d, name))
    for name in ("per_device_batch", "grad_accum", "steps", "r", "lora_alpha", "max_length", "seed", "eval_n",
                 "fail_step"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    p.add_argument("--fail-rank", type=int, default=None, help="make this rank raise (to see error handling)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--output-dir", required=True, help="where rank 0 writes result.json and adapter/")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    cfg = LaunchConfig(**args)
    if "LOCAL_RANK" in os.environ:  # started by accelerate launch / torchrun: this process is one rank
        train_worker(cfg)
        return 0
    result = launch(cfg)
    print(json.dumps({"losses": result.losses, "eval_perplexity": result.eval_perplexity,
                      "adapter_dir": result.adapter_dir}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
