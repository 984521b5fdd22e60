"""MLX's own group quantization (mx.quantize, mode affine) of a residual: the fast path on Apple GPUs."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from forge_mlx.targets import check_affine


def affine_linear(
    w: mx.array, group_size: int = 64, bits: int = 4, bias: mx.array | None = None, name: str = ""
) -> nn.QuantizedLinear:
    """A frozen nn.QuantizedLinear holding w (out, in) in groups of `group_size` along the input features."""
    out_dims, in_dims = w.shape
    check_affine(in_dims, group_size, bits, name)
    layer = nn.QuantizedLinear(in_dims, out_dims, bias=bias is not None, group_size=group_size, bits=bits)
    layer.weight, layer.scales, layer.biases = mx.quantize(w, group_size, bits, mode="affine")
    if bias is not None:
        layer.bias = bias.astype(w.dtype)
    layer.freeze()
    return layer
