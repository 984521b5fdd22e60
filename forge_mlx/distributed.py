"""Data-parallel training on MLX's distributed layer (`mx.distributed`, launched by `mlx.launch`).

Every rank holds the whole model and reads its shard of each global batch; gradients (adapters only: a few MB)
are summed with `all_sum`; rank 0 alone writes logs, checkpoints and the final adapters. On resume every rank reads
the same checkpoint, so the run directory must be on a path all hosts see (one Mac with several processes, or a
shared folder). Without a launcher the world has one rank and all of this is a no-op.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx


@lru_cache(maxsize=1)
def world():
    """The process group; `init()` returns a singleton group of size 1 when not launched by mlx.launch."""
    return mx.distributed.init()


def size() -> int:
    return world().size()


def rank() -> int:
    return world().rank()


def is_main() -> bool:
    return rank() == 0


def all_sum(x: mx.array) -> mx.array:
    """Sum over ranks (identity for one rank); on the CPU stream, which every backend's collectives support."""
    return x if size() == 1 else mx.distributed.all_sum(x, stream=mx.cpu)


def sum_floats(*values: float) -> list[float]:
    """Host floats summed over ranks (losses, token counts for reports)."""
    if size() == 1:
        return list(values)
    return all_sum(mx.array(values, dtype=mx.float32)).tolist()
