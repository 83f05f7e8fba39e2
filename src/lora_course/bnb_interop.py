"""bitsandbytes interop: reading its 4-bit layers in either layout, its CPU kernels' known dequantize bug and the
checks that catch it, and the one NF4 ``BitsAndBytesConfig``.

The NF4 format itself (codes, quantize/dequantize, ``Quantized4bit``, ``QLoRALinear``) is ``lora_course.nf4``;
this module reads bitsandbytes' ``Linear4bit`` weights into it (``quantized_from_bnb``, ``bnb_weight``,
``dequantized_copy``), keeps a model on bitsandbytes' standard layout (``disable_cpu_repacking``), states the
definition ``code[nibble] * absmax`` (``nf4_definition``, ``correctly_rounded``), measures bitsandbytes against it on
this machine (``check_bnb_dequantize``, ``check_bnb_forward``, ``bnb_cpu_report``), reproduces its CPU kernels in
PyTorch so tests build those states on any CPU (``emulate_bnb_*``), and builds QLoRA's ``BitsAndBytesConfig``
(``qlora_quantization_config``, used by ``sft`` and ``distributed``).

bitsandbytes' CPU kernels depend on the CPU (read from its csrc/cpu_ops.cpp and nn/modules.py, 0.49.2):

- On a CPU with AVX-512F, ``dequantize_4bit`` runs a vector kernel that finds a value's absmax as
  ``row * (n // blocksize) + column // blocksize``: right only when each row of ``n`` values holds whole blocks.
  For rows that do not (``n % blocksize != 0``, e.g. 576 values in blocks of 128) it scales values with their
  neighbours' absmax. QLoRA's blocksize 64 divides every in-feature count of the course's models (576, 1536).
- On a CPU with AVX512-BF16, ``Linear4bit.forward`` in eval mode without gradients repacks the weight in place
  into a CPU tile layout with bf16 absmax (``quant_state.packing_format_for_cpu``) and from then on computes with a
  bf16 kernel, also in train mode. That kernel has no backward: no gradient flows through the 4-bit weight to
  the layer's input. ``dequantize_4bit`` reads the repacked bytes as if they were the standard layout.
  ``quantized_from_bnb`` decodes either layout; ``disable_cpu_repacking`` keeps a model on the standard one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .nf4 import CODES, FLOAT_DTYPES, NF4_CODE, SUPPORTED_BLOCKSIZES, Quantized4bit, _round_ties_away, quantize_nf4

# ----------------------------------------------------------------- bitsandbytes' 4-bit layers, in either layout
CPU_BLOCK_N = 32  # output rows per tile of bitsandbytes' CPU layout (``_convert_weight_packed_for_cpu``'s block_n)
# The lookup table of bitsandbytes' AVX512-BF16 kernel (csrc/cpu_ops.cpp, tinygemm_kernel_nn): NF4's 16 levels as
# bf16 bit patterns. They are NF4_CODE rounded to bf16 (tests/test_nf4_bnb_cpu.py checks it).
BNB_CPU_BF16_NF4_LUT = (0xBF80, 0xBF32, 0xBF06, 0xBECA, 0xBE92, 0xBE3D, 0xBDBA, 0x0000,
                        0x3DA3, 0x3E25, 0x3E7C, 0x3EAD, 0x3EE2, 0x3F10, 0x3F39, 0x3F80)


def _bf16_from_bits(bits: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def cpu_layout_to_standard(packed: torch.Tensor, shape: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Undo bitsandbytes' CPU repacking of an (N, K) 4-bit weight: its standard packed bytes, ``(N*K/2,)`` uint8.

    The CPU layout (bitsandbytes 0.49, ``functional._convert_weight_packed_for_cpu``, read by the kernel
    ``gemv_4bit_inference`` in csrc/cpu_ops.cpp) is ``[N, K/2]`` bytes: rows come in tiles of 32; for tile ``t``
    and input-column pair ``(2j, 2j+1)`` it stores 32 bytes, byte ``b`` holding row ``32t + b//2`` (low nibble)
    and row ``32t + 16 + b//2`` (high nibble) at column ``2j + b%2``. Pure re-indexing: the input is not changed.
    """
    n_rows, k = (int(d) for d in shape)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    if n_rows % CPU_BLOCK_N or k % 2 or packed.numel() != n_rows * k // 2:
        raise ValueError(f"not a bitsandbytes CPU-layout weight of shape {tuple(shape)}: got {packed.numel()} bytes "
                         f"(the layout needs N*K/2 bytes, N a multiple of {CPU_BLOCK_N} and K even)")
    tiles = packed.reshape(n_rows // CPU_BLOCK_N, k // 2, CPU_BLOCK_N)  # [tile, column pair, byte]
    # nibbles in the order (row in tile, column of the pair): low nibbles are rows 0-15, high nibbles rows 16-31
    nib = torch.cat([tiles & 0xF, tiles >> 4], dim=-1).reshape(n_rows // CPU_BLOCK_N, k // 2, CPU_BLOCK_N, 2)
    codes = nib.permute(0, 2, 1, 3).reshape(-1)  # [tile, row, column pair, column] = row-major (N, K)
    return codes[0::2] << 4 | codes[1::2]


def is_cpu_repacked(quant_state: Any) -> bool:
    """Whether a bitsandbytes 4-bit weight was repacked in place into the CPU layout (by an eval forward)."""
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def quantized_from_bnb(data: torch.Tensor, quant_state: Any) -> Quantized4bit:
    """The course's ``Quantized4bit`` for a bitsandbytes 4-bit weight (``weight.data``, ``weight.quant_state``).

    Standard layout: the packed bytes as they are, with the absmax (or, under double quantization, the 8-bit absmax
    codes, ``state2``'s absmax, code and blocksize, and the offset). CPU layout (after an eval forward on an
    AVX512-BF16 CPU): the bytes re-indexed to the standard layout and the bf16 absmax that the kernel uses, one
    per block in the standard order; decoding gives exactly the weights the repacked layer holds (its kernel also
    rounds the 16 levels and its inputs to bf16 as it multiplies). Nothing is modified; the tensors are copies or
    views of the originals.
    """
    quant_type = getattr(quant_state, "quant_type", None)
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"not a bitsandbytes 4-bit quant_state (quant_type={quant_type!r}): expected nf4 or fp4")
    code = getattr(quant_state, "code", None)
    if code is not None and not torch.equal(code.detach().float().cpu(), CODES[quant_type]):
        raise ValueError(f"the quant_state's {quant_type} code differs from bitsandbytes' table: cannot decode it "
                         "with lora_course.nf4 (was it made by another quantizer?)")
    shape, blocksize = torch.Size(quant_state.shape), int(quant_state.blocksize)
    if is_cpu_repacked(quant_state):
        n_rows, k = shape
        if k % blocksize:
            raise ValueError(f"CPU-layout weight with {k} inputs per row and blocksize {blocksize}: not decodable")
        packed = cpu_layout_to_standard(data, shape).view(-1, 1)
        absmax = quant_state.absmax.detach().float().reshape(k // blocksize, n_rows).T.reshape(-1)
        dtype = getattr(quant_state, "original_dtype", quant_state.dtype)
        return Quantized4bit(packed, absmax, shape, dtype, blocksize, quant_type)
    packed = (data if data.dtype == torch.uint8 else data.view(torch.uint8)).detach().reshape(-1, 1)
    if getattr(quant_state, "nested", False):
        s2 = quant_state.state2
        return Quantized4bit(packed, quant_state.absmax.detach(), shape, quant_state.dtype, blocksize, quant_type,
                             s2.absmax.detach().float(), quant_state.offset.detach().float(),
                             s2.code.detach().float(), int(s2.blocksize))
    return Quantized4bit(packed, quant_state.absmax.detach().float(), shape, quant_state.dtype, blocksize, quant_type)


def bnb_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight a bitsandbytes ``Linear4bit`` holds, decoded by the definition ``code[nibble] * absmax``.

    Works on the standard and the CPU layout, on any CPU; ``dtype`` float32/bfloat16/float16 rounds the float32
    product once, as bitsandbytes does when it dequantizes to the compute dtype (other dtypes are cast from float32).
    """
    q = quantized_from_bnb(module.weight.data, module.weight.quant_state)
    if dtype in FLOAT_DTYPES:
        return replace(q, dtype=dtype).dequantize()
    return replace(q, dtype=torch.float32).dequantize().to(dtype)


def dequantized_copy(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of a bitsandbytes 4-bit model (peft-wrapped or not) whose 4-bit layers hold their dequantized weights.

    Why: on a CPU, bitsandbytes dequantizes every 4-bit weight at every forward call, so generating token by token
    from a QLoRA model is slow. The copy computes the same function (the NF4 weights decoded once, the adapters
    untouched) at plain-matmul speed; compare logits before trusting it. The original model is not changed.

    The weights are decoded with this module's NF4 (``bnb_weight``), not bitsandbytes' ``dequantize_4bit``: after an
    eval forward on an AVX512-BF16 CPU the weights are in bitsandbytes' CPU layout, which ``dequantize_4bit``
    misreads, and on AVX-512 CPUs ``dequantize_4bit`` is wrong for rows that are not whole blocks (module docstring).
    """
    import copy

    import bitsandbytes as bnb

    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        w = bnb_weight(module, dtype)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=w.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if module.bias is not None:
                linear.bias.copy_(module.bias.to(dtype))
        linear.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent_name) if parent_name else out, child, linear)
    return out


