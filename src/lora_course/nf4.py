"""NF4 from scratch: 4-bit NormalFloat block quantization, double quantization and a QLoRA linear layer.

Implements the storage format of Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"
(arXiv:2305.14314), written to reproduce bitsandbytes byte for byte: ``bitsandbytes/functional.py``
(``create_normal_map``, ``create_dynamic_map``, ``get_4bit_type``, ``quantize_4bit`` with
``compress_statistics``) and its reference kernels in ``bitsandbytes/backends/default/ops.py``
(``quantize_4bit``, ``_dequantize_4bit_impl``), as of bitsandbytes 0.49.

A weight is cut into blocks of ``blocksize`` consecutive values (row-major, across rows). Each block is scaled
by its absolute maximum into [-1, 1] and every value is replaced by the index of the nearest of 16 levels
(the *code*); two 4-bit indices share a byte, the first in the high nibble. NF4's levels are quantiles of the
standard normal, so each level is equally likely for normally distributed weights. Double quantization
stores the fp32 block absmax values themselves in 8 bits (bitsandbytes' dynamic code, blocks of 256, minus
their mean), cutting the constants from 32/64 = 0.5 to 8/64 + 32/(64·256) ≈ 0.127 bits per parameter.

Measured against bitsandbytes 0.49.2's CPU backend (tests/test_nf4.py): packed bytes and absmax are identical
for float32/bfloat16/float16 on every CPU; with and without double quantization (the 8-bit absmax codes matched on
all 1.66 M blocks of the course's CPU model). Dequantized values equal the definition ``code[nibble] * absmax``
(rounded once to the dtype) wherever bitsandbytes computes them correctly; where it does not, the difference is
named by ``bnb_interop.check_bnb_dequantize`` and ``bnb_interop.bnb_cpu_report``. Differences: bitsandbytes' CPU
path rejects an odd number of elements (this module pads the last byte's low nibble with 0); for 16-bit tensors
with an odd last dimension its Python fallback rounds the code to 16 bits before scaling (at most one ulp away
from the definition); its scalar C kernel rounds float16 ties away from zero, which ``dequantize`` follows; its
CUDA kernels were not compared here. Reading bitsandbytes' own 4-bit layers (either of its layouts, any CPU) and
checking its CPU kernels against the definition is ``lora_course.bnb_interop``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoRAPair

SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
ABSMAX_BLOCKSIZE = 256  # second-level blocks of double quantization (bitsandbytes' compress_statistics)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CHUNK = 1 << 18  # values per argmin pass: bounds the (chunk x 16) distance matrix to 16 MiB


def normal_map(offset: float = 0.9677083, use_extra_value: bool = True) -> torch.Tensor:
    """The NF4 levels: normal quantiles with an exact zero, normalised to [-1, 1] (bitsandbytes' construction).

    Why: for N(0, 1) data each level then covers an equal probability mass. QLoRA takes 8 quantiles for the
    positive half (``linspace(offset, 0.5, 9)`` without 0.5) and 7 for the negative half, so that zero is
    exactly representable; ``offset`` = 0.9677083 puts the outer levels at ±Φ⁻¹(offset) ≈ ±1.848 before
    normalising. bitsandbytes evaluates scipy's ``norm.ppf`` in float64 on float32 probabilities and divides in
    float32; this does the same with ``Φ⁻¹(p) = √2 · erfinv(2p − 1)``.
    """
    def ppf(p: torch.Tensor) -> torch.Tensor:
        return math.sqrt(2.0) * torch.erfinv(2.0 * p.double() - 1.0)

    pos = ppf(torch.linspace(offset, 0.5, 9 if use_extra_value else 8)[:-1])
    neg = -ppf(torch.linspace(offset, 0.5, 8)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float().sort().values
    return values / values.max()


def dynamic_map(max_exponent_bits: int = 7) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (``create_dynamic_map``): 256 levels, used for the absmax values.

    Why this code: it is a float-like format (a decimal exponent 10^-6..10^0 and a shrinking linear fraction),
    precise near zero where most mean-centred absmax values lie. Dettmers 2016, arXiv:1511.04561.
    """
    parts = [torch.tensor([0.0, 1.0])]
    for i in range(max_exponent_bits):  # 7 exponents, not a loop over data
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        parts += [scale * means, -scale * means]
    return torch.cat(parts).sort().values


NF4_CODE = normal_map()
# bitsandbytes' FP4 (get_4bit_type "fp4"), listed in bit-pattern order s|e1 e0|m: exponent codes 01, 10, 11 mean
# 2^3, 2^2, 2^1 and 00 is subnormal (0 or 0.0625); normalised by the largest magnitude, 12.
FP4_CODE = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3]) / 12.0
INT4_CODE = torch.arange(-7, 8, dtype=torch.float32) / 7.0  # symmetric absmax INT4: 15 evenly spaced levels
# bitsandbytes' CPU kernel (csrc/cpu_ops.cpp) sets code[0] = -1 in place before its binary search, and its
# QuantState keeps that copy: a block's most negative value, scaled to exactly -1, then round-trips exactly.
DYNAMIC_CODE = torch.cat([torch.tensor([-1.0]), dynamic_map()[1:]])
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE, "int4": INT4_CODE}


