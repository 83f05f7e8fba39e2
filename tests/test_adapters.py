"""lora_course.adapters (and lora_course.serving's measurements of it) on the tiny random Llama: registry mechanics,
routing equality, the noise floor, bad input, the CLI."""
import json
import shutil

import pytest
import torch
from peft.tuners.lora import LoraLayer

from lora_course.adapters import (
    BASE,
    AdapterCompatibilityError,
    AdapterFilesError,
    AdapterRegistry,
    AdapterRegistryError,
    is_unsloth_model,
    main,
)
from lora_course.adapters_io import save_adapter
from lora_course.models import load_base, random_model_dir, tiny_model_dir
from lora_course.serving import (
    GreedyComparison,
    compare_greedy,
    evaluate_matrix,
    mixed_vs_sequential,
    noise_floor,
)

PROMPTS = [[{"role": "user", "content": "Convert 3 km to m. Answer in JSON."}],
           [{"role": "user", "content": "Write a three-line poem about the sea."}],
           [{"role": "user", "content": "Write a Python function add(a, b)."}],
           [{"role": "user", "content": "Hi"}]]


def _make(path, seed, r=8, targets="all-linear", base=None, alpha=None):
    """Save a LoRA with random non-zero A and B (peft init_lora_weights=False), so adapters differ visibly."""
    from peft import LoraConfig, get_peft_model

    model, _ = base or load_base("tiny")
    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=targets,
                                          init_lora_weights=False))
    save_adapter(pm, path)
    pm.unload()
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    tiny = load_base("tiny")
    wide = load_base("tiny", str(random_model_dir("tiny-wide", {"hidden_size": 96, "intermediate_size": 128,
                                                               "num_hidden_layers": 2, "num_attention_heads": 4,
                                                               "num_key_value_heads": 2,
                                                               "max_position_embeddings": 512})))
    return {"a": _make(root / "a", 1, base=tiny), "b": _make(root / "b", 2, base=tiny),
            "c": _make(root / "c", 3, base=tiny), "r4": _make(root / "r4", 4, r=4, base=tiny),
            "qv": _make(root / "qv", 5, targets=["q_proj", "v_proj"], base=tiny),
            "r4a32": _make(root / "r4a32", 7, r=4, alpha=32, base=tiny), "r16": _make(root / "r16", 8, r=16, base=tiny),
            "wide": _make(root / "wide", 6, base=wide)}


@pytest.fixture
def reg():
    model, tok = load_base("tiny")
    return AdapterRegistry(model, tok)


def _lora_count(model):
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in model.modules())


def test_activate_gives_peft_set_adapter_state_and_outputs(reg, dirs):
    base_logits = reg.next_token_logits(PROMPTS)
    for n in "ab":
        reg.load(n, dirs[n])
    assert reg.active == "a"  # the first adapter loaded becomes active, as in peft
    for n in ("b", "a"):
        reg.activate(n)
        ours = reg.next_token_logits(PROMPTS)
        assert reg.peft_model.active_adapter == n
        assert all(layer.active_adapters == [n] and not layer.disable_adapters for _, layer in reg._layers)
        reg.activate_with_peft(n)
        torch.testing.assert_close(ours, reg.next_token_logits(PROMPTS), rtol=0, atol=0)
    assert (reg.next_token_logits(PROMPTS) - base_logits).abs().max() > 1e-2  # the adapter changes the output
    reg.activate(BASE)
    torch.testing.assert_close(reg.next_token_logits(PROMPTS), base_logits)
    reg.activate_with_peft("b")  # and back from the base through peft
    assert reg.active == "b" and not any(layer.disable_adapters for _, layer in reg._layers)


