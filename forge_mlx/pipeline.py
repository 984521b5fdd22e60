"""`forge-mlx train`: load, PiSSA-adapt, SFT, then DPO, writing everything into the run directory."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_unflatten

from forge_mlx import checkpoint as ckpt
from forge_mlx import distributed as dist
from forge_mlx import phases, reporting
from forge_mlx.adapter_import import check_layers, merged_weight, read_adapter
from forge_mlx.adapters import adapter_weights, apply_adapters, load_adapter_weights
from forge_mlx.config import Config
from forge_mlx.data.batching import shard
from forge_mlx.errors import ForgeError
from forge_mlx.losses import sft_loss
from forge_mlx.metrics_log import plot_losses
from forge_mlx.models import compute_dtype, load_model, on_gpu
from forge_mlx.quant import cache_dequantized, dequantize_residual, make_residual
from forge_mlx.run_files import (
    ADAPTER_CONFIG,
    FINAL_ADAPTERS,
    INIT_ADAPTERS,
    adapter_metadata,
    phase_done,
    prepare_run_dir,
    real_rows,
)
from forge_mlx.schedule import mlx_schedule
from forge_mlx.train import checkpoint_blocks, train_loop


def quantize_frozen_linears(model: nn.Module, config: Config) -> int:
    """Store the linear layers that carry no adapter in the residual's 4-bit format too (QLoRA keeps the whole
    base in 4 bits); returns how many were converted."""
    a = config.adapter
    if a.residual == "none":
        return 0
    swaps = [
        (
            path,
            make_residual(
                module.weight,
                a.residual,
                bias=module.get("bias"),
                dtype=module.weight.dtype,
                name=path,
                **phases.quant_options(a),
            ),
        )
        for path, module in model.named_modules()
        if type(module) is nn.Linear and ".layers." in f".{path}"
    ]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer; a quantized one packs 32 // bits inputs into each uint32 column."""
    out_dims, columns = module.weight.shape
    return (out_dims, columns * 32 // module.bits) if isinstance(module, nn.QuantizedLinear) else (out_dims, columns)


def merge_imported_adapter(model: nn.Module, path: str, dtype: mx.Dtype, log=print) -> int:
    """Fold a PEFT or mlx-lm LoRA into every layer it touches, targeted or not, so the PiSSA init decomposes
    the merged weights; returns how many layers were merged."""
    imported = read_adapter(path)
    linears = {p: m for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))}
    check_layers(imported, {p: linear_shape(m) for p, m in linears.items()})
    merged = []
    for name, layer in imported.layers.items():
        weight = merged_weight(np.array(dequantize_residual(linears[name])), layer)  # (out, in) fp32
        bias = linears[name].get("bias")
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        linear.weight = mx.array(weight).astype(dtype)
        if bias is not None:
            linear.bias = bias
        merged.append((name, linear))
    model.update_modules(tree_unflatten(merged))
    log(f"  merged {len(merged)} layers of the {imported.kind} adapter {imported.path} into the base weights")
    return len(merged)


def adapt(model: nn.Module, config: Config, log=print) -> dict:
    """PiSSA (or LoRA) adapters on the targets over a quantized residual; only the adapters train."""
    a = config.adapter
    dtype = compute_dtype(config.dtype)
    merged = merge_imported_adapter(model, a.import_adapter, dtype, log) if a.import_adapter else 0
    report = apply_adapters(model, dtype=dtype, **phases.adapter_options(config, log))
    report["imported_layers_merged"] = merged
    report["frozen_linears_quantized"] = quantize_frozen_linears(model, config)
    if a.cpu_dequant_cache and not on_gpu():
        for _, module in model.named_modules():
            cache_dequantized(module)
    model.freeze()
    model.unfreeze(keys=["lora_a", "lora_b"], strict=False)
    return report


def make_optimizer(lr: float, steps: int, warmup: int, min_lr_ratio: float, weight_decay: float) -> optim.AdamW:
    schedule = mlx_schedule(
        peak_lr=lr, total_steps=steps, warmup_steps=min(warmup, steps - 1), min_lr_ratio=min_lr_ratio
    )
    return optim.AdamW(learning_rate=schedule, weight_decay=weight_decay)


def local_rows(batch):
    """This rank's rows of a global batch (all of them on one process), never empty: a rank whose share is only
    filler rows keeps one, whose zero loss mask gives it zero weight."""
    if dist.size() > 1:
        batch = shard(batch, dist.rank(), dist.size())
    return batch, real_rows(batch) or [g * len(batch.example_ids) for g in range(batch.group)]


def sft_arrays(batch) -> tuple[tuple[mx.array, mx.array], int]:
    (tokens, mask), n_tokens = phases.sft_rows(*local_rows(batch))
    return (mx.array(tokens), mx.array(mask)), n_tokens


