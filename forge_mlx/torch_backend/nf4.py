"""NF4 storage in torch, byte for byte what forge_mlx/quant/nf4.py (and bitsandbytes) writes.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314). Quantizing is the float32 numpy both backends share
(forge_mlx/nf4_codebook.py), on the CPU; dequantizing is torch ops on the layer's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from forge_mlx.nf4_codebook import NESTED_BLOCKSIZE, NF4_LEVELS, quantize


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
    flat = w.detach().to("cpu", torch.float32).reshape(-1).numpy()  # (n,)
    parts = {k: torch.tensor(v) for k, v in quantize(flat, blocksize, double_quant, name).items()}  # copies
    dtype = w.dtype if dtype is None else dtype
    return NF4Tensor(parts.pop("packed"), parts.pop("absmax"), tuple(w.shape), blocksize, dtype, **parts)


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
