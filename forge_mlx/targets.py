"""Which layers get adapters, at which rank, with which init and residual storage: config semantics both backends
share.

Paths are from the model root (model.layers.0.self_attn.q_proj), the same in mlx-lm and transformers, so a
run's adapter names and per-layer seeds do not depend on the backend that trained it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

from forge_mlx.errors import ForgeError

TARGET_PRESETS = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
ADAPTER_NAMES = ("lora_a", "lora_b")
INIT_PATTERN = re.compile(r"pissa(?:_niter_(\d+))?|lora")
RESIDUAL_KINDS = ("none", "affine", "nf4")
AFFINE_BITS = (4, 8)
AFFINE_GROUP_SIZES = (32, 64, 128)  # the group sizes mx.quantize accepts in affine mode


def init_niter(init: str) -> int | None:
    """Power iterations of a pissa_niter_N init; None for the exact SVD (pissa)."""
    niter = INIT_PATTERN.fullmatch(init).group(1)
    return None if niter is None else int(niter)


def check_adapter_options(
    shape: tuple[int, int], rank: int, alpha: float, init: str, residual: str, iters: int, oversample: int, name: str
) -> None:
    """Reject an adapter that cannot be built, naming the layer."""
    where = name or None
    if INIT_PATTERN.fullmatch(init) is None:
        raise ForgeError(f"unknown init '{init}'", where=where, hint="use pissa, pissa_niter_N or lora")
    if residual not in RESIDUAL_KINDS:
        raise ForgeError(f"unknown residual '{residual}'", where=where, hint=f"use one of {', '.join(RESIDUAL_KINDS)}")
    if not 1 <= rank <= min(shape):
        raise ForgeError(
            f"rank {rank} does not fit a {shape} layer",
            where=where,
            hint=f"use a rank from 1 to {min(shape)}, or set this layer's rank with rank_pattern",
        )
    if alpha <= 0:
        raise ForgeError(f"alpha must be positive, got {alpha}", where=where)
    if iters < 1:
        raise ForgeError(f"qpissa_iters must be at least 1, got {iters}", where=where)
    if oversample < 0:
        raise ForgeError(f"oversample must be at least 0, got {oversample}", where=where)


def adapter_factors(
    factors: ModuleType,
    weight: Any,
    rank: int,
    alpha: float | None,
    init: str,
    residual: str,
    qpissa_iters: int,
    oversample: int,
    seed: int,
    name: str,
    round_trip: Callable[[Any], Any],
) -> tuple[Any, Any, Any, float, list[float]]:
    """(lora_a, lora_b, residual weight, scale, QPiSSA errors) for weight (out, in) fp32: LoRA, PiSSA, or QPiSSA
    fitted to round_trip's quantization error. `factors` is a backend's pissa module; alpha defaults to 2 * rank;
    oversample is the randomized SVD's extra sketch columns (pissa_niter_N only)."""
    out_dims, in_dims = weight.shape
    alpha = 2.0 * rank if alpha is None else alpha
    check_adapter_options((out_dims, in_dims), rank, alpha, init, residual, qpissa_iters, oversample, name)
    scale = alpha / rank
    if init == "lora":
        return (*factors.lora_factors(in_dims, out_dims, rank, seed), weight, scale, [])
    niter = init_niter(init)
    if residual == "none":
        return (*factors.pissa_factors(weight, rank, scale, niter, seed, oversample), scale, [])
    lora_a, lora_b, residual_weight, errors = factors.qpissa(
        weight, rank, scale, round_trip, qpissa_iters, niter, seed, oversample
    )
    return lora_a, lora_b, residual_weight, scale, errors


def layer_report(adapter: Any, seconds: float, errors: list[float]) -> dict:
    """apply_adapters' entry for one adapted layer (adapter_config.json's shapes and ranks come from it)."""
    in_dims, rank = adapter.lora_a.shape
    return {
        "shape": [adapter.lora_b.shape[1], in_dims],
        "rank": rank,
        "scale": adapter.scale,
        "seconds": seconds,
        "qpissa_errors": errors,
    }


def check_adapter_weights(current: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    """Reject adapter weights that do not name exactly the model's adapters (arrays of any backend), or whose
    shapes differ."""
    missing, unexpected = sorted(current.keys() - given.keys()), sorted(given.keys() - current.keys())
    if missing or unexpected:
        first = f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'"
        raise ForgeError(
            f"adapter weights do not match the model: {first} ({len(missing)} missing, {len(unexpected)} unexpected)",
            hint="load them into a model adapted with the same targets",
        )
    for key, value in given.items():
        if tuple(value.shape) != tuple(current[key].shape):
            raise ForgeError(
                f"adapter '{key}' has shape {tuple(value.shape)}, not {tuple(current[key].shape)}",
                hint="use the rank and rank_pattern of the run that saved them",
            )


def check_affine(in_dims: int, group_size: int, bits: int, name: str = "") -> None:
    """Reject an affine residual mx.quantize cannot store, naming the layer and the group sizes that fit."""
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


def select_targets(blocks: Sequence[tuple[str, Sequence[str]]], targets: str | Sequence[str]) -> list[str]:
    """Target paths, block by block in index order, from (block path, its linear layers' relative paths).

    `targets` is a preset or a list of layer names; per block the order is the targets' order, then path
    order.
    """
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            presets = " or ".join(TARGET_PRESETS)
            raise ForgeError(f"unknown target preset '{targets}'", hint=f"use {presets} or a list of layer names")
        targets = TARGET_PRESETS[targets]
    found, available = [], set()
    for prefix, linears in sorted(blocks, key=lambda item: int(item[0].rsplit(".", 1)[-1])):
        available.update(p.rsplit(".", 1)[-1] for p in linears)
        for target in targets:
            found += sorted(f"{prefix}.{p}" for p in linears if p.rsplit(".", 1)[-1] == target)
    missing = [t for t in targets if t not in available]
    if missing:
        raise ForgeError(
            f"target '{missing[0]}' matches no linear layer in model.layers",
            hint=f"this model has {', '.join(sorted(available))}",
        )
    return found


def _matches(path: str, key: str) -> bool:
    return path == key or path.endswith("." + key)


def layer_ranks(paths: Sequence[str], rank: int, rank_pattern: dict[str, int] | None) -> dict[str, int]:
    """Rank per path: the longest rank_pattern key that is the path or its dotted suffix, else `rank`."""
    pattern = rank_pattern or {}
    for key in pattern:
        if not any(_matches(p, key) for p in paths):
            raise ForgeError(
                f"key '{key}' matches no adapted layer",
                where="rank_pattern",
                hint=f"keys are a layer path or its dotted suffix, e.g. '{paths[0]}'",
            )
    ranks = {}
    for path in paths:
        keys = [k for k in pattern if _matches(path, k)]
        ranks[path] = pattern[max(keys, key=len)] if keys else rank
    return ranks