def test_mixed_batch_rows_equal_each_adapter_alone(reg, dirs):
    for n in ("a", "b", "c", "r4"):
        reg.load(n, dirs[n])
    route = ["a", "b", "r4", BASE, "c", "a"]
    prompts = (PROMPTS + PROMPTS)[:len(route)]
    mixed = reg.next_token_logits(prompts, route)
    for i, (p, n) in enumerate(zip(prompts, route)):
        reg.activate(n)
        alone = reg.next_token_logits([p])
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-4, atol=1e-4)
    routed = reg.generate(prompts, route, max_new_tokens=6)
    peft_mixed = reg.generate(prompts, route, engine="peft", max_new_tokens=6)
    one_by_one = []
    for p, n in zip(prompts, route):
        reg.activate(n)
        one_by_one += reg.generate([p], max_new_tokens=6)
    assert routed == peft_mixed == one_by_one
    assert len(set(routed[:3])) > 1  # different adapters answer differently
    assert "forward" not in vars(reg._layers[0][1])  # the routed forwards are removed afterwards


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_floor_passes_the_routed_batch_and_rejects_a_wrong_route(dirs, dtype, monkeypatch):
    model, tok = load_base("tiny", dtype=dtype)
    reg = AdapterRegistry(model, tok)
    for n in "abc":
        reg.load(n, dirs[n])
    route = ["a", "b", BASE, "c"]
    nf = noise_floor(reg, PROMPTS, route)
    assert reg.active == "a"  # restored
    assert nf.route == tuple(route) and nf.alone.shape[0] == len(route) and len(nf.per_row) == len(route)
    assert nf.floor == max(nf.per_row) and nf.bound == nf.k * nf.floor + nf.eps and nf.eps > 0
    assert nf.separates and nf.gap > 5 * nf.bound  # random adapters move every row by far more than the noise
    mixed = reg.next_token_logits(PROMPTS, route)
    assert nf.within(mixed), (nf.max_diff(mixed), nf.bound)
    assert compare_greedy(reg, PROMPTS, route, nf.bound, max_new_tokens=6).ok
    with pytest.raises(ValueError, match="one row per prompt"):
        nf.max_diff(mixed[:2])
    with pytest.raises(AdapterRegistryError, match="one name per prompt"):
        noise_floor(reg, PROMPTS, route[:2])

    # A broken routed forward: the stacked weights in another order than the mask expects, so rows get the wrong
    # adapter. The bound must reject it, for the logits and for the greedy replies alike.
    pack = reg._pack
    monkeypatch.setattr(reg, "_pack", lambda names: pack(names[1:] + names[:1]))
    wrong = reg.next_token_logits(PROMPTS, route)
    assert not nf.within(wrong) and nf.max_diff(wrong) > nf.gap / 2
    greedy = compare_greedy(reg, PROMPTS, route, nf.bound, max_new_tokens=6)
    assert not greedy.identical
    if dtype == torch.float32:
        assert not greedy.ok and greedy.real_differences
    else:  # a random-init model's logits are near zero: in bf16 every top-2 margin here is within the noise, so
        # its greedy replies say nothing either way (compare_greedy counts no difference); the logits check above does
        assert all(m is None or m <= 2 * nf.bound for m in greedy.margin), greedy
    # so is a route that sends rows to the wrong names through the correct forward
    monkeypatch.undo()
    assert not nf.within(reg.next_token_logits(PROMPTS, ["b", "a", BASE, "c"]))


def test_noise_floor_without_a_second_name_cannot_misroute(reg, dirs):
    reg.load("a", dirs["a"])
    nf = noise_floor(reg, PROMPTS[:2], ["a", "a"])
    assert nf.gap == float("inf") and nf.separates and nf.within(reg.next_token_logits(PROMPTS[:2], ["a", "a"]))


def test_greedy_comparison_counts_only_differences_away_from_near_ties():
    def cmp(first, margin, bound=0.1):
        return GreedyComparison(first, margin, bound, ("x",) * len(first), ("y",) * len(first))

    assert cmp((None, None), (None, None)).ok and cmp((None, None), (None, None)).identical
    near = cmp((None, 3), (None, 0.2))  # a flip where the top two logits are within 2 x bound: rounding can do it
    assert near.ok and not near.identical and near.real_differences == []
    real = cmp((None, 3), (None, 0.21))
    assert not real.ok and real.real_differences == [1]
    assert not cmp((0,), (None,)).ok  # a difference with no logits to judge it is real


