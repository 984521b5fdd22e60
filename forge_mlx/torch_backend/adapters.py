"""The adapter layer in torch: a frozen (maybe 4-bit) residual plus trainable PiSSA factors, swapped into a
transformers model. Parameter names are the MLX side's (model.layers.0.self_attn.q_proj.lora_a (in, r),
.lora_b (r, out)), so adapters.safetensors files are interchangeable between the backends.

Init runs on the CPU in fp32 layer by layer (the model may sit on a GPU); each new layer then moves to the
model's device. Seeds are the MLX side's (config seed + the layer's index in target order).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from forge_mlx.errors import ForgeError
from forge_mlx.targets import (
    ADAPTER_NAMES,
    adapter_factors,
    check_adapter_weights,
    layer_ranks,
    layer_report,
    select_targets,
)
from forge_mlx.torch_backend import pissa
from forge_mlx.torch_backend.quant import QUANTIZED, dequantize_residual, make_residual, quantize_dequantize


class PiSSALinear(nn.Module):
    """y = residual(x) + scale * (x @ lora_a) @ lora_b; residual is W minus its principal part (PiSSA)."""

    def __init__(
        self,
        residual: nn.Module,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scale: float,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.residual = residual.requires_grad_(False)
        self.lora_a = nn.Parameter(lora_a.float())  # (in, r)
        self.lora_b = nn.Parameter(lora_b.float())  # (r, out)
        self.scale = scale
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.residual(x)
        z = (self.dropout(x).to(self.lora_a.dtype) @ self.lora_a) @ self.lora_b  # (..., in) -> (..., r) -> (..., out)
        return y + (self.scale * z).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale * (lora_a @ lora_b).T: the adapter's (out, in) contribution to W, in fp32."""
        return self.scale * (self.lora_a.float() @ self.lora_b.float()).T


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
    dtype: torch.dtype = torch.float32,
    dropout: float = 0.0,
    seed: int = 0,
    name: str = "",
) -> tuple[PiSSALinear, list[float]]:
    """PiSSALinear (on the CPU) for `linear` and its QPiSSA error per iteration, as forge_mlx.adapters
    builds it."""
    if not isinstance(linear, (nn.Linear, *QUANTIZED)):
        raise ForgeError(f"cannot adapt a {type(linear).__name__}, only linear layers", where=name or None)
    weight = dequantize_residual(linear).cpu()  # (out, in) fp32
    quant = dict(group_size=group_size, bits=bits, blocksize=blocksize, double_quant=double_quant, dtype=dtype)
    round_trip = lambda w: quantize_dequantize(w, residual, name=name, **quant)
    lora_a, lora_b, residual_weight, scale, errors = adapter_factors(
        pissa, weight, rank, alpha, init, residual, qpissa_iters, oversample, seed, name, round_trip
    )
    base = make_residual(residual_weight, residual, bias=getattr(linear, "bias", None), name=name, **quant)
    return PiSSALinear(base, lora_a, lora_b, scale, dropout), errors


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ForgeError(
            f"model {type(model).__name__} has no `.model.layers`",
            hint="forge-mlx supports decoder models laid out like transformers' LlamaForCausalLM",
        )
    return layers


def find_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Paths from the model root of the linear layers in model.layers named in `targets`, in MLX's order."""
    layer_ids = {id(layer) for layer in decoder_layers(model)}
    blocks = [
        (path, [p for p, m in block.named_modules() if isinstance(m, (nn.Linear, *QUANTIZED))])
        for path, block in model.named_modules()
        if id(block) in layer_ids
    ]
    return select_targets(blocks, targets)


def module_device(module: nn.Module) -> torch.device:
    return next(itertools.chain(module.parameters(), module.buffers())).device


def swap_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


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

    Returns {"layers": {path: {shape, rank, scale, seconds, qpissa_errors}}, "trainable_parameters": n}.
    """
    model.requires_grad_(False)
    paths = find_targets(model, targets)
    ranks = layer_ranks(paths, rank, rank_pattern)
    layers = {}
    for index, path in enumerate(paths):
        start = time.perf_counter()
        linear = model.get_submodule(path)
        adapter, errors = build_adapter(
            linear, ranks[path], alpha, init=init, residual=residual, seed=seed + index, name=path, **options
        )
        swap_module(model, path, adapter.to(module_device(linear)))
        layers[path] = layer_report(adapter, time.perf_counter() - start, errors)
        if on_layer is not None:
            on_layer(path, layers[path])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"layers": layers, "trainable_parameters": trainable}


def quantize_frozen_linears(model: nn.Module, residual: str, **quant) -> int:
    """Store the linear layers in model.layers that carry no adapter in the residual's 4-bit format too (as
    QLoRA keeps the whole base in 4 bits); returns how many were converted."""
    if residual == "none":
        return 0
    layer_ids = {id(layer) for layer in decoder_layers(model)}
    paths = [
        f"{prefix}.{p}"
        for prefix, block in model.named_modules()
        if id(block) in layer_ids
        for p, m in block.named_modules()
        if type(m) is nn.Linear
    ]
    for path in paths:
        linear = model.get_submodule(path)
        frozen = make_residual(
            linear.weight, residual, bias=linear.bias, name=path, **{**quant, "dtype": linear.weight.dtype}
        )
        swap_module(model, path, frozen.to(linear.weight.device))
    return len(paths)


def adapter_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter factor by flat parameter name, e.g. model.layers.0.self_attn.q_proj.lora_a."""
    return {k: v for k, v in model.named_parameters() if k.rsplit(".", 1)[-1] in ADAPTER_NAMES}


def load_adapter_weights(model: nn.Module, weights: dict[str, np.ndarray | torch.Tensor]) -> None:
    """Set the adapter factors from `weights`, which must name exactly the model's adapters and shapes."""
    current = adapter_weights(model)
    check_adapter_weights(current, weights)
    with torch.no_grad():
        for key, value in weights.items():
            current[key].copy_(torch.as_tensor(value))