def _check(w: torch.Tensor, blocksize: int, quant_type: str) -> None:
    if not isinstance(w, torch.Tensor) or w.dtype not in FLOAT_DTYPES:
        got = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"4-bit quantization needs a float32, bfloat16 or float16 tensor, got {got}: "
                         "convert it first, e.g. w.float() (bitsandbytes accepts the same three dtypes)")
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize} is not supported: use one of {SUPPORTED_BLOCKSIZES} "
                         "(bitsandbytes' documented block sizes; QLoRA uses 64)")
    if quant_type not in CODES:
        raise ValueError(f"quant_type={quant_type!r} is unknown: use one of {sorted(CODES)}")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor: it has no blocks")


def _absmax_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block fp32 absmax and the values scaled into [-1, 1], with bitsandbytes' exact arithmetic.

    Full blocks are multiplied by ``1 / absmax`` in float32 (type promotion: 16-bit x float32 tensor); a
    trailing partial block is multiplied by a 0-dim float32 tensor, which keeps the input's 16-bit dtype. An
    all-zero block gives NaN, which argmin maps to code 0 (as bitsandbytes does); it dequantizes to 0.
    """
    n = flat.numel()
    full, rem = divmod(n, blocksize)
    absmax = torch.zeros(full + (rem > 0), dtype=torch.float32, device=flat.device)
    blocks = flat[: full * blocksize].reshape(full, blocksize)
    absmax[:full] = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1 / absmax[:full].view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        tail = flat[n - rem:]
        absmax[-1] = tail.abs().max()
        scaled = torch.cat([scaled, torch.clamp(tail * (1 / absmax[-1]), -1, 1)])
    return absmax, scaled


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (first one on ties), as uint8; vectorised in chunks of 2^18 values."""
    code = code.to(scaled.device, torch.float32)
    parts = [torch.argmin((s.view(-1, 1) - code).abs(), dim=-1) for s in scaled.split(_CHUNK)]
    return torch.cat(parts).to(torch.uint8)


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``values * absmax`` block by block in float32 (the last block may be partial)."""
    n = values.numel()
    padded = F.pad(values, (0, absmax.numel() * blocksize - n))
    return (padded.view(-1, blocksize) * absmax.view(-1, 1)).reshape(-1)[:n]


def _round_ties_away(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 -> a 16-bit dtype, rounding to nearest with ties away from zero (torch rounds ties to even).

    At an exact tie ``mirror = 2x - nearest`` is the other 16-bit neighbour; elsewhere it is not a 16-bit value.
    """
    near = x.to(dtype)
    mirror = 2 * x - near.float()
    tie = (mirror != near.float()) & (mirror.to(dtype).float() == mirror)
    return torch.where(tie & (mirror.abs() > near.float().abs()), mirror.to(dtype), near)


def _to_half(x: torch.Tensor) -> torch.Tensor:
    """float32 -> float16 rounding ties away from zero, as bitsandbytes' scalar C kernel does."""
    return _round_ties_away(x, torch.float16)


