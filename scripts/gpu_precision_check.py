"""The course's precision rules on a real GPU, as a T4 would get them: PASS/FAIL per way of training.

Run on a CUDA machine (e.g. one H200), from the repository root:

    python scripts/gpu_precision_check.py                       # LORA_COURSE_EMULATE=t4, a small random Llama
    python scripts/gpu_precision_check.py --model-dir DIR       # the same on a real model folder (e.g. SmolLM2-135M)
    python scripts/gpu_precision_check.py --emulate none        # the GPU's own precision (bf16 on an H200)

Each check runs in a fresh process (Unsloth patches transformers for the whole process it is imported in; the
emulation's memory cap is per process) and prints one JSON line; this script prints PASS/FAIL per check, writes
them all to ``--out`` and exits 1 if any failed. The checks:

- ``decide``: the course's hardware reading (``lora_course.hardware``): under ``t4`` compute capability 7.5, no
  native bf16, fp16 chosen, torch's own ``get_device_capability`` unchanged (compilers see the real GPU), and the
  15 GiB cap real (14 GiB allocate, 2 GiB more raise ``OutOfMemoryError``).
- ``plain-lora`` / ``plain-full`` / ``plain-qlora``: ``train.train_steps`` (the loop of chapters 1, 3, 6 and 7) with
  ``hardware.train_precision``'s dtypes: fp16 weights + fp32 LoRA; fp32 master weights under fp16 autocast; NF4
  with fp16 compute + fp32 LoRA. fp16 runs use a GradScaler.
- ``trl-lora`` / ``trl-qlora``: ``sft.build_recipe`` -> ``load_for_sft`` -> ``make_trainer`` (TRL 1.15
  ``SFTTrainer``, transformers + peft backend), the path of notebooks 05 and 06 that failed with
  ``"_amp_foreach_non_finite_check_and_unscale_cuda" not implemented for 'BFloat16'``.
- ``trainer-full``: transformers ``Trainer`` full fine-tuning with ``train_precision("full").trainer_flags()`` over
  fp32 master weights.
- ``unsloth-qlora``: the same recipe through Unsloth's ``FastLanguageModel`` (SKIP when unsloth is not installed).
- ``unsloth-serving``: ``unsloth_serving.check`` (notebook 07's Unsloth engine) in the chosen precision.

A check passes when it ran without error, every loss is finite, the loss fell (second half of the steps below the
first half, on average), the trainable parameters are fp32 where a GradScaler runs (and the scaler is the one that
ran), and the weights were loaded in the dtype the rules give.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CHECKS = ("decide", "plain-lora", "plain-full", "plain-qlora", "trl-lora", "trl-qlora", "trainer-full",
          "unsloth-qlora", "unsloth-serving")
# A small Llama whose heads are 64 wide (Unsloth's and SDPA's kernels take it), two layers: seconds per check.
SMALL_LLAMA = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
               "tie_word_embeddings": True, "rope_theta": 10000.0}


# ------------------------------------------------------------------------------------------------ helpers
def _dt(d: Any) -> str:
    return str(d).replace("torch.", "")


def _loss_checks(losses: list[float]) -> dict[str, Any]:
    """Finite, and falling: the mean of the second half of the steps below the first half's (each step sees other
    examples, so one step's loss moves by ~0.02 around the trend; halves average that out)."""
    half = len(losses) // 2
    return {"losses": [round(x, 4) for x in losses], "finite": all(math.isfinite(x) for x in losses),
            "fell": half > 0 and sum(losses[-half:]) / half < sum(losses[:half]) / half}


def _trainable_dtypes(model: Any) -> list[str]:
    return sorted({_dt(p.dtype) for p in model.parameters() if p.requires_grad})


def _data(n: int = 64) -> list[dict[str, Any]]:
    from lora_course.data import load_task

    return load_task("creative", "train")[:n]


# ------------------------------------------------------------------------------------------------- checks
def check_decide(model_dir: str, steps: int, lr: float) -> dict[str, Any]:
    import torch

    from lora_course import hardware

    real = torch.cuda.get_device_capability()
    info = hardware.gpu_info()
    out: dict[str, Any] = {"describe": hardware.describe(), "real_capability": real}
    emu = hardware.emulation()
    ok = info.real_capability == real and torch.cuda.get_device_capability() == real
    if emu is None:
        ok = ok and info.capability == real and (hardware.select_dtype() == torch.bfloat16) == (real >= (8, 0))
        out["note"] = "no emulation: the course reads the real GPU"
    else:
        ok = ok and info.capability == emu.capability and not info.native_bf16
        ok = ok and hardware.select_dtype() == torch.float16
        held = torch.empty((int(emu.memory_gib) - 1) * 2**30, dtype=torch.uint8, device="cuda")
        try:
            more = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
            out["cap"] = f"FAILED: {emu.memory_gib - 1:.0f} + 2 GiB allocated under a {emu.memory_gib:.0f} GiB cap"
            ok = False
            del more
        except torch.OutOfMemoryError:
            out["cap"] = f"{emu.memory_gib - 1:.0f} GiB allocated, 2 GiB more refused: the cap holds"
        del held
        torch.cuda.empty_cache()
    return {"ok": ok, **out}


