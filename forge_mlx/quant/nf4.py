"""NF4 storage bit-compatible with bitsandbytes (QLoRA, Dettmers et al. 2023, arXiv:2305.14314).

Quantizing is offline float32 numpy shared with the torch backend (forge_mlx/nf4_codebook.py); dequantizing is
MLX ops, so it runs inside compiled training steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from forge_mlx.nf4_codebook import NESTED_BLOCKSIZE, NF4_LEVELS, dynamic_map, quantize


@dataclass(frozen=True)
class NF4Tensor:
    """A weight in bitsandbytes NF4 form; double-quantized, `absmax` holds uint8 codes of absmax - offset."""

    packed: mx.array  # (ceil(n/2),) uint8, first element of each pair in the high nibble
    absmax: mx.array  # (ceil(n/blocksize),) float32, or uint8 codes when double-quantized
    shape: tuple[int, ...]
    blocksize: int
    dtype: mx.Dtype  # what dequantize returns by default (bitsandbytes' quant_state.dtype)
    nested_absmax: mx.array | None = None  # (ceil(blocks/256),) float32
    nested_quant_map: mx.array | None = None  # (256,) float32, the signed dynamic map
    offset: mx.array | None = None  # () float32, the mean of absmax

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None


def quantize_nf4(
    w: mx.array,
    blocksize: int = 64,
    double_quant: bool = True,
    *,
    dtype: mx.Dtype | None = None,
    name: str = "",
) -> NF4Tensor:
    """bitsandbytes quantize_4bit(w, blocksize, compress_statistics=double_quant, quant_type="nf4")."""
    flat = np.array(w.astype(mx.float32)).reshape(-1)  # (n,)
    parts = {k: mx.array(v) for k, v in quantize(flat, blocksize, double_quant, name).items()}
    dtype = w.dtype if dtype is None else dtype
    return NF4Tensor(parts.pop("packed"), parts.pop("absmax"), tuple(w.shape), blocksize, dtype, **parts)


def _scale_blocks(values: mx.array, scales: mx.array, blocksize: int, n: int) -> mx.array:
    """values (m,) times one scale per block of `blocksize`, cut to the first n: (n,) float32."""
    pad = scales.size * blocksize - values.size
    if pad:
        values = mx.pad(values, (0, pad))
    return (values.reshape(scales.size, blocksize) * scales[:, None]).reshape(-1)[:n]


def dequantize_nf4(t: NF4Tensor, dtype: mx.Dtype | None = None) -> mx.array:
    """The weight in `dtype` (default t.dtype), computed in float32 as bitsandbytes does; MLX ops only."""
    absmax = t.absmax
    if t.double_quant:
        codes = t.nested_quant_map[absmax]  # (blocks,)
        absmax = _scale_blocks(codes, t.nested_absmax, NESTED_BLOCKSIZE, absmax.size) + t.offset
    codes = mx.stack([t.packed >> 4, t.packed & 0xF], axis=-1).reshape(-1)  # (2*ceil(n/2),)
    values = mx.array(NF4_LEVELS, dtype=mx.float32)[codes]
    w = _scale_blocks(values, absmax, t.blocksize, math.prod(t.shape))
    return w.reshape(t.shape).astype(t.dtype if dtype is None else dtype)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored as bitsandbytes NF4; arrays use bitsandbytes' names."""

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        bias: bool = True,
        blocksize: int = 64,
        double_quant: bool = True,
        dtype: mx.Dtype = mx.float32,
    ):
        super().__init__()
        self.output_dims, self.input_dims = output_dims, input_dims
        self.blocksize = blocksize
        self.dtype = dtype
        n = output_dims * input_dims
        blocks = -(-n // blocksize)
        self.weight = mx.zeros(((n + 1) // 2,), mx.uint8)
        self.absmax = mx.zeros((blocks,), mx.uint8 if double_quant else mx.float32)
        if double_quant:
            self.nested_absmax = mx.zeros((-(-blocks // NESTED_BLOCKSIZE),), mx.float32)
            self.nested_quant_map = mx.array(dynamic_map())
            self.offset = mx.zeros((), mx.float32)
        if bias:
            self.bias = mx.zeros((output_dims,), dtype)
        self.freeze()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.output_dims, self.input_dims)

    @classmethod
    def from_tensor(cls, t: NF4Tensor, bias: mx.array | None = None) -> NF4Linear:
        """Wrap an NF4Tensor of shape (out, in), e.g. one read from a bnb-4bit checkpoint."""
        output_dims, input_dims = t.shape
        layer = cls(input_dims, output_dims, bias is not None, t.blocksize, t.double_quant, t.dtype)
        layer.weight, layer.absmax = t.packed, t.absmax
        if t.double_quant:
            layer.nested_absmax, layer.nested_quant_map = t.nested_absmax, t.nested_quant_map
            layer.offset = t.offset
        if bias is not None:
            layer.bias = bias.astype(t.dtype)
        layer.freeze()
        return layer

    @classmethod
    def from_weight(
        cls,
        w: mx.array,
        blocksize: int = 64,
        double_quant: bool = True,
        *,
        bias: mx.array | None = None,
        dtype: mx.Dtype | None = None,
        name: str = "",
    ) -> NF4Linear:
        """Quantize w (out, in); `dtype` (default w's) is what dequantize returns and the bias is kept in."""
        return cls.from_tensor(quantize_nf4(w, blocksize, double_quant, dtype=dtype, name=name), bias)

    @property
    def tensor(self) -> NF4Tensor:
        """The stored weight as an NF4Tensor (e.g. for to_bnb_tensors)."""
        nested = {}
        if "nested_absmax" in self:
            nested = {k: self[k] for k in ("nested_absmax", "nested_quant_map", "offset")}
        return NF4Tensor(self.weight, self.absmax, self.shape, self.blocksize, self.dtype, **nested)

    def dequantize(self, dtype: mx.Dtype | None = None) -> mx.array:
        """The weight (out, in) in `dtype` (default the layer's dtype)."""
        return dequantize_nf4(self.tensor, dtype)

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ self.dequantize(x.dtype).T
        if "bias" in self:
            y = y + self.bias.astype(x.dtype)
        return y

    def _extra_repr(self) -> str:
        return (
            f"input_dims={self.input_dims}, output_dims={self.output_dims}, bias={'bias' in self}, "
            f"blocksize={self.blocksize}, double_quant={'nested_absmax' in self}"
        )
