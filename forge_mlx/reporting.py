"""Optional live reporting of the metrics.jsonl records to Weights & Biases (`train.report_to: wandb`).

metrics.jsonl stays the record of truth; a session opened around a run mirrors each record written to it, so both
backends report without knowing about W&B. W&B's run id is kept in the run directory, so `--resume` continues the
same W&B run. Offline use: WANDB_MODE=offline.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from forge_mlx.errors import ForgeError
from forge_mlx.run_files import atomic_write_text

RUN_ID_FILE = "wandb_run_id"
_sinks: list[Callable[[dict], None]] = []


def publish(record: dict) -> None:
    """Hand one metrics record to every open reporting session (none unless one was asked for)."""
    for sink in _sinks:
        sink(record)


def wandb_payload(record: dict) -> dict[str, float]:
    """A metrics record as W&B keys: numbers under `<phase>/`, with `<phase>/step` as that phase's x axis."""
    phase = record.get("phase", "sft")
    return {
        f"{phase}/{key}": value
        for key, value in record.items()
        if key != "phase" and isinstance(value, int | float) and not isinstance(value, bool)
    }


@contextmanager
def session(config: Any, run_dir: Path, *, main: bool = True) -> Iterator[None]:
    """Mirror metrics records to the configured service for the duration of a run; a no-op when report_to is
    none or on a data-parallel rank other than 0."""
    if config.train.report_to == "none" or not main:
        yield
        return
    run = _open_wandb(config, Path(run_dir))
    defined: set[str] = set()

    def sink(record: dict) -> None:
        phase = record.get("phase", "sft")
        if phase not in defined:  # each phase plots against its own step counter
            run.define_metric(f"{phase}/step")
            run.define_metric(f"{phase}/*", step_metric=f"{phase}/step")
            defined.add(phase)
        run.log(wandb_payload(record))

    _sinks.append(sink)
    try:
        yield
    finally:
        _sinks.remove(sink)
        run.finish()


def _open_wandb(config: Any, run_dir: Path):
    try:
        import wandb
    except ImportError as exc:
        raise ForgeError(
            "train.report_to is wandb but the wandb package is not installed",
            hint="pip install wandb (or forge-mlx[wandb]), or set train.report_to: none",
        ) from exc
    run_dir.mkdir(parents=True, exist_ok=True)
    id_file = run_dir / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else _new_run_id(run_dir)
    if not id_file.exists():
        atomic_write_text(id_file, run_id + "\n")
    return wandb.init(
        project=config.train.wandb_project,
        name=run_dir.resolve().name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config=dataclasses.asdict(config),
    )


def _new_run_id(run_dir: Path) -> str:
    """W&B ids allow letters, digits, - and _; the folder name plus a random suffix keeps them readable."""
    import secrets

    stem = re.sub(r"[^A-Za-z0-9_-]", "-", run_dir.resolve().name)[:40]
    return f"{stem}-{secrets.token_hex(4)}"
