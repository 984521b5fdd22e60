"""MLX's own group quantization (mx.quantize, mode affine) of a residual: the fast path on Apple GPUs."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from forge_mlx.errors import ForgeError

AFFINE_BITS = (4, 8)
AFFINE_GROUP_SIZES = (32, 64, 128)  # the group sizes mx.quantize accepts in affine mode


def affine_linear(
    w: mx.array, group_size: int = 64, bits: int = 4, bias: mx.array | None = None, name: str = ""
) -> nn.QuantizedLinear:
    """A frozen nn.QuantizedLinear holding w (out, in) in groups of `group_size` along the input features."""
    out_dims, in_dims = w.shape
    where = name or None
    if bits not in AFFINE_BITS:
        raise ForgeError(f"affine residual bits must be one of {AFFINE_BITS}, got {bits}", where=where)
    if group_size not in AFFINE_GROUP_SIZES or in_dims % group_size:
        valid = ", ".join(str(g) for g in AFFINE_GROUP_SIZES if in_dims % g == 0)
        raise ForgeError(
            f"group size {group_size} does not fit a layer with {in_dims} input features",
            where=where,
            hint=f"valid group sizes here: {valid or 'none, keep this layer unquantized'}",
        )
    layer = nn.QuantizedLinear(in_dims, out_dims, bias=bias is not None, group_size=group_size, bits=bits)
    layer.weight, layer.scales, layer.biases = mx.quantize(w, group_size, bits, mode="affine")
    if bias is not None:
        layer.bias = bias.astype(w.dtype)
    layer.freeze()
    return layer
