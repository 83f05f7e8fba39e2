"""bitsandbytes' CPU-dependent 4-bit paths, built on purpose on any CPU (issue 28).

On a CPU with AVX512-BF16, ``Linear4bit.forward`` in eval mode without gradients repacks the weight in place
(``bitsandbytes.functional._convert_weight_packed_for_cpu``) and computes with a bf16 kernel without backward; on a
CPU with AVX-512F, ``dequantize_4bit`` runs a vector kernel that is wrong for rows that are not whole blocks. These
tests build those states here: the conversion is bitsandbytes' own function, called as its forward calls it; the
bf16 kernel and the AVX-512 dequantize are reproduced in PyTorch from bitsandbytes' C source
(``lora_course.bnb_interop``), and where this CPU runs the real kernels they are compared with them.
"""
import copy
import warnings

import pytest
import torch

from lora_course import bnb_interop, nf4

bnb = pytest.importorskip("bitsandbytes")
bnb_F = pytest.importorskip("bitsandbytes.functional")
pytestmark = [pytest.mark.filterwarnings("ignore:_check_is_size:FutureWarning"),
              pytest.mark.filterwarnings("ignore:.*autograd kernel was not registered.*:UserWarning")]

AVX512_BF16_CPU = {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_tile": True, "amx_bf16": True,
                   "amx_int8": True, "torch_capability": "AVX512", "bnb_avx512f": True, "bnb_avx512bf16": True}
AVX2_CPU = {"avx2": True, "avx512f": False, "avx512_bf16": False, "amx_tile": False, "amx_bf16": False,
            "amx_int8": False, "torch_capability": "AVX2", "bnb_avx512f": False, "bnb_avx512bf16": False}


class _NoBackward(torch.autograd.Function):
    """bitsandbytes' CPU ``gemv_4bit`` is a custom op with no autograd formula: under torch's default autograd
    fallback ("warn") its output requires grad but its backward gives its inputs no gradient."""

    @staticmethod
    def forward(ctx, a, out):
        return out

    @staticmethod
    def backward(ctx, grad):
        return None, None


