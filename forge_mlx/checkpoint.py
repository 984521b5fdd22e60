"""Atomic checkpoints a run can resume from exactly: adapters, optimizer state, step, RNG and data position.

Layout: RUN/checkpoints/<phase>-<step:06d>/{adapters.safetensors, optimizer.safetensors, state.json}. A checkpoint is
written into a temporary folder and renamed into place, so a crash (even kill -9) leaves either the whole checkpoint or
none; state.json records a SHA-256 of every file so a corrupted one is detected and the previous checkpoint is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from forge_mlx.errors import ForgeError

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reason(exc: Exception) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def write_failed(path: Path, exc: Exception, hint: str = "nothing half-written was left") -> ForgeError:
    """The user error for a failed write (a full disk, permissions), naming the file."""
    return ForgeError(f"cannot write {Path(path).name}: {_reason(exc)}", where=str(path),
                      hint=f"check free disk space and permissions; {hint}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file so a reader sees the old or the new content, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_failed(path, exc) from None


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


def optimizer_arrays(optimizer) -> dict[str, mx.array]:
    return dict(tree_flatten(optimizer.state))


def checkpoint_dir(run_dir: Path, phase: str, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{phase}-{step:06d}"


def save_checkpoint(
    run_dir: Path, phase: str, step: int, adapters: dict[str, mx.array], optimizer, state: dict[str, Any],
    keep: int = 3,
) -> Path:
    """Write one checkpoint atomically and keep the newest `keep` of this phase."""
    final = checkpoint_dir(run_dir, phase, step)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    opt = optimizer_arrays(optimizer)
    for i, array in enumerate(mx.random.state):
        opt[f"__rng__.{i}"] = array
    mx.eval(list(adapters.values()), list(opt.values()))  # compute errors are not write errors
    try:
        tmp.mkdir(parents=True)
        _write_safetensors(tmp / "adapters.safetensors", adapters, {})
        _write_safetensors(tmp / "optimizer.safetensors", opt, {})
        files = {name: sha256(tmp / name) for name in ("adapters.safetensors", "optimizer.safetensors")}
        record = {"phase": phase, "step": step, "files": files, **state}
        (tmp / STATE_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
        for name in [*files, STATE_FILE]:
            with open(tmp / name, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except (OSError, RuntimeError) as exc:  # a full disk: drop the partial folder, keep the earlier ones
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(final, exc, "the earlier checkpoints are intact") from None
    for old in list_checkpoints(run_dir, phase)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path, phase: str | None = None) -> list[Path]:
    """Completed checkpoints, oldest first (phase order sft < dpo, then step)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and "-" in p.name]
    if phase:
        found = [p for p in found if p.name.startswith(f"{phase}-")]
    order = {"sft": 0, "dpo": 1}
    return sorted(found, key=lambda p: (order.get(p.name.split("-")[0], 9), p.name))


def verify(path: Path) -> dict | None:
    """The checkpoint's state if every file is present and matches its checksum, else None."""
    try:
        record = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        for name, digest in record["files"].items():
            if sha256(path / name) != digest:
                return None
        return record
    except (OSError, ValueError, KeyError):
        return None


def latest_good(run_dir: Path, phase: str | None = None) -> tuple[Path, dict] | tuple[None, None]:
    """The newest checkpoint that verifies; corrupted ones are skipped (and reported by the caller)."""
    for path in reversed(list_checkpoints(run_dir, phase)):
        record = verify(path)
        if record is not None:
            return path, record
    return None, None


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
