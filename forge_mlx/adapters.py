"""The adapter layer: a frozen (maybe 4-bit) residual plus trainable PiSSA factors, swapped into a model.

Names follow mlx-lm's LoRALinear: lora_a (in, r), lora_b (r, out); PEFT's lora_A.weight = lora_a.T and
lora_B.weight = lora_b.T. Init factors are not stored: export recomputes them from the saved init adapters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from forge_mlx import pissa
from forge_mlx.errors import ForgeError
from forge_mlx.quant import dequantize_residual, make_residual, quantize_dequantize
from forge_mlx.targets import (  # noqa: F401  (TARGET_PRESETS and ADAPTER_NAMES are part of this module's API)
    ADAPTER_NAMES,
    TARGET_PRESETS,
    adapter_factors,
    check_adapter_weights,
    layer_ranks,
    layer_report,
    select_targets,
)


class PiSSALinear(nn.Module):
    """y = residual(x) + scale * (x @ lora_a) @ lora_b; residual is W minus its principal part (PiSSA)."""

    def __init__(self, residual: nn.Module, lora_a: mx.array, lora_b: mx.array, scale: float, dropout: float = 0.0):
        super().__init__()
        self.residual = residual
        self.residual.freeze()
        self.lora_a = lora_a  # (in, r)
        self.lora_b = lora_b  # (r, out)
        self.scale = scale
        self.dropout = nn.Dropout(p=dropout)

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int, alpha: float | None = None, **options) -> PiSSALinear:
        """Wrap a linear layer; `options` are build_adapter's (init, residual, quantization, name...)."""
        return build_adapter(linear, rank, alpha, **options)[0]

    def __call__(self, x: mx.array) -> mx.array:
        y = self.residual(x)
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b  # (..., in) -> (..., r) -> (..., out)
        return y + (self.scale * z).astype(x.dtype)

    def delta_weight(self) -> mx.array:
        """scale * (lora_a @ lora_b).T: the adapter's (out, in) contribution to W, in fp32."""
        return self.scale * (self.lora_a.astype(mx.float32) @ self.lora_b.astype(mx.float32)).T

    def fuse(self, dtype: mx.Dtype = mx.float32) -> nn.Linear:
        """A plain nn.Linear with W = dequant(residual) + delta computed in fp32, stored as `dtype`."""
        weight = dequantize_residual(self.residual) + self.delta_weight()
        out_dims, in_dims = weight.shape
        bias = self.residual.get("bias")
        fused = nn.Linear(in_dims, out_dims, bias=bias is not None)
        fused.weight = weight.astype(dtype)
        if bias is not None:
            fused.bias = bias.astype(dtype)
        return fused


def build_adapter(
    linear: nn.Module,
    rank: int,
    alpha: float | None = None,
    *,
    init: str = "pissa",
    residual: str = "none",
    qpissa_iters: int = 1,
    oversample: int = pissa.OVERSAMPLE,
    group_size: int = 64,
    bits: int = 4,
    blocksize: int = 64,
    double_quant: bool = True,
    dtype: mx.Dtype = mx.float32,
    dropout: float = 0.0,
    seed: int = 0,
    dequantize_base: bool = True,
    name: str = "",
) -> tuple[PiSSALinear, list[float]]:
    """PiSSALinear for `linear` and its QPiSSA error per iteration (empty unless PiSSA on a quantized store).

    A quantized base is dequantized first (W is what the model computes); alpha defaults to 2 * rank.
    """
    if not isinstance(linear, (nn.Linear, nn.QuantizedLinear)):
        raise ForgeError(f"cannot adapt a {type(linear).__name__}, only linear layers", where=name or None)
    if isinstance(linear, nn.QuantizedLinear) and not dequantize_base:
        raise ForgeError("the base layer is quantized", where=name or None, hint="load unquantized weights")
    weight = dequantize_residual(linear)  # (out, in) fp32
    quant = dict(group_size=group_size, bits=bits, blocksize=blocksize, double_quant=double_quant, dtype=dtype)
    round_trip = lambda w: quantize_dequantize(w, residual, name=name, **quant)
    lora_a, lora_b, residual_weight, scale, errors = adapter_factors(
        pissa, weight, rank, alpha, init, residual, qpissa_iters, oversample, seed, name, round_trip
    )
    base = make_residual(residual_weight, residual, bias=linear.get("bias"), name=name, **quant)
    return PiSSALinear(base, lora_a, lora_b, scale, dropout), errors


def find_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Paths from the model root of the linear layers in model.layers named in `targets` (a preset or names).

    Embeddings and lm_head are never targets: they live outside model.layers.
    """
    layer_ids = {id(layer) for layer in model.layers}
    blocks = [
        (path, [p for p, m in block.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))])
        for path, block in model.named_modules()
        if id(block) in layer_ids
    ]
    return select_targets(blocks, targets)


def apply_adapters(
    model: nn.Module,
    *,
    targets: str | Sequence[str] = "all-linear",
    rank: int = 16,
    alpha: float | None = None,
    init: str = "pissa",
    residual: str = "none",
    rank_pattern: dict[str, int] | None = None,
    seed: int = 0,
    on_layer: Callable[[str, dict], None] | None = None,
    **options,
) -> dict:
    """Freeze `model`, swap each target for a PiSSALinear (options: build_adapter's); only the factors train.

    Returns {"layers": {path: {shape, rank, scale, seconds, qpissa_errors}}, "trainable_parameters": n};
    on_layer(path, entry) is called as each layer is done (progress).
    """
    model.freeze()
    paths = find_targets(model, targets)
    ranks = layer_ranks(paths, rank, rank_pattern)
    modules = dict(model.named_modules())
    layers = {}
    for index, path in enumerate(paths):
        start = time.perf_counter()
        adapter, errors = build_adapter(
            modules[path],
            ranks[path],
            alpha,
            init=init,
            residual=residual,
            seed=seed + index,
            name=path,
            **options,
        )
        mx.eval(adapter.parameters())
        model.update_modules(tree_unflatten([(path, adapter)]))
        layers[path] = layer_report(adapter, time.perf_counter() - start, errors)
        if on_layer is not None:
            on_layer(path, layers[path])
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return {"layers": layers, "trainable_parameters": trainable}


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """Every adapter factor by flat parameter name, e.g. model.layers.0.self_attn.q_proj.lora_a."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ADAPTER_NAMES}


def load_adapter_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Set the adapter factors from `weights`, which must name exactly the model's adapters and shapes."""
    current = adapter_weights(model)
    check_adapter_weights(current, weights)
    model.load_weights([(k, v.astype(current[k].dtype)) for k, v in weights.items()], strict=False)


def fuse_adapters(model: nn.Module, dtype: mx.Dtype = mx.float32) -> None:
    """Replace every PiSSALinear in `model` by its fused nn.Linear, stored as `dtype`."""
    fused = [(path, m.fuse(dtype)) for path, m in model.named_modules() if isinstance(m, PiSSALinear)]
    if fused:
        model.update_modules(tree_unflatten(fused))
