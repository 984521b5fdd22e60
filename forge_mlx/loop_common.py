"""The backend-free parts of the training loop: its spec and result, Ctrl-C handling and its bookkeeping (bad-step
count, report window, memory alert, metrics.jsonl records, progress lines), so both backends log the same records."""

from __future__ import annotations

import math
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from forge_mlx.errors import ForgeError
from forge_mlx.metrics_log import MetricsLog


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


class Bookkeeping:
    """What a loop does around its array work, the same in both backends: counts bad steps, sums the report
    window, warns once about memory, and keeps the report and validation records; only the main rank (data
    parallel: rank 0) writes metrics.jsonl and prints."""

    def __init__(
        self,
        spec: LoopSpec,
        run_dir: Path,
        start_step: int,
        device_bytes: int,
        *,
        main: bool = True,
        extra_report: Callable[[], dict] = dict,
    ) -> None:
        self.spec, self.run_dir, self.main, self.extra_report = spec, run_dir, main, extra_report
        self.log = MetricsLog(Path(run_dir) / "metrics.jsonl") if main else None
        self.device_bytes = device_bytes
        self.result = LoopResult(start_step, float("nan"))
        self.window = new_window()
        self.bad_in_row, self.warned, self.peak = 0, False, 0

    def skipped(self, step: int, step_loss: float, what: str | None) -> bool:
        """True when the update must be skipped (`what` from bad_step): records and announces it, and stops after
        spec.max_bad_steps in a row; a good step resets the count."""
        if not what:
            self.bad_in_row = 0
            return False
        self.bad_in_row += 1
        spec = self.spec
        if self.main:
            self.log.write(
                {"phase": spec.phase, "step": step + 1, "event": f"skipped_nonfinite_{what}", "loss": str(step_loss)}
            )
            print(f"\n[{spec.phase}] step {step + 1}: non-finite {what} (loss {step_loss}); update skipped")
        if self.bad_in_row >= spec.max_bad_steps:
            raise ForgeError(
                f"{self.bad_in_row} non-finite steps in a row (last: {what}); "
                "stopped with the last good checkpoint intact",
                where=str(self.run_dir),
                hint="lower the learning rate or check the data",
            )
        return True

    def stepped(
        self,
        step: int,
        step_loss: float,
        loss_sum: float,
        weight: float,
        tokens: float,
        seconds: float,
        aux: dict,
        peak: int,
    ) -> None:
        """Take in an applied update (sums over its micro-batches, peak memory in bytes so far)."""
        self.result.steps_done, self.result.last_loss = step, step_loss
        add_to_window(self.window, loss_sum, weight, int(tokens), seconds, aux)
        self.peak = peak
        limit = self.device_bytes * self.spec.memory_alert
        if self.main and limit and peak > limit and not self.warned:
            self.warned = True
            print(
                f"\nWARNING: peak memory {peak / 2**30:.2f} GB is over {self.spec.memory_alert:.0%} of the "
                f"device's {self.device_bytes / 2**30:.1f} GB: {self.spec.memory_hint}"
            )

    def due(self, step: int, every: int) -> bool:
        """Every `every` steps and at the last one (reports, validation, checkpoints)."""
        return step % every == 0 or step == self.spec.steps

    def report(self, step: int, lr: float, grad_norm: float) -> None:
        """The report record (means over the window since the last one) and the progress line."""
        spec = self.spec
        record = {**report_record(spec, step, lr, self.window, self.peak, grad_norm), **self.extra_report()}
        self.result.history.append(record)
        if self.main:
            self.log.write(record)
            progress(
                spec.phase, step, spec.steps, record["loss"], record["lr"], record["tokens_per_s"], self.peak / 2**30
            )
        self.window = new_window()

    def validated(self, step: int, val_loss: float, val_aux: dict[str, float]) -> None:
        """The validation record (evaluate_loss's mean loss and aux means)."""
        record = {
            "phase": self.spec.phase,
            "step": step,
            "val_loss": val_loss,
            **{f"val_{k}": v for k, v in val_aux.items()},
        }
        self.result.history.append(record)
        if self.main:
            self.log.write(record)
            print(f"\n[{self.spec.phase}] step {step}: val loss {val_loss:.4f}", flush=True)

    def interrupted(self, step: int) -> None:
        """Ctrl-C: the checkpoint of `step` is written; the loop stops."""
        if self.main:
            print(f"\n[{self.spec.phase}] interrupted: checkpoint written at step {step}; continue with --resume")
        self.result.interrupted = True

    def finished(self) -> LoopResult:
        """The result, after a newline that ends the progress lines."""
        if self.main:
            print()
        return self.result
