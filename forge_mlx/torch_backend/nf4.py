"""NF4 storage in torch, byte for byte what forge_mlx/quant/nf4.py (and bitsandbytes) writes.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314). Quantizing runs on the CPU in float32 with the same ops as the
MLX side's numpy: blocks over the row-major flattened weight (a last partial block gets its own absmax),
every element scaled by the float32 reciprocal of its block's absmax, nearest level with ties to the lower
one; double quantization stores absmax - mean(absmax) as 8-bit dynamic-map codes in blocks of 256.
Dequantizing is torch ops on the layer's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from forge_mlx.errors import ForgeError

# bitsandbytes' get_4bit_type("nf4"): normal-distribution quantiles, sorted, in [-1, 1].
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # those bitsandbytes' quantize_4bit accepts
NESTED_BLOCKSIZE = 256  # bitsandbytes' double quantization of absmax
_TINY = 1e-38  # bitsandbytes clamps absmax to this before taking its reciprocal


@dataclass(frozen=True)
class NF4Tensor:
    """A weight in bitsandbytes NF4 form; double-quantized, `absmax` holds uint8 codes of absmax - offset."""

    packed: torch.Tensor  # (ceil(n/2),) uint8, first element of each pair in the high nibble
    absmax: torch.Tensor  # (ceil(n/blocksize),) float32, or uint8 codes when double-quantized
    shape: tuple[int, ...]
    blocksize: int
    dtype: torch.dtype  # what dequantize returns by default
    nested_absmax: torch.Tensor | None = None  # (ceil(blocks/256),) float32
    nested_quant_map: torch.Tensor | None = None  # (256,) float32, the signed dynamic map
    offset: torch.Tensor | None = None  # () float32, the mean of absmax

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None


@cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' create_dynamic_map(signed=True), computed as bitsandbytes does: 256 sorted float32
    codes."""
    data = [0.0, 1.0]
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += (10 ** (i - 6) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    return torch.tensor(sorted(data), dtype=torch.float32)


def _quantize_blocks(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code of x/absmax per block (ties to the lower code), over x zero-padded to whole blocks."""
    blocks = -(-x.numel() // blocksize)
    padded = torch.zeros(blocks * blocksize, dtype=torch.float32)
    padded[: x.numel()] = x
    padded = padded.reshape(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)  # (blocks,)
    scaled = padded * (1.0 / absmax.clamp_min(_TINY))[:, None]
    midpoints = (code[:-1] + code[1:]) / 2
    codes = torch.searchsorted(midpoints, scaled.reshape(-1), right=False).to(torch.uint8)
    return codes, absmax


def quantize_nf4(
    w: torch.Tensor,
    blocksize: int = 64,
    double_quant: bool = True,
    *,
    dtype: torch.dtype | None = None,
    name: str = "",
) -> NF4Tensor:
    """bitsandbytes quantize_4bit(w, blocksize, compress_statistics=double_quant, quant_type="nf4"), on the
    CPU."""
    if blocksize not in BLOCKSIZES:
        hint = f"use one of {BLOCKSIZES}"
        raise ForgeError(f"NF4 block size {blocksize} is not supported", where=name or None, hint=hint)
    flat = w.detach().to("cpu", torch.float32).reshape(-1)  # (n,)
    if not torch.isfinite(flat).all():
        raise ForgeError("weight has NaN or infinite values; it cannot be quantized", where=name or None)
    codes, absmax = _quantize_blocks(flat, torch.tensor(NF4_LEVELS, dtype=torch.float32), blocksize)
    codes = codes[: flat.numel() + flat.numel() % 2]  # an odd count is padded with the code of 0.0
    packed = (codes[0::2] << 4) | codes[1::2]  # (ceil(n/2),)
    nested = {}
    if double_quant:
        offset = absmax.double().mean().float()
        codes, nested_absmax = _quantize_blocks(absmax - offset, dynamic_map(), NESTED_BLOCKSIZE)
        absmax = codes[: absmax.numel()]
        nested = {"nested_absmax": nested_absmax, "nested_quant_map": dynamic_map().clone(), "offset": offset}
    return NF4Tensor(packed, absmax, tuple(w.shape), blocksize, w.dtype if dtype is None else dtype, **nested)


def _scale_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int, n: int) -> torch.Tensor:
    """values (m,) times one scale per block of `blocksize`, cut to the first n: (n,) float32."""
    pad = scales.numel() * blocksize - values.numel()
    if pad:
        values = F.pad(values, (0, pad))
    return (values.reshape(scales.numel(), blocksize) * scales[:, None]).reshape(-1)[:n]


def dequantize_nf4(t: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight in `dtype` (default t.dtype), computed in float32 as bitsandbytes does, on t's device."""
    absmax = t.absmax
    if t.double_quant:
        codes = t.nested_quant_map[absmax.long()]  # (blocks,)
        absmax = _scale_blocks(codes, t.nested_absmax, NESTED_BLOCKSIZE, absmax.numel()) + t.offset
    codes = torch.stack([t.packed >> 4, t.packed & 0xF], dim=-1).reshape(-1)  # (2*ceil(n/2),)
    values = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=codes.device)[codes.long()]
    w = _scale_blocks(values, absmax, t.blocksize, math.prod(t.shape))
    return w.reshape(t.shape).to(t.dtype if dtype is None else dtype)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored as bitsandbytes NF4 (buffers use bitsandbytes' names)."""

    def __init__(self, t: NF4Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = t.shape
        self.blocksize, self.dtype = t.blocksize, t.dtype
        self.register_buffer("weight", t.packed)
        self.register_buffer("absmax", t.absmax)
        for key in ("nested_absmax", "nested_quant_map", "offset"):
            self.register_buffer(key, getattr(t, key))
        self.register_buffer("bias", None if bias is None else bias.to(t.dtype))
        self.register_buffer("dequantized", None, persistent=False)  # set by quant.cache_dequantized

    @classmethod
    def from_weight(
        cls,
        w: torch.Tensor,
        blocksize: int = 64,
        double_quant: bool = True,
        *,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        name: str = "",
    ) -> NF4Linear:
        """Quantize w (out, in); `dtype` (default w's) is what dequantize returns and the bias is kept in."""
        return cls(quantize_nf4(w, blocksize, double_quant, dtype=dtype, name=name), bias)

    @property
    def tensor(self) -> NF4Tensor:
        nested = {k: getattr(self, k) for k in ("nested_absmax", "nested_quant_map", "offset")}
        return NF4Tensor(
            self.weight,
            self.absmax,
            (self.out_features, self.in_features),
            self.blocksize,
            self.dtype,
            **nested,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (out, in) in `dtype` (default the layer's dtype)."""
        return dequantize_nf4(self.tensor, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized if self.dequantized is not None else self.dequantize(x.dtype)
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