def disable_cpu_repacking(model: nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer of ``model`` on the standard layout and the float32 path, on any CPU.

    Why: on an AVX512-BF16 CPU an eval forward without gradients repacks a layer for a bf16 kernel that has no
    backward, and the layer stays repacked in train mode: QLoRA training after an evaluation would then get no
    gradient through the frozen 4-bit weights. This turns the repack off (``support_avx512bf16_for_cpu``, the flag
    ``Linear4bit.forward`` checks) and puts layers already repacked back on the standard layout without loss
    (fp32 absmax equal to the bf16 ones the kernel used, not bitsandbytes' lossy re-quantization). Returns the
    number of 4-bit layers. On a CPU without AVX512-BF16 nothing changes: the flag is already off.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    count = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        count += 1
        module.support_avx512bf16_for_cpu = False
        qs = module.weight.quant_state
        if not is_cpu_repacked(qs):
            continue
        q = quantized_from_bnb(module.weight.data, qs)
        state = QuantState(absmax=q.absmax, shape=q.shape, code=qs.code, blocksize=q.blocksize,
                           quant_type=q.quant_type, dtype=q.dtype)
        data = q.packed.reshape(qs.original_qshape)
        storage = getattr(qs, "original_storage_type", None)
        module.weight.data = data.view(storage) if storage is not None else data
        module.weight.quant_state = state
        module.quant_state = state
    return count


# ------------------------------------------------------- bitsandbytes' CPU kernels against the definition
def nf4_definition(packed: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int,
                   code: torch.Tensor = NF4_CODE) -> torch.Tensor:
    """The definition of 4-bit block dequantization, in float32: ``code[nibble] * absmax[block]`` (flat, n values).

    Written independently of ``Quantized4bit.dequantize`` so that tests compare both implementations against it.
    """
    p = packed.reshape(-1)
    nibbles = torch.stack([p >> 4, p & 0xF], dim=-1).reshape(-1)[:n].long()
    return code.to(p.device)[nibbles] * absmax.float().repeat_interleave(blocksize)[:n]


def correctly_rounded(values: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Elementwise: ``values`` is the float32 ``exact`` rounded to ``dtype`` (to nearest, either tie rule)."""
    values, exact = values.reshape(-1), exact.reshape(-1)
    if dtype == torch.float32:
        return values.float() == exact
    return (values == exact.to(dtype)) | (values == _round_ties_away(exact, dtype))


def cpu_features() -> dict[str, Any]:
    """The CPU features that decide bitsandbytes' CPU kernels: the CPU's flags (Linux ``/proc/cpuinfo``), torch's
    vector capability, and bitsandbytes' own runtime checks (what its C library branches on)."""
    from .llama_build import cpu_flags

    flags = cpu_flags()
    out: dict[str, Any] = {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16",
                                                    "amx_int8")}
    out["torch_capability"] = torch.backends.cpu.get_cpu_capability()
    try:
        from bitsandbytes.cextension import lib
        from bitsandbytes.functional import has_avx512bf16

        out["bnb_avx512f"] = bool(lib.has_avx512f_cpu())
        out["bnb_avx512bf16"] = bool(has_avx512bf16())
    except Exception:  # noqa: BLE001 - no native library (or an older one): its vector kernels cannot run
        out["bnb_avx512f"] = out["bnb_avx512bf16"] = False
    return out


def bnb_dequantize_path(shape: tuple[int, ...], dtype: torch.dtype, blocksize: int,
                        features: dict[str, Any]) -> str:
    """Which code bitsandbytes 0.49's CPU ``dequantize_4bit`` runs (backends/cpu/ops.py, csrc/cpu_ops.cpp):
    ``python`` (odd last dimension; or blocksize >= 2048 in 32/16-bit float on torch's AVX512 capability),
    ``avx512`` (bitsandbytes' AVX-512F check, a last dimension divisible by 16) or ``scalar``."""
    if shape[-1] % 2 or (features["torch_capability"] == "AVX512" and blocksize >= 2048 and dtype != torch.bfloat16):
        return "python"
    if features["bnb_avx512f"] and shape[-1] % 16 == 0 and blocksize >= 16:
        return "avx512"
    return "scalar"


def emulate_bnb_avx512_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...],
                                  blocksize: int, dtype: torch.dtype, code: torch.Tensor = NF4_CODE) -> torch.Tensor:
    """What bitsandbytes 0.49's AVX-512 ``dequantizeBlockwise4bitCpu`` returns, reproduced in PyTorch.

    It walks the tensor as ``m`` rows of ``n = shape[-1]`` values and takes the absmax of row ``r``, column ``c``
    at ``r * (n // blocksize) + c // blocksize``; the definition's block is ``(r * n + c) // blocksize``. They agree
    when ``n`` is a multiple of ``blocksize`` (or there is one row). The product is float32, rounded to ``dtype``
    to nearest-even (``_mm512_cvtps_ph`` / ``_mm512_cvtneps_pbh``).
    """
    n = shape[-1]
    m = math.prod(shape[:-1]) if len(shape) > 1 else 1
    p = packed.reshape(-1)
    nibbles = torch.stack([p >> 4, p & 0xF], dim=-1).reshape(m, n).long()
    idx = torch.arange(m).view(-1, 1) * (n // blocksize) + torch.arange(n).view(1, -1) // blocksize
    return (code[nibbles] * absmax.float()[idx]).to(dtype).reshape(shape)


def qlora_quantization_config(compute_dtype: Any, storage_dtype: Any = None) -> Any:
    """QLoRA's 4-bit settings for ``from_pretrained``: NF4 (this module's code), double quantization of the absmax
    constants, matmuls in ``compute_dtype``. ``storage_dtype`` (default uint8: two weights per byte) stores the packed
    weights as elements of another dtype, same bytes: FSDP needs the compute dtype there (notebook 10).
    (``models.load_for_method`` still writes the same settings inline: it keys notebook 09's committed results.)"""
    from transformers import BitsAndBytesConfig

    kw = {"bnb_4bit_quant_storage": storage_dtype} if storage_dtype is not None else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, **kw)


