"""Timing torch training steps for tools/bench_train.py --backend torch: the pipeline's model, data and step,
with no run directory."""

from __future__ import annotations

import time

import torch

from forge_mlx.config import Config
from forge_mlx.data.batching import BatchStream
from forge_mlx.torch_backend.device import peak_memory_bytes, pick_device, synchronize
from forge_mlx.torch_backend.pipeline import pad_id, prepare_model, sft_loss_fn, sft_splits, sft_tensors
from forge_mlx.torch_backend.train import accumulate, apply_update, make_optimizer


def time_training_steps(
    config: Config, steps: int = 10, warmup: int = 2, device: torch.device | str | None = None, log=print
) -> dict:
    """Tokens/s of `steps` SFT optimizer steps (after `warmup` untimed ones) on `config`, writing nothing.

    For tools/bench_train.py --backend torch; each step is train.grad_accum micro-batches of train.batch_size.
    Returns backend, device, dtype, steps, tokens, seconds, tokens_per_s, peak_memory_gb and the loss of
    every step (warmup included).
    """
    if steps < 1:
        raise ValueError(f"time at least one step, got {steps}")
    device = pick_device(str(device)) if device is not None else None
    model, tokenizer, _, device, _ = prepare_model(config, device, log)
    t = config.train
    train_set, _ = sft_splits(config, tokenizer, log)
    stream = BatchStream(
        train_set.examples,
        t.batch_size,
        seed=config.seed,
        max_seq_length=config.data.max_seq_length,
        pad_id=pad_id(tokenizer),
    )
    batches = (sft_tensors(b, device) for b in stream)
    optimizer = make_optimizer(model, t.lr, warmup + steps, 0, t.min_lr_ratio, t.weight_decay)
    loss_fn = sft_loss_fn(t.loss_chunk_size)
    model.train()
    tokens, losses = 0, []
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            start, tokens = time.perf_counter(), 0
        loss_sum, weight, _, n = accumulate(model, loss_fn, batches, t.grad_accum)
        apply_update(optimizer, max(weight, 1e-9), t.max_grad_norm)
        tokens += n
        losses.append(loss_sum / max(weight, 1e-9))
    synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "backend": "torch",
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype),
        "steps": steps,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_memory_gb": peak_memory_bytes(device) / 2**30,
        "losses": losses,
    }
