"""Notebook 11's plumbing: a training loop that shows its learning rate, gradient norms and update sizes, a divergence
guard that stops a run and names the fix, and the bookkeeping of merging a QLoRA-trained adapter.

- ``train_run``: the course's plain loop (``train.train_steps``: AdamW, answer-only loss, seeded batches) with what a
  real recipe adds: a learning-rate schedule (``transformers.get_scheduler``, the same function ``Trainer`` calls for
  ``lr_scheduler_type``/``warmup_steps``), gradient clipping (``torch.nn.utils.clip_grad_norm_``, as ``Trainer`` does
  with ``max_grad_norm``), and per step the rate used, the gradient norm before and after clipping and the size of
  the update actually written into the weights. Optionally it stops a diverging run (``DivergenceGuard``).
- ``DivergenceGuard``: a loss that is not finite, or far above the run's first loss, stops training before the bad
  step is applied; ``TrainingDiverged`` carries the log so far and a message naming the fixes.
- ``snapshot_trainable`` / ``restore_trainable``: start several runs from the same adapter initialisation.
- ``dequantized_weights``: the weights a bitsandbytes 4-bit model really computes with, keyed by the plain model's
  module names, decoded with ``bnb_interop.bnb_weight`` (correct on every CPU, unlike bitsandbytes'
  ``dequantize_4bit`` on AVX-512 CPUs for rows that are not whole blocks): what a QLoRA adapter must be merged into.
- ``merged_model``: the trained model with its adapter merged, a QLoRA adapter into the dequantized NF4 weights (the
  pitfall handled); notebook 13 exports it.
- ``logit_gap``: how far two models' next-token distributions are apart on the same batch (max |logit difference|,
  mean KL, top-1 agreement), over the positions that carry a label.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .data import collate, global_batches, tokenize_example

SCHEDULES: tuple[str, ...] = ("constant", "constant_with_warmup", "linear", "cosine")


@dataclass
class RunLog:
    """Per-step record of a ``train_run``: the loss, the learning rate the step used, the gradient norm before and
    after clipping (equal without clipping) and the norm of the change the optimizer made to the trainable weights."""

    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    clipped_norms: list[float] = field(default_factory=list)
    update_norms: list[float] = field(default_factory=list)
    skipped_steps: int = 0  # fp16 GradScaler steps skipped for inf/nan gradients
    seconds: float = 0.0
    stopped: str | None = None  # the divergence message when a guard stopped the run

    @property
    def steps(self) -> int:
        return len(self.update_norms)


class TrainingDiverged(RuntimeError):
    """A run stopped by ``DivergenceGuard``: ``log`` holds the steps done before it (the bad step is not applied)."""

    def __init__(self, message: str, step: int, loss: float, log: RunLog) -> None:
        super().__init__(message)
        self.step, self.loss, self.log = step, loss, log


@dataclass(frozen=True)
class DivergenceGuard:
    """Stop a run whose loss is not finite, exceeds ``factor`` times its first loss, or (given ``vocab_size``) is worse
    than a uniform guess over the vocabulary by more than that factor: above log(vocab_size) + log(factor).

    Why a ratio to the first loss: in a healthy run the loss of a batch stays near or below the first one (notebook
    11's runs: never above 1.05x), so a factor of a few is far outside that noise, while a diverging run passes it
    within a few steps (there, at lr=0.3 before the second limit existed: 4.1x and 8.1x on a CPU, 3.6x and 3.3x in
    bf16 on a GPU) and climbs on towards inf/nan.
    Why the uniform guess as well: a ratio to the first loss misses a run that blows up from a high first loss and
    then stays put. In fp16 with loss scaling (the GPU lane deciding as a T4) the same bad rate took the loss from 5.13
    to 14.5 at the second step and held it at ~14.3: only 2.8x the first, yet above log(49152) = 10.80, the loss of
    a model that knows nothing. A model starting near that loss (a random init) is healthy within a few tenths of it;
    log(factor) (1.1 nats for 3x: a third of the uniform guess's probability on the targets) is far outside that.
    """

    factor: float = 3.0
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.factor, (int, float)) and self.factor > 1):
            raise ValueError(f"DivergenceGuard factor must be a number > 1 (times the first loss), got {self.factor!r}")
        if self.vocab_size is not None and not (isinstance(self.vocab_size, int) and self.vocab_size > 1):
            raise ValueError(f"DivergenceGuard vocab_size must be an integer > 1 (the model's output vocabulary, "
                             f"model.config.vocab_size) or None, got {self.vocab_size!r}")

    @property
    def uniform_limit(self) -> float | None:
        """The loss above which the model does worse than a uniform guess by more than ``factor`` (None: not used)."""
        return None if self.vocab_size is None else math.log(self.vocab_size) + math.log(self.factor)

    def check(self, step: int, loss: float, first: float, lr: float, max_grad_norm: float | None,
              warmup_steps: int) -> str | None:
        """None while training is healthy; else the message saying what happened and what to change."""
        limit = self.uniform_limit
        if math.isfinite(loss) and loss <= self.factor * first and (limit is None or loss <= limit):
            return None
        if not math.isfinite(loss):
            what = f"loss is {loss}"
        elif loss > self.factor * first:
            what = f"loss {loss:.2f} is {loss / first:.1f}x the first step's {first:.2f} (limit {self.factor:g}x)"
        else:
            what = (f"loss {loss:.2f} is worse than a uniform guess over {self.vocab_size} tokens (log V = "
                    f"{math.log(self.vocab_size):.2f}) by more than {self.factor:g}x (limit {limit:.2f})")
        fixes = [f"lower the learning rate (now {lr:.2g}; LoRA trains at 1e-4 to 2e-3)"]
        if not warmup_steps:
            fixes.append("warm up over the first 5-10% of the steps (warmup_steps)")
        if max_grad_norm is None:
            fixes.append("clip gradients (max_grad_norm=1.0)")
        fixes.append("in fp16, scale the loss (a GradScaler; Trainer(fp16=True) does it)")
        return f"diverged at step {step}: {what}. Fix: " + "; ".join(fixes) + "."


def _keeps_logits(model: Any) -> bool:
    """Whether the model's forward (under a peft wrapper: its base model's) takes transformers' ``logits_to_keep``."""
    import inspect

    forward = getattr(model, "get_base_model", lambda: model)().forward
    return "logits_to_keep" in inspect.signature(forward).parameters


def answer_logits(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """The logits at the positions whose next token is an answer token, and those tokens: ``(logits (B, K, V),
    targets (B, K))`` with -100 where a row has no answer token at a kept position.

    A causal LM scores every position, but the loss (assistant-only labels) reads only the K positions before an
    answer token: on the course's tasks 18 of 58 in a batch of 4. ``logits_to_keep`` (transformers' argument, a 1-D
    tensor of positions) runs the output layer, 49152 x 576 on the cpu model (a fifth of its forward), on those alone:
    the same loss to float rounding (measured 1.2e-7 of 1.91), a LoRA step 13% faster and a full fine-tuning step
    11% (notebook 12's runs on 1 CPU thread). A model whose forward has no ``logits_to_keep`` scores every position.
    """
    shifted = batch["labels"][:, 1:]
    if not _keeps_logits(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        return logits, shifted
    cols = (shifted != -100).any(0).nonzero().squeeze(1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=cols).logits
    return logits, shifted[:, cols]


def answer_loss(model: Any, batch: dict[str, Any]) -> Any:
    """The mean cross-entropy over the batch's answer tokens (what ``model(**batch).loss`` computes, from
    ``answer_logits``: the output layer only where it is read; a model without ``logits_to_keep``: its own loss)."""
    import torch

    if not _keeps_logits(model):
        return model(**batch).loss
    logits, targets = answer_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=-100)


def train_run(model: Any, tokenizer: Any, examples: list[dict[str, Any]], steps: int, batch_size: int = 8,
              lr: float = 2e-3, schedule: str = "constant", warmup_steps: int = 0, max_grad_norm: float | None = None,
              seed: int = 0, max_length: int = 128, weight_decay: float = 0.0, optimizer: Any = None,
              guard: DivergenceGuard | None = None, amp: str = "auto",
              on_step: Callable[[int], None] | None = None) -> RunLog:
    """Train the model's trainable parameters for ``steps`` AdamW steps with a schedule and optional clipping.

    ``schedule`` is a ``transformers.get_scheduler`` name (``SCHEDULES``), stepped once per optimizer step as
    ``Trainer`` does; ``max_grad_norm`` clips the total gradient norm before the step (None: no clipping). With a
    ``guard`` a diverging loss raises ``TrainingDiverged`` before its step is applied. fp16 models on a GPU train
    under autocast with a GradScaler (gradients unscaled before clipping), as ``train.train_steps`` does.
    ``on_step(step)`` runs after each optimizer step, before the gradients are cleared, as in ``train.train_steps``:
    AdaLoRA's ``model.base_model.update_and_allocate(step)`` reads the gradients there (notebook 12).
    """
    import torch
    from transformers import get_scheduler

    from .hardware import amp_context, check_scalable, make_grad_scaler, resolve_loop_amp

    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)} "
                         "(transformers' lr_scheduler_type names)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not 0 <= warmup_steps < steps:
        raise ValueError(f"warmup_steps must be in [0, steps), got {warmup_steps} of {steps}")
    if warmup_steps and schedule == "constant":
        raise ValueError("schedule 'constant' ignores warmup_steps: use 'constant_with_warmup' (or cosine/linear)")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None (no clipping), got {max_grad_norm!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: add LoRA layers (or unfreeze some) first")
    torch.manual_seed(seed)
    feats = [tokenize_example(tokenizer, ex, max_length) for ex in examples]
    device = params[0].device
    # On a CPU torch's AdamW defaults to a Python loop over the tensors; fused=True is its vectorised C++ kernel, the
    # same update to float rounding: AdamW's step over notebook 12's 106M full fine-tuning weights 0.205 -> 0.081 s on
    # 2 cores (Intel Xeon, AVX-512; a full step is ~1.5 s). On a GPU torch's default (foreach) stays.
    opt = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                                         fused=True if device.type == "cpu" else None)
    sched = get_scheduler(schedule, opt, num_warmup_steps=warmup_steps, num_training_steps=steps)
    amp = resolve_loop_amp(model, amp)
    scaler = make_grad_scaler(amp, device.type)
    if scaler is not None:
        check_scalable(params)
    log = RunLog()
    model.train()
    t0 = time.perf_counter()
    try:
        for step, idx in enumerate(global_batches(len(feats), batch_size, steps, seed)):
            batch = {k: v.to(device) for k, v in collate([feats[i] for i in idx], tokenizer.pad_token_id).items()}
            with amp_context(amp, device.type):
                loss = answer_loss(model, batch)  # = model(**batch).loss, the output layer only where read
            value = loss.item()
            current_lr = opt.param_groups[0]["lr"]
            if guard is not None:
                message = guard.check(step, value, log.losses[0] if log.losses else value, current_lr,
                                      max_grad_norm, warmup_steps)
                if message:
                    log.stopped = message
                    raise TrainingDiverged(message, step, value, log)
            before = [p.detach().clone() for p in params]
            if scaler is None:
                loss.backward()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads).item()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            clipped = torch.nn.utils.get_total_norm(grads).item() if max_grad_norm is not None else norm
            if scaler is None:
                opt.step()
            else:
                scale = scaler.get_scale()
                scaler.step(opt)
                scaler.update()
                log.skipped_steps += scaler.get_scale() < scale  # the scale drops only after a skipped step
            sched.step()
            if on_step is not None:
                on_step(step)
            opt.zero_grad(set_to_none=True)
            update = update_norm(before, params)
            log.losses.append(value)
            log.lrs.append(current_lr)
            log.grad_norms.append(norm)
            log.clipped_norms.append(clipped)
            log.update_norms.append(update)
    finally:
        log.seconds = time.perf_counter() - t0
        model.eval()
    return log


