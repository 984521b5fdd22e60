"""Learning-rate schedule: linear warmup from 0, then cosine decay to min_lr (nanoGPT's get_lr).

Convention: `step` counts the optimizer updates already applied, so update k (0-based) uses lr_at(k). MLX
optimizers do this (the schedule gets `optimizer.step` before its increment), as do Hugging Face's LambdaLR
schedules; with warmup the first update therefore has lr 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from forge_mlx.errors import ForgeError

if TYPE_CHECKING:  # imported in mlx_schedule, so lr_at works without mlx (the torch backend)
    import mlx.core as mx


def lr_at(step: int, *, peak_lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """LR of update `step`: peak*step/warmup, then cosine from peak to peak*min_lr_ratio at total_steps."""
    _check(total_steps, warmup_steps, min_lr_ratio)
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    min_lr = peak_lr * min_lr_ratio
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def mlx_schedule(
    *, peak_lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0
) -> Callable[[mx.array], mx.array]:
    """lr_at as an mlx.optimizers schedule (mx.array step -> mx.array lr): a table, flat past the end."""
    import mlx.core as mx

    lrs = [
        lr_at(s, peak_lr=peak_lr, total_steps=total_steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)
        for s in range(total_steps + 1)
    ]
    table = mx.array(lrs, dtype=mx.float32)  # (total_steps + 1,)
    return lambda step: table[mx.minimum(step, total_steps)]


def _check(total_steps: int, warmup_steps: int, min_lr_ratio: float) -> None:
    """Fail early on a schedule that cannot be drawn."""
    if not 0 <= warmup_steps < total_steps:
        raise ForgeError(
            f"warmup_steps ({warmup_steps}) must lie in [0, total_steps) with total_steps={total_steps}",
            hint="lower warmup_steps or train for more steps",
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ForgeError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
