"""The storage of a frozen residual in torch: full precision, MLX affine groups or bitsandbytes NF4."""

from __future__ import annotations

import torch
from torch import nn

from forge_mlx.errors import ForgeError
from forge_mlx.targets import RESIDUAL_KINDS
from forge_mlx.torch_backend.affine import AffineLinear
from forge_mlx.torch_backend.nf4 import NF4Linear

QUANTIZED = (NF4Linear, AffineLinear)


def make_residual(
    weight: torch.Tensor,
    kind: str,
    *,
    bias: torch.Tensor | None = None,
    group_size: int = 64,
    bits: int = 4,
    blocksize: int = 64,
    double_quant: bool = True,
    dtype: torch.dtype = torch.float32,
    name: str = "",
) -> nn.Module:
    """A frozen CPU layer holding `weight` (out, in) as `kind`: nn.Linear, AffineLinear or NF4Linear."""
    weight = weight.detach().cpu()
    bias = None if bias is None else bias.detach().cpu()
    if kind == "none":
        out_dims, in_dims = weight.shape
        layer = nn.Linear(in_dims, out_dims, bias=bias is not None, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
    elif kind == "affine":
        layer = AffineLinear(weight.to(dtype), group_size, bits, bias=bias, name=name)
    elif kind == "nf4":
        layer = NF4Linear.from_weight(weight, blocksize, double_quant, bias=bias, dtype=dtype, name=name)
    else:
        hint = f"use one of {', '.join(RESIDUAL_KINDS)}"
        raise ForgeError(f"unknown residual kind '{kind}'", where=name or None, hint=hint)
    return layer.requires_grad_(False)


def dequantize_residual(module: nn.Module) -> torch.Tensor:
    """The (out, in) float32 weight a residual module multiplies by, whichever kind it is."""
    if isinstance(module, QUANTIZED):
        return module.dequantize(torch.float32)
    if isinstance(module, nn.Linear):
        return module.weight.detach().float()
    raise TypeError(f"not a residual module: {type(module).__name__}")


def quantize_dequantize(weight: torch.Tensor, kind: str, **options) -> torch.Tensor:
    """Round trip `weight` through `kind` storage (QPiSSA fits the adapter to this quantization error)."""
    return dequantize_residual(make_residual(weight, kind, **options))


def cache_dequantized(module: nn.Module) -> None:
    """Forward a 4-bit layer through a full-precision copy of its exact 4-bit values (CPU: BLAS speed); the
    stored 4-bit buffers are unchanged."""
    if isinstance(module, QUANTIZED) and module.dequantized is None:
        module.dequantized = module.dequantize(module.dtype)
