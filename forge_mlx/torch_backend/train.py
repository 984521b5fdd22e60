"""One training loop for SFT and DPO in torch, as forge_mlx/train.py: token-weighted gradient accumulation,
clipping, MLX's AdamW, NaN skipping, validation, atomic checkpoints (the MLX layout) and exact resume."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from torch import nn

from forge_mlx.loop_common import Bookkeeping, Interrupt, LoopResult, LoopSpec, bad_step
from forge_mlx.phases import resume_checkpoint
from forge_mlx.run_files import save_numpy_arrays, write_checkpoint
from forge_mlx.schedule import lr_at
from forge_mlx.torch_backend.adapters import adapter_weights, load_adapter_weights
from forge_mlx.torch_backend.device import device_memory_bytes, peak_memory_bytes, rng_state, set_rng_state

# loss_fn(model, *batch) -> (loss, weight, aux): loss is the weighted mean over `weight` units (tokens or
# pairs); aux holds per-batch sums to report (e.g. DPO rewards times pairs).
LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]
Batches = Iterator[tuple[tuple[torch.Tensor, ...], int]]
RNG_PREFIX = "__torch_rng__."


def schedule(peak_lr: float, steps: int, warmup: int, min_lr_ratio: float) -> Callable[[int], float]:
    """lr_at rounded to float32 and flat past the end, as the MLX side's schedule table."""
    warmup = min(warmup, steps - 1)
    lr_at(0, peak_lr=peak_lr, total_steps=steps, warmup_steps=warmup, min_lr_ratio=min_lr_ratio)  # checks
    return lambda step: float(
        np.float32(
            lr_at(
                min(step, steps),
                peak_lr=peak_lr,
                total_steps=steps,
                warmup_steps=warmup,
                min_lr_ratio=min_lr_ratio,
            )
        )
    )


class AdamW:
    """mlx.optimizers.AdamW: decay first, no bias correction; state named as MLX names it (step,
    learning_rate, <param>.m, <param>.v), so optimizer.safetensors has the MLX layout."""

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        lr: Callable[[int], float],
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        self.params, self.lr, self.weight_decay, self.betas, self.eps = params, lr, weight_decay, betas, eps
        self.step, self.learning_rate = 0, 0.0
        self.m = {k: torch.zeros_like(p) for k, p in params.items()}
        self.v = {k: torch.zeros_like(p) for k, p in params.items()}

    @torch.no_grad()
    def update(self, grads: dict[str, torch.Tensor]) -> None:
        """One update with the lr of the updates already applied (the MLX and HF convention)."""
        lr = self.learning_rate = self.lr(self.step)
        self.step += 1
        b1, b2 = self.betas
        for key, param in self.params.items():
            g = grads[key]
            param.mul_(1 - lr * self.weight_decay)
            self.m[key] = b1 * self.m[key] + (1 - b1) * g
            self.v[key] = b2 * self.v[key] + (1 - b2) * g.square()
            param.sub_(lr * self.m[key] / (self.v[key].sqrt() + self.eps))

    def state_arrays(self) -> dict[str, np.ndarray]:
        arrays = {
            "step": np.array(self.step, np.uint64),
            "learning_rate": np.array(self.learning_rate, np.float32),
        }
        for key in self.params:
            arrays[f"{key}.m"], arrays[f"{key}.v"] = to_numpy(self.m[key]), to_numpy(self.v[key])
        return arrays

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.step, self.learning_rate = int(arrays["step"]), float(arrays["learning_rate"])
        for key, param in self.params.items():
            self.m[key] = torch.from_numpy(arrays[f"{key}.m"]).to(param.device, param.dtype)
            self.v[key] = torch.from_numpy(arrays[f"{key}.v"]).to(param.device, param.dtype)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def clip_grad_norm(grads: dict[str, torch.Tensor], max_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """optim.clip_grad_norm: scale by min(max_norm / (norm + 1e-6), 1); max_norm 0 disables clipping."""
    norm = torch.sqrt(sum((g.float().square().sum() for g in grads.values()), torch.zeros(())))
    if max_norm:
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        grads = {k: g * factor for k, g in grads.items()}
    return grads, norm.item()


def accumulate(model: nn.Module, loss_fn: LossFn, batches: Batches, micro_batches: int):
    """Backward `micro_batches` batches, each weighted by its token (or pair) count: .grad holds sum(weight *
    grad). Returns (sum of loss * weight, total weight, aux sums, real tokens)."""
    loss_sum, total_weight, aux_sum, tokens = 0.0, 0.0, {}, 0
    for _ in range(micro_batches):
        batch, real_tokens = next(batches)
        loss, weight, aux = loss_fn(model, *batch)
        (loss * weight).backward()
        w = weight.item()
        total_weight += w
        loss_sum += loss.item() * w
        tokens += real_tokens
        for key, value in aux.items():
            aux_sum[key] = aux_sum.get(key, 0.0) + value.item()
    return loss_sum, total_weight, aux_sum, tokens


def apply_update(optimizer: AdamW, total_weight: float, max_grad_norm: float) -> float:
    """Mean the summed gradients, clip, update; returns the gradient norm before clipping."""
    grads = {
        k: p.grad / total_weight if p.grad is not None else torch.zeros_like(p) for k, p in optimizer.params.items()
    }
    grads, norm = clip_grad_norm(grads, max_grad_norm)
    optimizer.update(grads)
    zero_grads(optimizer)
    return norm


def grads_finite(optimizer: AdamW) -> bool:
    """Every accumulated gradient entry is finite (a finite loss can still overflow in the backward)."""
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in optimizer.params.values())


