"""The run directory's file format, shared by the MLX and torch backends (no array library imported here).

RUN/config.yaml, adapter_config.json, adapters_init.safetensors, adapters.safetensors, metrics.jsonl,
dpo_reference.safetensors, {sft,dpo}_done.json and checkpoints/<phase>-<step:06d>/{adapters.safetensors,
optimizer.safetensors, state.json}. A checkpoint is written into a temporary folder and renamed into place,
so a crash leaves the whole checkpoint or none; state.json records a SHA-256 of every file, so corruption is
detected.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from forge_mlx.config import Config, load_config, save_config
from forge_mlx.errors import ForgeError

RESOLVED_CONFIG = "config.yaml"
ADAPTER_CONFIG = "adapter_config.json"
INIT_ADAPTERS = "adapters_init.safetensors"
FINAL_ADAPTERS = "adapters.safetensors"
REFERENCE_FILE = "dpo_reference.safetensors"
CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
CHECKPOINT_FILES = ("adapters.safetensors", "optimizer.safetensors")
STALE_ON_FRESH_START = (
    "sft_done.json",
    "dpo_done.json",
    REFERENCE_FILE,
    "metrics.jsonl",
    "summary.json",
    INIT_ADAPTERS,
    FINAL_ADAPTERS,
    ADAPTER_CONFIG,
    "wandb_run_id",  # a fresh run is a new W&B run; --resume continues the old one
)


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
    return ForgeError(
        f"cannot write {Path(path).name}: {_reason(exc)}",
        where=str(path),
        hint=f"check free disk space and permissions; {hint}",
    )


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


def save_numpy_arrays(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Atomic safetensors write of numpy arrays: a full disk leaves the old file (or none), and a ForgeError
    names it."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        save_file({k: np.asarray(v, order="C") for k, v in arrays.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_failed(path, exc) from None


def checkpoint_dir(run_dir: Path, phase: str, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{phase}-{step:06d}"


def write_checkpoint(
    run_dir: Path,
    phase: str,
    step: int,
    write_files: Callable[[Path], None],
    state: dict[str, Any],
    keep: int = 3,
) -> Path:
    """Write one checkpoint atomically (write_files(folder) saves CHECKPOINT_FILES into it); keep the newest
    `keep` of this phase. A failed write (a full disk) drops the partial folder and keeps the earlier ones."""
    final = checkpoint_dir(run_dir, phase, step)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write_files(tmp)
        files = {name: sha256(tmp / name) for name in CHECKPOINT_FILES}
        record = {"phase": phase, "step": step, "files": files, **state}
        (tmp / STATE_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
        for name in [*files, STATE_FILE]:
            with open(tmp / name, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except (OSError, RuntimeError) as exc:  # MLX reports a failed write as RuntimeError
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


def prepare_run_dir(config: Config, resume: bool) -> Path:
    """Create the run directory; refuse to overwrite a run's checkpoints unless resuming it."""
    run_dir = Path(config.output_dir)
    if resume and not (run_dir / RESOLVED_CONFIG).exists():
        raise ForgeError("nothing to resume: no run here", where=str(run_dir), hint="start without --resume")
    if not resume and list_checkpoints(run_dir):
        raise ForgeError(
            "the run directory already holds checkpoints",
            where=str(run_dir),
            hint="pass --resume to continue it, or set output_dir to a new folder",
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:  # a fresh run must not pick up an earlier run's phase markers or reference log-probs
            for name in STALE_ON_FRESH_START:
                (run_dir / name).unlink(missing_ok=True)
        save_config(config, run_dir / RESOLVED_CONFIG)
    except OSError as exc:
        raise ForgeError(f"cannot write the run directory ({exc.strerror})", where=str(run_dir)) from None
    return run_dir


def phase_done(run_dir: Path, phase: str) -> bool:
    return (Path(run_dir) / f"{phase}_done.json").exists()


def phase_steps(n_batches: int, grad_accum: int, steps: int | None, epochs: float | None) -> int:
    """Optimizer steps for a phase: `steps` as given, else `epochs` (default 1) over the batches."""
    if steps is not None:
        return steps
    return max(1, math.ceil((epochs or 1.0) * n_batches / grad_accum))


def real_rows(batch) -> list[int]:
    """Rows that hold an example (the epoch's last batch is topped up with empty rows), pairs kept
    together."""
    b = len(batch.example_ids)
    keep = [i for i, ids in enumerate(batch.example_ids) if ids]
    return [g * b + i for g in range(batch.group) for i in keep]


def adapter_metadata(config: Config, report: dict, model_config: dict) -> dict:
    """The run's adapter description (read by export and eval): base, method, per-layer ranks, residual
    format."""
    a = config.adapter
    return {
        "format": "forge-mlx",
        "base_model": config.model,
        "model_type": model_config.get("model_type"),
        "init": a.init,
        "oversample": a.oversample,
        "rank": a.rank,
        "alpha": a.alpha,
        "scale": a.alpha / a.rank,
        "dropout": a.dropout,
        "targets": sorted(report["layers"]),
        "ranks": {p: e["rank"] for p, e in report["layers"].items()},
        "scales": {p: e["scale"] for p, e in report["layers"].items()},
        "residual": a.residual,
        "bits": a.bits,
        "group_size": a.group_size,
        "blocksize": a.blocksize,
        "double_quant": a.double_quant,
        "trainable_parameters": report["trainable_parameters"],
    }


def run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / RESOLVED_CONFIG
    if not path.exists():
        raise ForgeError("not a forge-mlx run directory (no config.yaml)", where=str(run_dir))
    return load_config(path)


def adapter_meta(run_dir: str | Path) -> dict:
    path = Path(run_dir) / ADAPTER_CONFIG
    if not path.exists():
        raise ForgeError("the run has no adapter_config.json", where=str(run_dir))
    return json.loads(path.read_text(encoding="utf-8"))


def trained_adapters_file(run_dir: str | Path) -> Path:
    """The final adapters, or the newest good checkpoint's when the run stopped early."""
    run_dir = Path(run_dir)
    if (run_dir / FINAL_ADAPTERS).exists():
        return run_dir / FINAL_ADAPTERS
    path, _ = latest_good(run_dir)
    if path is None:
        raise ForgeError(
            "the run directory holds no adapters (no adapters.safetensors, no checkpoint)",
            where=str(run_dir),
            hint="train first, or point at a finished run",
        )
    return path / "adapters.safetensors"