def sft_loss_fn(chunk_size: int | None):
    return phases.sft_loss_fn(sft_loss, chunk_size)


def resume_point(run_dir: Path, phase: str, model, optimizer, log=print) -> tuple[int, dict | None]:
    """(step, data state) of the newest good checkpoint of `phase`, loaded into model and optimizer."""
    path, record = phases.resume_checkpoint(run_dir, phase, log, dist.is_main())
    if path is None:
        return 0, None
    ckpt.load_into(path, model, optimizer)
    log(f"  resumed {phase} from {path.name} (step {record['step']})")
    return record["step"], record["data"]


def train_backend(model) -> phases.TrainBackend:
    """MLX's optimizer, checkpoint resume and loop for phases.train_phase; rank 0 alone writes the done files."""
    loop = partial(train_loop, adapter_weights=lambda: adapter_weights(model))
    return phases.TrainBackend(make_optimizer, resume_point, loop, write=dist.is_main())


def run_sft(model, tokenizer, config: Config, run_dir: Path, resume: bool, log=print) -> dict:
    sft = phases.sft_phase(config, tokenizer, log)
    loss_fn = sft_loss_fn(config.train.loss_chunk_size)
    return phases.train_phase(
        train_backend(model), model, sft, loss_fn, sft_arrays, sft_arrays, config, run_dir, resume, log
    )


def configure_memory(config: Config) -> None:
    """Wire the model's memory on macOS and cap MLX's buffer cache, so memory does not creep in long runs."""
    if config.memory.cache_limit_gb is not None:
        mx.set_cache_limit(int(config.memory.cache_limit_gb * 2**30))
    if config.memory.wired_limit and on_gpu() and sys.platform == "darwin":
        limit = mx.device_info().get("max_recommended_working_set_size")
        if limit:
            mx.set_wired_limit(int(limit))


def run_training(config: Config, resume: bool = False, log=print) -> dict:
    """The whole job; returns a summary that is also written to RUN/summary.json."""
    if config.backend == "torch":
        from forge_mlx.torch_backend.pipeline import run_training as run_on_torch

        return run_on_torch(config, resume, log)
    if dist.size() > 1 and config.train.batch_size % dist.size():
        raise ForgeError(
            f"train.batch_size {config.train.batch_size} must be a multiple of the {dist.size()} "
            "processes (it is the global batch)",
            where="train.batch_size",
        )
    if dist.is_main():
        prepare_run_dir(config, resume)
        log(f"data parallel over {dist.size()} processes" if dist.size() > 1 else "single process")
    run_dir = Path(config.output_dir)
    if not dist.is_main():
        log = lambda *args: None  # noqa: E731  (rank 0 speaks for the group)
    with reporting.session(config, run_dir, main=dist.is_main()) as outcome:
        summary = train_run(config, run_dir, resume, log)
        outcome.exit_code = reporting.exit_code(summary)
    return summary


def train_run(config: Config, run_dir: Path, resume: bool, log=print) -> dict:
    """Load, adapt, SFT, DPO and the final files, into a prepared run directory."""
    configure_memory(config)
    mx.random.seed(config.seed)
    log(f"loading {config.model}")
    model, tokenizer, model_config = load_model(config.model, config.dtype)
    log(f"adapting ({config.adapter.init}, rank {config.adapter.rank}, residual {config.adapter.residual})")
    report = adapt(model, config, log)
    meta = adapter_metadata(config, report, model_config)
    if dist.is_main() and not (run_dir / INIT_ADAPTERS).exists():
        ckpt.save_arrays(run_dir / INIT_ADAPTERS, adapter_weights(model))
        ckpt.atomic_write_text(run_dir / ADAPTER_CONFIG, json.dumps(meta, indent=1))
    log(f"  {len(report['layers'])} adapted layers, {report['trainable_parameters']:,} trainable parameters")
    if config.train.grad_checkpoint:
        checkpoint_blocks(model)
    summary = {"adapter": meta}
    if config.data.train and not phase_done(run_dir, "sft"):
        summary["sft"] = run_sft(model, tokenizer, config, run_dir, resume, log)
        if summary["sft"]["interrupted"]:
            return summary
    elif phase_done(run_dir, "sft"):
        path, _ = ckpt.latest_good(run_dir, "sft")
        if path is not None:
            load_adapter_weights(model, mx.load(str(path / "adapters.safetensors")))
    if config.dpo.enabled:
        from forge_mlx.dpo import run_dpo

        summary["dpo"] = run_dpo(model, tokenizer, config, run_dir, resume, log)
        if summary["dpo"]["interrupted"]:
            return summary
    if dist.is_main():
        ckpt.save_arrays(run_dir / FINAL_ADAPTERS, adapter_weights(model))
        plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
        ckpt.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1, default=str))
        log(f"done: adapters in {run_dir / FINAL_ADAPTERS}")
    return summary
