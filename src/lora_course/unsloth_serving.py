"""What works when ``AdapterRegistry`` serves a model loaded through Unsloth's ``FastLanguageModel`` (GPU only).

``check(model_dir, adapters, prompts)`` measures it in two fresh processes, so neither the caller nor the reference
is touched by Unsloth's patches (importing Unsloth rewrites transformers' Llama classes for the whole process):

1. **plain** (transformers + peft in the GPU's precision, ``hardware.select_dtype``: bf16 with native bf16, fp16
   on a T4 or under ``LORA_COURSE_EMULATE=t4``): the registry's next-token logits of every prompt under each
   adapter and under the bare base: the reference. Without given adapters it first writes random LoRA adapters
   (r=8, every linear layer, non-zero B) so that each one visibly changes the outputs of a random-init model.
2. **unsloth**: ``FastLanguageModel.from_pretrained(..., dtype=<the same precision>, load_in_4bit=False)`` (given
   explicitly: Unsloth's own default follows ``torch.cuda.is_bf16_supported()``, which an emulation leaves True),
   ``FastLanguageModel.for_inference``, then ``AdapterRegistry``: ``load`` (with its checks), ``activate`` +
   next-token logits and greedy ``generate`` per adapter (compared with the plain reference), one **mixed batch**
   routed per row (``adapter_names``; forward logits, and the raw logits of every generated token, which Unsloth
   computes in its own decode step), peft's own mixed batch (``engine="peft"``), and ``unload`` of every adapter
   (memory freed, the bare base back).

The returned report holds every number; ``tests/test_adapters_gpu.py`` asserts on it and notebook 07 prints it.

    python -m lora_course.unsloth_serving --model-dir DIR [--out report.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

RANDOM_ADAPTERS = ("a", "b", "c")


def default_prompts(n: int = 4) -> list[list[dict[str, str]]]:
    """``n`` chat prompts from the three tasks' eval sets (round robin)."""
    from .data import TASKS, load_task, prompt_messages

    sets = {t: load_task(t, "eval") for t in TASKS}
    return [prompt_messages(sets[TASKS[i % len(TASKS)]][i // len(TASKS)]) for i in range(n)]


def route_for(names: list[str], n_rows: int) -> list[str]:
    """One adapter per row, cycling through ``names`` and the bare base."""
    from .adapters import BASE

    cycle = [*names, BASE]
    return [cycle[i % len(cycle)] for i in range(n_rows)]


def check(model_dir: str | Path, adapters: dict[str, str | Path] | None = None,
          prompts: list[Any] | None = None, new_tokens: int = 12, work: str | Path | None = None,
          timeout: float = 600) -> dict[str, Any]:
    """Run both phases (see the module docstring) and return the Unsloth phase's report with the reference's numbers."""
    work = Path(work or tempfile.mkdtemp(prefix="unsloth-serving-"))
    work.mkdir(parents=True, exist_ok=True)
    job = {"model_dir": str(model_dir), "prompts": prompts or default_prompts(), "new_tokens": new_tokens,
           "adapters": {k: str(v) for k, v in (adapters or {}).items()}, "work": str(work)}
    (work / "job.json").write_text(json.dumps(job))
    for phase in ("plain", "unsloth"):
        proc = subprocess.run([sys.executable, "-m", "lora_course.unsloth_serving", "--phase", phase,
                               "--job", str(work / "job.json")], capture_output=True, text=True, check=False,
                              timeout=timeout, env={**os.environ})
        (work / f"{phase}.log").write_text(proc.stdout + "\n" + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"the {phase} phase failed (exit {proc.returncode}); log {work / (phase + '.log')}:\n"
                               f"{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    return json.loads((work / "report.json").read_text(encoding="utf-8"))


def verdict(rep: dict[str, Any], ratio: float = 0.1) -> dict[str, bool]:
    """Plain statements about what worked, each True or False, from a ``check`` report.

    "Matches" means: the largest logit difference is at most ``ratio`` times the separation between adapters (the
    smallest difference between one adapter's logits and any other adapter's, or the base's): bf16/fp16 kernels differ
    in their last bits, but a row served by the wrong adapter, or by none, is off by the whole separation.
    """
    sep = min(rep["alone_vs_plain_other_adapter"].values())
    tol = ratio * sep
    names = [n for n in rep["alone_vs_plain"] if n != "__base__"]
    return {
        "the registry detects the Unsloth model and loads every adapter (with its checks)":
            bool(rep["unsloth_detected"]) and rep["loaded"] == names,
        "activate: each adapter (and the bare base) matches the plain stack's logits for it":
            all(rep["alone_vs_plain"][n] <= ratio * rep["alone_vs_plain_other_adapter"][n]
                for n in rep["alone_vs_plain"]),
        "mixed batch (adapter_names), forward: every row matches its adapter alone":
            rep["mixed_vs_alone_next_token"] <= tol,
        "mixed batch, generate: every generated position's logits match its adapter alone (Unsloth's decode step)":
            rep["mixed_vs_alone_generated_logits"] <= tol and min(rep["decode_positions_compared"]) >= 2,
        "activate after a mixed batch: the adapters' state is restored": rep["activate_after_routing"] <= tol,
        "unload: adapter memory freed, the bare base serves again and generates":
            rep["names_after_unload"] == [] and rep["memory_freed_by_unload_mib"] >= rep["adapters_mib"] - 1.0
            and rep["base_after_unload_vs_plain"] <= tol and rep["base_generates_after_unload"],
        "peft's own mixed batch (engine='peft') gives the routed batch's greedy replies":
            "peft_engine_error" not in rep and all(rep.get("peft_engine_text_equal", [False])),
    }


# ------------------------------------------------------------------------------------------------ phases
def _make_random_adapters(model: Any, folder: Path, names: tuple[str, ...], seed: int = 0) -> dict[str, str]:
    import torch
    from peft import get_peft_model

    from .shapes import ALL_LINEAR
    from .targets import build_lora_config

    out = {}
    for i, name in enumerate(names):
        torch.manual_seed(seed + i)
        cfg = build_lora_config(model, r=8, lora_alpha=16, target_modules=ALL_LINEAR, init_lora_weights=False)
        pm = get_peft_model(model, cfg)
        with torch.no_grad():  # peft's non-default init gives B kaiming-uniform entries; scaled so the model stays sane
            for pname, p in pm.named_parameters():
                if "lora_B" in pname:
                    p.mul_(0.3)
        pm.save_pretrained(str(folder / name))
        model = pm.unload()
        out[name] = str(folder / name)
    return out


def serving_dtype() -> Any:
    """The precision both phases serve in: ``hardware.select_dtype("cuda")`` (applies an emulation's memory cap)."""
    from .hardware import select_dtype

    return select_dtype("cuda")


def _plain(job: dict[str, Any]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .adapters import BASE, AdapterRegistry

    dtype = serving_dtype()
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=dtype).to("cuda").eval()
    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    work = Path(job["work"])
    if not job["adapters"]:
        job["adapters"] = _make_random_adapters(model, work / "adapters", RANDOM_ADAPTERS)
        (work / "job.json").write_text(json.dumps(job))
    reg = AdapterRegistry(model, tok)
    for name, path in job["adapters"].items():
        reg.load(name, path)
    logits = {}
    for name in [BASE, *job["adapters"]]:
        reg.activate(name)
        logits[name] = reg.next_token_logits(job["prompts"]).cpu()
    route = route_for(list(job["adapters"]), len(job["prompts"]))
    routed = reg.next_token_logits(job["prompts"], route).cpu()
    alone = torch.stack([logits[a][i] for i, a in enumerate(route)])
    torch.save({"logits": logits, "plain_routed_vs_alone": float((routed - alone).abs().max())},
               work / "plain.pt")


def _generate_logits(reg: Any, prompts: list[Any], n: int, route: list[str] | None) -> tuple[list[list[int]], Any]:
    """Greedy tokens and the raw logits of every generated position, rows routed by ``route`` (None: active)."""
    import torch

    batch = reg.encode(prompts)
    kw = {"do_sample": False, "max_new_tokens": n, "min_new_tokens": n, "pad_token_id": reg.tokenizer.pad_token_id,
          "output_logits": True, "return_dict_in_generate": True}
    with torch.inference_mode():
        if route is None:
            out = reg.model.generate(**batch, **kw)
        else:
            with reg.routed(route):
                out = reg.model.generate(**batch, **kw)
    tokens = out.sequences[:, batch["input_ids"].shape[1]:].tolist()
    return tokens, torch.stack(out.logits, 1).float().cpu()  # (rows, steps, vocab)


def _unsloth(job: dict[str, Any]) -> None:
    from .sft import import_unsloth

    flm = import_unsloth()  # first: Unsloth patches transformers' classes as it is imported
    import torch

    from .adapters import BASE, AdapterRegistry

    work = Path(job["work"])
    ref = torch.load(work / "plain.pt")
    names, prompts, n = list(job["adapters"]), job["prompts"], job["new_tokens"]
    dtype = serving_dtype()
    model, tok = flm.from_pretrained(model_name=job["model_dir"], max_seq_length=1024, dtype=dtype,
                                     load_in_4bit=False)
    flm.for_inference(model)
    tok = getattr(tok, "tokenizer", tok)
    reg = AdapterRegistry(model, tok)
    rep: dict[str, Any] = {"unsloth_detected": reg.unsloth, "model_class": type(model).__name__,
                           "plain_routed_vs_alone": ref["plain_routed_vs_alone"],
                           "dtype": str(dtype).replace("torch.", ""),
                           "model_dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    mem0 = torch.cuda.memory_allocated()
    for name in names:
        reg.load(name, job["adapters"][name])
    rep["loaded"] = reg.names
    rep["adapters_mib"] = (torch.cuda.memory_allocated() - mem0) / 2**20

    def diff(a: Any, b: Any) -> float:
        return float((a - b).abs().max())

    # activate: each adapter alone, against the plain stack's logits for the same adapter (and for the others)
    alone, vs_plain, vs_other = {}, {}, {}
    for name in [BASE, *names]:
        reg.activate(name)
        alone[name] = reg.next_token_logits(prompts).cpu()
        vs_plain[name] = diff(alone[name], ref["logits"][name])
        vs_other[name] = min(diff(alone[name], ref["logits"][o]) for o in [BASE, *names] if o != name)
    rep["alone_vs_plain"], rep["alone_vs_plain_other_adapter"] = vs_plain, vs_other
    rep["logit_scale"] = float(max(t.abs().max() for t in ref["logits"].values()))

    # one generation per row alone (activate), then the same rows in one mixed batch
    route = route_for(names, len(prompts))
    rep["route"] = route
    alone_tokens, alone_logits = [], []
    for p, a in zip(prompts, route):
        reg.activate(a)
        t, lg = _generate_logits(reg, [p], n, None)
        alone_tokens.append(t[0])
        alone_logits.append(lg[0])
    reg.activate(names[0])
    mixed_next = reg.next_token_logits(prompts, route).cpu()
    rep["mixed_vs_alone_next_token"] = diff(mixed_next, torch.stack([alone[a][i] for i, a in enumerate(route)]))
    mixed_tokens, mixed_logits = _generate_logits(reg, prompts, n, route)
    rep["mixed_tokens_equal"] = [m == a for m, a in zip(mixed_tokens, alone_tokens)]
    steps, worst = [], 0.0
    for i in range(len(prompts)):  # compare positions up to the first token where the two greedy paths part
        k = next((j for j, (x, y) in enumerate(zip(mixed_tokens[i], alone_tokens[i])) if x != y), n - 1)
        steps.append(k + 1)
        worst = max(worst, diff(mixed_logits[i, :k + 1], alone_logits[i][:k + 1]))
    rep["decode_positions_compared"], rep["mixed_vs_alone_generated_logits"] = steps, worst
    rep["mixed_text"] = reg.generate(prompts, route, max_new_tokens=n)
    try:
        peft_text = reg.generate(prompts, route, engine="peft", max_new_tokens=n)
        rep["peft_engine_text_equal"] = [a == b for a, b in zip(peft_text, rep["mixed_text"])]
    except Exception as e:  # noqa: BLE001  (reported, not hidden: any failure of peft's mixed batch under Unsloth)
        rep["peft_engine_error"] = f"{type(e).__name__}: {e}"[:300]
    # activate after routing: the layers' state is back (same logits as before routing)
    reg.activate(names[-1])
    rep["activate_after_routing"] = diff(reg.next_token_logits(prompts).cpu(), alone[names[-1]])

    # unload every adapter: memory back, the bare base serves again
    before = torch.cuda.memory_allocated()  # generation above left Unsloth's decode buffers too: not adapter memory
    freed = [reg.unload(name) for name in names]
    rep["unloaded_bytes"], rep["names_after_unload"] = sum(freed), reg.names
    rep["memory_freed_by_unload_mib"] = (before - torch.cuda.memory_allocated()) / 2**20
    rep["base_after_unload_vs_plain"] = diff(reg.next_token_logits(prompts).cpu(), ref["logits"][BASE])
    rep["base_generates_after_unload"] = bool(reg.generate(prompts[:1], max_new_tokens=4))
    (work / "report.json").write_text(json.dumps(rep, indent=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=("plain", "unsloth"), help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help="a local model folder (default: the GPU lane's ~1B random-init Llama)")
    p.add_argument("--tokenizer-source", help="tokenizer folder for building the GPU lane's model")
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    a = p.parse_args(argv)
    if a.phase:
        job = json.loads(Path(a.job).read_text(encoding="utf-8"))
        (_plain if a.phase == "plain" else _unsloth)(job)
        return 0
    if a.model_dir is None:
        from .models import gpu_model_dir

        a.model_dir = str(gpu_model_dir(a.tokenizer_source))
    rep = check(a.model_dir)
    print(json.dumps(rep, indent=1))
    if a.out:
        a.out.write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
