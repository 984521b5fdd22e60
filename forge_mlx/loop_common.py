"""The backend-free parts of the training loop: its spec and result, Ctrl-C handling, report records and the
progress line, so both backends log the same metrics.jsonl records."""

from __future__ import annotations

import math
import signal
import sys
from dataclasses import dataclass, field

from forge_mlx.errors import ForgeError


@dataclass
class LoopSpec:
    phase: str  # "sft" or "dpo": names checkpoints and metric records
    steps: int
    grad_accum: int
    max_grad_norm: float
    steps_per_report: int
    steps_per_eval: int
    save_every: int
    max_bad_steps: int
    val_batches: int
    memory_alert: float = 0.8
    memory_hint: str = "lower train.batch_size or data.max_seq_length, or set train.grad_checkpoint: true"
    compile_step: bool = True  # MLX: off under loss chunking, whose memory saving mx.compile undoes


def loop_spec(phase: str, steps: int, grad_accum: int, config) -> LoopSpec:
    """The loop settings a phase takes from the config (train.* for reporting, saving and limits)."""
    t = config.train
    return LoopSpec(
        phase,
        steps,
        grad_accum,
        t.max_grad_norm,
        t.steps_per_report,
        t.steps_per_eval,
        t.save_every,
        t.max_bad_steps,
        t.val_batches,
        config.memory.alert_threshold,
        compile_step=t.loss_chunk_size is None,
    )


@dataclass
class LoopResult:
    steps_done: int
    last_loss: float
    interrupted: bool = False
    history: list[dict] = field(default_factory=list)


class Interrupt:
    """Turn Ctrl-C / SIGTERM into a flag the loop checks, so it can checkpoint before exiting."""

    def __init__(self) -> None:
        self.hit = False

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame) -> None:
        if self.hit:  # a second Ctrl-C aborts at once
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def bad_step(step_loss: float, total_weight: float, grads_finite: bool) -> str | None:
    """Why this step's update must be skipped, or None: a non-finite loss (or nothing to weigh it by), or a
    finite loss whose gradients overflowed (applying them would turn every adapter weight into NaN)."""
    if not math.isfinite(step_loss) or total_weight == 0:
        return "loss"
    return None if grads_finite else "grad"


def skip_step(log, spec: LoopSpec, step: int, step_loss: float, what: str, bad_in_row: int, run_dir) -> None:
    """Record and announce a skipped update (log is None off rank 0); stop after spec.max_bad_steps in a row."""
    if log is not None:
        log.write({"phase": spec.phase, "step": step + 1, "event": f"skipped_nonfinite_{what}", "loss": str(step_loss)})
        print(f"\n[{spec.phase}] step {step + 1}: non-finite {what} (loss {step_loss}); update skipped")
    if bad_in_row >= spec.max_bad_steps:
        raise ForgeError(
            f"{bad_in_row} non-finite steps in a row (last: {what}); stopped with the last good checkpoint intact",
            where=str(run_dir),
            hint="lower the learning rate or check the data",
        )


def new_window() -> dict:
    """Sums over the steps since the last report."""
    return {"loss": 0.0, "weight": 0.0, "tokens": 0, "time": 0.0, "aux": {}}


def add_to_window(window: dict, loss_sum: float, weight: float, tokens: int, seconds: float, aux: dict) -> None:
    window["loss"] += loss_sum
    window["weight"] += weight
    window["tokens"] += tokens
    window["time"] += seconds
    for key, value in aux.items():
        window["aux"][key] = window["aux"].get(key, 0.0) + value


def report_record(spec: LoopSpec, step: int, lr: float, window: dict, peak: int, grad_norm: float) -> dict:
    """One metrics.jsonl record: means over the window, weighted by tokens (SFT) or pairs (DPO)."""
    weight = max(window["weight"], 1e-9)
    seconds = max(window["time"], 1e-9)
    return {
        "phase": spec.phase,
        "step": step,
        "loss": window["loss"] / weight,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": window["tokens"] / seconds,
        "peak_memory_gb": peak / 2**30,
        **{key: value / weight for key, value in window["aux"].items()},
    }


def progress(phase: str, step: int, total: int, loss: float, lr: float, tps: float, peak_gb: float) -> None:
    bar_len = 24
    filled = int(bar_len * step / max(total, 1))
    line = (
        f"[{phase}] {step:>5d}/{total} |{'#' * filled}{'.' * (bar_len - filled)}| loss {loss:.4f} "
        f"lr {lr:.2e} {tps:,.0f} tok/s peak {peak_gb:.2f} GB"
    )
    end = "\r" if sys.stdout.isatty() else "\n"
    print(line, end=end, flush=True)