def emulate_bnb_python_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...],
                                  blocksize: int, dtype: torch.dtype, code: torch.Tensor = NF4_CODE) -> torch.Tensor:
    """bitsandbytes' Python fallback (``_dequantize_4bit_impl``): the code is cast to ``dtype`` before scaling."""
    n = math.prod(shape)
    p = packed.reshape(-1)
    nibbles = torch.stack([p >> 4, p & 0xF], dim=-1).reshape(-1)[:n].long()
    values = code.to(dtype)[nibbles].float() * absmax.float().repeat_interleave(blocksize)[:n]
    return values.to(dtype).reshape(shape)


@dataclass
class BnbDequantizeCheck:
    """bitsandbytes' ``dequantize_4bit`` and the course's ``dequantize`` against the definition, on this machine."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int
    path: str  # the code bitsandbytes runs here: python | avx512 | scalar
    max_abs_diff: float  # max |bitsandbytes - definition| (float32)
    bnb_matches: bool  # bitsandbytes = the definition, correctly rounded to dtype
    course_matches: bool  # the course's dequantize = the definition, correctly rounded to dtype
    bytes_equal: bool  # the course's packed bytes and absmax = bitsandbytes'
    verdict: str  # definition | python-fallback-16bit | avx512-row-indexing | unexplained
    features: dict[str, Any]

    @property
    def known_deviation(self) -> bool:
        """bitsandbytes is wrong here in the way its AVX-512 kernel is known to be, reproduced value for value."""
        return self.verdict == "avx512-row-indexing"

    def message(self) -> str:
        import bitsandbytes

        flags = ", ".join(k for k in ("avx512f", "avx512_bf16", "amx_bf16") if self.features.get(k)) or "no AVX-512"
        head = (f"bitsandbytes {bitsandbytes.__version__} on this CPU ({flags}; torch capability "
                f"{self.features['torch_capability']}): dequantize_4bit of a {self.shape} {str(self.dtype)[6:]} "
                f"tensor, blocksize {self.blocksize}, runs its {self.path} kernel: max |bnb - code[nibble]*absmax| "
                f"= {self.max_abs_diff:.3g}")
        n = self.shape[-1]
        if self.verdict == "avx512-row-indexing":
            return (f"{head}. Known bitsandbytes bug, reproduced value for value: its AVX-512 kernel takes the absmax "
                    f"as if each row of {n} values held whole blocks of {self.blocksize} ({n} % {self.blocksize} = "
                    f"{n % self.blocksize}). Packed bytes and absmax equal the course's: {self.bytes_equal}; the "
                    f"course's dequantize equals the definition: {self.course_matches}.")
        if self.verdict == "python-fallback-16bit":
            return f"{head}: its Python fallback rounds the code to {str(self.dtype)[6:]} first (one ulp at most)"
        if self.verdict == "definition":
            return f"{head}: equal to the definition"
        return f"{head}: UNEXPLAINED (neither the definition nor a known kernel behaviour)"


def check_bnb_dequantize(shape: tuple[int, ...] = (96, 576), dtype: torch.dtype = torch.float32,
                         blocksize: int = 64, seed: int = 0, features: dict[str, Any] | None = None,
                         dequantize: Any = None, weights: torch.Tensor | None = None) -> BnbDequantizeCheck:
    """Quantize a tensor with bitsandbytes (``weights``, or a random N(0, 0.02²) one of ``shape`` and ``dtype``),
    dequantize it with bitsandbytes and with the course, and judge both against the definition
    ``code[nibble] * absmax``, naming any known bitsandbytes behaviour.

    ``features`` (default ``cpu_features()``) and ``dequantize`` (default ``bitsandbytes.functional.dequantize_4bit``)
    are parameters so that tests can judge another CPU's results on this one.
    """
    import bitsandbytes.functional as bnb_F

    features = cpu_features() if features is None else features
    dequantize = bnb_F.dequantize_4bit if dequantize is None else dequantize
    if weights is None:
        weights = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)
    w, shape, dtype = weights, tuple(weights.shape), weights.dtype
    packed, state = bnb_F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    bnb_out = dequantize(packed, state, quant_type="nf4").reshape(shape)
    exact = nf4_definition(packed, state.absmax, w.numel(), blocksize)
    mine = quantize_nf4(w, blocksize)
    course = replace(mine, packed=packed, absmax=state.absmax).dequantize()
    bytes_equal = torch.equal(mine.packed, packed) and torch.equal(mine.absmax, state.absmax)
    bnb_matches = bool(correctly_rounded(bnb_out, exact, dtype).all())
    path = bnb_dequantize_path(shape, dtype, blocksize, features)
    if bnb_matches:
        verdict = "definition"
    elif path == "python" and dtype != torch.float32 and torch.equal(
            bnb_out, emulate_bnb_python_dequantize(packed, state.absmax, shape, blocksize, dtype)):
        verdict = "python-fallback-16bit"
    elif path == "avx512" and torch.equal(
            bnb_out, emulate_bnb_avx512_dequantize(packed, state.absmax, shape, blocksize, dtype)):
        verdict = "avx512-row-indexing"
    else:
        verdict = "unexplained"
    return BnbDequantizeCheck(tuple(shape), dtype, blocksize, path,
                              (bnb_out.float().reshape(-1) - exact).abs().max().item(), bnb_matches,
                              bool(correctly_rounded(course, exact, dtype).all()), bytes_equal, verdict, features)


def emulate_bnb_cpu_bf16_linear(x: torch.Tensor, data: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """What bitsandbytes' AVX512-BF16 kernel (``gemv_4bit_inference``, csrc/cpu_ops.cpp) computes for a layer in
    the CPU layout, reproduced in PyTorch for CPUs that cannot run it (up to the order of float32 additions).

    The input is rounded to bf16; each weight is the NF4 level in bf16 (``BNB_CPU_BF16_NF4_LUT``); per block of
    ``blocksize`` inputs the products are summed in float32 (``_mm512_dpbf16_ps``), scaled by the block's bf16
    absmax and accumulated in float32; the result is rounded to bf16 and returned in the input's dtype.
    """
    if not is_cpu_repacked(quant_state) or quant_state.quant_type != "nf4":
        raise ValueError("emulate_bnb_cpu_bf16_linear needs an NF4 weight in bitsandbytes' CPU layout "
                         "(quant_state.packing_format_for_cpu)")
    n_rows, k = quant_state.shape
    bs = int(quant_state.blocksize)
    p = cpu_layout_to_standard(data, quant_state.shape)
    nibbles = torch.stack([p >> 4, p & 0xF], dim=-1).reshape(n_rows, k // bs, bs).long()
    w = _bf16_from_bits(BNB_CPU_BF16_NF4_LUT).float()[nibbles]  # [N, K/bs, bs]
    a = x.reshape(-1, k).to(torch.bfloat16).float().reshape(-1, k // bs, bs)
    per_block = torch.einsum("mgb,ngb->mgn", a, w)  # float32 sums within each block
    out = (per_block * quant_state.absmax.float().unsqueeze(0)).sum(dim=1)  # absmax [K/bs, N]
    return out.to(torch.bfloat16).to(x.dtype).reshape(*x.shape[:-1], n_rows)


def _bnb_test_layer(in_features: int, out_features: int, seed: int) -> Any:
    import bitsandbytes as bnb

    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.02
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32,
                              compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                     module=layer)
    return layer.to("cpu")  # quantizes


def check_bnb_forward(in_features: int = 576, out_features: int = 64, seed: int = 0) -> dict[str, Any]:
    """Measure what one bitsandbytes ``Linear4bit`` (NF4, double quant, blocksize 64, float32 compute) does here.

    An eval forward without gradients (where an AVX512-BF16 CPU repacks), then a train-mode forward and backward
    (QLoRA training). Returns whether the eval forward repacked, the largest error of each forward relative to
    ``x @ W.T`` with ``W`` decoded by the definition, how far ``dequantize_4bit`` then is from ``W``, and whether
    the training backward delivers ``dL/dx = dL/dy @ W`` (an error of 1.0 means no gradient reached the input).
    """
    import warnings

    import bitsandbytes.functional as bnb_F

    layer = _bnb_test_layer(in_features, out_features, seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(3, in_features, generator=g)
    w_before = bnb_weight(layer)
    with torch.no_grad():
        y = layer(x)
    repacked = is_cpu_repacked(layer.weight.quant_state)
    w = bnb_weight(layer)  # the weights the layer holds now, in either layout

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).abs().max() / b.abs().max()).item()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnb_deq = bnb_F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float().reshape(w.shape)
        layer.train()
        xg = x.clone().requires_grad_(True)
        y_train = layer(xg)
        upstream = torch.randn(y_train.shape, generator=g)
        if y_train.requires_grad:  # the repacked kernel may return an output outside autograd altogether
            y_train.backward(upstream)
    grad = torch.zeros_like(x) if xg.grad is None else xg.grad
    return {"eval_forward_repacks": repacked,
            "eval_forward_dtype": "bfloat16" if repacked else "float32",
            "eval_forward_rel_err": rel(y, x @ w.T),
            "weights_changed_by_repack_rel": rel(w, w_before),
            "bnb_dequantize_after_forward_max_diff": (bnb_deq - w).abs().max().item(),
            "train_forward_rel_err": rel(y_train.detach(), x @ w.T),
            "train_grad_rel_err": rel(grad, upstream @ w)}


def bnb_cpu_report(shape: tuple[int, int] = (96, 576), blocksizes: tuple[int, ...] = SUPPORTED_BLOCKSIZES,
                   dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """What bitsandbytes' CPU kernels do on this machine, measured: version, CPU features, for each blocksize the
    largest difference of ``dequantize_4bit`` from the definition (and its verdict), and ``check_bnb_forward``."""
    import warnings

    import bitsandbytes

    features = cpu_features()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checks = {bs: check_bnb_dequantize(shape, dtype, bs, features=features) for bs in blocksizes}
        forward = check_bnb_forward()
    return {"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__, "cpu": features,
            "dequantize_shape": tuple(shape), "dequantize_dtype": str(dtype)[6:],
            "dequantize": {bs: {"max_abs_diff": c.max_abs_diff, "verdict": c.verdict, "path": c.path,
                                "course_matches": c.course_matches, "bytes_equal": c.bytes_equal}
                           for bs, c in checks.items()},
            "forward": forward}


def format_bnb_cpu_report(report: dict[str, Any]) -> str:
    """``bnb_cpu_report`` as lines of text (the notebooks and the environment doctor print it)."""
    cpu = report["cpu"]
    flags = [k for k in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8") if cpu[k]]
    head = (f"bitsandbytes {report['bitsandbytes']}, torch {report['torch']} (CPU capability "
            f"{cpu['torch_capability']}); CPU flags: {', '.join(flags) or 'none of avx2/avx512/amx'}; bitsandbytes' "
            f"own checks: avx512f={cpu['bnb_avx512f']}, avx512bf16={cpu['bnb_avx512bf16']}")
    what = f"{report['dequantize_shape']} {report['dequantize_dtype']}"
    lines = [head, f"dequantize_4bit of a {what} tensor vs code[nibble]*absmax:"]
    for bs, d in report["dequantize"].items():
        lines.append(f"  blocksize {bs:>4}: {d['path']:<6} kernel, max |diff| {d['max_abs_diff']:.3g} -> {d['verdict']}"
                     f"; course's dequantize = definition: {d['course_matches']}")
    f = report["forward"]
    lines.append(f"Linear4bit eval forward (no grad): repacks in place: {f['eval_forward_repacks']}, computes in "
                 f"{f['eval_forward_dtype']} (rel. error {f['eval_forward_rel_err']:.1e}); dequantize_4bit afterwards "
                 f"off by {f['bnb_dequantize_after_forward_max_diff']:.3g}")
    lines.append(f"then train mode: forward rel. error {f['train_forward_rel_err']:.1e}, input gradient rel. error "
                 f"{f['train_grad_rel_err']:.1e} (1.0 = no gradient through the 4-bit weight)")
    return "\n".join(lines)