def check_plain(kind: str, model_dir: str, steps: int, lr: float) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    from lora_course.hardware import train_precision
    from lora_course.models import load_base
    from lora_course.train import train_steps

    mode = {"plain-lora": "lora", "plain-full": "full", "plain-qlora": "qlora"}[kind]
    prec = train_precision(mode)
    if mode == "qlora":
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        from lora_course.models import prepare_tokenizer

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=prec.compute_dtype)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=prec.model_dtype,
                                                     device_map={"": 0})
        tok = prepare_tokenizer(AutoTokenizer.from_pretrained(model_dir))
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model, tok = load_base("gpu", model_dir, mode=mode)
    loaded = _dt(next(p for p in model.parameters() if p.is_floating_point()).dtype)
    model.config.use_cache = False
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    log = train_steps(model, tok, _data(), steps=steps, batch_size=4, lr=lr, max_length=96,
                      amp=prec.loop_amp if mode == "full" else "auto")
    res = {**_loss_checks(log.losses), "amp": log.amp, "expected_amp": prec.loop_amp,
           "skipped_steps": log.skipped_steps, "loaded_dtype": loaded, "expected_dtype": _dt(prec.model_dtype),
           "trainable": _trainable_dtypes(model), "precision": prec.as_dict()}
    want_loaded = "float32" if mode == "qlora" else _dt(prec.model_dtype)  # kbit prep upcasts the unquantized
    ok = (res["finite"] and res["fell"] and log.amp == prec.loop_amp and loaded == want_loaded
          and (res["trainable"] == ["float32"] or not prec.grad_scaler)
          and len(log.skipped_steps) < steps // 2)
    return {"ok": ok, **res}


def check_trl(kind: str, model_dir: str, steps: int, lr: float) -> dict[str, Any]:
    from datasets import Dataset

    from lora_course.chat_format import to_prompt_completion
    from lora_course.sft import build_recipe, detect_hardware, import_unsloth, load_for_sft, make_trainer

    backend = "unsloth" if kind == "unsloth-qlora" else "transformers"
    hw = detect_hardware()
    if backend == "unsloth":
        if hw.unsloth_version is None:
            return {"ok": None, "skip": "unsloth is not installed"}
        import_unsloth()  # before transformers' classes are used
    recipe = build_recipe(hw, backend, effective_batch_size=4, max_length=128, learning_rate=lr, r=8,
                          load_in_4bit=kind != "trl-lora", quiet=True)  # the notebooks' batching: packed / padding-free
    model, tok = load_for_sft(recipe, model_dir, seed=0)
    loaded = sorted({_dt(p.dtype) for p in model.parameters() if p.is_floating_point() and not p.requires_grad})
    out = tempfile.mkdtemp(prefix=f"precision-{kind}-")
    trainer = make_trainer(model, recipe.sft_config(out, steps, seed=0, disable_tqdm=True),
                           Dataset.from_list([to_prompt_completion(e) for e in _data()]), tok, quiet=True)
    trainable_before = _trainable_dtypes(trainer.model)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    acc = trainer.accelerator
    res = {**_loss_checks(losses), "recipe_precision": recipe.precision, "mixed_precision": acc.mixed_precision,
           "grad_scaler": acc.scaler is not None, "trainable_at_train": trainable_before,
           "frozen_dtypes": loaded, "n_gpu": trainer.args.n_gpu, "backend": recipe.backend}
    fp16 = recipe.precision == "fp16"
    ok = (res["finite"] and res["fell"] and res["grad_scaler"] == fp16 and trainer.args.n_gpu == 1
          and (trainable_before == ["float32"] or not fp16) and acc.mixed_precision == recipe.precision.replace(
              "fp32", "no"))
    return {"ok": ok, **res}


def check_trainer_full(model_dir: str, steps: int, lr: float) -> dict[str, Any]:
    from transformers import Trainer, TrainingArguments

    from lora_course.data import collate, tokenize_example
    from lora_course.hardware import single_device, train_precision
    from lora_course.models import load_base

    prec = train_precision("full")
    model, tok = load_base("gpu", model_dir, mode="full")
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(True)
    feats = [tokenize_example(tok, ex, 96) for ex in _data()]
    args = single_device(TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="precision-full-"), max_steps=steps, per_device_train_batch_size=4,
        learning_rate=lr / 10, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=0, dataloader_num_workers=0, **prec.trainer_flags()))
    trainer = Trainer(model=model, args=args, train_dataset=feats,
                      data_collator=lambda f: collate(f, tok.pad_token_id))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    res = {**_loss_checks(losses), "flags": prec.trainer_flags(), "grad_scaler": trainer.accelerator.scaler is not None,
           "weights": _trainable_dtypes(model), "expected_weights": _dt(prec.model_dtype)}
    ok = (res["finite"] and res["fell"] and res["grad_scaler"] == prec.grad_scaler
          and res["weights"] == [_dt(prec.model_dtype)])
    return {"ok": ok, **res}