def update_norm(before: list[Any], params: list[Any]) -> float:
    """||after - before|| over every tensor of ``params``; ``before`` holds their copies and is overwritten.

    The difference is taken in place in the copies (no float copy of a 106M-weight model per step: 0.07 s instead of
    0.23 s a full fine-tuning step on the cpu model) and is exact whenever a weight moved by less than its own size
    (Sterbenz: b/2 <= a <= 2b makes a - b representable), otherwise within one rounding of the weights' dtype; the
    per-tensor norms are combined in fp32.
    """
    import torch

    with torch.no_grad():
        after = [p.detach() for p in params]
        torch._foreach_sub_(before, after)
        norms = torch._foreach_norm(before)
        return float(torch.linalg.vector_norm(torch.stack([n.float() for n in norms])))


def snapshot_trainable(model: Any) -> dict[str, Any]:
    """A copy of every trainable parameter, by name: ``restore_trainable`` puts them back (same start for each run)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore_trainable(model: Any, snapshot: dict[str, Any]) -> None:
    """Copy a ``snapshot_trainable`` back into the model (in place); every snapshot name must exist."""
    import torch

    params = dict(model.named_parameters())
    missing = sorted(set(snapshot) - set(params))
    if missing:
        raise KeyError(f"the snapshot has parameters this model lacks (another model or adapter?): {missing[:3]}")
    with torch.no_grad():
        for name, value in snapshot.items():
            params[name].copy_(value)


def dequantized_weights(model: Any, dtype: Any = None) -> dict[str, Any]:
    """The weight of every bitsandbytes 4-bit layer of ``model`` (peft-wrapped or not), decoded, by plain module name.

    Names are those of the unwrapped model (``model.layers.0.self_attn.q_proj``), so they address the same layers of
    a 16-bit copy of the model: ``plain.get_submodule(name).weight.copy_(w)`` turns it into the dequantized NF4 base.
    Decoded with ``bnb_interop.bnb_weight`` (either of bitsandbytes' layouts, any CPU); ``dtype`` default float32.
    """
    import bitsandbytes as bnb
    import torch

    from .bnb_interop import bnb_weight

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            plain = name.removeprefix("base_model.model.").removesuffix(".base_layer")
            out[plain] = bnb_weight(module, dtype or torch.float32)
    if not out:
        raise ValueError("the model has no bitsandbytes 4-bit layers: load it with "
                         "BitsAndBytesConfig(load_in_4bit=True) (QLoRA) first")
    return out


def _own_forward(model: Any) -> Any:
    """``model`` with every instance-level ``forward`` removed, so each module runs its class's own.

    TRL's ``SFTTrainer`` (1.15, ``trainer.utils.add_fused_lm_head``) replaces the trained model's ``forward`` with a
    wrapper that closes over the *original* bound ``forward``. ``copy.deepcopy`` copies the attribute but not the
    closure, so the copy's forward keeps running the original model, its own weights unused: a merged copy then
    "matches" the trained model exactly, whatever its weights (notebook 13 measured 0.0 that way; a test reproduces
    it). The wrapper only adds a fused loss for training; the class's forward computes the same logits.
    """
    for module in model.modules():
        if "forward" in vars(module):
            del module.forward
    return model


def merged_model(peft_model: Any, profile: str = "auto", model_id: str | None = None, dtype: Any = None,
                 merge: bool = True) -> Any:
    """A plain transformers model computing what the trained ``peft_model`` computes, its LoRA update merged in.

    A 16-bit (or fp32) base merges as peft does, W + sBA. A QLoRA model (bitsandbytes 4-bit layers) merges into the
    **dequantized** NF4 weights Ŵ + sBA, the function it was trained on: the base is loaded again unquantized in
    ``dtype`` (fp32 by default), its quantized layers get ``dequantized_weights``, then the adapter is merged. Merging
    into the original 16-bit W instead shifts every layer by W - Ŵ (notebook 11 measures it), and ``merge_and_unload``
    on the 4-bit model itself re-quantizes and loses most of the update. ``profile``/``model_id`` name the base the
    QLoRA model was loaded from (``models.resolve_source``). ``peft_model`` itself is left as trained, adapter
    included (``merge_and_unload`` on it would strip its LoRA layers, and a later ``save_pretrained`` would write
    an empty adapter): a 16-bit model is merged on a copy (cast to ``dtype`` when one is given).

    ``merge=False`` returns the same model with the adapter kept unmerged (a peft model): the trained function
    computed in ``dtype``, the reference a merged model is compared with when training ran in 16-bit (notebook 13:
    the trained bf16 model differs from it by bf16 rounding, the fp32 merge by fp32 rounding only).
    """
    import copy
    import tempfile

    import bitsandbytes as bnb
    import torch
    from peft import PeftModel

    from .models import load_base

    if not hasattr(peft_model, "merge_and_unload"):
        raise TypeError(f"{type(peft_model).__name__} has no adapter to merge: pass the peft model you trained "
                        "(get_peft_model / PeftModel.from_pretrained)")
    if not any(isinstance(m, bnb.nn.Linear4bit) for m in peft_model.modules()):
        twin = _own_forward(copy.deepcopy(peft_model))
        if dtype is not None:
            twin = twin.to(dtype)
        return (twin.merge_and_unload() if merge else twin).eval()
    deq = dequantized_weights(peft_model, dtype or torch.float32)
    base, _ = load_base(profile, model_id, dtype=dtype or torch.float32,
                        device=str(next(peft_model.parameters()).device))
    with torch.no_grad():
        for name, w in deq.items():
            base.get_submodule(name).weight.copy_(w)
    with tempfile.TemporaryDirectory(prefix="qlora-merge-") as folder:
        peft_model.save_pretrained(folder)  # the adapter as shipped: weights and config, nothing of the 4-bit base
        twin = PeftModel.from_pretrained(base, folder)
        merged = twin.merge_and_unload() if merge else twin
    merged.eval()
    return merged


def logit_gap(ref_logits: Any, logits: Any, labels: Any | None = None) -> dict[str, float]:
    """How far ``logits`` are from ``ref_logits`` (same batch): max |difference|, mean KL(ref || other) in nats, and
    the share of positions where both pick the same top token. Positions: where the next token carries a label
    (``labels[:, 1:] != -100``), or all positions without ``labels``."""
    import torch

    if ref_logits.shape != logits.shape:
        raise ValueError(f"logits of different shapes {tuple(ref_logits.shape)} and {tuple(logits.shape)}: "
                         "run both models on the same batch")
    ref, other = ref_logits.float(), logits.float()
    if labels is not None:
        mask = labels[:, 1:] != -100
        ref, other = ref[:, :-1][mask], other[:, :-1][mask]
    else:
        ref, other = ref.reshape(-1, ref.shape[-1]), other.reshape(-1, other.shape[-1])
    logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(other, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return {"max_abs": (ref - other).abs().max().item(), "mean_kl": kl.mean().item(),
            "top1_agree": (ref.argmax(-1) == other.argmax(-1)).float().mean().item()}


__all__ = ["SCHEDULES", "DivergenceGuard", "RunLog", "TrainingDiverged", "answer_logits", "answer_loss",
           "dequantized_weights", "logit_gap",
           "restore_trainable", "snapshot_trainable", "train_run", "update_norm"]
