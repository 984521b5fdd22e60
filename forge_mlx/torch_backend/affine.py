"""MLX's affine group quantization (mx.quantize, mode "affine") in torch: the same packed words, scales and
biases.

Per group of `group_size` inputs: the edge value (the min or max with the larger magnitude) sits exactly on
the grid, scale = (max - min) / (2^bits - 1) signed toward the edge (then refit so edge / scale is an
integer), bias = the edge (0 if it rounds to code 0), q = clip(round((w - bias) / scale), 0, 2^bits - 1),
packed little end first into uint32 words (kept as int32: same bits). w = scale * q + bias in the scales'
dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from forge_mlx.targets import check_affine


def quantize_affine(
    w: torch.Tensor, group_size: int = 64, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mx.quantize(w, group_size, bits, mode="affine"): words (out, in*bits/32) int32, scales and biases
    (out, in/group_size) in w's dtype."""
    out_dims, in_dims = w.shape
    groups = w.reshape(out_dims, in_dims // group_size, group_size).float()  # (out, g, group_size)
    n_bins = float(2**bits - 1)
    w_max, w_min = groups.amax(-1, keepdim=True), groups.amin(-1, keepdim=True)  # (out, g, 1)
    toward_min = w_min.abs() > w_max.abs()
    scales = torch.clamp_min((w_max - w_min) / n_bins, 1e-7)
    scales = torch.where(toward_min, scales, -scales)
    edge = torch.where(toward_min, w_min, w_max)
    q0 = torch.round(edge / scales)
    scales = torch.where(q0 != 0, edge / q0, scales)
    biases = torch.where(q0 == 0, torch.zeros_like(edge), edge)
    q = torch.clamp(torch.round((groups - biases) / scales), 0, n_bins).to(torch.int64)  # (out, g, group_size)
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64, device=w.device) * bits
    words = (q.reshape(out_dims, -1, per_word) << shifts).sum(-1)  # (out, in*bits/32), < 2**32
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # uint32 bits as int32
    return words, scales.squeeze(-1).to(w.dtype), biases.squeeze(-1).to(w.dtype)


def dequantize_affine(
    words: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, group_size: int, bits: int
) -> torch.Tensor:
    """scale * q + bias (out, in) in the scales' dtype, rounded after each op as mx.dequantize does."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32, device=words.device) * bits
    q = ((words[..., None] >> shifts) & (2**bits - 1)).reshape(words.shape[0], -1)  # (out, in)
    return scales.repeat_interleave(group_size, dim=1) * q.to(scales.dtype) + biases.repeat_interleave(
        group_size, dim=1
    )


class AffineLinear(nn.Module):
    """A frozen linear layer stored as nn.QuantizedLinear stores it (weight words, scales, biases)."""

    def __init__(
        self,
        w: torch.Tensor,
        group_size: int = 64,
        bits: int = 4,
        bias: torch.Tensor | None = None,
        name: str = "",
    ):
        super().__init__()
        self.out_features, self.in_features = w.shape
        check_affine(self.in_features, group_size, bits, name)
        self.group_size, self.bits, self.dtype = group_size, bits, w.dtype
        words, scales, biases = quantize_affine(w, group_size, bits)
        self.register_buffer("weight", words)
        self.register_buffer("scales", scales)
        self.register_buffer("biases", biases)
        self.register_buffer("bias", None if bias is None else bias.to(w.dtype))
        self.register_buffer("dequantized", None, persistent=False)  # set by quant.cache_dequantized

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        weight = dequantize_affine(self.weight, self.scales, self.biases, self.group_size, self.bits)
        return weight.to(dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized if self.dequantized is not None else self.dequantize(x.dtype)
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
