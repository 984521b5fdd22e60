"""Storage of the frozen PiSSA residual: full precision, MLX affine groups, or bitsandbytes-exact NF4."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from forge_mlx.errors import ForgeError
from forge_mlx.quant.affine import affine_linear
from forge_mlx.quant.nf4 import NF4Linear
from forge_mlx.targets import RESIDUAL_KINDS


def make_residual(
    weight: mx.array,
    kind: str,
    *,
    bias: mx.array | None = None,
    group_size: int = 64,
    bits: int = 4,
    blocksize: int = 64,
    double_quant: bool = True,
    dtype: mx.Dtype = mx.float32,
    name: str = "",
) -> nn.Module:
    """A frozen layer holding `weight` (out, in) as `kind`: nn.Linear, nn.QuantizedLinear or NF4Linear."""
    if kind == "none":
        out_dims, in_dims = weight.shape
        layer = nn.Linear(in_dims, out_dims, bias=bias is not None)
        layer.weight = weight.astype(dtype)
        if bias is not None:
            layer.bias = bias.astype(dtype)
    elif kind == "affine":
        layer = affine_linear(weight.astype(dtype), group_size, bits, bias=bias, name=name)
    elif kind == "nf4":
        layer = NF4Linear.from_weight(weight, blocksize, double_quant, bias=bias, dtype=dtype, name=name)
    else:
        hint = f"use one of {', '.join(RESIDUAL_KINDS)}"
        raise ForgeError(f"unknown residual kind '{kind}'", where=name or None, hint=hint)
    layer.freeze()
    return layer


def dequantize_residual(module: nn.Module) -> mx.array:
    """The (out, in) float32 weight a residual module multiplies by, whichever kind it is."""
    if isinstance(module, NF4Linear):
        weight = module.dequantize(mx.float32)  # the exact NF4 values, whatever the layer dtype
    elif isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        weight = mx.dequantize(
            module.weight,
            module.scales,
            module.get("biases"),
            group_size=module.group_size,
            bits=module.bits,
            mode=module.mode,
        )
    elif isinstance(module, nn.Linear):
        weight = module.weight
    else:
        raise TypeError(f"not a residual module: {type(module).__name__}")
    return weight.astype(mx.float32)


class _DequantizedForward:
    """Forward through a full-precision copy of the 4-bit weight: MLX's CPU backend has no fast 4-bit matmul
    (affine ~75x and NF4 ~6x slower than a BLAS matmul here), while the values stay exactly the 4-bit ones."""

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ self._dequantized.T
        return y + self["bias"] if "bias" in self else y


class _DequantizedEmbedding:
    """A 4-bit embedding (an mlx_lm-quantized model's, tied as the LM head) read and multiplied through its
    full-precision copy: as a head it is the largest matmul of a small model (49,152 x 576 for SmolLM2)."""

    def __call__(self, x: mx.array) -> mx.array:
        return self._dequantized[x]

    def as_linear(self, x: mx.array) -> mx.array:
        return x @ self._dequantized.T


_CACHED_CLASSES: dict[type, type] = {}


def cache_dequantized(module: nn.Module) -> nn.Module:
    """Give a quantized residual a dequantized weight copy (not a parameter: the name starts with '_') and route
    its forward through it; the stored 4-bit arrays, saved files and exports are unchanged."""
    if not isinstance(module, (NF4Linear, nn.QuantizedLinear, nn.QuantizedEmbedding)) or "_dequantized" in module:
        return module
    dtype = module.dtype if isinstance(module, NF4Linear) else module.scales.dtype
    module._dequantized = dequantize_residual(module).astype(dtype)
    base = type(module)
    if base not in _CACHED_CLASSES:
        forward = _DequantizedEmbedding if isinstance(module, nn.QuantizedEmbedding) else _DequantizedForward
        _CACHED_CLASSES[base] = type(base.__name__, (forward, base), {})
    module.__class__ = _CACHED_CLASSES[base]
    return module


def quantize_dequantize(weight: mx.array, kind: str, **options) -> mx.array:
    """Round trip `weight` through `kind` storage (QPiSSA fits the adapter to this quantization error)."""
    return dequantize_residual(make_residual(weight, kind, **options))


__all__ = [
    "RESIDUAL_KINDS",
    "make_residual",
    "dequantize_residual",
    "quantize_dequantize",
    "cache_dequantized",
    "NF4Linear",
]
