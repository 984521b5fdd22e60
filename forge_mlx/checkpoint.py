"""MLX's side of the run-directory format (forge_mlx/run_files.py): writing mx arrays atomically, and saving and
restoring adapters, optimizer state and the RNG for an exact resume."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from forge_mlx.run_files import (  # noqa: F401  (the checkpoint API callers use through this module)
    atomic_write_text,
    latest_good,
    list_checkpoints,
    verify,
    write_checkpoint,
    write_failed,
)


def _write_safetensors(path: Path, arrays: dict[str, mx.array], metadata: dict[str, str]) -> None:
    """Write through a temporary name (removed on failure), so no torn file is ever visible."""
    mx.eval(list(arrays.values()))  # a compute error surfaces here, not disguised as a write error
    tmp = path.with_name(f".tmp-{path.name}")  # keeps the .safetensors suffix mx.save_safetensors insists on
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_arrays(path: Path, arrays: dict[str, mx.array], metadata: dict[str, str] | None = None) -> None:
    """Atomic safetensors write: a full disk leaves the old file (or none) and a ForgeError naming it."""
    try:
        _write_safetensors(path, arrays, metadata or {})
    except (OSError, RuntimeError) as exc:  # MLX reports a failed write as RuntimeError
        raise write_failed(path, exc) from None


def save_checkpoint(
    run_dir: Path,
    phase: str,
    step: int,
    adapters: dict[str, mx.array],
    optimizer,
    state: dict[str, Any],
    keep: int = 3,
) -> Path:
    """Adapters, optimizer state and RNG key as one atomic checkpoint; the newest `keep` of the phase stay."""
    opt = dict(tree_flatten(optimizer.state))
    for i, array in enumerate(mx.random.state):
        opt[f"__rng__.{i}"] = array
    mx.eval(list(adapters.values()), list(opt.values()))  # compute errors are not write errors

    def write_files(folder: Path) -> None:
        _write_safetensors(folder / "adapters.safetensors", adapters, {})
        _write_safetensors(folder / "optimizer.safetensors", opt, {})

    return write_checkpoint(run_dir, phase, step, write_files, state, keep)


def load_into(path: Path, model, optimizer) -> None:
    """Restore adapters, optimizer state and the RNG; call before the step is compiled (it captures the state)."""
    model.load_weights(list(mx.load(str(path / "adapters.safetensors")).items()), strict=False)
    opt = mx.load(str(path / "optimizer.safetensors"))
    rng = [opt.pop(k) for k in sorted((k for k in opt if k.startswith("__rng__.")), key=lambda k: int(k[8:]))]
    optimizer.state = tree_unflatten(list(opt.items()))
    if rng:  # mx.random.state takes no assignment; seed(s) sets the (2,) uint32 key to [s >> 32, s & 0xffffffff]
        hi, lo = rng[0].tolist()
        mx.random.seed((hi << 32) | lo)
    mx.eval(model.parameters(), optimizer.state)
