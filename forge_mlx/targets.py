"""Which layers get adapters, at which rank, with which init: config semantics both backends share.

Paths are from the model root (model.layers.0.self_attn.q_proj), the same in mlx-lm and transformers, so a
run's adapter names and per-layer seeds do not depend on the backend that trained it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from forge_mlx.errors import ForgeError

TARGET_PRESETS = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
ADAPTER_NAMES = ("lora_a", "lora_b")
INIT_PATTERN = re.compile(r"pissa(?:_niter_(\d+))?|lora")
RESIDUAL_KINDS = ("none", "affine", "nf4")


def init_niter(init: str) -> int | None:
    """Power iterations of a pissa_niter_N init; None for the exact SVD (pissa)."""
    niter = INIT_PATTERN.fullmatch(init).group(1)
    return None if niter is None else int(niter)


def check_adapter_options(
    shape: tuple[int, int], rank: int, alpha: float, init: str, residual: str, iters: int, name: str
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
