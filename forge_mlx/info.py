"""What a model is and whether a config fits in memory, before any training starts."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import mlx.nn as nn
from mlx.utils import tree_flatten

from forge_mlx.adapters import TARGET_PRESETS
from forge_mlx.config import Config
from forge_mlx.models import on_gpu

FP32_ADAM_BYTES = 16  # per trainable parameter: value, gradient and two Adam moments in fp32


def target_names(targets: str | list[str]) -> tuple[str, ...]:
    return (
        TARGET_PRESETS[targets]
        if isinstance(targets, str) and targets in TARGET_PRESETS
        else tuple([targets] if isinstance(targets, str) else targets)
    )


def linear_layers(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Module path -> (out, in) for every linear layer inside the transformer blocks."""
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.QuantizedLinear)) and ".layers." in f".{name}":
            out_dims, in_dims = module.weight.shape
            if isinstance(module, nn.QuantizedLinear):
                in_dims = in_dims * 32 // module.bits
            shapes[name] = (out_dims, in_dims)
    return shapes


def parameter_count(model: nn.Module) -> int:
    """Weights of every leaf module, 4-bit packed ones counted unpacked."""
    total = 0
    for _, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            out_dims, packed = module.weight.shape
            total += out_dims * packed * 32 // module.bits + (module["bias"].size if "bias" in module else 0)
        elif not module.children():
            total += sum(v.size for _, v in tree_flatten(module.parameters()))
    return total


@dataclass(frozen=True)
class MemoryEstimate:
    frozen_weights: int
    adapters: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.frozen_weights + self.adapters + self.optimizer + self.activations


def residual_bytes_per_weight(config: Config, dtype_bytes: int) -> float:
    a = config.adapter
    if a.residual == "nf4":
        absmax = (1 + 4 / 256) / a.blocksize if a.double_quant else 4 / a.blocksize
        return 0.5 + absmax
    if a.residual == "affine":
        return a.bits / 8 + 2 * dtype_bytes / a.group_size  # packed codes + a scale and a bias per group
    return dtype_bytes


def estimate_memory(model: nn.Module, model_config: dict, config: Config, dtype_bytes: int = 4) -> MemoryEstimate:
    """Peak training memory: 4-bit linears, full-precision rest, fp32 adapters + AdamW, checkpointed activations."""
    layers = linear_layers(model)
    wanted = target_names(config.adapter.targets)
    linear_weights = sum(o * i for o, i in layers.values())
    other_weights = parameter_count(model) - linear_weights
    frozen = int(linear_weights * residual_bytes_per_weight(config, dtype_bytes) + other_weights * dtype_bytes)
    if config.adapter.residual != "none" and config.adapter.cpu_dequant_cache and not on_gpu():
        frozen += linear_weights * dtype_bytes  # the CPU's dequantized forward copies
    adapter_params = 0
    for name, (out_dims, in_dims) in layers.items():
        if name.rsplit(".", 1)[-1] in wanted:
            rank = config.adapter.rank_pattern.get(name, config.adapter.rank)
            adapter_params += rank * (in_dims + out_dims)
    hidden = model_config.get("hidden_size", 0)
    inter = model_config.get("intermediate_size", 4 * hidden)
    n_layers = model_config.get("num_hidden_layers", 1)
    heads = model_config.get("num_attention_heads", 1)
    vocab = model_config.get("vocab_size", 0)
    batch, seq = config.train.batch_size, config.data.max_seq_length
    tokens = batch * seq
    block = tokens * (8 * hidden + 3 * inter) * dtype_bytes + batch * heads * seq * seq * dtype_bytes
    if config.train.grad_checkpoint:  # keep each block's input, recompute one block at a time
        activations = tokens * hidden * dtype_bytes * n_layers + block
    else:
        activations = block * n_layers
    rows = min(config.train.loss_chunk_size or seq, seq)
    activations += 2 * batch * rows * vocab * 4  # logits and their gradient, fp32
    return MemoryEstimate(frozen, adapter_params * 4, adapter_params * (FP32_ADAM_BYTES - 4), activations)


def describe(model: nn.Module, model_config: dict) -> dict:
    """Architecture, parameter count and the targetable linear layers grouped by their name."""
    groups: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for name, shape in linear_layers(model).items():
        groups[name.rsplit(".", 1)[-1]].append(shape)
    return {
        "architecture": (model_config.get("architectures") or [model_config.get("model_type")])[0],
        "model_type": model_config.get("model_type"),
        "parameters": parameter_count(model),
        "layers": model_config.get("num_hidden_layers"),
        "hidden_size": model_config.get("hidden_size"),
        "vocab_size": model_config.get("vocab_size"),
        "targets": {name: {"count": len(shapes), "shape": list(shapes[0])} for name, shapes in groups.items()},
    }