def zero_grads(optimizer: AdamW) -> None:
    for param in optimizer.params.values():
        param.grad = None


@torch.no_grad()
def evaluate_loss(model: nn.Module, loss_fn: LossFn, batches: list[tuple]) -> tuple[float, dict[str, float]]:
    """Weighted mean loss (and aux sums / weight) over the given batches, without gradients."""
    model.eval()
    total, weight_sum, aux_sum = 0.0, 0.0, {}
    for batch in batches:
        loss, weight, aux = loss_fn(model, *batch)
        total += loss.item() * weight.item()
        weight_sum += weight.item()
        for key, value in aux.items():
            aux_sum[key] = aux_sum.get(key, 0.0) + value.item()
    model.train()
    weight_sum = max(weight_sum, 1.0)
    return total / weight_sum, {k: v / weight_sum for k, v in aux_sum.items()}


def save_checkpoint(
    run_dir: Path,
    phase: str,
    step: int,
    model: nn.Module,
    optimizer: AdamW,
    device: torch.device,
    state: dict,
) -> Path:
    """checkpoints/<phase>-<step>/ as the MLX side writes it; the torch RNGs ride in optimizer.safetensors."""

    def write(folder: Path) -> None:
        save_numpy_arrays(folder / "adapters.safetensors", {k: to_numpy(v) for k, v in adapter_weights(model).items()})
        rng = {RNG_PREFIX + k: v.numpy() for k, v in rng_state(device).items()}
        save_numpy_arrays(folder / "optimizer.safetensors", {**optimizer.state_arrays(), **rng})

    return write_checkpoint(run_dir, phase, step, write, state)


def load_checkpoint(path: Path, model: nn.Module, optimizer: AdamW, device: torch.device) -> None:
    """Restore adapters, optimizer state and the RNGs from a checkpoint folder."""
    load_adapter_weights(model, load_file(str(path / "adapters.safetensors")))
    arrays = load_file(str(path / "optimizer.safetensors"))
    set_rng_state(
        {k[len(RNG_PREFIX) :]: torch.from_numpy(arrays.pop(k)) for k in list(arrays) if k.startswith(RNG_PREFIX)},
        device,
    )
    optimizer.load_state_arrays(arrays)


def train_loop(
    model: nn.Module,
    optimizer: AdamW,
    loss_fn: LossFn,
    batches: Batches,
    spec: LoopSpec,
    run_dir: Path,
    *,
    device: torch.device,
    data_state: Callable[[], dict],
    val_batches: Callable[[], list[tuple]] | None = None,
    start_step: int = 0,
    extra_report: Callable[[], dict] = dict,
) -> LoopResult:
    """Run `spec.steps` optimizer steps from `start_step`; each step is `grad_accum` micro-batches from
    `batches`, which yields (tensors for loss_fn, count of real tokens). Writes the MLX side's metrics and
    checkpoints."""
    book = Bookkeeping(spec, run_dir, start_step, device_memory_bytes(device), extra_report=extra_report)
    model.train()
    with Interrupt() as interrupt:
        step = start_step
        while step < spec.steps:
            tic = time.perf_counter()
            loss_sum, total_weight, aux_sum, tokens = accumulate(model, loss_fn, batches, spec.grad_accum)
            step_loss = loss_sum / max(total_weight, 1e-9)
            what = bad_step(step_loss, total_weight, grads_finite(optimizer))
            if what:
                zero_grads(optimizer)
            if book.skipped(step, step_loss, what):
                continue
            grad_norm = apply_update(optimizer, total_weight, spec.max_grad_norm)
            step += 1
            seconds = time.perf_counter() - tic
            book.stepped(step, step_loss, loss_sum, total_weight, tokens, seconds, aux_sum, peak_memory_bytes(device))
            if book.due(step, spec.steps_per_report):
                book.report(step, optimizer.learning_rate, grad_norm)
            if val_batches and spec.val_batches and book.due(step, spec.steps_per_eval):
                book.validated(step, *evaluate_loss(model, loss_fn, val_batches()))
            if book.due(step, spec.save_every) or interrupt.hit:
                record = {"data": data_state(), "loss": step_loss}
                save_checkpoint(run_dir, spec.phase, step, model, optimizer, device, record)
            if interrupt.hit:
                book.interrupted(step)
                break
    return book.finished()


def make_optimizer(
    model: nn.Module, lr: float, steps: int, warmup: int, min_lr_ratio: float, weight_decay: float
) -> AdamW:
    """AdamW over the adapter factors with the shared warmup + cosine schedule."""
    return AdamW(dict(adapter_weights(model)), schedule(lr, steps, warmup, min_lr_ratio), weight_decay)


def resume_point(
    run_dir: Path, phase: str, model: nn.Module, optimizer: AdamW, log=print, *, device: torch.device
) -> tuple[int, dict | None]:
    """(step, data state) of the newest good checkpoint of `phase`, loaded into model and optimizer."""
    path, record = resume_checkpoint(run_dir, phase, log)
    if path is None:
        return 0, None
    load_checkpoint(path, model, optimizer, device)
    log(f"  resumed {phase} from {path.name} (step {record['step']})")
    return record["step"], record["data"]