@dataclass
class Quantized4bit:
    """A 4-bit block-quantized tensor: packed codes plus the per-block constants needed to dequantize it.

    ``packed`` has bitsandbytes' shape ``(ceil(n / 2), 1)`` and nibble order. Without double quantization
    ``absmax`` holds one fp32 value per block; with it, ``absmax`` holds 8-bit dynamic-code indices of
    ``block_absmax - offset`` and ``absmax2`` one fp32 scale per ``absmax_blocksize`` (256) of them, decoded with
    ``absmax_code`` (None: bitsandbytes' CPU copy of its dynamic code, ``DYNAMIC_CODE``).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    absmax2: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    absmax_code: torch.Tensor | None = None
    absmax_blocksize: int = ABSMAX_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    def codes(self) -> torch.Tensor:
        """The 4-bit indices, one uint8 per element, in the tensor's flat order."""
        p = self.packed.reshape(-1)
        return torch.stack([p >> 4, p & 0xF], dim=-1).reshape(-1)[: math.prod(self.shape)]

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax of every block (reconstructed from its 8-bit codes under double quantization)."""
        if not self.double_quant:
            return self.absmax
        code = (DYNAMIC_CODE if self.absmax_code is None else self.absmax_code).to(self.absmax.device, torch.float32)
        return _scale_blocks(code[self.absmax.long()], self.absmax2, self.absmax_blocksize) + self.offset

    def dequantize(self) -> torch.Tensor:
        """``code[index] * absmax`` in float32, rounded once to the original dtype, as bitsandbytes' C kernel does."""
        values = CODES[self.quant_type].to(self.packed.device)[self.codes().long()]
        out = _scale_blocks(values, self.block_absmax(), self.blocksize)
        return (_to_half(out) if self.dtype == torch.float16 else out.to(self.dtype)).reshape(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: packed codes plus all constants."""
        parts = [self.packed, self.absmax, self.absmax2, self.offset]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def quantize_4bit(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False,
                  quant_type: str = "nf4") -> Quantized4bit:
    """Block-quantize ``w`` with a 16-level code (``nf4``, ``fp4`` or ``int4``), optionally double-quantizing.

    Matches ``bitsandbytes.functional.quantize_4bit(w, blocksize, quant_type=..., compress_statistics=...)``
    for NF4: the same absmax, the same nearest-level indices (ties to the lower index), the same packing.
    """
    _check(w, blocksize, quant_type)
    absmax, scaled = _absmax_scale(w.reshape(-1), blocksize)
    idx = _nearest(scaled, CODES[quant_type])
    if idx.numel() % 2:  # odd count: the last byte's low nibble is padding
        idx = torch.cat([idx, idx.new_zeros(1)])
    packed = (idx[0::2] << 4 | idx[1::2]).view(-1, 1)
    q = Quantized4bit(packed, absmax, w.shape, w.dtype, blocksize, quant_type)
    if double_quant:
        q.offset = absmax.mean()
        q.absmax2, scaled2 = _absmax_scale(absmax - q.offset, ABSMAX_BLOCKSIZE)
        q.absmax = _nearest(scaled2, DYNAMIC_CODE)
    return q


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> Quantized4bit:
    """NF4-quantize ``w``: byte-identical to bitsandbytes' ``quantize_4bit(..., quant_type="nf4")``."""
    return quantize_4bit(w, blocksize, double_quant, "nf4")


def roundtrip_error(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64) -> dict[str, float]:
    """Mean squared and mean absolute error of quantize-then-dequantize, computed in float64."""
    err = quantize_4bit(w, blocksize, False, quant_type).dequantize().double() - w.double()
    return {"mse": err.pow(2).mean().item(), "mae": err.abs().mean().item()}


def bits_per_param(blocksize: int = 64, double_quant: bool = False, absmax_blocksize: int = ABSMAX_BLOCKSIZE,
                   code_bits: int = 4) -> float:
    """Storage per weight: 4 bits of code plus the block constants spread over the block.

    Without double quantization: 4 + 32/blocksize (4.5 at 64). With it: 4 + 8/blocksize +
    32/(blocksize·absmax_blocksize) (≈ 4.127 at 64/256), QLoRA's ≈ 0.373-bit saving; the one fp32 mean per
    tensor is negligible and left out.
    """
    if not double_quant:
        return code_bits + 32 / blocksize
    return code_bits + 8 / blocksize + 32 / (blocksize * absmax_blocksize)


class QLoRALinear(LoRAPair):
    """A frozen NF4 weight, dequantized on the fly in ``forward``, plus a trainable LoRA pair (QLoRA).

    The weight lives in buffers (``packed`` codes and ``absmax``, plus ``absmax2``/``offset`` under double
    quantization), so it has no gradient and ``.to(device)`` moves it. The pair is ``lora_course.lora.LoRAPair``,
    the one ``LoRALinear`` uses: ``lora_A`` (r x in) starts Kaiming-uniform and ``lora_B`` (out x r) at zero, in
    float32 for a bf16/fp16 weight, so the layer starts exactly equal to ``F.linear(x, dequantized W, b)``::

        y = x Ŵᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ,   Ŵ = dequantize(NF4(W)),   scaling = alpha / r (rsLoRA: / √r)
    """

    def __init__(self, q: Quantized4bit, bias: torch.Tensor | None, r: int, alpha: float,
                 dropout: float = 0.0, use_rslora: bool = False) -> None:
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"QLoRALinear needs a 2-D (out, in) weight, got shape {tuple(q.shape)}")
        self.out_features, self.in_features = q.shape
        self.blocksize, self.weight_dtype, self.quant_type = q.blocksize, q.dtype, q.quant_type
        self.register_buffer("packed", q.packed)
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("absmax2", q.absmax2)
        self.register_buffer("offset", q.offset)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.init_lora_pair(self.in_features, self.out_features, r, alpha, dropout, use_rslora, q.dtype,
                            q.packed.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, blocksize: int = 64, double_quant: bool = True,
                    dropout: float = 0.0, use_rslora: bool = False) -> QLoRALinear:
        """Quantize ``linear.weight`` to NF4 (double-quantized by default, as QLoRA does) and add LoRA."""
        q = quantize_nf4(linear.weight.detach(), blocksize, double_quant)
        return cls(q, linear.bias, r, alpha, dropout, use_rslora)

    def quantized(self) -> Quantized4bit:
        """The stored weight as a ``Quantized4bit`` view of this module's buffers."""
        return Quantized4bit(self.packed, self.absmax, torch.Size((self.out_features, self.in_features)),
                             self.weight_dtype, self.blocksize, self.quant_type, self.absmax2, self.offset)

    def dequantized_weight(self) -> torch.Tensor:
        return self.quantized().dequantize()

    def weight_nbytes(self) -> int:
        """Bytes of the frozen weight as stored (codes + constants, bias excluded)."""
        return self.quantized().nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)
        return self.add_lora_update(x, result)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type}, "
                f"blocksize={self.blocksize}, double_quant={self.absmax2 is not None}, r={self.r}, "
                f"alpha={self.alpha:g}")