def test_mixed_vs_sequential_keeps_every_repeat_and_reports_medians(reg, dirs):
    import statistics

    for n in "ab":
        reg.load(n, dirs[n])
    reg.activate("b")
    tp = mixed_vs_sequential(reg, {"a": PROMPTS[:1], "b": PROMPTS[1:2]}, new_tokens=2, repeats=3, with_peft=False)
    assert set(tp.samples) == {"mixed", "sequential", "sequential_routed"} and reg.active == "b"
    assert all(len(v) == 3 and min(v) > 0 for v in tp.samples.values())
    assert tp.mixed_s == statistics.median(tp.samples["mixed"])
    assert tp.sequential_routed_s == statistics.median(tp.samples["sequential_routed"])
    assert tp.ratio == min(tp.sequential_s, tp.sequential_routed_s) / tp.mixed_s
    with pytest.raises(ValueError, match="at least once"):
        mixed_vs_sequential(reg, {"a": PROMPTS[:1]}, repeats=0)


def test_evaluate_matrix_matches_activated_generation(reg, dirs):
    from lora_course.data import load_task
    from lora_course.evaluate import evaluate_task

    reg.load("a", dirs["a"])
    reg.load("b", dirs["b"])
    exs = load_task("technical", "eval")[:2]
    m = evaluate_matrix(reg, {"technical": exs}, ["a", BASE, "b"], max_new_tokens={"technical": 5})
    assert set(m) == {("a", "technical"), (BASE, "technical"), ("b", "technical")}
    for n in ("a", BASE, "b"):
        reg.activate(n)
        want = evaluate_task(reg.model, reg.tokenizer, "technical", exs, with_perplexity=False, max_new_tokens=5)
        assert m[(n, "technical")].outputs == want.outputs
        assert m[(n, "technical")].metrics == want.metrics


def test_bad_names_are_refused_with_the_fix(reg, dirs):
    reg.load("a", dirs["a"])
    with pytest.raises(AdapterRegistryError, match="already loaded"):
        reg.load("a", dirs["b"])
    with pytest.raises(AdapterRegistryError, match="not allowed"):
        reg.load(BASE, dirs["b"])
    with pytest.raises(AdapterRegistryError, match=r"unknown adapter name 'nope'.*\['a'\]"):
        reg.generate(PROMPTS[:2], ["a", "nope"])
    with pytest.raises(AdapterRegistryError, match="unknown adapter name 'nope'"):
        reg.generate(PROMPTS[:2], ["a", "nope"], engine="peft")
    with pytest.raises(AdapterRegistryError, match="one name per prompt"):
        reg.generate(PROMPTS[:2], ["a"])
    with pytest.raises(AdapterRegistryError, match="unknown adapter name"):
        reg.activate("b")
    assert reg.names == ["a"]


def test_adapter_for_another_base_model(reg, dirs):
    with pytest.raises(AdapterCompatibilityError, match="tiny-wide.*hidden 96") as e:
        reg.load("w", dirs["wide"])
    assert isinstance(e.value, ValueError)
    assert reg.names == [] and reg.peft_model is None and _lora_count(reg.model) == 0  # nothing half-loaded
    reg.load("a", dirs["a"])
    with pytest.raises(AdapterCompatibilityError):
        reg.load("w", dirs["wide"])
    assert reg.names == ["a"] and "w" not in reg.peft_model.peft_config


def test_adapter_folder_with_missing_files(reg, dirs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(dirs["a"], broken)
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFilesError, match="adapter_model.safetensors"):
        reg.load("x", broken)
    shutil.copytree(dirs["a"], tmp_path / "noconf")
    (tmp_path / "noconf" / "adapter_config.json").unlink()
    with pytest.raises(AdapterFilesError, match="adapter_config.json"):
        reg.load("x", tmp_path / "noconf")
    with pytest.raises(AdapterFilesError, match="no adapter folder"):
        reg.load("x", tmp_path / "nowhere")
    assert reg.names == [] and _lora_count(reg.model) == 0


