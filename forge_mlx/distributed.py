"""Data-parallel training on MLX's distributed layer (`mx.distributed`, launched by `mlx.launch`).

Every rank holds the whole model and reads its shard of each global batch; gradients (adapters only: a few MB)
are summed with `all_sum`; rank 0 alone writes logs, checkpoints and exports, and hands its restored state to the
others on resume. Without a launcher the world has one rank and all of this is a no-op.
"""

from __future__ import annotations

import json
from functools import lru_cache

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten


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


def broadcast_tree(tree):
    """Rank 0's arrays on every rank (the others contribute zeros to a sum)."""
    if size() == 1:
        return tree
    flat = [(k, all_sum(v if is_main() else mx.zeros_like(v))) for k, v in tree_flatten(tree)]
    return tree_unflatten(flat)


def broadcast_json(value):
    """Rank 0's JSON-serialisable value on every rank (e.g. the data position of a resumed run)."""
    if size() == 1:
        return value
    raw = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_main() else np.zeros(0, np.uint8)
    length = int(all_sum(mx.array([raw.size], mx.int32)).item())
    padded = np.zeros(length, np.int32)
    padded[: raw.size] = raw
    data = np.array(all_sum(mx.array(padded))).astype(np.uint8)
    return json.loads(data.tobytes().decode())
