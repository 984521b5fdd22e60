"""Optional live reporting of the metrics.jsonl records to Weights & Biases (`train.report_to: wandb`).

metrics.jsonl stays the record of truth; a session opened around a run mirrors each record written to it, so both
backends report without knowing about W&B. W&B's run id is kept in the run directory, so `--resume` continues the
same W&B run. Offline use: WANDB_MODE=offline.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


@dataclass
class Outcome:
    """How the run ended, for the service's run state: 0 finished, 130 interrupted (resumable), 1 failed."""

    exit_code: int = 0


def exit_code(summary: dict) -> int:
    """130 when a phase stopped on Ctrl-C / SIGTERM with a checkpoint (the CLI exits with it too), else 0."""
    return 130 if any(summary.get(phase, {}).get("interrupted") for phase in ("sft", "dpo")) else 0


@contextmanager
def session(config: Any, run_dir: Path, *, main: bool = True) -> Iterator[Outcome]:
    """Mirror metrics records to the configured service for the duration of a run; a no-op when report_to is
    none or on a data-parallel rank other than 0. The caller sets `outcome.exit_code = 130` for an interrupted
    run; an exception marks the W&B run failed (130 for KeyboardInterrupt) and propagates."""
    outcome = Outcome()
    if config.train.report_to == "none":
        yield outcome
        return
    _require_wandb()  # on every rank, so a missing package stops all of them, not rank 0 alone
    if not main:
        yield outcome
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
        yield outcome
    except BaseException as exc:
        outcome.exit_code = 130 if isinstance(exc, KeyboardInterrupt) else 1
        raise
    finally:
        _sinks.remove(sink)
        run.finish(exit_code=outcome.exit_code)


def _require_wandb() -> None:
    if importlib.util.find_spec("wandb") is None:
        raise ForgeError(
            "train.report_to is wandb but the wandb package is not installed",
            hint="pip install wandb (or forge-mlx[wandb]), or set train.report_to: none",
        )


def _open_wandb(config: Any, run_dir: Path):
    import wandb

    run_dir.mkdir(parents=True, exist_ok=True)
    id_file = run_dir / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else _new_run_id(run_dir)
    if not id_file.exists():
        atomic_write_text(id_file, run_id + "\n")
    try:
        return wandb.init(
            project=config.train.wandb_project,
            name=run_dir.resolve().name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=dataclasses.asdict(config),
        )
    except Exception as exc:  # no API key, no network, a refused project: one line, not wandb's traceback
        raise ForgeError(
            f"Weights & Biases did not start: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            where=str(run_dir),
            hint="run `wandb login`, set WANDB_MODE=offline, or set train.report_to: none",
        ) from exc


def _new_run_id(run_dir: Path) -> str:
    """W&B ids allow letters, digits, - and _; the folder name plus a random suffix keeps them readable."""
    import secrets

    stem = re.sub(r"[^A-Za-z0-9_-]", "-", run_dir.resolve().name)[:40]
    return f"{stem}-{secrets.token_hex(4)}"