def check_serving(model_dir: str, steps: int, lr: float) -> dict[str, Any]:
    from lora_course.hardware import select_dtype
    from lora_course.sft import installed_version
    from lora_course.unsloth_serving import check, verdict

    if installed_version("unsloth") is None:
        return {"ok": None, "skip": "unsloth is not installed"}
    rep = check(model_dir, new_tokens=6)
    want = _dt(select_dtype("cuda"))
    res = {"dtype": rep.get("dtype"), "model_dtype": rep.get("model_dtype"), "expected": want,
           "verdict": verdict(rep)}
    return {"ok": rep.get("dtype") == want and rep.get("model_dtype") == want, **res}


def run_child(check: str, model_dir: str, steps: int, lr: float) -> dict[str, Any]:
    fn = {"decide": check_decide, "trainer-full": check_trainer_full, "unsloth-serving": check_serving}.get(check)
    if fn is None:
        fn = (lambda *a: check_plain(check, *a)) if check.startswith("plain") else (lambda *a: check_trl(check, *a))
    t0 = time.perf_counter()
    try:
        res = fn(model_dir, steps, lr)
    except Exception as e:  # noqa: BLE001 - the failure is the result
        res = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
    import torch

    if torch.cuda.is_available():
        res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return {"check": check, **res}


# --------------------------------------------------------------------------------------------------- main
def build_model(tokenizer_source: str | None) -> str:
    from lora_course.models import cpu_model_dir, random_model_dir

    if tokenizer_source is None and (ROOT / ".gpu" / "tokenizer").is_dir():
        tokenizer_source = str(ROOT / ".gpu" / "tokenizer")
    return str(random_model_dir("precision-check-llama", SMALL_LLAMA, 0, "float32",
                                tokenizer_source=tokenizer_source or cpu_model_dir()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", help="a local model folder (default: a small random Llama built here)")
    p.add_argument("--tokenizer-source", help="tokenizer folder for the small Llama (default .gpu/tokenizer)")
    p.add_argument("--emulate", default="t4", help="LORA_COURSE_EMULATE for the checks ('none': the real GPU)")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated, from {', '.join(CHECKS)}")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate (full fine-tuning uses a tenth)")
    p.add_argument("--out", type=Path, default=Path("build-gpu/precision-check.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(run_child(a.child, a.model_dir, a.steps, a.lr), default=str), flush=True)
        return 0
    import torch

    if not torch.cuda.is_available():
        p.error("this check needs a CUDA GPU")
    checks = [c.strip() for c in a.checks.split(",") if c.strip()]
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        p.error(f"unknown checks {unknown}: choose from {', '.join(CHECKS)}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    if a.emulate.lower() in ("", "none", "off"):
        env.pop("LORA_COURSE_EMULATE", None)
    else:
        env["LORA_COURSE_EMULATE"] = a.emulate
    model_dir = a.model_dir or build_model(a.tokenizer_source)
    print(f"precision check on {torch.cuda.get_device_name(0)}, LORA_COURSE_EMULATE={env.get('LORA_COURSE_EMULATE')}, "
          f"model {model_dir}", flush=True)
    results = []
    for check in checks:
        proc = subprocess.run([sys.executable, __file__, "--child", check, "--model-dir", model_dir,
                               "--steps", str(a.steps), "--lr", str(a.lr)], env=env, capture_output=True, text=True,
                              check=False, timeout=900)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        res = json.loads(lines[-1][7:]) if lines else {"check": check, "ok": False, "error": f"exit {proc.returncode}",
                                                      "stderr": proc.stderr[-4000:]}
        status = "SKIP" if res["ok"] is None else "PASS" if res["ok"] else "FAIL"
        res["status"] = status
        results.append(res)
        brief = {k: res[k] for k in ("losses", "amp", "skipped_steps", "recipe_precision", "grad_scaler",
                                     "trainable_at_train", "trainable", "loaded_dtype", "dtype", "cap", "skip",
                                     "error", "peak_gib", "seconds") if k in res}
        print(f"{status} {check:16s} {json.dumps(brief, default=str)}", flush=True)
        if status == "FAIL" and "traceback" in res:
            print(res["traceback"], flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"device": torch.cuda.get_device_name(0), "emulate": env.get("LORA_COURSE_EMULATE"),
                                 "model_dir": model_dir, "results": results}, indent=1, default=str))
    failed = [r["check"] for r in results if r["status"] == "FAIL"]
    print(f"{len(results) - len(failed)} of {len(results)} PASS/SKIP; FAILED: {failed or 'none'}; {a.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