def _emulated_gemv_4bit(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
    with torch.no_grad():
        y = bnb_interop.emulate_bnb_cpu_bf16_linear(A, B, state)
    return _NoBackward.apply(A, y)


@pytest.fixture
def avx512_bf16(monkeypatch):
    """This process behaves as bitsandbytes 0.49.2 does on an AVX512-BF16 CPU: Linear4bit layers see the feature
    (their forward then repacks with bitsandbytes' own conversion) and the repacked matmul runs the bf16 kernel.
    Returns a function that switches existing layers over too."""
    if bnb_interop.cpu_features()["bnb_avx512bf16"]:  # the real kernel runs here: nothing to emulate
        return lambda model: model
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    monkeypatch.setattr(bnb_F, "gemv_4bit", _emulated_gemv_4bit)

    def switch(model):
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = True
        return model
    return switch


def _layer(n_out=96, n_in=576, nested=True, dtype=torch.float32, blocksize=64, bias=False, seed=0):
    w = (torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)
    layer = bnb.nn.Linear4bit(n_in, n_out, bias=bias, compute_dtype=torch.float32, compress_statistics=nested,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=nested, quant_type="nf4",
                                     blocksize=blocksize, module=layer)
    return layer.to("cpu")


def _repack(layer):
    """What ``Linear4bit.forward`` does on an AVX512-BF16 CPU before its first eval matmul."""
    layer.weight.data, layer.weight.quant_state = bnb_F._convert_weight_packed_for_cpu(layer.weight.data,
                                                                                        layer.weight.quant_state)
    return layer


# ------------------------------------------------------------------------------------------- the layout
@pytest.mark.parametrize("n_out, n_in, nested, dtype, blocksize", [
    (96, 576, True, torch.float32, 64), (64, 128, False, torch.float32, 64), (32, 256, True, torch.bfloat16, 128),
    (1536, 576, True, torch.float32, 64)])
def test_cpu_layout_is_undone_byte_for_byte(n_out, n_in, nested, dtype, blocksize):
    layer = _layer(n_out, n_in, nested, dtype, blocksize)
    standard = layer.weight.data.clone()
    before = bnb_interop.quantized_from_bnb(layer.weight.data, layer.weight.quant_state)
    _repack(layer)
    qs = layer.weight.quant_state
    assert bnb_interop.is_cpu_repacked(qs) and layer.weight.data.shape == (n_out, n_in // 2)
    assert not torch.equal(layer.weight.data.reshape(-1), standard.reshape(-1))  # the bytes did move
    mine = bnb_interop.cpu_layout_to_standard(layer.weight.data, qs.shape)
    assert torch.equal(mine, standard.reshape(-1))
    inverse, _ = bnb_F._convert_weight_packed_for_cpu_inverse(layer.weight.data.clone(), copy.deepcopy(qs))
    assert torch.equal(mine, inverse.reshape(-1))  # bitsandbytes' own inverse (its state-dict path) agrees
    # decoded: the same nibbles; each block's absmax is the one the kernel uses, the old one rounded to bf16
    after = bnb_interop.quantized_from_bnb(layer.weight.data, qs)
    assert torch.equal(after.codes(), before.codes()) and not after.double_quant
    assert torch.equal(after.absmax, before.block_absmax().bfloat16().float())
    assert after.dtype == dtype and after.shape == (n_out, n_in)
    exact = bnb_interop.nf4_definition(mine, after.absmax, n_out * n_in, blocksize)
    assert torch.equal(bnb_interop.bnb_weight(layer).reshape(-1), exact)


def test_cpu_layout_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="not a bitsandbytes CPU-layout weight of shape"):
        bnb_interop.cpu_layout_to_standard(torch.zeros(48, 32, dtype=torch.uint8), (48, 64))
    layer = _layer(32, 64)
    with pytest.raises(ValueError, match="needs an NF4 weight in bitsandbytes' CPU layout"):
        bnb_interop.emulate_bnb_cpu_bf16_linear(torch.randn(2, 64), layer.weight.data, layer.weight.quant_state)


def test_kernel_lookup_table_is_nf4_rounded_to_bf16():
    lut = bnb_interop._bf16_from_bits(bnb_interop.BNB_CPU_BF16_NF4_LUT)
    assert torch.equal(lut, nf4.NF4_CODE.to(torch.bfloat16))


def test_bnb_dequantize_misreads_the_cpu_layout_and_the_course_does_not():
    layer = _repack(_layer())
    right = bnb_interop.bnb_weight(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrong = bnb_F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float().reshape(right.shape)
    # garbage: the error is of the size of the weights themselves (measured 0.14 here; max |w| 0.09)
    assert (wrong - right).abs().max() > 0.5 * right.abs().max()


def test_emulated_bf16_kernel_is_within_bf16_rounding_of_the_float32_product():
    layer = _repack(_layer())
    qs = layer.weight.quant_state
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(1))
    w = bnb_interop.bnb_weight(layer)
    y = bnb_interop.emulate_bnb_cpu_bf16_linear(x, layer.weight.data, qs)
    ref = x @ w.T
    # x, each level and the output are rounded to bf16 (relative error <= 2^-9 each): |y - ref| <= 2^-9 |ref| for
    # the output plus 2 * 2^-9 * sum_k |x_k w_k| for the inputs; float32 accumulation adds ~1e-7 relative.
    bound = 2**-9 * ref.abs() + 2 * 2**-9 * (x.abs() @ w.abs().T) + 1e-6
    assert ((y - ref).abs() <= bound).all(), ((y - ref).abs() / bound).max()
    assert (y - ref).abs().max() > 0  # it does round (measured 3.6e-3 on outputs up to 1.6)
    if bnb_interop.cpu_features()["bnb_avx512bf16"]:  # the real kernel runs here: the emulation reproduces it
        real = bnb_F.gemv_4bit(x, layer.weight, state=qs)
        # Same products, same roundings; only the order of the float32 sums may differ, which can move an output
        # by one bf16 step (2^-7 relative) or, near zero, by the float32 sum's own error (2^-24 per term of
        # sum_k |x_k w_k|). Measured on a Xeon with AVX512-BF16 and AMX: bit-identical for this layer (and for
        # 1536x576, 576x1536); 1.2 steps at most on a 64x128 layer with 40 rows.
        bound = 2**-7 * real.abs() + 576 * 2**-24 * (x.abs() @ w.abs().T)
        assert ((real - y).abs() <= bound).all(), (real - y).abs().max()


# ------------------------------------------------------------- bitsandbytes' dequantize vs the definition
def _avx512_kernel(packed, state, quant_type="nf4"):
    return bnb_interop.emulate_bnb_avx512_dequantize(packed, state.absmax, tuple(state.shape), state.blocksize,
                                                     state.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_avx512_row_indexing_is_named_where_it_occurs(dtype):
    c = bnb_interop.check_bnb_dequantize((96, 576), dtype, 128, features=AVX512_BF16_CPU, dequantize=_avx512_kernel)
    assert c.path == "avx512" and not c.bnb_matches and c.known_deviation
    assert c.course_matches and c.bytes_equal  # the course's own code stays right
    msg = c.message()
    for part in (f"bitsandbytes {bnb.__version__}", "avx512f, avx512_bf16", "blocksize 128", "(96, 576)",
                 "576 % 128 = 64", "whole blocks"):
        assert part in msg, msg
    assert 0.005 < c.max_abs_diff < 0.1  # the issue measured 0.039 on such a CPU for float32
    # blocksize 64 divides 576: the same kernel is exact there, so QLoRA's blocksize is not affected
    ok = bnb_interop.check_bnb_dequantize((96, 576), dtype, 64, features=AVX512_BF16_CPU, dequantize=_avx512_kernel)
    assert ok.path == "avx512" and ok.verdict == "definition" and ok.bnb_matches
    assert ok.max_abs_diff == 0 or dtype != torch.float32  # 16-bit: the correct rounding of the float32 product


def test_a_deviation_is_only_named_when_it_matches_the_machine_and_the_kernel():
    # the AVX-512 result on a CPU whose bitsandbytes has no AVX-512: not this machine's kernel -> unexplained
    c = bnb_interop.check_bnb_dequantize((96, 576), torch.float32, 128, features=AVX2_CPU, dequantize=_avx512_kernel)
    assert c.path == "scalar" and c.verdict == "unexplained" and not c.known_deviation
    assert "UNEXPLAINED" in c.message()

    def off_by_a_little(packed, state, quant_type="nf4"):  # another error: an absmax one block off
        out = _avx512_kernel(packed, state)
        return out * 1.001

    c = bnb_interop.check_bnb_dequantize((96, 576), torch.float32, 128, features=AVX512_BF16_CPU,
                                         dequantize=off_by_a_little)
    assert c.verdict == "unexplained" and not c.known_deviation


def test_path_prediction_follows_bitsandbytes_dispatch():
    P = bnb_interop.bnb_dequantize_path
    assert P((96, 576), torch.float32, 64, AVX2_CPU) == "scalar"
    assert P((96, 576), torch.float32, 64, AVX512_BF16_CPU) == "avx512"
    assert P((96, 577), torch.float32, 64, AVX512_BF16_CPU) == "python"  # odd last dimension
    assert P((96, 576), torch.float32, 2048, AVX512_BF16_CPU) == "python"  # its accuracy fallback
    assert P((96, 576), torch.bfloat16, 2048, AVX512_BF16_CPU) == "avx512"
    assert P((2, 3, 40), torch.float32, 64, AVX512_BF16_CPU) == "scalar"  # 40 is not a multiple of 16


def test_report_on_this_machine_is_consistent():
    r = bnb_interop.bnb_cpu_report(blocksizes=(64, 128))
    cpu, fwd = r["cpu"], r["forward"]
    assert r["bitsandbytes"] == bnb.__version__
    for bs, d in r["dequantize"].items():
        assert d["course_matches"] and d["bytes_equal"]
        assert d["verdict"] in ("definition", "avx512-row-indexing"), (bs, d)
        assert (d["verdict"] == "definition") == (d["max_abs_diff"] == 0)
    assert r["dequantize"][64]["verdict"] == "definition"  # 576 = 9 x 64: every kernel is exact
    # the forward repacks exactly where bitsandbytes' own check says AVX512-BF16 (nn/modules.py)
    assert fwd["eval_forward_repacks"] == cpu["bnb_avx512bf16"]
    if not fwd["eval_forward_repacks"]:  # float32 all along: exact (measured 0.0), gradient right
        assert fwd["eval_forward_rel_err"] < 1e-5 and fwd["train_grad_rel_err"] < 1e-5
    text = bnb_interop.format_bnb_cpu_report(r)
    assert "blocksize   64" in text and "repacks in place" in text


def test_report_on_a_simulated_avx512_bf16_cpu(avx512_bf16):
    fwd = bnb_interop.check_bnb_forward()
    assert fwd["eval_forward_repacks"] and fwd["eval_forward_dtype"] == "bfloat16"
    # bf16 rounding of inputs, levels and outputs: relative error of order 2^-9 (measured 2.2e-3), not float32's
    assert 1e-4 < fwd["eval_forward_rel_err"] < 2e-2
    assert 0 < fwd["weights_changed_by_repack_rel"] < 2**-8  # absmax rounded to bf16 (measured 2.5e-3)
    assert fwd["bnb_dequantize_after_forward_max_diff"] > 0.01  # reads the repacked bytes as standard: garbage
    # and the layer stays repacked in train mode: the training forward is bf16 and no gradient reaches the input
    assert 1e-4 < fwd["train_forward_rel_err"] < 2e-2
    assert fwd["train_grad_rel_err"] == 1.0


def test_training_from_the_start_never_repacks(avx512_bf16):
    layer = avx512_bf16(_layer()).train()  # QLoRA training: train mode, gradients on
    x = torch.randn(3, 576, requires_grad=True)
    layer(x).sum().backward()
    assert not bnb_interop.is_cpu_repacked(layer.weight.quant_state)  # Linear4bit.forward repacks only in eval mode
    torch.testing.assert_close(x.grad, torch.ones(3, 96) @ bnb_interop.bnb_weight(layer), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- whole models
def _tiny_qlora(seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lora_course.models import tiny_model_dir

    q = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir(), dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    torch.manual_seed(seed)
    q = get_peft_model(q, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in q.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)  # a non-zero adapter, so the checks cover it
    return q.eval()


IDS = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _bf16_noise_floor(model, copy_model):
    """The logit change from rounding where the bf16 kernel rounds, measured without its layout or kernel.

    In a second copy every formerly 4-bit layer rounds its input, its weight and its output to bf16 and multiplies
    in float32: the kernel's rounding points (csrc/cpu_ops.cpp: bf16 input, bf16 levels, fp32 sums, bf16 output).
    """
    names = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    rounded = copy.deepcopy(copy_model)
    for n, m in rounded.named_modules():
        if n in names:
            with torch.no_grad():
                m.weight.copy_(m.weight.bfloat16().float())
            m.register_forward_pre_hook(lambda mod, a: (a[0].bfloat16().float(),))
            m.register_forward_hook(lambda mod, a, out: out.bfloat16().float())
    return (_logits(rounded) - _logits(copy_model)).abs().max().item()


def _layers(model):
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_copy_after_an_eval_forward_on_an_avx512_bf16_cpu_computes_the_same_function(avx512_bf16):
    q = avx512_bf16(_tiny_qlora())
    standard = _logits(bnb_interop.dequantized_copy(q))
    logits = _logits(q)  # the eval forward repacks every layer in place and runs the bf16 kernel
    assert all(bnb_interop.is_cpu_repacked(m.weight.quant_state) for m in _layers(q))
    state = [(m.weight.data.clone(), m.weight.quant_state.absmax.clone()) for m in _layers(q)]
    d = bnb_interop.dequantized_copy(q)
    assert not _layers(d)
    diff = (_logits(d) - logits).abs().max().item()
    noise = _bf16_noise_floor(q, d)
    # The copy computes in float32 what the kernel computes with bf16 roundings: the two differ by the rounding
    # noise measured independently (tiny model: diff 0.0033 for a noise of 0.0029; the course's cpu model:
    # 0.47 and 0.44, as the issue measured on an AVX512-BF16 Xeon). Twice the noise leaves room for the other
    # order of float32 sums; a misread layout is off by ~100x the noise.
    assert 0 < noise and diff <= 2 * noise, (diff, noise)
    # the tolerance separates: what the copy did before the fix (bitsandbytes' dequantize_4bit of the repacked
    # bytes) is off by far more than the noise
    old = copy.deepcopy(d)
    modules = dict(old.named_modules())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for n, m in q.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                w = bnb_F.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
                modules[n].weight.copy_(w.reshape(modules[n].weight.shape))
    assert (_logits(old) - logits).abs().max() > 10 * noise
    # the copy follows the weights the layers hold now (absmax rounded to bf16 by the repack), not the old ones
    assert (_logits(d) - standard).abs().max() > 0
    # the original still works, untouched: same bytes, same state, same logits
    for m, (data, absmax) in zip(_layers(q), state):
        assert torch.equal(m.weight.data, data) and torch.equal(m.weight.quant_state.absmax, absmax)
        assert bnb_interop.is_cpu_repacked(m.weight.quant_state)
    assert torch.equal(_logits(q), logits)


def test_copy_made_before_and_after_a_forward_on_this_cpu():
    """The branch this machine takes (repacking or not), without emulation: the copy matches the model."""
    q = _tiny_qlora()
    before = bnb_interop.dequantized_copy(q)
    logits = _logits(q)
    after = bnb_interop.dequantized_copy(q)
    repacked = all(bnb_interop.is_cpu_repacked(m.weight.quant_state) for m in _layers(q))
    assert repacked == bnb_interop.cpu_features()["bnb_avx512bf16"]
    if repacked:
        noise = _bf16_noise_floor(q, after)
        assert (_logits(after) - logits).abs().max() <= 2 * noise  # derivation in the emulated test above
    else:
        # float32 on both sides, the same weights and ops: measured 0.0; 1e-5 of the logit scale allows another
        # BLAS summation order (2^-24 * sqrt(576) relative per dot product, far below it)
        scale = logits.abs().max().item()
        assert (_logits(after) - logits).abs().max() <= 1e-5 * scale
        assert torch.equal(_logits(before), _logits(after))


def test_direct_conversion_then_copy_equals_the_decoded_definition():
    """The conversion function itself, as the forward calls it, on every layer: the copy holds code*absmax(bf16)."""
    q = _tiny_qlora()
    std = {id(m): bnb_interop.quantized_from_bnb(m.weight.data, m.weight.quant_state) for m in _layers(q)}
    for m in _layers(q):
        _repack(m)
    d = bnb_interop.dequantized_copy(q)
    names = {n: m for n, m in q.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    copies = dict(d.named_modules())
    for n, m in names.items():
        s = std[id(m)]
        exact = bnb_interop.nf4_definition(s.packed, s.block_absmax().bfloat16().float(), s.shape.numel(), s.blocksize)
        assert torch.equal(copies[n].weight.detach().reshape(-1), exact), n


def test_disable_cpu_repacking_keeps_the_float32_path_and_restores_without_loss(avx512_bf16):
    q = avx512_bf16(_tiny_qlora())
    _logits(q)  # repacked
    held = {id(m): bnb_interop.bnb_weight(m) for m in _layers(q)}
    assert bnb_interop.disable_cpu_repacking(q) == len(_layers(q)) == 14
    for m in _layers(q):
        assert not bnb_interop.is_cpu_repacked(m.weight.quant_state) and not m.support_avx512bf16_for_cpu
        assert torch.equal(bnb_interop.bnb_weight(m), held[id(m)])  # exactly the weights the kernel used
    logits = _logits(q)  # no repack any more: float32, the definition
    assert not any(bnb_interop.is_cpu_repacked(m.weight.quant_state) for m in _layers(q))
    assert (logits - _logits(bnb_interop.dequantized_copy(q))).abs().max() <= 1e-5 * logits.abs().max()
    # training after that evaluation gets its gradients through the frozen 4-bit weights again
    q.train()
    x = q.get_input_embeddings()(IDS).detach().requires_grad_(True)
    q(inputs_embeds=x, labels=IDS).loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # and it saves through bitsandbytes' state-dict path: the standard bytes and the absmax the kernel used
    sd = q.get_base_model().state_dict()
    for n, m in q.get_base_model().named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            s = bnb_interop.quantized_from_bnb(m.weight.data, m.weight.quant_state)
            assert torch.equal(sd[n + ".weight"].reshape(-1), s.packed.reshape(-1))
            assert torch.equal(sd[n + ".weight.absmax"], s.absmax)
