"""Training loops the chapters share.

``train_steps`` is the plain PyTorch loop (AdamW, assistant-only loss, fixed seed) that notebook 01's from-scratch
LoRA and quick checks use; it trains whatever parameters have ``requires_grad`` set, so it serves a hand-made LoRA, a
peft model or full fine-tuning alike. The SFT recipe builder of notebook 05 (``build_recipe``: TRL ``SFTConfig``
defaults by hardware, Unsloth or transformers + peft) lives in ``lora_course.sft`` and is re-exported here.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .data import collate, tokenize_example
from .sft import SFTRecipe, build_recipe, choose_backend  # notebook 05: the SFT recipe builder

__all__ = ["SFTRecipe", "TrainLog", "build_recipe", "choose_backend", "train_steps"]


@dataclass
class TrainLog:
    """Per-step losses and timing of a run."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def sec_per_step(self) -> float:
        return self.seconds / max(len(self.losses), 1)


def train_steps(model: Any, tokenizer: Any, examples: list[dict[str, Any]], steps: int = 40,
                batch_size: int = 8, lr: float = 1e-3, seed: int = 0, max_length: int = 128,
                log_every: int = 0, weight_decay: float = 0.0, optimizer: Any = None,
                on_step: Callable[[int], None] | None = None, amp: str = "auto") -> TrainLog:
    """Train the model's trainable parameters for ``steps`` AdamW steps on shuffled ``examples``.

    Batches cycle through a seeded shuffle of the data; the loss is on the answer tokens only. ``optimizer``
    replaces the default AdamW (e.g. LoRA+'s, which gives B a larger learning rate than A); ``on_step(step)`` runs
    after each optimizer step, before the gradients are cleared (AdaLoRA's rank allocation reads them there).

    ``amp="auto"``: a model on a GPU that computes in fp16 (a T4: fp16 base, fp32 adapters) trains under fp16
    autocast with a ``GradScaler``, as ``Trainer(fp16=True)`` does: without loss scaling fp16 activations overflow
    (seen on an H200 deciding as a T4: chapter 5's creative adapter trained to NaN weights), and a step whose
    gradients hold inf/nan is skipped instead of written into the weights. bf16 and fp32 models train as loaded.
    """
    import torch

    from .hardware import amp_context, check_scalable, make_grad_scaler, resolve_loop_amp

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: add LoRA layers (or unfreeze some) first")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    feats = [tokenize_example(tokenizer, ex, max_length) for ex in examples]
    order: list[int] = []
    opt = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    device = params[0].device
    amp = resolve_loop_amp(model, amp)
    scaler = make_grad_scaler(amp, device.type)
    if scaler is not None:
        check_scalable(params)
    log = TrainLog()
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        if len(order) < batch_size:
            more = list(range(len(feats)))
            rng.shuffle(more)
            order += more
        idx, order = order[:batch_size], order[batch_size:]
        batch = {k: v.to(device) for k, v in collate([feats[i] for i in idx], tokenizer.pad_token_id).items()}
        with amp_context(amp, device.type):
            loss = model(**batch).loss
        if scaler is None:
            loss.backward()
            opt.step()
        else:  # gradients unscaled before on_step reads them; a step with inf/nan gradients is skipped
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        if on_step is not None:
            on_step(step)
        opt.zero_grad(set_to_none=True)
        log.losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1:4d}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.0f} s)")
    log.seconds = time.perf_counter() - t0
    model.eval()
    return log