def test_config_rank_that_does_not_match_the_weights(reg, dirs, tmp_path):
    lied = tmp_path / "lied"
    shutil.copytree(dirs["a"], lied)
    cfg = json.loads((lied / "adapter_config.json").read_text())
    cfg["r"] = 4
    (lied / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterCompatibilityError, match="r=4 but its weights have rank"):
        reg.load("x", lied)


def test_combining_incompatible_ranks_or_targets(reg, dirs):
    for n in ("a", "r4", "qv"):
        reg.load(n, dirs[n])
    with pytest.raises(AdapterCompatibilityError, match="equal ranks.*'cat'"):
        reg.combine("mix", ["a", "r4"], [0.5, 0.5], "linear")
    with pytest.raises(AdapterCompatibilityError, match="different layers"):
        reg.combine("mix", ["a", "qv"], [0.5, 0.5], "cat")
    with pytest.raises(AdapterRegistryError, match="one weight each"):
        reg.combine("mix", ["a", "r4"], [1.0], "cat")
    with pytest.raises(AdapterRegistryError, match="combination_type"):
        reg.combine("mix", ["a", "r4"], [1.0, 1.0], "ties")
    assert reg.names == ["a", "r4", "qv"] and "mix" not in reg.peft_model.peft_config


def test_combination_types_and_their_error(reg, dirs):
    for n in ("a", "b", "r4"):
        reg.load(n, dirs[n])
    w = [0.7, 0.3]
    cat = reg.combine("cat", ["a", "r4"], w, "cat")
    assert cat.r == 12
    assert reg.combination_error("cat", ["a", "r4"], w) < 1e-5  # exact: the ranks are stacked
    reg.combine("svd", ["a", "r4"], w, "svd", svd_rank=12)
    assert reg.combination_error("svd", ["a", "r4"], w) < 1e-4  # full rank kept: exact up to float error
    reg.combine("lin", ["a", "b"], w, "linear")
    assert reg.combination_error("lin", ["a", "b"], w) > 1e-2  # cross terms B_a A_b: an approximation
    out = reg.generate(PROMPTS[:3], ["cat", "lin", "a"], max_new_tokens=4)
    assert len(out) == 3
    reg.activate("cat")
    torch.testing.assert_close(reg.next_token_logits(PROMPTS[:1]), reg.next_token_logits(PROMPTS[:1], ["cat"]),
                               rtol=1e-4, atol=1e-4)


def test_unload_frees_memory_and_restores_the_base(reg, dirs):
    base_logits = reg.next_token_logits(PROMPTS)
    n0 = sum(p.numel() for p in reg.model.parameters())
    reg.load("a", dirs["a"])
    reg.load("b", dirs["b"])
    n2 = sum(p.numel() for p in reg.model.parameters())
    assert n2 - n0 == reg.info("a").n_params + reg.info("b").n_params
    freed = reg.unload("a")  # the active one: the base becomes active
    assert freed == reg.info("b").bytes and reg.active == BASE and reg.names == ["b"]
    assert sum(p.numel() for p in reg.model.parameters()) == n0 + reg.info("b").n_params
    torch.testing.assert_close(reg.next_token_logits(PROMPTS), base_logits)
    reg.unload("b")
    assert reg.peft_model is None and _lora_count(reg.model) == 0
    assert sum(p.numel() for p in reg.model.parameters()) == n0
    torch.testing.assert_close(reg.next_token_logits(PROMPTS), base_logits)
    with pytest.raises(AdapterRegistryError):
        reg.unload("b")


def _compiled_logits(compiled, batch):
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        return compiled(**batch, position_ids=pos).logits[:, -1].float()


