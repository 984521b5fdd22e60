"""One training loop for SFT and DPO (mlx-lm style): compiled step, token-weighted gradient accumulation,
gradient checkpointing, clipping, NaN skipping, validation, atomic checkpoints and exact resume."""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from forge_mlx import checkpoint as ckpt
from forge_mlx.errors import ForgeError
from forge_mlx.metrics_log import MetricsLog
from forge_mlx.models import device_memory_bytes

# loss_fn(model, *batch) -> (loss, weight, aux): loss is the weighted mean over `weight` units (tokens or pairs);
# aux holds per-batch sums to report (e.g. DPO rewards times pairs).
LossFn = Callable[..., tuple[mx.array, mx.array, dict[str, mx.array]]]


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


@dataclass
class LoopResult:
    steps_done: int
    last_loss: float
    interrupted: bool = False
    history: list[dict] = field(default_factory=list)


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each transformer block in the backward pass (mx.checkpoint), per instance, so no class is patched
    for other models in the process and the parameter names stay the same."""
    for block in model.layers:
        cls = type(block)
        if getattr(cls, "_forge_checkpointed", False):
            continue
        call = cls.__call__

        def checkpointed(self, *args, _call=call, **kwargs):
            def inner(params, *args, **kwargs):
                self.update(params)
                return _call(self, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        block.__class__ = type(cls.__name__, (cls,), {"__call__": checkpointed, "_forge_checkpointed": True})


def make_step(model: nn.Module, optimizer: optim.Optimizer, loss_fn: LossFn, max_grad_norm: float):
    """Compiled micro-step (adds weight * grad to the running sum) and compiled update (mean, clip, AdamW)."""
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def micro(grad_sum, *batch):
        (loss, weight, aux), grad = loss_and_grad(model, *batch)
        grad = tree_map(lambda g: g * weight, grad)
        if grad_sum is not None:
            grad = tree_map(mx.add, grad, grad_sum)
        return loss, weight, aux, grad

    @partial(mx.compile, inputs=state, outputs=state)
    def update(grad_sum, total_weight):
        grad = tree_map(lambda g: g / total_weight, grad_sum)
        grad, norm = optim.clip_grad_norm(grad, max_grad_norm or float("inf"))
        optimizer.update(model, grad)
        return norm

    return micro, update, state


def evaluate_loss(model: nn.Module, loss_fn: LossFn, batches: list[tuple]) -> tuple[float, dict[str, float]]:
    """Weighted mean loss (and aux sums / weight) over the given batches, without gradients, in eval mode (no
    dropout); the caller switches back to training."""
    model.eval()
    total, weight_sum, aux_sum = 0.0, 0.0, {}
    for batch in batches:
        loss, weight, aux = loss_fn(model, *batch)
        mx.eval(loss, weight, aux)
        total += loss.item() * weight.item()
        weight_sum += weight.item()
        for key, value in aux.items():
            aux_sum[key] = aux_sum.get(key, 0.0) + value.item()
    weight_sum = max(weight_sum, 1.0)
    return total / weight_sum, {k: v / weight_sum for k, v in aux_sum.items()}


class _Interrupt:
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


def _progress(phase: str, step: int, total: int, loss: float, lr: float, tps: float, peak_gb: float) -> None:
    bar_len = 24
    filled = int(bar_len * step / max(total, 1))
    line = (f"[{phase}] {step:>5d}/{total} |{'#' * filled}{'.' * (bar_len - filled)}| loss {loss:.4f} "
            f"lr {lr:.2e} {tps:,.0f} tok/s peak {peak_gb:.2f} GB")
    end = "\r" if sys.stdout.isatty() else "\n"
    print(line, end=end, flush=True)


def train_loop(
    model: nn.Module,
    optimizer: optim.Optimizer,
    loss_fn: LossFn,
    batches: Iterator[tuple[tuple[mx.array, ...], int]],
    spec: LoopSpec,
    run_dir: Path,
    *,
    adapter_weights: Callable[[], dict[str, mx.array]],
    data_state: Callable[[], dict],
    val_batches: Callable[[], list[tuple]] | None = None,
    start_step: int = 0,
    extra_report: Callable[[], dict] = dict,
) -> LoopResult:
    """Run `spec.steps` optimizer steps from `start_step`; each step is `grad_accum` micro-batches from `batches`,
    which yields (arrays for loss_fn, count of real tokens).

    State restored by the caller (checkpoint.load_into) must be in place before this is called, since the
    compiled step captures the model, optimizer and RNG state here.
    """
    log = MetricsLog(Path(run_dir) / "metrics.jsonl")
    micro, update, state = make_step(model, optimizer, loss_fn, spec.max_grad_norm)
    memory_limit = device_memory_bytes() * spec.memory_alert
    warned = False
    result = LoopResult(start_step, float("nan"))
    window = {"loss": 0.0, "weight": 0.0, "tokens": 0, "time": 0.0, "aux": {}}
    bad_in_row = 0
    model.train()
    with _Interrupt() as interrupt:
        step = start_step
        while step < spec.steps:
            tic = time.perf_counter()
            grad_sum, total_weight, loss_sum, aux_sum, tokens = None, 0.0, 0.0, {}, 0
            for _ in range(spec.grad_accum):
                batch, real_tokens = next(batches)
                loss, weight, aux, grad_sum = micro(grad_sum, *batch)
                mx.eval(loss, weight, aux, grad_sum)
                total_weight += weight.item()
                loss_sum += loss.item() * weight.item()
                tokens += real_tokens
                for key, value in aux.items():
                    aux_sum[key] = aux_sum.get(key, 0.0) + value.item()
            step_loss = loss_sum / max(total_weight, 1e-9)
            if not math.isfinite(step_loss) or total_weight == 0:
                bad_in_row += 1
                log.write({"phase": spec.phase, "step": step + 1, "event": "skipped_nonfinite_loss",
                           "loss": str(step_loss)})
                print(f"\n[{spec.phase}] step {step + 1}: non-finite loss ({step_loss}); update skipped")
                if bad_in_row >= spec.max_bad_steps:
                    raise ForgeError(
                        f"{bad_in_row} non-finite losses in a row; stopped with the last good checkpoint intact",
                        where=str(run_dir), hint="lower the learning rate or check the data",
                    )
                continue
            bad_in_row = 0
            grad_norm = update(grad_sum, mx.array(total_weight, mx.float32))
            mx.eval(state, grad_norm)
            step += 1
            result.steps_done, result.last_loss = step, step_loss
            window["loss"] += loss_sum
            window["weight"] += total_weight
            window["tokens"] += tokens
            window["time"] += time.perf_counter() - tic
            for key, value in aux_sum.items():
                window["aux"][key] = window["aux"].get(key, 0.0) + value
            peak = mx.get_peak_memory()
            if memory_limit and peak > memory_limit and not warned:
                warned = True
                print(f"\nWARNING: peak memory {peak / 2**30:.2f} GB is over {spec.memory_alert:.0%} of the device's "
                      f"{device_memory_bytes() / 2**30:.1f} GB: {spec.memory_hint}")
            if step % spec.steps_per_report == 0 or step == spec.steps:
                record = {**_report(spec, step, optimizer, window, peak, grad_norm.item()), **extra_report()}
                log.write(record)
                result.history.append(record)
                _progress(spec.phase, step, spec.steps, record["loss"], record["lr"], record["tokens_per_s"],
                          peak / 2**30)
                window = {"loss": 0.0, "weight": 0.0, "tokens": 0, "time": 0.0, "aux": {}}
            if val_batches and spec.val_batches and (step % spec.steps_per_eval == 0 or step == spec.steps):
                val_loss, val_aux = evaluate_loss(model, loss_fn, val_batches())
                model.train()
                record = {"phase": spec.phase, "step": step, "val_loss": val_loss,
                          **{f"val_{k}": v for k, v in val_aux.items()}}
                log.write(record)
                result.history.append(record)
                print(f"\n[{spec.phase}] step {step}: val loss {val_loss:.4f}", flush=True)
            if step % spec.save_every == 0 or step == spec.steps or interrupt.hit:
                ckpt.save_checkpoint(run_dir, spec.phase, step, adapter_weights(), optimizer,
                                     {"data": data_state(), "loss": step_loss})
            if interrupt.hit:
                print(f"\n[{spec.phase}] interrupted: checkpoint written at step {step}; continue with --resume")
                result.interrupted = True
                break
    print()
    return result


def _report(spec: LoopSpec, step: int, optimizer, window: dict, peak: int, grad_norm: float) -> dict:
    weight = max(window["weight"], 1e-9)
    seconds = max(window["time"], 1e-9)
    return {
        "phase": spec.phase,
        "step": step,
        "loss": window["loss"] / weight,
        "lr": optimizer.learning_rate.item(),
        "grad_norm": grad_norm,
        "tokens_per_s": window["tokens"] / seconds,
        "peak_memory_gb": peak / 2**30,
        **{key: value / weight for key, value in window["aux"].items()},
    }
