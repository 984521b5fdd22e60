"""`forge-mlx train`: load, PiSSA-adapt, SFT, then DPO, writing everything into the run directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_unflatten

from forge_mlx import checkpoint as ckpt
from forge_mlx import distributed as dist
from forge_mlx.adapter_import import check_layers, merged_weight, read_adapter
from forge_mlx.adapters import adapter_weights, apply_adapters, load_adapter_weights
from forge_mlx.config import Config
from forge_mlx.data.batching import BatchStream, eval_batches, shard
from forge_mlx.data.jsonl import load_split
from forge_mlx.data.sft import encode_sft_split
from forge_mlx.errors import ForgeError
from forge_mlx.losses import sft_loss
from forge_mlx.metrics_log import drop_metrics_after, plot_losses
from forge_mlx.models import compute_dtype, load_model, on_gpu
from forge_mlx.quant import cache_dequantized, dequantize_residual, make_residual
from forge_mlx.run_files import (
    ADAPTER_CONFIG,
    FINAL_ADAPTERS,
    INIT_ADAPTERS,
    adapter_metadata,
    phase_done,
    phase_steps,
    prepare_run_dir,
    real_rows,
)
from forge_mlx.schedule import mlx_schedule
from forge_mlx.train import LoopSpec, checkpoint_blocks, train_loop


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
                group_size=a.group_size,
                bits=a.bits,
                blocksize=a.blocksize,
                double_quant=a.double_quant,
                dtype=module.weight.dtype,
                name=path,
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
    done = {"n": 0}

    def progress(path: str, entry: dict) -> None:
        done["n"] += 1
        if done["n"] == 1 or done["n"] % 10 == 0:
            log(f"  init {done['n']} layers ({path}: {entry['seconds']:.2f} s)")

    dtype = compute_dtype(config.dtype)
    merged = merge_imported_adapter(model, a.import_adapter, dtype, log) if a.import_adapter else 0
    report = apply_adapters(
        model,
        targets=a.targets,
        rank=a.rank,
        alpha=a.alpha,
        init=a.init,
        residual=a.residual,
        rank_pattern=a.rank_pattern,
        seed=config.seed,
        on_layer=progress,
        qpissa_iters=a.qpissa_iters,
        group_size=a.group_size,
        bits=a.bits,
        blocksize=a.blocksize,
        double_quant=a.double_quant,
        dtype=dtype,
        dropout=a.dropout,
    )
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
    batch, rows = local_rows(batch)
    return (mx.array(batch.tokens[rows]), mx.array(batch.loss_mask[rows])), int(batch.lengths[rows].sum())


def sft_loss_fn(chunk_size: int | None):
    def loss_fn(model, tokens, mask):
        loss, n_tokens = sft_loss(model, tokens, mask, chunk_size=chunk_size)
        return loss, n_tokens, {}

    return loss_fn


def resume_point(run_dir: Path, phase: str, model, optimizer, log=print) -> tuple[int, dict | None]:
    """(step, data state) of the newest good checkpoint of `phase`, loaded into model and optimizer."""
    bad = [p for p in ckpt.list_checkpoints(run_dir, phase) if ckpt.verify(p) is None]
    for path in bad:
        log(f"  checkpoint {path.name} is incomplete or corrupted (checksum); using an earlier one")
    path, record = ckpt.latest_good(run_dir, phase)
    if path is None:
        return 0, None
    ckpt.load_into(path, model, optimizer)
    if dist.is_main():
        drop_metrics_after(Path(run_dir) / "metrics.jsonl", phase, record["step"])
    log(f"  resumed {phase} from {path.name} (step {record['step']})")
    return record["step"], record["data"]


def run_sft(model, tokenizer, config: Config, run_dir: Path, resume: bool, log=print) -> dict:
    d, t = config.data, config.train
    train_set = encode_sft_split(
        load_split(d.train, "train", kind="sft"),
        tokenizer,
        max_seq_length=d.max_seq_length,
        overlong=d.overlong,
        mask_prompt=d.mask_prompt,
        supervise=d.supervise,
    )
    valid_source = d.valid or (d.train if Path(d.train).is_dir() else None)
    valid_data = load_split(valid_source, "valid", kind="sft", required=d.valid is not None) if valid_source else None
    valid_set = (
        encode_sft_split(
            valid_data,
            tokenizer,
            max_seq_length=d.max_seq_length,
            overlong=d.overlong,
            mask_prompt=d.mask_prompt,
            supervise=d.supervise,
        )
        if valid_data
        else None
    )
    log(
        f"SFT data: {len(train_set.examples)} examples (truncated {train_set.truncated}, dropped "
        f"{train_set.dropped_overlong} over max_seq_length, {train_set.dropped_no_target} with no target)"
        + (f", valid {len(valid_set.examples)}" if valid_set else "")
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stream = BatchStream(
        train_set.examples, t.batch_size, seed=config.seed, max_seq_length=d.max_seq_length, pad_id=pad
    )
    steps = phase_steps(stream.batches_per_epoch, t.grad_accum, t.steps, t.epochs)
    optimizer = make_optimizer(t.lr, steps, t.warmup_steps, t.min_lr_ratio, t.weight_decay)
    start, data_state = resume_point(run_dir, "sft", model, optimizer, log) if resume else (0, None)
    if data_state:
        stream = BatchStream.from_state(train_set.examples, data_state, pad_id=pad)
    val = None
    if valid_set and valid_set.examples and t.val_batches:
        val_list = [sft_arrays(b)[0] for b in eval_batches(valid_set.examples, t.batch_size, pad_id=pad)]
        val = lambda: val_list[: t.val_batches]  # noqa: E731
    spec = LoopSpec(
        "sft",
        steps,
        t.grad_accum,
        t.max_grad_norm,
        t.steps_per_report,
        t.steps_per_eval,
        t.save_every,
        t.max_bad_steps,
        t.val_batches,
        config.memory.alert_threshold,
    )
    result = train_loop(
        model,
        optimizer,
        sft_loss_fn(t.loss_chunk_size),
        (sft_arrays(b) for b in stream),
        spec,
        run_dir,
        adapter_weights=lambda: adapter_weights(model),
        data_state=stream.state,
        val_batches=val,
        start_step=start,
        extra_report=lambda: {"padding_fraction": stream.padding_fraction},
    )
    summary = {
        "steps": result.steps_done,
        "final_loss": result.last_loss,
        "interrupted": result.interrupted,
        "padding_fraction": stream.padding_fraction,
        "examples": len(train_set.examples),
        "truncated": train_set.truncated,
        "dropped": train_set.dropped_overlong,
    }
    if not result.interrupted and dist.is_main():
        ckpt.atomic_write_text(run_dir / "sft_done.json", json.dumps(summary, indent=1))
    return summary


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
