"""One training loop for SFT and DPO (mlx-lm style): compiled step, token-weighted gradient accumulation,
gradient checkpointing, clipping, NaN skipping, validation, atomic checkpoints and exact resume."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from forge_mlx import checkpoint as ckpt
from forge_mlx import distributed as dist
from forge_mlx.loop_common import Bookkeeping, Interrupt, LoopResult, LoopSpec, bad_step
from forge_mlx.metrics_log import MetricsLog  # noqa: F401  (tests patch MetricsLog.write through this module)
from forge_mlx.models import device_memory_bytes

# loss_fn(model, *batch) -> (loss, weight, aux): loss is the weighted mean over `weight` units (tokens or pairs);
# aux holds per-batch sums to report (e.g. DPO rewards times pairs).
LossFn = Callable[..., tuple[mx.array, mx.array, dict[str, mx.array]]]


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


def make_step(
    model: nn.Module, optimizer: optim.Optimizer, loss_fn: LossFn, max_grad_norm: float, compile_micro: bool = True
):
    """Micro-step (adds weight * grad to the running sum) and compiled update (mean, clip, AdamW).

    The micro-step is compiled unless `compile_micro` is False: under a chunked loss, mx.compile's graph
    simplification keeps every chunk's logits alive until the backward (chunk 64 at seq 1024: 528 MB compiled vs
    320 MB eager, docs/BENCHMARKS.md section 9), which is the memory chunking exists to save.
    """
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    def micro(grad_sum, *batch):
        (loss, weight, aux), grad = loss_and_grad(model, *batch)
        grad = tree_map(lambda g: g * weight, grad)
        if grad_sum is not None:
            grad = tree_map(mx.add, grad, grad_sum)
        return loss, weight, aux, grad

    if compile_micro:
        micro = mx.compile(micro, inputs=state, outputs=state)

    @partial(mx.compile, inputs=state, outputs=state)
    def update(grad_sum, total_weight):
        # data parallel: each rank holds the weighted sum over its rows; total_weight is already global
        grad = tree_map(lambda g: g / total_weight, tree_map(dist.all_sum, grad_sum))
        grad, norm = optim.clip_grad_norm(grad, max_grad_norm or float("inf"))
        optimizer.update(model, grad)
        return norm

    return micro, update, state


@mx.compile
def all_finite(tree) -> mx.array:
    """True when every gradient entry is finite (a scalar bool; cheap: adapters only)."""
    return mx.array([mx.isfinite(g).all() for _, g in tree_flatten(tree)]).all()


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
    main = dist.is_main()  # data parallel: rank 0 alone writes metrics, checkpoints and progress
    book = Bookkeeping(spec, run_dir, start_step, device_memory_bytes(), main=main, extra_report=extra_report)
    micro, update, state = make_step(model, optimizer, loss_fn, spec.max_grad_norm, spec.compile_step)
    model.train()
    with Interrupt() as interrupt:
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
            grads_ok = float(all_finite(grad_sum).item())
            loss_sum, total_weight, tokens, stop, ranks_grads_ok, *aux_values = dist.sum_floats(
                loss_sum, total_weight, tokens, float(interrupt.hit), grads_ok, *aux_sum.values()
            )
            aux_sum = dict(zip(aux_sum, aux_values))
            step_loss = loss_sum / max(total_weight, 1e-9)
            if book.skipped(step, step_loss, bad_step(step_loss, total_weight, ranks_grads_ok >= dist.size())):
                continue
            grad_norm = update(grad_sum, mx.array(total_weight, mx.float32))
            mx.eval(state, grad_norm)
            step += 1
            seconds = time.perf_counter() - tic
            book.stepped(step, step_loss, loss_sum, total_weight, tokens, seconds, aux_sum, mx.get_peak_memory())
            if book.due(step, spec.steps_per_report):
                book.report(step, optimizer.learning_rate.item(), grad_norm.item())
            if val_batches and spec.val_batches and book.due(step, spec.steps_per_eval):
                book.validated(step, *evaluate_loss(model, loss_fn, val_batches()))
                model.train()
            if main and (book.due(step, spec.save_every) or stop):
                record = {"data": data_state(), "loss": step_loss}
                ckpt.save_checkpoint(run_dir, spec.phase, step, adapter_weights(), optimizer, record)
            if stop:
                book.interrupted(step)
                break
    return book.finished()