@pytest.mark.parametrize("prepared", [True, False])
def test_compiled_hotswap_does_not_recompile(dirs, prepared):
    model, tok = load_base("tiny")
    ref = AdapterRegistry(model, tok)
    ref.load("new", dirs["r4a32"])
    want = ref.next_token_logits(PROMPTS[:2])

    model, tok = load_base("tiny")
    reg = AdapterRegistry(model, tok)
    reg.load("slot", dirs["a"])
    if prepared:
        reg.prepare_compiled_hotswap(target_rank=8)
    batch = reg.encode(PROMPTS[:2])
    compiled = torch.compile(reg.model, backend="eager", dynamic=False)
    before = _compiled_logits(compiled, batch)
    reg.hotswap("slot", dirs["r4a32"])  # rank 4 and alpha 32 (scaling 8) into a rank-8, scaling-2 slot
    with torch.compiler.set_stance("fail_on_recompile"):
        if not prepared:  # the control: the new scaling is a Python float the compiled graph depends on
            with pytest.raises(RuntimeError, match="recompile"):
                _compiled_logits(compiled, batch)
            return
        after = _compiled_logits(compiled, batch)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(AdapterCompatibilityError, match="targets"):
        reg.hotswap("slot", dirs["qv"])
    with pytest.raises(AdapterCompatibilityError, match="saved for"):
        reg.hotswap("slot", dirs["wide"])
    with pytest.raises(AdapterCompatibilityError, match="above the target_rank"):
        reg.hotswap("slot", dirs["r16"])


def test_unsloth_models_route_with_every_routed_adapter_active_in_every_layer(dirs):
    model, tok = load_base("tiny")
    cls = type(model)

    def forward(self, *args, **kwargs):
        return cls.forward(self, *args, **kwargs)

    forward.__module__ = "unsloth.models.llama"
    model.__class__ = type("UnslothPatched", (cls,), {"forward": forward})
    assert is_unsloth_model(model)
    reg = AdapterRegistry(model, tok)
    reg.load("a", dirs["a"])
    reg.load("b", dirs["b"])
    reg.activate("b")
    assert reg.generate(PROMPTS[:1], max_new_tokens=3)
    layers = [m for m in reg.model.modules() if isinstance(m, LoraLayer)]
    alone = []
    for p, n in zip(PROMPTS[:3], ["a", "b", BASE]):
        reg.activate(n)
        alone.append(reg.next_token_logits([p]))
    reg.activate("b")
    seen = set()
    # Unsloth's kernels hand the work to layer(x) when a layer has several active adapters: record that state
    hooks = [m.register_forward_pre_hook(lambda m, _: seen.add((tuple(m.active_adapters), m.disable_adapters)))
             for m in layers]
    mixed = reg.next_token_logits(PROMPTS[:3], ["a", "b", BASE])
    assert seen == {(("a", "b"), False)}
    seen.clear()
    single = reg.next_token_logits([PROMPTS[0], PROMPTS[2]], ["a", BASE])
    assert seen == {(("a", "a"), False)}
    for h in hooks:
        h.remove()
    torch.testing.assert_close(mixed, torch.cat(alone), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(single, torch.cat([alone[0], alone[2]]), rtol=1e-4, atol=1e-4)
    assert {(tuple(m.active_adapters), m.disable_adapters) for m in layers} == {(("b",), False)}  # restored
    assert reg.generate(PROMPTS[:2], ["a", "b"], max_new_tokens=3)


def test_cli_builds_and_benchmarks(tmp_path, monkeypatch, capsys):
    tiny = str(tiny_model_dir())  # in the real cache; the adapters go to a fresh one
    monkeypatch.setenv("LORA_COURSE_CACHE", str(tmp_path))
    main(["--build-course-adapters", "--profile", "tiny", "--model-id", tiny, "--tasks", "creative"])
    assert "creative" in capsys.readouterr().out
    assert len(list((tmp_path / "adapters").glob("creative-*"))) == 1
    rc = main(["--bench", "--profile", "tiny", "--model-id", tiny, "--tasks", "creative", "technical", "--rows", "1",
               "--new-tokens", "3", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "activate (registry)" in out and "mixed / sequential throughput" in out and rc in (0, 1)
    assert ("FAIL" in out) == (rc == 1)
